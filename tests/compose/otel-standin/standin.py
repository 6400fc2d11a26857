"""A stand-in for the OpenTelemetry collector in the compose stack's test,
where no image can be pulled: it takes OTLP/gRPC trace exports on :4317 and
prints, once each, the service.name of every resource it is sent. (The
compose file's collector is the real one; this only takes its place.)"""
import re
import sys
import threading
from concurrent import futures

import grpc

SERVICE_NAME = re.compile(rb"\x0a\x0cservice\.name\x12.\x0a(.)", re.S)
seen = set()
# Exports arrive on several threads at once. print() writes the text and the
# newline separately, so two threads could run their lines together
# ("...=tallytraces from ..."): one lock, one write per line.
lock = threading.Lock()


def export(request, context):
    for m in SERVICE_NAME.finditer(request):
        start = m.end()
        name = request[start:start + m.group(1)[0]].decode(errors="replace")
        with lock:
            if name in seen:
                continue
            seen.add(name)
            sys.stdout.write(f"traces from service.name={name}\n")
            sys.stdout.flush()
    return b""  # an empty ExportTraceServiceResponse


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((
    grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)},
    ),
))
server.add_insecure_port("0.0.0.0:4317")
server.start()
print("otel stand-in listening on :4317 (args ignored: %s)" % " ".join(sys.argv[1:]), flush=True)
server.wait_for_termination()
