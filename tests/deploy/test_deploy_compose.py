"""The compose stack parses, every long-running service has a health check, start order waits on
health, data lives in named volumes, no secret is written into the file, and Triton takes no call
but health without the key the services read from a compose secret file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from deploy_helpers import DEPLOY, require, run
from triton_lockdown import assert_locked_down, effective_command

COMPOSE = DEPLOY / "compose"
ONE_SHOT = {"minio-init"}  # runs to completion; others wait on service_completed_successfully
APP = ("generator", "reward", "counterfactual", "finetune")


def _compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


def test_every_long_running_service_has_a_healthcheck() -> None:
    services = _compose()["services"]
    assert set(services) == {"minio", "minio-init", "triton", *APP, "prometheus", "grafana"}
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc["restart"] == "no"
            continue
        check = svc["healthcheck"]
        assert check["test"][0] == "CMD" and check["interval"] and check["retries"], name
    for name in APP:
        assert services[name]["healthcheck"]["test"] == ["CMD", "clinisynth-healthcheck", name]


def test_start_order_waits_on_health() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond["condition"] == expected, f"{name} -> {dep}"
    for name in APP:
        assert set(services[name]["depends_on"]) == {"minio-init", "triton"}


def test_state_lives_in_named_volumes() -> None:
    doc = _compose()
    volumes = set(doc["volumes"])
    assert volumes == {"minio-data", "finetune-scratch", "prometheus-data", "grafana-data"}
    mounts = {m.split(":")[0] for svc in doc["services"].values() for m in svc.get("volumes", [])}
    assert volumes <= mounts


def test_no_secret_values_in_compose_files() -> None:
    """Every secret-looking variable is interpolated from .env, never written in."""
    secretish = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|TOKENS?)\b")
    for path in (COMPOSE / "compose.yaml", COMPOSE / "compose.gpu.yaml"):
        for svc in yaml.safe_load(path.read_text())["services"].values():
            env = svc.get("environment", {})
            for key, value in env.items():
                if secretish.search(key):
                    assert str(value).startswith("${"), f"{path.name}: {key} has a literal value"
    assert (COMPOSE / ".gitignore").read_text().split() == [".env", "secrets/"]


def test_env_example_names_every_required_variable() -> None:
    text = (COMPOSE / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = dict(
        line.split("=", 1)
        for line in (COMPOSE / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required <= set(example), sorted(required - set(example))
    assert all("change-me" in example[k] for k in required if "PASSWORD" in k or "SECRET" in k)


def test_prometheus_and_grafana_mount_the_repository_config() -> None:
    services = _compose()["services"]
    prom = services["prometheus"]["volumes"]
    assert "../prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom
    assert "../prometheus/rules:/etc/prometheus/rules:ro" in prom
    for mount in services["grafana"]["volumes"]:
        source = mount.split(":")[0]
        if source.startswith("."):
            assert (COMPOSE / source).resolve().is_dir(), mount
    targets = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    static = [
        t
        for job in targets["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    for name, port in zip(APP, (9101, 9102, 9103, 9104), strict=True):
        assert f"{name}:{port}" in static
        env = services[name]["environment"]
        assert env[f"CLINISYNTH_{name.upper()}_METRICS_PORT"] == str(port)
    assert "triton:8002" in static


def test_docker_compose_validates_the_files(tmp_path: Path) -> None:
    """docker-compose's own schema check and interpolation, with .env.example as the .env."""
    binary = require("docker-compose")
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        args = [binary, "--env-file", str(COMPOSE / ".env.example")]
        for f in files:
            args += ["-f", str(COMPOSE / f)]
        out = yaml.safe_load(run([*args, "config"], cwd=tmp_path))
        assert out["services"]["generator"]["environment"]["CLINISYNTH_TRITON_URL"] == "triton:8001"
        assert "environment" not in out["services"]["triton"]
    gpu = out["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_minio_init_script_is_posix_sh() -> None:
    script = COMPOSE / "minio-init.sh"
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n") and "set -eu" in text
    assert "mc mb --ignore-existing" in text  # idempotent
    sh = shutil.which("dash") or shutil.which("sh")
    if sh:
        run([sh, "-n", str(script)])


# --- Triton's restricted protocols (issue #14) -------------------------------------------------

TRITON_KEY_SECRET = "clinisynth-triton-key"
S3_OVERRIDE = COMPOSE / "compose.s3-models.yaml"


def _secret_file(doc: dict[str, Any], service: str, path: str) -> str | None:
    """The compose secret ``path`` is, when it is one that ``service`` mounts, else None."""
    name = path.removeprefix("/run/secrets/")
    mounted = {
        s if isinstance(s, str) else s["source"]
        for s in doc["services"][service].get("secrets", [])
    }
    if path.startswith("/run/secrets/") and name in mounted and "file" in doc["secrets"][name]:
        return name
    return None


def _triton_env_is_clean(triton: dict[str, Any]) -> None:
    from clinisynth_server.triton.launcher import _ENV_SECRET

    env = triton.get("environment", {})
    env = env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
    assert not [k for k in env if _ENV_SECRET.search(k) or k.startswith("AWS_")], env
    assert "env_file" not in triton


def test_triton_restricts_every_group_but_health_with_the_key_secret(tmp_path: Path) -> None:
    doc = _compose()
    triton = doc["services"]["triton"]
    assert "entrypoint" not in triton, "the image's entrypoint must run (it adds the flags)"
    key_path = f"/run/secrets/{TRITON_KEY_SECRET}"
    assert f"--restricted-key-file={key_path}" in triton["command"]
    # a file the operator makes in the git-ignored secrets/ folder, never a value in the repo
    assert doc["secrets"][TRITON_KEY_SECRET] == {"file": "./secrets/triton.key"}
    command, _, values = effective_command(
        triton["command"], lambda p: _secret_file(doc, "triton", p), tmp_path
    )
    assert_locked_down(command, values[key_path])


def test_every_service_reads_the_triton_key_from_the_compose_secret() -> None:
    doc = _compose()
    for name in APP:
        env = doc["services"][name]["environment"]
        assert _secret_file(doc, name, env["CLINISYNTH_TRITON_KEY_FILE"]) == TRITON_KEY_SECRET
        # no variable of any service carries the key itself
        assert not [k for k in env if "TRITON_KEY" in k and k != "CLINISYNTH_TRITON_KEY_FILE"]


def test_triton_gets_no_token_or_credential_in_its_environment(tmp_path: Path) -> None:
    """Neither the services' tokens nor any store key; with the S3 override Triton reads the
    repository with its own read-only user, from secret files turned into a 0600 file."""
    doc = _compose()
    _triton_env_is_clean(doc["services"]["triton"])
    override = yaml.safe_load(S3_OVERRIDE.read_text())
    merged = {
        "services": {"triton": {**doc["services"]["triton"], **override["services"]["triton"]}},
        "secrets": {**doc["secrets"], **override["secrets"]},
    }
    triton = merged["services"]["triton"]
    _triton_env_is_clean(triton)
    assert any(a.startswith("--model-repository=s3://") for a in triton["command"])
    command, env, values = effective_command(
        triton["command"], lambda p: _secret_file(merged, "triton", p), tmp_path
    )
    assert_locked_down(command, values[f"/run/secrets/{TRITON_KEY_SECRET}"])
    creds = Path(env["TRITON_CLOUD_CREDENTIAL_PATH"]).read_text()
    assert values["/run/secrets/triton-store-secret-key"] in creds
    assert set(override["services"]["minio-init"]["secrets"]) == {
        "triton-store-access-key",
        "triton-store-secret-key",
    }
    assert "clinisynth-models-ro" in (COMPOSE / "minio-init.sh").read_text()


def test_docker_compose_validates_the_s3_models_override(tmp_path: Path) -> None:
    binary = require("docker-compose")
    args = [
        binary,
        "--env-file",
        str(COMPOSE / ".env.example"),
        "-f",
        str(COMPOSE / "compose.yaml"),
    ]
    out = yaml.safe_load(run([*args, "-f", str(S3_OVERRIDE), "config"], cwd=tmp_path))
    triton = out["services"]["triton"]
    assert "environment" not in triton
    assert {s["source"] for s in triton["secrets"]} == {
        TRITON_KEY_SECRET,
        "triton-store-access-key",
        "triton-store-secret-key",
    }
