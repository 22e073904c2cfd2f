"""`clinisynth up` with CLINISYNTH_TLS_CERT / _KEY: the stack probes its services over TLS, the
SDK and `status` find it and speak TLS without flags, `down` leaves nothing; and an `up` that
cannot succeed (probes that cannot verify the services) fails and leaves no process behind.

The certificates are made here (self-signed, for localhost / 127.0.0.1) with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stack_helpers import cli, no_process_left, stack_logs

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_up_generate_down_with_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path / "tls", "localhost")
    home = tmp_path / "home"
    env = {
        **os.environ,
        "CLINISYNTH_HOME": str(home),
        "CLINISYNTH_TLS_CERT": str(cert),
        "CLINISYNTH_TLS_KEY": str(key),
    }
    try:
        up = cli(env, "up", "--detach", "--wait", "500")
        assert up.returncode == 0, up.stdout + up.stderr + stack_logs(home)
        info = json.loads(up.stdout)
        assert info["tls"] is True and Path(info["ca_cert"]) == cert.resolve()

        # The SDK finds the stack and speaks TLS without being told (a user's shell has no
        # TLS variables, only CLINISYNTH_HOME).
        user_env = {k: v for k, v in env.items() if not k.startswith("CLINISYNTH_TLS")}
        status = cli(user_env, "status", "--json", timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert set(json.loads(status.stdout)["health"].values()) == {"SERVING"}
        code = (
            "import clinisynth\n"
            "with clinisynth.Client() as c:\n"
            "    r = c.generate('cells', class_name='neutrophil', n=2, steps=4, seed=1)\n"
            "    print(len(r.images))\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", code], env=user_env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0 and run.stdout.strip() == "2", run.stdout + run.stderr

        # Plaintext is refused: the services serve TLS only.
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(info["generator"]) as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        down = cli(env, "down")
    assert down.returncode == 0, down.stderr
    left = no_process_left(home)
    assert not left, f"processes left after `down`: {left}"


def test_failed_up_leaves_no_process(tmp_path: Path) -> None:
    """The services serve one certificate, the probes trust another: `up` cannot succeed."""
    cert, key = _self_signed(tmp_path / "tls", "localhost")
    other, _ = _self_signed(tmp_path / "other", "someone-else")
    home = tmp_path / "home"
    env = {
        **os.environ,
        "CLINISYNTH_HOME": str(home),
        "CLINISYNTH_TLS_CERT": str(cert),
        "CLINISYNTH_TLS_KEY": str(key),
        "CLINISYNTH_TLS_CA": str(other),
    }
    started = time.monotonic()
    up = cli(env, "up", "--detach", "--wait", "150")
    elapsed = time.monotonic() - started
    assert up.returncode != 0, up.stdout
    # the first probe that reaches a service fails its handshake: `up` says why and gives up
    assert "TLS verification failed" in up.stderr, up.stderr
    assert elapsed < 150 + 45, elapsed  # gives up on time, cleanup included
    left = no_process_left(home, within_s=5.0)
    assert not left, f"processes left by a failed `up`: {left}"
    assert not (home / "stack.json").exists()
