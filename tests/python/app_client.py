#!/usr/bin/env python3
"""An independent client for a chipsite user gateway, written from docs/protocol.md alone.

Subcommands (each prints exactly one JSON object on stdout):

  enroll --ticket T --chip-id ID --state FILE
      0  {"enrolled": true, "chip_id": "..."}   (the site's result; state saved, mode 0600)
      2  {"enrolled": false}                     (the site closed without a byte)
      3  server key check failed (stderr: "server key does not match the ticket")
      4  {"error": {...}}                        (the site answered with a JSON-RPC error)
  call --state FILE METHOD [--params JSON]
      0  the `result` object
      4  {"error": {...}}      (JSON-RPC error, including an admission refusal with id null)
      5  {"closed": {...}}     (a `closed` notification arrived before the response)
      3  server key check failed
  follow --state FILE --count N --timeout SECONDS
      0  {"alarms": [params, ...]}                       (N alarms received)
      5  {"alarms": [...], "closed": {...}}              (`closed` notification, or
                                                          {"eof": true} if the connection ended)
      5  {"alarms": [...], "timeout": true}
      4  {"error": {...}}                                (admission refused / subscribe failed)
      3  server key check failed

Any other failure (bad arguments, bad ticket, network, protocol violation): exit 1, or 64
for a command-line usage error, with one line on stderr and nothing on stdout.
The token and the private key are never printed.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
import sys
import tempfile
import time
import urllib.parse

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

MAX_FRAME = 65536           # bytes, not counting the line end (section 2)
CONNECT_TIMEOUT = 10.0      # connect + TLS handshake
RESPONSE_TIMEOUT = 30.0     # per response
KEEPALIVE_INTERVAL = 240.0  # the site closes connections idle for 300 s (section 2)

EXIT_FAIL = 1
EXIT_NOT_ENROLLED = 2
EXIT_SERVER_KEY = 3
EXIT_RPC_ERROR = 4
EXIT_CLOSED = 5
EXIT_USAGE = 64

_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


class Failure(Exception):
    """A failure reported as one line on stderr with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


class ProtocolError(Failure):
    pass


# ---------------------------------------------------------------------------
# Encoding helpers (section 5)


def b64url_decode(text: str, what: str) -> bytes:
    if not isinstance(text, str) or not text or not _B64URL.match(text) or len(text) % 4 == 1:
        raise Failure(f"{what} is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pin_of(spki_der: bytes) -> str:
    return "sha256//" + base64.b64encode(hashlib.sha256(spki_der).digest()).decode("ascii")


def load_site_key(site_key_b64: str) -> ec.EllipticCurvePublicKey:
    der = b64url_decode(site_key_b64, "site key")
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise Failure("site key is not a SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise Failure("site key is not a P-256 key")
    return key


# ---------------------------------------------------------------------------
# Tickets (section 6)


def parse_ticket(text: str) -> dict:
    """Returns {"host", "port", "token", "site_key"}; never echoes the ticket in errors."""
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            raise Failure("ticket is not valid JSON") from None
        if not isinstance(obj, dict) or obj.get("kind") != "user":
            raise Failure('ticket JSON is not a user ticket ("kind" must be "user")')
        host, port, token, key = obj.get("host"), obj.get("port"), obj.get("token"), obj.get("site_key")
        pin = obj.get("pin")
    elif text.startswith("chipsite:"):
        rest = text[len("chipsite:"):]
        kind, sep, query = rest.partition("?")
        if kind != "user" or not sep:
            raise Failure("ticket URI is not a user ticket (chipsite:user?...)")
        fields: dict[str, str] = {}
        for part in query.split("&"):
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq:
                raise Failure("ticket URI has a field without a value")
            name = urllib.parse.unquote(name)
            if name in fields:
                raise Failure(f"ticket URI repeats field {name!r}")
            fields[name] = urllib.parse.unquote(value)
        host, port, token, key = fields.get("h"), fields.get("p"), fields.get("t"), fields.get("k")
        pin = None
        if port is not None:
            if not port.isdigit():
                raise Failure("ticket port is not a number")
            port = int(port)
    else:
        raise Failure("ticket is neither a chipsite:user URI nor ticket JSON")

    if not isinstance(host, str) or not host:
        raise Failure("ticket has no host")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise Failure("ticket has no valid port")
    if not isinstance(token, str) or not token or not _B64URL.match(token):
        raise Failure("ticket has no valid token")
    if not isinstance(key, str):
        raise Failure("ticket has no site key")
    spki = b64url_decode(key, "ticket site key")
    load_site_key(key)
    if pin is not None and pin != pin_of(spki):
        raise Failure("ticket pin does not match its site key")
    return {"host": host, "port": port, "token": token, "site_key": key}


# ---------------------------------------------------------------------------
# Connections (sections 1, 2, 7)


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def verify_server(ssock: ssl.SSLSocket, site_key: ec.EllipticCurvePublicKey) -> bool:
    """Section 7, checks 1 and 2 (check 3 is the completed handshake)."""
    if ssock.version() != "TLSv1.3":
        return False
    der = ssock.getpeercert(binary_form=True)
    if not der:
        return False
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    if leaf.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        return False
    try:
        site_key.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    now = _utcnow()
    return leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc


def make_context(client_pem: bytes | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we verify the leaf against the pinned site key ourselves
    if client_pem is not None:
        # ssl can load a certificate only from a file: use a private temporary one, removed at once.
        fd, path = tempfile.mkstemp(prefix="chipsite-client-", suffix=".pem")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(client_pem)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
    return ctx


class Connection:
    """One TLS connection carrying JSON-RPC frames (one JSON object per line)."""

    def __init__(self, host: str, port: int, site_key: ec.EllipticCurvePublicKey,
                 mismatch_message: str, client_pem: bytes | None = None):
        ctx = make_context(client_pem)
        try:
            raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise Failure(f"cannot connect to {_hostport(host, port)}: {_oserr(e)}") from None
        try:
            raw.settimeout(CONNECT_TIMEOUT)
            sni = None if _is_ip(host) else host
            self.sock = ctx.wrap_socket(raw, server_hostname=sni)
        except (OSError, ssl.SSLError) as e:
            raw.close()
            raise Failure(f"TLS handshake with {_hostport(host, port)} failed: {_oserr(e)}") from None
        # Nothing has been sent yet (beyond the handshake): check the server first.
        if not verify_server(self.sock, site_key):
            self.abort()
            raise Failure(mismatch_message, EXIT_SERVER_KEY)
        self.buf = bytearray()
        self.eof = False
        self.received_any = False

    # -- writing

    def send(self, obj: dict) -> None:
        line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(line) > MAX_FRAME:
            raise Failure(f"request is longer than {MAX_FRAME} bytes")
        self.sock.settimeout(RESPONSE_TIMEOUT)
        try:
            self.sock.sendall(line + b"\n")
        except (OSError, ssl.SSLError) as e:
            raise Failure(f"sending failed: {_oserr(e)}") from None

    # -- reading

    def read_frame(self, deadline: float) -> dict | None:
        """The next frame as a JSON object, or None at end of stream.

        Raises TimeoutError when the deadline passes, ProtocolError on a bad frame.
        """
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > MAX_FRAME:
                    raise ProtocolError(f"server frame longer than {MAX_FRAME} bytes")
                try:
                    obj = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise ProtocolError("server sent a frame that is not JSON") from None
                if not isinstance(obj, dict):
                    raise ProtocolError("server sent a frame that is not a JSON object")
                return obj
            if len(self.buf) > MAX_FRAME + 1:  # + 1 for a possible '\r'
                raise ProtocolError(f"server frame longer than {MAX_FRAME} bytes")
            if self.eof:
                if self.buf:
                    raise ProtocolError("connection closed in the middle of a frame")
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            except (socket.timeout, TimeoutError):
                raise TimeoutError from None
            except ConnectionResetError:
                # Treat a reset like an end of stream: what already arrived stays valid.
                data = b""
            except (OSError, ssl.SSLError) as e:
                raise Failure(f"receiving failed: {_oserr(e)}") from None
            if data:
                self.received_any = True
                self.buf += data
            else:
                self.eof = True

    def close(self) -> None:
        try:
            self.sock.settimeout(1.0)
            self.sock.unwrap()  # close_notify
        except (OSError, ssl.SSLError, ValueError):
            pass
        self.abort()

    def abort(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _oserr(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    text = str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__


def _is_response(obj: dict, want_id) -> bool:
    return "method" not in obj and ("result" in obj or "error" in obj) and obj.get("id") == want_id


def _error_obj(obj: dict) -> dict:
    err = obj.get("error")
    return err if isinstance(err, dict) else {"code": None, "message": repr(err)}


# ---------------------------------------------------------------------------
# State


def save_state(path: str, state: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".chipsite-state-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        os.chmod(path, 0o600)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_state(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except OSError as e:
        raise Failure(f"cannot read state file: {e.strerror}") from None
    except json.JSONDecodeError:
        raise Failure("state file is not JSON") from None
    for name in ("chip_id", "host", "port", "site_key", "private_key_pem"):
        if name not in state:
            raise Failure(f"state file has no {name!r}")
    return state


def client_cert_pem(state: dict) -> bytes:
    """Section 9: a self-signed certificate of the enrolled key, CN = CHIP ID."""
    try:
        key = serialization.load_pem_private_key(state["private_key_pem"].encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise Failure("state file holds no usable private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise Failure("state file key is not a P-256 key")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, state["chip_id"])])
    now = _utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM) + key_pem


def open_session(state: dict) -> Connection:
    site_key = load_site_key(state["site_key"])
    return Connection(state["host"], int(state["port"]), site_key,
                      "server key does not match the saved site key", client_cert_pem(state))


# ---------------------------------------------------------------------------
# Commands


def cmd_enroll(args) -> tuple[dict, int]:
    ticket = parse_ticket(args.ticket)
    if not args.chip_id:
        raise Failure("--chip-id must not be empty")
    site_key = load_site_key(ticket["site_key"])
    app_key = ec.generate_private_key(ec.SECP256R1())
    app_spki = app_key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    conn = Connection(ticket["host"], ticket["port"], site_key, "server key does not match the ticket")
    try:
        conn.send({"jsonrpc": "2.0", "id": 1, "method": "enroll",
                   "params": {"token": ticket["token"], "chip_id": args.chip_id,
                              "public_key": b64url_encode(app_spki)}})
        try:
            reply = conn.read_frame(time.monotonic() + RESPONSE_TIMEOUT)
        except TimeoutError:
            raise Failure("no answer to enroll within 30 s") from None
    finally:
        conn.close()

    if reply is None:
        return {"enrolled": False}, EXIT_NOT_ENROLLED
    if "error" in reply:
        return {"error": _error_obj(reply)}, EXIT_RPC_ERROR
    result = reply.get("result")
    if reply.get("id") != 1 or not isinstance(result, dict):
        raise ProtocolError("unexpected answer to enroll")
    if result.get("enrolled") is not True:
        return result, EXIT_NOT_ENROLLED
    if result.get("chip_id", args.chip_id) != args.chip_id:
        raise ProtocolError("the site enrolled another CHIP ID")
    save_state(args.state, {
        "chip_id": args.chip_id,
        "host": ticket["host"],
        "port": ticket["port"],
        "site_key": ticket["site_key"],
        "private_key_pem": app_key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()).decode("ascii"),
    })
    return result, 0


def _await_response(conn: Connection, want_id, deadline: float, alarms: list | None = None):
    """Reads until the response to want_id. Returns (kind, payload):
    ("result", obj) | ("error", err) | ("closed", params) | ("eof", None)."""
    while True:
        obj = conn.read_frame(deadline)
        if obj is None:
            return "eof", None
        if "method" in obj and "id" not in obj:
            method, params = obj.get("method"), obj.get("params")
            if method == "closed":
                return "closed", params if isinstance(params, dict) else {}
            if method == "alarm" and alarms is not None:
                alarms.append(params)
            continue
        if "error" in obj and (obj.get("id") == want_id or obj.get("id") is None):
            return "error", _error_obj(obj)
        if _is_response(obj, want_id):
            return "result", obj.get("result")
        # a response to some other id (e.g. a keepalive): ignore


def _parse_params(text: str | None):
    if text is None:
        return None
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        raise Failure("--params is not JSON") from None
    if not isinstance(params, (dict, list)):
        raise Failure("--params must be a JSON object or array")
    return params


def cmd_call(args) -> tuple[dict, int]:
    params = _parse_params(args.params)
    state = load_state(args.state)
    conn = open_session(state)
    try:
        request = {"jsonrpc": "2.0", "id": 1, "method": args.method}
        if params is not None:
            request["params"] = params
        try:
            conn.send(request)
        except Failure:
            # The site may have refused the session and closed already: look for its error frame.
            pass
        try:
            kind, payload = _await_response(conn, 1, time.monotonic() + RESPONSE_TIMEOUT)
        except TimeoutError:
            raise Failure("no response within 30 s") from None
    finally:
        conn.close()
    if kind == "result":
        return (payload if isinstance(payload, dict) else {"result": payload}), 0
    if kind == "error":
        return {"error": payload}, EXIT_RPC_ERROR
    if kind == "closed":
        return {"closed": payload}, EXIT_CLOSED
    raise Failure("the site closed the session without answering")


def cmd_follow(args) -> tuple[dict, int]:
    if args.count < 0:
        raise Failure("--count must not be negative")
    if args.timeout <= 0:
        raise Failure("--timeout must be positive")
    state = load_state(args.state)
    conn = open_session(state)
    alarms: list = []
    try:
        try:
            conn.send({"jsonrpc": "2.0", "id": 1, "method": "alarms.subscribe"})
        except Failure:
            pass
        try:
            kind, payload = _await_response(conn, 1, time.monotonic() + RESPONSE_TIMEOUT, alarms)
        except TimeoutError:
            raise Failure("no answer to alarms.subscribe within 30 s") from None
        if kind == "error":
            return {"error": payload}, EXIT_RPC_ERROR
        if kind == "closed":
            return {"alarms": alarms[: args.count], "closed": payload}, EXIT_CLOSED
        if kind == "eof":
            return {"alarms": alarms[: args.count], "closed": {"eof": True}}, EXIT_CLOSED
        if not (isinstance(payload, dict) and payload.get("subscribed") is True):
            raise ProtocolError("alarms.subscribe did not answer {\"subscribed\": true}")

        deadline = time.monotonic() + args.timeout
        next_keepalive = time.monotonic() + KEEPALIVE_INTERVAL
        next_id = 2
        while len(alarms) < args.count:
            now = time.monotonic()
            if now >= deadline:
                return {"alarms": alarms, "timeout": True}, EXIT_CLOSED
            if now >= next_keepalive:
                # The site closes a connection that sends nothing for 300 s.
                conn.send({"jsonrpc": "2.0", "id": next_id, "method": "status"})
                next_id += 1
                next_keepalive = now + KEEPALIVE_INTERVAL
            try:
                obj = conn.read_frame(min(deadline, next_keepalive))
            except TimeoutError:
                continue
            if obj is None:
                return {"alarms": alarms, "closed": {"eof": True}}, EXIT_CLOSED
            if "id" in obj:
                if "error" in obj and obj.get("id") is None:
                    return {"alarms": alarms, "error": _error_obj(obj)}, EXIT_RPC_ERROR
                continue  # keepalive responses
            if obj.get("method") == "closed":
                params = obj.get("params")
                return {"alarms": alarms, "closed": params if isinstance(params, dict) else {}}, EXIT_CLOSED
            if obj.get("method") == "alarm":
                alarms.append(obj.get("params"))
        return {"alarms": alarms[: args.count]}, 0
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, and an exit code that no result uses
        sys.stderr.write(f"{self.prog}: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="app_client.py", description="chipsite user gateway client (docs/protocol.md)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("enroll", help="enroll with a user ticket")
    e.add_argument("--ticket", required=True, help="chipsite:user?... URI or ticket JSON")
    e.add_argument("--chip-id", required=True)
    e.add_argument("--state", required=True, help="where to save the enrolled state (mode 0600)")
    e.set_defaults(func=cmd_enroll)

    c = sub.add_parser("call", help="open a session and call one method")
    c.add_argument("--state", required=True)
    c.add_argument("method")
    c.add_argument("--params", help="JSON object (or array) of parameters")
    c.set_defaults(func=cmd_call)

    f = sub.add_parser("follow", help="subscribe to alarms and print the first N")
    f.add_argument("--state", required=True)
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--timeout", type=float, required=True, help="seconds to wait for the alarms")
    f.set_defaults(func=cmd_follow)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result, code = args.func(args)
    except Failure as e:
        sys.stderr.write(f"app_client.py: {e}\n")
        return e.code
    except KeyboardInterrupt:
        sys.stderr.write("app_client.py: interrupted\n")
        return 130
    except Exception as e:  # keep the one-line contract; never echo secrets
        sys.stderr.write(f"app_client.py: unexpected {type(e).__name__}\n")
        return EXIT_FAIL
    sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
