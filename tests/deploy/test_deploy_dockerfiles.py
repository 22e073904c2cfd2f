"""Dockerfiles: multi-stage, non-root final stage, no compilers in it, the agreed entrypoint, and
only files the .dockerignore lets into the build context."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from deploy_helpers import DEPLOY
from triton_lockdown import assert_locked_down, effective_command

DOCKER = DEPLOY / "docker"
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|cargo|rustc)\b")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins, args in _instructions(path):
        if ins == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((ins, args))
    return stages


def test_services_image() -> None:
    path = DOCKER / "services.Dockerfile"
    stages = _stages(path)
    assert len(stages) >= 2, "multi-stage build"
    final = stages[-1]
    final_text = "\n".join(f"{i} {a}" for i, a in final)
    assert not COMPILERS.search(final_text), "compilers in the final stage"
    assert "pip install" not in final_text, "the final stage copies a built venv instead"
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    entry = [a for i, a in final if i == "ENTRYPOINT"][-1]
    assert "clinisynth-serve" in entry
    assert [a for i, a in final if i == "CMD"][-1] == '["generator"]'
    build_text = "\n".join(a for i, a in stages[0])
    assert (
        "torch==${TORCH_VERSION}" in build_text and "ARG TORCH_VERSION=2.13.0" in path.read_text()
    )
    assert "--index-url" in build_text, "torch from its own (CPU by default) index"
    assert "'.[server]'" in build_text or '".[server]"' in build_text
    assert any(i == "COPY" and "--from=build" in a for i, a in final)


def test_triton_image() -> None:
    path = DOCKER / "triton.Dockerfile"
    text = path.read_text()
    stages = _stages(path)
    assert len(stages) >= 2
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3" in text
    final_text = "\n".join(f"{i} {a}" for i, a in stages[-1])
    for pkg in ("torch==", "diffusers==", "transformers==", "safetensors==", '"numpy<2"'):
        assert pkg in final_text, pkg
    assert "--no-deps /wheels/*.whl" in final_text, "the clinisynth package itself"
    users = [a for i, a in stages[-1] if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    cmd = [a for i, a in stages[-1] if i == "CMD"][-1]
    assert "--model-control-mode=explicit" in cmd and "--load-model=*" in cmd
    assert "EXPOSE 8000 8001 8002" in final_text


def test_triton_image_starts_triton_restricted_by_default(tmp_path: Path) -> None:
    """The image runs tritonserver through deploy/docker/triton-entrypoint.py, and its default
    CMD (a plain `docker run` with the key secret mounted) restricts every group but health."""
    final = _stages(DOCKER / "triton.Dockerfile")[-1]
    entry = json.loads([a for i, a in final if i == "ENTRYPOINT"][-1])
    assert entry[0] == "/opt/clinisynth/bin/python", "the venv with clinisynth_server in it"
    copies = [a.split() for i, a in final if i == "COPY" and "--from=" not in a]
    assert any(c[-2:] == ["deploy/docker/triton-entrypoint.py", entry[1]] for c in copies)
    cmd = json.loads([a for i, a in final if i == "CMD"][-1])
    key_path = "/run/secrets/clinisynth-triton-key"
    assert f"--restricted-key-file={key_path}" in cmd
    command, _, values = effective_command(
        cmd, lambda p: "clinisynth-triton-key" if p == key_path else None, tmp_path
    )
    assert_locked_down(command, values[key_path])


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for these files: last match wins, ! re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        if (
            fnmatch.fnmatch(rel, pat)
            or fnmatch.fnmatch(rel, pat.rstrip("*").rstrip("/") + "/*")
            or rel == pat
        ):
            ignored = not negate
    return ignored


def test_copied_deploy_paths_exist_and_pass_the_dockerignore() -> None:
    repo = DEPLOY.parent
    for name in ("services.Dockerfile", "triton.Dockerfile"):
        ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
        patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
        for ins, args in _instructions(DOCKER / name):
            if ins != "COPY" or "--from=" in args:
                continue
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert not _ignored(src, patterns), f"{name}: {src} is excluded by .dockerignore"
                if src.startswith("deploy/"):
                    assert (repo / src).exists(), f"{name}: COPY {src} does not exist"
