#!/usr/bin/env python3
"""gRPC health probe for clinisynth containers: `clinisynth-healthcheck SERVICE`.

Why it exists: compose HEALTHCHECKs need a command inside the image, and Kubernetes' native gRPC
probes cannot speak TLS, so a TLS-enabled deployment probes with this instead. It asks the
service's `grpc.health.v1.Health/Check` on localhost and exits 0 only for SERVING.

It reads the same environment as the service: CLINISYNTH_<SERVICE>_PORT (default per service),
CLINISYNTH_TLS_CERT (TLS on; the certificate is also the trust root unless CLINISYNTH_TLS_CA names
one), CLINISYNTH_HEALTHCHECK_TLS_NAME (the name to check the certificate against, default
localhost) and CLINISYNTH_AUTH_TOKENS (the first token is sent as a bearer token, in case the
health service is not exempt from auth). When the service verifies client certificates
(CLINISYNTH_TLS_CLIENT_CA set), the probe presents CLINISYNTH_HEALTHCHECK_TLS_CERT / _KEY, by
default the service's own certificate and key (which then needs the "client auth" usage and an
issuer in the client CA bundle). Only grpcio and grpcio-health-checking are needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

DEFAULT_PORTS: dict[str, int] = {
    "generator": 50051,
    "reward": 50052,
    "counterfactual": 50053,
    "finetune": 50054,
}


def resolve_port(service: str, env: Mapping[str, str]) -> int:
    """The port the service listens on, from its env var or the documented default."""
    raw = env.get(f"CLINISYNTH_{service.upper()}_PORT", "").strip()
    return int(raw) if raw else DEFAULT_PORTS[service]


def check(
    port: int, env: Mapping[str, str], timeout: float, host: str = "localhost", name: str = ""
) -> str:
    """Returns the health status name (SERVING, NOT_SERVING, ...) or raises grpc.RpcError."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{host}:{port}"
    cert_path = env.get("CLINISYNTH_TLS_CERT", "").strip()
    if cert_path:
        ca_path = env.get("CLINISYNTH_TLS_CA", "").strip() or cert_path
        with open(ca_path, "rb") as f:
            roots = f.read()
        chain = key = None
        if env.get("CLINISYNTH_TLS_CLIENT_CA", "").strip():  # mTLS: no handshake without one
            chain_path = env.get("CLINISYNTH_HEALTHCHECK_TLS_CERT", "").strip() or cert_path
            key_path = (
                env.get("CLINISYNTH_HEALTHCHECK_TLS_KEY", "").strip()
                or env.get("CLINISYNTH_TLS_KEY", "").strip()
            )
            with open(chain_path, "rb") as f_chain, open(key_path, "rb") as f_key:
                chain, key = f_chain.read(), f_key.read()
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots, private_key=key, certificate_chain=chain
        )
        tls_name = env.get("CLINISYNTH_HEALTHCHECK_TLS_NAME", "").strip() or "localhost"
        channel = grpc.secure_channel(
            target, creds, options=[("grpc.ssl_target_name_override", tls_name)]
        )
    else:
        channel = grpc.insecure_channel(target)
    tokens = [t.strip() for t in env.get("CLINISYNTH_AUTH_TOKENS", "").split(",") if t.strip()]
    metadata = [("authorization", f"Bearer {tokens[0]}")] if tokens else None
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=name), timeout=timeout, metadata=metadata
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Probe a clinisynth service's grpc.health.v1.")
    parser.add_argument("service", choices=sorted(DEFAULT_PORTS))
    parser.add_argument("--port", type=int, help="override CLINISYNTH_<SERVICE>_PORT")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    parser.add_argument(
        "--health-service", default="", help="service name to ask about ('' = whole server)"
    )
    args = parser.parse_args(argv)
    env = os.environ
    port = args.port or resolve_port(args.service, env)
    try:
        status = check(port, env, args.timeout, host=args.host, name=args.health_service)
    except Exception as exc:  # any failure to get an answer means unhealthy
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(
            f"{args.service} on {args.host}:{port}: unhealthy ({type(exc).__name__}: {details})",
            file=sys.stderr,
        )
        return 1
    print(f"{args.service} on {args.host}:{port}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
