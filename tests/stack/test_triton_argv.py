"""Triton's key is in no command line: not ``/proc/<pid>/cmdline`` of the server (readable by
every local user) and not the command line or environment of any process it spawns, and Triton
still enforces it. Where the argv_key library cannot be had, Triton never starts with a key it
does not hold; the launcher falls back to the key on the command line and says so.

The server is the one ``tests/stack/test_triton_security.py`` starts (the launcher, as the stack
uses it, with secrets in the launching environment); the attacker reads ``/proc`` and calls the
ports as any local user could."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")

from clinisynth_server.triton import native  # noqa: E402
from clinisynth_server.triton.client import GRPC_KEY_HEADER, KEY_HEADER  # noqa: E402
from clinisynth_server.triton.launcher import (  # noqa: E402
    TritonServer,
    server_environment,
)
from tests.stack.test_triton_security import (  # noqa: E402
    SAMPLE,
    _environ,
    _http,
    _refused,
    _sample_inputs,
    server,  # noqa: F401  (the module's Triton)
)

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]


def _descendants(root: int) -> list[int]:
    """``root`` and every live process below it (by parent pid, whatever its group)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += frontier
    return found


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_key_is_in_no_command_line_or_environment(server: TritonServer) -> None:  # noqa: F811
    assert server.pid is not None and server.key
    key = server.key.encode()
    procs = _descendants(server.pid)
    assert len(procs) >= 2, procs  # tritonserver + the sample model's python stub
    names = {pid: _cmdline(pid).split(b"\0")[0].rsplit(b"/", 1)[-1] for pid in procs}
    assert names[server.pid] == b"tritonserver"
    for pid in procs:
        cmdline = _cmdline(pid)
        assert key not in cmdline, (pid, names[pid])
        assert key not in Path(f"/proc/{pid}/environ").read_bytes(), (pid, names[pid])
    # Triton was told where the key is restricted, just not the key
    args = _cmdline(server.pid).decode().split("\0")
    restricted = [a for a in args if a.startswith(("--grpc-restricted", "--http-restricted"))]
    assert len(restricted) == 2 and all(a.endswith(f":{KEY_HEADER}") for a in restricted)
    # the stubs (model code) inherit neither the library nor the key file's name
    stubs = [pid for pid in procs if pid != server.pid]
    for pid in stubs:
        env = _environ(pid)
        assert "LD_PRELOAD" not in env and native.KEY_FILE_ENV not in env, (pid, names[pid])
    assert key not in server.log_path.read_bytes()
    assert not server.key_in_argv


def test_key_is_still_enforced(server: TritonServer) -> None:  # noqa: F811
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        _refused(lambda: c.get_model_repository_index())
        _refused(lambda: c.infer(SAMPLE, _sample_inputs(grpcclient)))
        # the placeholder a reader of the command line might try is no key either
        empty = {GRPC_KEY_HEADER: ""}
        _refused(lambda: c.infer(SAMPLE, _sample_inputs(grpcclient), headers=empty))
        ok = {GRPC_KEY_HEADER: server.key}
        assert c.get_model_repository_index(headers=ok) is not None
        result = c.infer(SAMPLE, _sample_inputs(grpcclient), headers=ok)
        assert result.as_numpy("noise_pred").shape == (1, 1, 8, 8)
    finally:
        c.close()
    assert _http(server, "POST", "/v2/repository/index", {}) in (401, 403)
    assert _http(server, "POST", "/v2/repository/index", {}, {KEY_HEADER: server.key}) == 200


def test_triton_refuses_the_options_without_the_library(tmp_path: Path) -> None:
    """Fail closed: the command line the launcher now writes, run without the library."""
    (tmp_path / "repo").mkdir()
    srv = TritonServer(tmp_path / "repo", key_file=tmp_path / "triton.key")
    srv._shim = tmp_path / "unused.so"  # what start() sets when the library is there
    proc = subprocess.run(
        srv.command(), env=server_environment(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert native.UNPATCHED_OPTION_MARKER in proc.stdout + proc.stderr


@pytest.fixture
def no_library_yet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh process-wide state: the library untried (restored afterwards)."""
    monkeypatch.setattr(native, "_failure", None)
    yield


def _start_empty(tmp_path: Path, cache: Path) -> TritonServer:
    (tmp_path / "repo").mkdir()
    return TritonServer(tmp_path / "repo", key_file=tmp_path / "triton.key", cache_dir=cache)


def test_no_compiler_falls_back_to_the_key_in_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_library_yet: None
) -> None:
    monkeypatch.setattr(native, "compiler", lambda: None)
    with _start_empty(tmp_path, tmp_path / "cache") as srv:
        assert srv.pid is not None
        assert srv.key_in_argv and srv.key.encode() in _cmdline(srv.pid)
        assert native.unavailable_reason() is not None
        assert "compiler" in (native.unavailable_reason() or "")
        assert _http(srv, "POST", "/v2/repository/index", {}) in (401, 403)
        assert _http(srv, "POST", "/v2/repository/index", {}, {KEY_HEADER: srv.key}) == 200


def test_a_library_that_does_not_load_falls_back(tmp_path: Path, no_library_yet: None) -> None:
    cache = tmp_path / "cache"
    broken = native.library_path(cache)
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not an ELF object")  # ld.so ignores it; Triton refuses the option
    with _start_empty(tmp_path, cache) as srv:
        assert srv.pid is not None
        assert srv.key_in_argv and srv.key.encode() in _cmdline(srv.pid)
        assert "did not load" in (native.unavailable_reason() or "")
        assert _http(srv, "POST", "/v2/repository/index", {}, {KEY_HEADER: srv.key}) == 200


def test_the_library_is_built_once_per_source(tmp_path: Path, no_library_yet: None) -> None:
    built = native.shim_library(tmp_path)
    assert built is not None and built == native.library_path(tmp_path)
    assert built.is_file() and os.access(built, os.X_OK)
    mtime = built.stat().st_mtime_ns
    assert native.shim_library(tmp_path) == built and built.stat().st_mtime_ns == mtime
