"""TLS is on by default in deploy/: the prod overlay has cert-manager issue the services'
certificate and every service mounts it, serves with it and probes through it; compose mounts
the dev CA's certificate (make-dev-certs.sh) into every service; no private key is written into
any manifest. The dev certificates are checked with `cryptography` and `openssl verify`, then
served by a real reward service: gRPC and the review page over TLS, the image's health probe
verifying them, plaintext refused."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from deploy_helpers import DEPLOY, OVERLAYS, by_kind, render, require, run
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = ("generator", "reward", "counterfactual", "finetune")
COMPOSE = DEPLOY / "compose"
SCRIPT = COMPOSE / "make-dev-certs.sh"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
TLS_VARS = ("CLINISYNTH_TLS_CERT", "CLINISYNTH_TLS_KEY", "CLINISYNTH_TLS_CA")
CERT_MANAGER_KINDS = {"Certificate", "Issuer", "ClusterIssuer"}  # CRDs: no schema to check
K8S_VERSION = "1.32.0"  # the kubectl this suite renders with


def _pod(deploy: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = deploy["spec"]["template"]["spec"]
    return pod


def _container(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in _pod(deploy)["containers"] if c["name"] == name]
    return c


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _secret_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> str | None:
    """``secret/key`` when ``path`` is a file of a Secret the container mounts read-only."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        folder = m["mountPath"].rstrip("/") + "/"
        secret = volumes[m["name"]].get("secret")
        if secret and m.get("readOnly") and path.startswith(folder):
            return f"{secret['secretName']}/{path[len(folder) :]}"
    return None


# --- Kubernetes ---------------------------------------------------------------------------------


def _certificate() -> dict[str, Any]:
    (cert,) = by_kind(render("prod"), "Certificate").values()
    return cert


def test_prod_overlay_has_cert_manager_issue_the_services_certificate() -> None:
    cert = _certificate()
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert cert["metadata"]["namespace"] == "clinisynth"
    spec = cert["spec"]
    # an issuer the operator names (documented), of cert-manager's own kinds
    ref = spec["issuerRef"]
    assert ref["kind"] in ("Issuer", "ClusterIssuer") and ref["name"]
    assert ref.get("group", "cert-manager.io") == "cert-manager.io"
    # renewed well before it expires, with a new key each time
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    hours = {k: int(spec[k].removesuffix("h")) for k in ("duration", "renewBefore")}
    assert 0 < hours["renewBefore"] < hours["duration"]
    assert "server auth" in spec["usages"]
    # every name a client in the cluster dials, for every service
    names = set(spec["dnsNames"])
    for svc in SERVICES:
        for suffix in ("", ".clinisynth", ".clinisynth.svc", ".clinisynth.svc.cluster.local"):
            assert svc + suffix in names, svc + suffix
    # the overlay only asks for the Secret; cert-manager writes it
    assert spec["secretName"] not in by_kind(render("prod"), "Secret")


def test_every_prod_service_serves_and_probes_with_the_mounted_certificate() -> None:
    objs = render("prod")
    secret = _certificate()["spec"]["secretName"]
    names = set(_certificate()["spec"]["dnsNames"])
    deployments = by_kind(objs, "Deployment")
    for name in SERVICES:
        d = deployments[name]
        pod, c = _pod(d), _container(d, name)
        env = _env(c)
        files = {var: env.get(var) for var in TLS_VARS}
        assert all(isinstance(v, str) for v in files.values()), f"{name}: {files}"
        assert {var: _secret_file(pod, c, str(p)) for var, p in files.items()} == {
            "CLINISYNTH_TLS_CERT": f"{secret}/tls.crt",
            "CLINISYNTH_TLS_KEY": f"{secret}/tls.key",
            "CLINISYNTH_TLS_CA": f"{secret}/ca.crt",
        }, name
        (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret]
        assert volume["secret"]["defaultMode"] & 0o007 == 0, f"{name}: key readable by others"
        # kubelet's gRPC probe cannot speak TLS: the image's probe, checking the name it is for
        assert env["CLINISYNTH_HEALTHCHECK_TLS_NAME"] == name and name in names
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in c[probe], f"{name}.{probe}"
            assert c[probe]["exec"]["command"] == ["clinisynth-healthcheck", name]
            assert c[probe]["timeoutSeconds"] >= 3
        # renewals are re-read from the mounted files: nothing rolls the pods
        assert "secret.reloader.stakater.com/reload" not in d["metadata"].get("annotations", {})
        # Prometheus keeps scraping the plain HTTP metrics port
        metrics = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
        assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(
            metrics
        )
    for name, svc in by_kind(objs, "Service").items():
        if name in SERVICES:  # TLS, not cleartext HTTP/2, on the gRPC port
            (grpc_port,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
            assert grpc_port.get("appProtocol") != "kubernetes.io/h2c", name
    (page,) = [p for p in by_kind(objs, "Service")["reward"]["spec"]["ports"] if p["port"] == 8080]
    assert page["appProtocol"] == "https"  # the review page serves the same certificate


def test_only_the_services_mount_the_tls_secret() -> None:
    """Triton and training workers get no key of the services' certificate."""
    secret = _certificate()["spec"]["secretName"]
    mounted = {
        name
        for name, d in by_kind(render("prod"), "Deployment").items()
        if any(v.get("secret", {}).get("secretName") == secret for v in _pod(d)["volumes"])
    }
    assert mounted == set(SERVICES)
    job = (DEPLOY / "k8s" / "overlays" / "prod" / "job-template.gpu.yaml").read_text()
    assert secret not in job


def test_dev_overlay_stays_plaintext_with_native_grpc_probes() -> None:
    """The documented choice: dev needs no cert-manager; prod is TLS (components/tls)."""
    objs = render("dev")
    assert not [o for o in objs if o["kind"] in CERT_MANAGER_KINDS]
    for name in SERVICES:
        c = _container(by_kind(objs, "Deployment")[name], name)
        assert not set(TLS_VARS) & set(_env(c)), name
        assert "grpc" in c["readinessProbe"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates_against_the_kubernetes_schema(overlay: str) -> None:
    import kubernetes_validate

    skipped = set()
    for doc in render(overlay):
        if doc["kind"] in CERT_MANAGER_KINDS:
            skipped.add(doc["kind"])
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {where}")
    assert skipped == ({"Certificate"} if overlay == "prod" else set())


PRIVATE_KEY = "PRIVATE KEY-----"


def _deploy_texts() -> dict[str, str]:
    """Every manifest and compose file in the repository (not the git-ignored secrets/)."""
    texts = {}
    for path in sorted((DEPLOY / "k8s").rglob("*")) + sorted(COMPOSE.rglob("*")):
        if path.is_file() and "secrets" not in path.relative_to(DEPLOY).parts:
            texts[str(path.relative_to(DEPLOY))] = path.read_text(errors="replace")
    return texts


def test_no_private_key_literal_anywhere_in_the_manifests() -> None:
    texts = _deploy_texts()
    assert "k8s/overlays/prod/certificate.yaml" in texts and "compose/compose.yaml" in texts
    for name, text in texts.items():
        assert PRIVATE_KEY not in text, name
        assert "tls.key:" not in text.replace(" ", ""), name  # a Secret's data key, inlined
    for overlay in OVERLAYS:
        for obj in render(overlay):
            rendered = yaml.safe_dump(obj)
            assert PRIVATE_KEY not in rendered, obj["metadata"]["name"]
            if obj["kind"] == "Secret":
                for value in (obj.get("data") or {}).values():
                    assert PRIVATE_KEY not in base64.b64decode(value).decode(errors="replace")


# --- Compose ------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return doc


def _compose_secret(doc: dict[str, Any], service: str, path: str) -> str | None:
    """The file behind compose secret ``path`` when ``service`` mounts it."""
    name = path.removeprefix("/run/secrets/")
    mounted = {
        s if isinstance(s, str) else s["source"]
        for s in doc["services"][service].get("secrets", [])
    }
    if path.startswith("/run/secrets/") and name in mounted:
        return str(doc["secrets"][name]["file"])
    return None


def test_every_compose_service_has_the_tls_variables_and_the_certificate_secrets() -> None:
    doc = _compose()
    for name in SERVICES:
        env = doc["services"][name]["environment"]
        files = {var: _compose_secret(doc, name, env[var]) for var in TLS_VARS}
        assert files == {
            "CLINISYNTH_TLS_CERT": "./secrets/tls/tls.crt",
            "CLINISYNTH_TLS_KEY": "./secrets/tls/tls.key",
            "CLINISYNTH_TLS_CA": "./secrets/tls/ca.crt",
        }, name
        # the health check is the image's probe: it reads the same variables (TLS, CA)
        assert doc["services"][name]["healthcheck"]["test"][1] == "clinisynth-healthcheck"
    # the dev CA's own key is never mounted into anything
    assert not [s for s, v in doc["secrets"].items() if v.get("file", "").endswith("ca.key")]
    for name, svc in doc["services"].items():
        if name not in SERVICES:
            assert not [s for s in svc.get("secrets", []) if "tls" in str(s)], name


def test_docker_compose_config_keeps_the_tls_settings(tmp_path: Path) -> None:
    binary = require("docker-compose")
    args = [
        binary,
        "--env-file",
        str(COMPOSE / ".env.example"),
        "-f",
        str(COMPOSE / "compose.yaml"),
    ]
    out = yaml.safe_load(run([*args, "config"], cwd=tmp_path))
    for name in SERVICES:
        svc = out["services"][name]
        assert svc["environment"]["CLINISYNTH_TLS_CERT"] == "/run/secrets/clinisynth-tls-cert"
        assert {s["source"] for s in svc["secrets"]} >= {
            "clinisynth-tls-cert",
            "clinisynth-tls-key",
            "clinisynth-tls-ca",
        }
    assert Path(out["secrets"]["clinisynth-tls-key"]["file"]) == COMPOSE / "secrets/tls/tls.key"


# --- the dev certificates -----------------------------------------------------------------------


def _make_certs(out: Path, *names: str) -> subprocess.CompletedProcess[str]:
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh and shutil.which("openssl"), "sh and openssl are needed"
    return subprocess.run(
        [sh, str(SCRIPT), "--out", str(out), *names], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compose") / "secrets" / "tls"
    proc = _make_certs(out, "clinisynth.hospital.example", "10.20.30.40")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_dev_cert_script_is_posix_sh() -> None:
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n") and "set -eu" in text
    sh = shutil.which("dash") or shutil.which("sh")
    if sh:
        run([sh, "-n", str(SCRIPT)])


def test_dev_certificate_chains_to_the_dev_ca_and_names_every_service(dev_certs: Path) -> None:
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    ca = x509.load_pem_x509_certificate((dev_certs / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((dev_certs / "tls.crt").read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(sans.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert {*SERVICES, "localhost", "clinisynth.hospital.example"} <= dns
    assert {"127.0.0.1", "10.20.30.40"} <= ips
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # a server certificate for each compose service name (the name clients and probes check)
    for name in [*SERVICES, "localhost"]:
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName(name))
        verifier.verify(leaf, [])
    verifier = (
        PolicyBuilder()
        .store(Store([ca]))
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    verifier.verify(leaf, [])
    # and openssl agrees
    run(["openssl", "verify", "-CAfile", str(dev_certs / "ca.crt"), str(dev_certs / "tls.crt")])
    from cryptography.x509.verification import VerificationError

    with pytest.raises(VerificationError, match="subjectAltName"):
        PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("triton")).verify(
            leaf, []
        )


def test_dev_certificate_files_modes(dev_certs: Path) -> None:
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in dev_certs.iterdir()}
    assert modes == {"ca.crt": 0o444, "ca.key": 0o400, "tls.crt": 0o444, "tls.key": 0o444}
    # the key is readable by the containers' user only because nobody else can enter the folder
    assert stat.S_IMODE(dev_certs.stat().st_mode) == 0o700
    assert stat.S_IMODE(dev_certs.parent.stat().st_mode) == 0o700


def test_running_the_script_again_rotates_the_service_key_and_keeps_the_ca(tmp_path: Path) -> None:
    out = tmp_path / "secrets" / "tls"
    assert _make_certs(out).returncode == 0
    before = {n: (out / n).read_bytes() for n in ("ca.crt", "ca.key", "tls.crt", "tls.key")}
    again = _make_certs(out)
    assert again.returncode == 0, again.stderr
    after = {n: (out / n).read_bytes() for n in before}
    assert after["ca.crt"] == before["ca.crt"] and after["ca.key"] == before["ca.key"]
    assert after["tls.key"] != before["tls.key"] and after["tls.crt"] != before["tls.crt"]
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "tls.crt")])


# --- the dev certificates served by a real service ----------------------------------------------


def _health(address: str, credentials: grpc.ChannelCredentials | None, name: str = "") -> str:
    options = [("grpc.ssl_target_name_override", name)] if name else []
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_reward_serves_grpc_and_the_review_page_over_tls_with_the_dev_certificate(
    dev_certs: Path, start_reward: Callable[..., tuple[Any, str]]
) -> None:
    cert, key, ca = (str(dev_certs / n) for n in ("tls.crt", "tls.key", "ca.crt"))
    running, url = start_reward(tls_cert=cert, tls_key=key)
    port = int(running.address.rsplit(":", 1)[1])
    address = f"127.0.0.1:{port}"
    creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
    # as a compose neighbour dials it (service name) and as the health probe does (localhost)
    assert _health(address, creds, "reward") == "SERVING"
    assert _health(address, creds, "localhost") == "SERVING"
    with pytest.raises(grpc.RpcError):
        _health(address, None)  # TLS only
    with pytest.raises(grpc.RpcError):  # a name the certificate does not carry
        _health(address, creds, "triton")

    # the image's probe, with the environment compose gives the service
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLINISYNTH_")}
    probe_env = {
        **clean,
        "CLINISYNTH_REWARD_PORT": str(port),
        "CLINISYNTH_TLS_CERT": cert,
        "CLINISYNTH_TLS_KEY": key,
        "CLINISYNTH_TLS_CA": ca,
    }
    probe = [sys.executable, str(HEALTHCHECK), "reward", "--host", "127.0.0.1"]
    proc = subprocess.run(probe, env=probe_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "SERVING" in proc.stdout, proc.stdout + proc.stderr
    # ... which fails when the certificate is not from the CA it trusts
    other = _make_certs(dev_certs.parent.parent / "other" / "tls")
    assert other.returncode == 0, other.stderr
    wrong = {**probe_env, "CLINISYNTH_TLS_CA": str(dev_certs.parent.parent / "other/tls/ca.crt")}
    proc = subprocess.run(probe, env=wrong, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr

    # the review page: HTTPS with the same certificate, verified against the dev CA
    assert url.startswith("https://")
    web_port = int(url.split(":")[2].split("/")[0])
    context = ssl.create_default_context(cafile=ca)
    with urllib.request.urlopen(f"https://localhost:{web_port}/review", context=context) as r:
        assert r.status == 200 and b"<html" in r.read().lower()
        assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
    with pytest.raises(urllib.error.URLError) as refused:  # not trusted without the dev CA
        urllib.request.urlopen(
            f"https://localhost:{web_port}/review", context=ssl.create_default_context()
        )
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError), refused.value
    # plain HTTP gets no page: the handshake fails and the connection is closed
    with socket.create_connection(("127.0.0.1", web_port), timeout=10) as s:
        s.sendall(b"GET /review HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert b"<html" not in s.recv(65536).lower()
    # a failed handshake does not stop the page from serving the next client
    with urllib.request.urlopen(f"https://localhost:{web_port}/review", context=context) as r:
        assert r.status == 200


def test_sdk_and_cli_trust_a_remote_stacks_ca(
    dev_certs: Path,
    start_reward: Callable[..., tuple[Any, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """$CLINISYNTH_TLS_CA (SDK) / --ca-file (CLI) name the CA of a stack the client did not
    start; without it the dev certificate is not trusted."""
    import clinisynth
    from clinisynth.cli import main as cli_main

    cert, key, ca = (str(dev_certs / n) for n in ("tls.crt", "tls.key", "ca.crt"))
    running, _url = start_reward(tls_cert=cert, tls_key=key)
    address = f"localhost:{running.address.rsplit(':', 1)[1]}"
    monkeypatch.delenv("CLINISYNTH_TLS_CA", raising=False)
    with (
        clinisynth.Client(endpoints={"reward": address}, tls=True, retries=0, timeout=10) as c,
        pytest.raises(clinisynth.ClinisynthError),
    ):
        c.feedback.list()  # the system's roots do not know the dev CA
    monkeypatch.setenv("CLINISYNTH_TLS_CA", ca)
    with clinisynth.Client(endpoints={"reward": address}, retries=0, timeout=10) as c:
        assert c.feedback.list() == []
    monkeypatch.delenv("CLINISYNTH_TLS_CA")
    monkeypatch.setenv("CLINISYNTH_REWARD_ADDRESS", address)
    monkeypatch.setenv("CLINISYNTH_HOME", str(dev_certs.parent.parent / "home"))
    assert cli_main(["--ca-file", ca, "feedback", "list", "--json"]) == 0
    out = capsys.readouterr().out  # after the service's own "REVIEW <url>" line
    assert json.loads(out[out.index("[") :]) == [], out
