#!/usr/bin/env python3
"""Generic gRPC client for the chipsite admin API, "grpcurl-style".

Knows nothing about chipsite's protos: it lists services through server
reflection (v1alpha), builds message classes from the reflected descriptors
and calls AdminService over mutual TLS. Then it checks that a non-admin
identity (user-gateway) is refused.

Usage:
    python3 tests/python/reflection_client.py --endpoints <data-dir>/endpoints.json [--chip-id pyclient]

Deps: see requirements.txt next to this file (grpcio, grpcio-reflection, protobuf).
"""

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

ADMIN_SERVICE = "chipsite.admin.v1.AdminService"
HEALTH_SERVICE = "grpc.health.v1.Health"
# DNS SAN of the admin server certificate; we dial 127.0.0.1:<port>.
TARGET_NAME = "admin.chipsite.internal"
TIMEOUT = 10.0


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def connect(address, ca_path, cert_path, key_path):
    """A channel to `address` over mutual TLS, presenting cert/key."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_path).read_bytes(),
        private_key=Path(key_path).read_bytes(),
        certificate_chain=Path(cert_path).read_bytes(),
    )
    channel = grpc.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", TARGET_NAME)]
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    except grpc.FutureTimeoutError:
        raise CheckFailed(
            f"could not connect to {address} over mutual TLS as {cert_path} "
            f"(server down, wrong CA, or TLS handshake rejected)"
        )
    return channel


def unary(channel, pool, service, method, request_fields):
    """Call service/method with a request built from a dict; returns the response message."""
    method_desc = pool.FindServiceByName(service).methods_by_name[method]
    request_cls = message_factory.GetMessageClass(method_desc.input_type)
    response_cls = message_factory.GetMessageClass(method_desc.output_type)
    call = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    return call(json_format.ParseDict(request_fields, request_cls()), timeout=TIMEOUT)


def to_json(message):
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def run(endpoints, chip_id):
    address, ca = endpoints["admin"], endpoints["ca"]
    pki = Path(endpoints["data_dir"]) / "pki"

    # 1. Reflection over mTLS as admin-client.
    admin = connect(address, ca, endpoints["admin_client_cert"], endpoints["admin_client_key"])
    reflection_db = ProtoReflectionDescriptorDatabase(admin)
    services = sorted(reflection_db.get_services())
    print("services (reflection v1alpha):")
    for name in services:
        print(f"  {name}")
    for wanted in (ADMIN_SERVICE, HEALTH_SERVICE):
        check(wanted in services, f"reflection does not list {wanted}")

    # 2. Message classes from the reflected descriptors only.
    pool = descriptor_pool.DescriptorPool(reflection_db)
    admin_desc = pool.FindServiceByName(ADMIN_SERVICE)
    print(f"{ADMIN_SERVICE}: {len(admin_desc.methods)} methods, "
          f"from {admin_desc.file.name}")

    status = unary(admin, pool, ADMIN_SERVICE, "GetVaultStatus", {})
    print("GetVaultStatus ->")
    print(to_json(status))

    name = "Python Client"
    try:
        created = unary(admin, pool, ADMIN_SERVICE, "CreateUser",
                        {"chip_id": chip_id, "name": name})
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.ALREADY_EXISTS:
            raise CheckFailed(f"user {chip_id!r} already exists on this site; "
                              f"pass a fresh --chip-id")
        raise
    print("CreateUser ->")
    print(to_json(created))
    check(created.chip_id == chip_id, f"CreateUser returned chip_id {created.chip_id!r}")

    fetched = unary(admin, pool, ADMIN_SERVICE, "GetUser", {"chip_id": chip_id})
    print("GetUser ->")
    print(to_json(fetched))
    check(fetched.chip_id == chip_id and fetched.name == name,
          f"GetUser returned chip_id={fetched.chip_id!r} name={fetched.name!r}, "
          f"expected {chip_id!r} / {name!r}")
    admin.close()

    # 3. Another identity must be refused (messages still come from the pool
    #    built above: user-gateway may not use reflection itself).
    gateway = connect(address, ca, pki / "user-gateway.pem", pki / "user-gateway.key")
    try:
        unary(gateway, pool, ADMIN_SERVICE, "CreateUser",
              {"chip_id": f"{chip_id}-gw", "name": "Should Not Exist"})
    except grpc.RpcError as err:
        check(err.code() == grpc.StatusCode.PERMISSION_DENIED,
              f"user-gateway CreateUser failed with {err.code().name} "
              f"({err.details()}), expected PERMISSION_DENIED")
        print(f"CreateUser as user-gateway -> {err.code().name}: {err.details()}")
    else:
        raise CheckFailed("user-gateway was allowed to call AdminService/CreateUser")
    finally:
        gateway.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", required=True, help="path to <data-dir>/endpoints.json")
    parser.add_argument("--chip-id", default="pyclient", help="CHIP ID of the user to create")
    args = parser.parse_args()

    try:
        endpoints = json.loads(Path(args.endpoints).read_text())
        run(endpoints, args.chip_id)
    except CheckFailed as err:
        print(f"reflection client: FAILED: {err}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"reflection client: FAILED: RPC error {err.code().name}: {err.details()}",
              file=sys.stderr)
        return 1
    except (OSError, KeyError, ValueError) as err:
        print(f"reflection client: FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print("reflection client: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
