"""Shared by the deploy checks of Triton's lock-down: the Triton image's entrypoint, Triton's own
list of protocol groups, the command the entrypoint would exec for a manifest's arguments, and the
assertion that such a command restricts every group but ``health`` with the services' header.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from types import ModuleType

from deploy_helpers import DEPLOY

ENTRYPOINT = DEPLOY / "docker" / "triton-entrypoint.py"
RESTRICTION_FLAGS = ("--grpc-restricted-protocol", "--http-restricted-api")


@cache
def entrypoint() -> ModuleType:
    """deploy/docker/triton-entrypoint.py, imported from its path (the image runs that file)."""
    spec = importlib.util.spec_from_file_location("clinisynth_triton_entrypoint", ENTRYPOINT)
    assert spec is not None and spec.loader is not None, f"{ENTRYPOINT} is missing"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def triton_protocol_groups() -> frozenset[str]:
    """Every protocol group the shipped tritonserver knows, as its own ``--help`` lists them."""
    from clinisynth_server.triton import launcher

    binary = launcher.pytriton_dir() / "bin" / "tritonserver"
    proc = subprocess.run(
        [str(binary), "--help"],
        env=launcher.server_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = proc.stdout + proc.stderr
    lists = re.findall(r"Allowed protocols:\s*(.*?)\n\s*\n", text, flags=re.DOTALL)
    assert lists, f"tritonserver --help names no protocol groups:\n{text[-2000:]}"
    groups = {frozenset(g.strip() for g in found.replace("\n", " ").split(",")) for found in lists}
    assert len(groups) == 1, f"gRPC and HTTP list different groups: {groups}"
    (only,) = groups
    assert "health" in only and "inference" in only, only
    return only


def restrictions(command: Sequence[str]) -> dict[str, tuple[frozenset[str], str, str]]:
    """``flag -> (groups, header, key)`` for the restricted-protocol flags of a command."""
    found: dict[str, tuple[frozenset[str], str, str]] = {}
    for arg in command:
        flag, _, value = arg.partition("=")
        if flag not in RESTRICTION_FLAGS:
            continue
        assert flag not in found, f"{flag} given twice"
        groups, _, rest = value.partition(":")
        header, _, key = rest.partition("=")
        found[flag] = (frozenset(groups.split(",")), header, key)
    return found


def assert_locked_down(command: Sequence[str], key: str) -> None:
    """Both protocols restrict every group Triton has but health, keyed by the services' header
    and ``key``."""
    from clinisynth_server.triton.client import KEY_HEADER

    found = restrictions(command)
    assert set(found) == set(RESTRICTION_FLAGS), f"restriction flags missing: {command}"
    expected = triton_protocol_groups() - {"health"}
    for flag, (groups, header, value) in found.items():
        assert groups == expected, f"{flag}: {sorted(groups)} != {sorted(expected)}"
        assert header == KEY_HEADER and value == key, flag


def effective_command(
    args: Sequence[str],
    secret_file: Callable[[str], str | None],
    root: Path,
    environ: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """What the image's entrypoint would exec for container ``args``.

    Every ``--*-file=PATH`` argument must name a mounted secret file: ``secret_file(PATH)``
    says which (``"secret/key"``) or None. PATH is re-created under ``root`` holding a value
    made from that name, so the real entrypoint code runs on it. Returns (command, environment,
    {original PATH: the value written}).
    """
    values: dict[str, str] = {}
    local_args: list[str] = []
    for arg in args:
        flag, eq, path = arg.partition("=")
        if eq and flag.endswith("-file"):
            source = secret_file(path)
            assert source is not None, f"{arg}: not a file of a mounted Secret"
            local = root / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            values[path] = re.sub(r"[^A-Za-z0-9_-]", "-", f"test-{source}")
            local.write_text(values[path] + "\n")
            arg = f"{flag}={local}"
        local_args.append(arg)
    command, env = entrypoint().build(local_args, dict(environ or {"PATH": "/usr/bin:/bin"}))
    return command, env, values
