"""Run the real ``tritonserver`` shipped inside the nvidia-pytriton wheel (CPU or GPU).

Why each environment detail matters (checked on this machine):

- The python-backend stub links ``libpython3.X.so.1.0``: ``LD_LIBRARY_PATH`` starts with this
  interpreter's ``LIBDIR`` (else an older system libpython loads and the stub crashes), then
  the wheel's ``nvidia_pytriton.libs``.
- The stub embeds an *isolated* interpreter: it ignores ``PYTHONPATH`` and finds its prefix by
  looking ``python3`` up on ``PATH``. So this interpreter's ``bin`` goes first on ``PATH``
  (the stub then adopts the venv, its numpy and torch), and ``PYTHONPATH`` (the repo's
  ``services/`` dir and extras) is re-applied by each generated ``model.py``.
- Each server gets its own python-backend shared-memory prefix so parallel servers
  (tests, several services) never collide in ``/dev/shm``.

CPU sharing on a busy host (measured on a 2-core machine, ``clinisynth benchmark generator
--background-load 1``):

- Triton stays in the caller's *session* (its own process group, so :meth:`TritonServer.stop`
  still reaches every stub). With ``kernel.sched_autogroup_enabled`` (the default on desktop and
  many server kernels) the scheduler shares CPU time between sessions first and applies ``nice``
  only inside one: a server in a session of its own competed as an equal with a ``nice 19`` job
  started from the caller's shell, while the in-process pipeline it is compared with, in the
  caller's session, left that job the crumbs. ``own_session=True`` restores the old behaviour.
- The stubs' OpenMP threads spin only briefly before sleeping (``GOMP_SPINCOUNT``, default
  :data:`OMP_SPIN_COUNT`; ``KMP_BLOCKTIME`` for Intel OpenMP builds), instead of libgomp's
  300,000 spins: a thread that finished its share of an operator and spins keeps its core busy,
  so a sibling thread that lost its core to another process is neither helped by the idle core
  nor waited for cheaply. Either variable set in the launcher's environment wins. Each stub
  uses ``cpu_count // instances`` intra-op threads unless its model sets ``torch_threads``
  (``backends._base.configure_torch_threads``).

Models load with ``--model-control-mode=explicit --load-model=*``: everything in the
repository is up after :meth:`TritonServer.start`, and ``load_model``/``unload_model``
through the client add, replace or retire models and versions later.

Locked down, because Triton's ports are reachable by every local process and a model loaded
with an inline ``model.py`` runs code as this user:

- every protocol group but ``health`` (load / unload, repository index, model config, logging,
  trace, shared memory, statistics, metadata and inference) needs the header
  :data:`~clinisynth_server.triton.client.KEY_HEADER` carrying a key made per start
  (``--grpc-restricted-protocol`` / ``--http-restricted-api``). The key is written to a 0600
  file (:attr:`TritonServer.key_file`) whose *path* the services get; the key itself is in no
  environment. Triton 2.51 reads it only from its command line, and ``/proc/<pid>/cmdline`` is
  readable by every local user, so the command line carries the options *without* the key and
  the preloaded :mod:`~clinisynth_server.triton.native` library completes them from the key
  file while Triton parses them (Triton refuses the incomplete option, so a server without the
  library never starts with a readable key). Where that library cannot be built (no C
  compiler) the key goes on the command line, with a warning (:attr:`TritonServer.key_in_argv`,
  shown by ``clinisynth status``).
- Triton's environment is built by allow-list (:func:`server_environment`): no token, password,
  cloud credential or TLS key path reaches a stub.
- its python backend's shared-memory tensors live on a private ``/dev/shm``: where this user may
  make a mount namespace (root, as the stack runs here and in containers), Triton starts in one
  with its own tmpfs at ``/dev/shm`` (mode 0700), so no other process sees a tensor, and the
  regions vanish with the server (no leftovers after kill -9). The backend sets its regions'
  mode itself (0644), so a umask alone cannot protect them; :func:`private_shm_prefix` falls
  back to the shared ``/dev/shm`` only where no namespace can be made, and says so in the log.
  Files Triton itself creates follow umask 077.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from clinisynth_server.errors import FailedPrecondition, Unavailable
from clinisynth_server.triton import native
from clinisynth_server.triton.client import KEY_HEADER, remember_key

SERVICES_DIR = Path(__file__).resolve().parents[2]  # .../services (holds clinisynth_server)

# Protocol groups (Triton 2.51's names) that need the key. ``health`` stays open for probes.
RESTRICTED_GROUPS = (
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
# What Triton and its python stubs may inherit: names ...
_ENV_ALLOWED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "TMPDIR",
        "TMP",
        "TEMP",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "XDG_CACHE_HOME",
        "TOKENIZERS_PARALLELISM",
    }
)
# ... and prefixes (threading, accelerator and offline-hub knobs) ...
_ENV_ALLOWED_PREFIXES = (
    "LC_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "KMP_",
    "TORCH_",
    "CUDA_",
    "NVIDIA_",
    "HF_",
    "TRANSFORMERS_",
    "DIFFUSERS_",
    "GOMP_",
)
# ... unless the name says it is a secret (HF_TOKEN, CUDA_..._KEY, ...).
_ENV_SECRET = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH|CERT", re.IGNORECASE)
# Spins an idle OpenMP thread makes before it sleeps (libgomp's default is 300,000); see above.
OMP_SPIN_COUNT = 10_000
# The same for Intel OpenMP (milliseconds; its default is 200).
KMP_BLOCKTIME_MS = 1


@dataclass(frozen=True)
class Ports:
    grpc: int
    http: int
    metrics: int


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free TCP ports (all sockets held open until every one is chosen)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def pytriton_dir() -> Path:
    """``site-packages/pytriton/tritonserver`` of the installed nvidia-pytriton wheel."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition("nvidia-pytriton is not installed: pip install nvidia-pytriton")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where built artefacts (backend folders, the argv_key library) are kept."""
    return cache_dir or Path(
        os.environ.get("CLINISYNTH_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clinisynth"
    )


def backend_directory(cache_dir: Path | None = None) -> Path:
    """A ``--backend-directory`` whose ``python/`` holds the backend and this Python's stub.

    Built once per wheel + Python version in a cache dir; built in a temp folder and renamed
    into place so concurrent launchers never see half a directory.
    """
    dist = pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FailedPrecondition(
            f"nvidia-pytriton ships no python-backend stub for Python {version}"
        )
    stamp = f"{int(stub.stat().st_mtime)}-{stub.stat().st_size}"
    target = cache_root(cache_dir) / "triton-backends" / f"py{version}-{stamp}"
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        python_dir = staging / "python"
        python_dir.mkdir()
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(dist / "backends" / "python" / name, python_dir / name)
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
        with contextlib.suppress(OSError):  # another launcher won the race: use theirs
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_SHM_WRAPPER: list[str] | None = None


def private_shm_prefix() -> list[str]:
    """A command prefix that runs the server in its own mount namespace with a private
    ``/dev/shm`` (tmpfs, 0700), or ``[]`` where that is not possible (probed once).

    ``unshare`` execs the shell, which execs the server: the server keeps the pid of the
    process started, so its process group, log lines and health probes are unchanged."""
    global _SHM_WRAPPER
    if _SHM_WRAPPER is None:
        unshare = shutil.which("unshare")
        script = 'mount -t tmpfs -o mode=0700,nosuid,nodev tmpfs /dev/shm && exec "$@"'
        wrapper = [
            unshare or "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            script,
            "tritonserver",
        ]
        ok = False
        if unshare and os.path.isdir("/dev/shm"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                probe = subprocess.run([*wrapper, "true"], capture_output=True, timeout=10)
                ok = probe.returncode == 0
        _SHM_WRAPPER = wrapper if ok else []
    return list(_SHM_WRAPPER)


def server_environment(
    extra_pythonpath: Sequence[Path | str] = (), base: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment ``tritonserver`` (and so every stub) gets; see the module docstring.

    Built by allow-list, not by deleting known secrets: a stub runs whatever ``model.py`` the
    repository holds, so it must not inherit the services' bearer tokens, S3 keys, TLS key
    paths or any credential a deployment adds under a name nobody predicted. Only the path,
    locale, temp, library, threading, accelerator and offline-hub variables pass, and even
    those not when the name looks like a secret (``HF_TOKEN``).

    The Triton key itself is never put in an environment (``/proc/<pid>/environ`` of a
    stub would hand it to the model code it protects against); :meth:`TritonServer.start`
    adds only the preload library and the key file's path, which the library removes from
    Triton's environment before ``main`` (so no stub inherits them).
    """
    source = dict(os.environ if base is None else base)
    env = {
        name: value
        for name, value in source.items()
        if (name in _ENV_ALLOWED or name.startswith(_ENV_ALLOWED_PREFIXES))
        and not _ENV_SECRET.search(name)
    }
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = Path(pytriton_dir()).parent.parent / "nvidia_pytriton.libs"
    ld = [libdir, str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    site_packages = sysconfig.get_paths()["purelib"]
    pythonpath = [*map(str, extra_pythonpath), str(SERVICES_DIR), site_packages]
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(pythonpath + ([old] if old else []))
    env.setdefault("HF_HUB_OFFLINE", "1")  # a model must never reach for the network
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env.setdefault("GOMP_SPINCOUNT", str(OMP_SPIN_COUNT))
    env.setdefault("KMP_BLOCKTIME", str(KMP_BLOCKTIME_MS))
    return env


def grouping(own_session: bool = False) -> dict[str, Any]:
    """``Popen`` arguments for the server: a process group of its own (``stop()`` signals the
    group, so every stub), in the caller's session unless ``own_session`` (module docstring)."""
    if own_session:
        return {"start_new_session": True}
    return {"process_group": 0}


class TritonServer:
    """A ``tritonserver`` process serving ``model_repository``; a context manager.

    Ports are picked free unless given. ``start()`` returns once the server reports ready
    (every model in the repository loaded) or raises :class:`Unavailable` with its log tail.
    ``stop()`` sends SIGTERM, then SIGKILLs the whole process group: no stub survives.

    ``restricted`` (the default) protects every protocol but health with ``key`` (made here
    unless given), which is written to ``key_file`` (0600; a private temp folder unless
    given) for other processes and remembered for :class:`TritonClient` s of this process.
    A restart (``stop()`` then ``start()``) keeps ports and key.

    The server runs in a process group of its own inside the caller's session, so CPU time is
    shared with the caller's other processes the way ``nice`` says (see the module docstring);
    ``own_session`` starts it in a new session instead (a CPU-share group of its own where the
    kernel groups by session).
    """

    def __init__(
        self,
        model_repository: Path | str,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | str | None = None,
        log_verbose: int = 0,
        startup_timeout_s: float = 180.0,
        stop_timeout_s: float = 15.0,
        strict: bool = True,
        extra_pythonpath: Sequence[Path | str] = (),
        extra_args: Sequence[str] = (),
        cache_dir: Path | None = None,
        key: str | None = None,
        key_file: Path | str | None = None,
        restricted: bool = True,
        own_session: bool = False,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        chosen = iter(free_ports(3))
        self.ports = Ports(
            grpc=grpc_port or next(chosen),
            http=http_port or next(chosen),
            metrics=metrics_port or next(chosen),
        )
        self.host = host
        self._log_dir: str | None = None
        if log_path is None:
            self._log_dir = tempfile.mkdtemp(prefix="clinisynth-triton-")
            log_path = Path(self._log_dir) / "tritonserver.log"
        self.log_path = Path(log_path)
        self.log_verbose = log_verbose
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.strict = strict
        self.extra_pythonpath = tuple(extra_pythonpath)
        self.extra_args = tuple(extra_args)
        self.cache_dir = cache_dir
        self.shm_prefix = f"clinisynth{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.restricted = restricted
        self.own_session = own_session
        self.key = (key or secrets.token_urlsafe(32)) if restricted else ""
        if restricted and key_file is None:  # a dead server's key is worthless: left there
            key_file = Path(tempfile.mkdtemp(prefix="clinisynth-triton-key-")) / "triton.key"
        self.key_file: Path | None = Path(key_file) if key_file is not None else None
        # The argv_key library for this start (None: key on the command line, or no key).
        self._shim: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses ------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        """``host:port`` for :class:`~clinisynth_server.triton.client.TritonClient`."""
        return f"{_connect_host(self.host)}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def key_in_argv(self) -> bool:
        """True when the key is on Triton's command line (the argv_key library is unavailable)."""
        return bool(self.key) and self._shim is None

    def _restriction_args(self) -> list[str]:
        """With the argv_key library the options end at the header: it appends ``=<key>``."""
        if not self.key:
            return []
        value = f"{','.join(RESTRICTED_GROUPS)}:{KEY_HEADER}"
        if self._shim is None:
            value = f"{value}={self.key}"
        return [f"--grpc-restricted-protocol={value}", f"--http-restricted-api={value}"]

    def _environment(self) -> dict[str, str]:
        """:func:`server_environment`, plus the argv_key library and the key file's path."""
        env = server_environment(self.extra_pythonpath)
        if self._shim is not None and self.key_file is not None:
            env["LD_PRELOAD"] = str(self._shim)
            env[native.KEY_FILE_ENV] = str(self.key_file)
        return env

    def _write_key_file(self) -> None:
        """The key, readable by this user only, for the services (they get only its path)."""
        if not (self.key and self.key_file):
            return
        self.key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an older file keeps its mode otherwise
            os.write(fd, self.key.encode())
        finally:
            os.close(fd)

    def command(self) -> list[str]:
        """The full ``tritonserver`` command line."""
        return [
            str(pytriton_dir() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory(self.cache_dir)}",
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            f"--exit-on-error={'true' if self.strict else 'false'}",
            f"--strict-readiness={'true' if self.strict else 'false'}",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout_s) - 2)}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--backend-config=python,shm-growth-byte-size=1048576",
            *self._restriction_args(),
            *self.extra_args,
        ]

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, on_spawn: Callable[[int], None] | None = None) -> TritonServer:
        """Launch and wait until ready; :class:`Unavailable` (with log tail) if it is not.

        ``on_spawn(pid)`` runs as soon as the process exists (a supervisor records its group
        before the long wait for the models)."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        if not self.model_repository.is_dir():
            raise FailedPrecondition(f"model repository {self.model_repository} does not exist")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_key_file()
        if self.key:
            remember_key(self.grpc_url, self.key)
        self._shim = native.shim_library(cache_root(self.cache_dir)) if self.key_file else None
        prefix = private_shm_prefix()
        with open(self.log_path, "ab") as log:
            if not prefix:
                log.write(
                    b"clinisynth: no private /dev/shm (cannot make a mount namespace); "
                    b"python-backend tensors are in the shared /dev/shm\n"
                )
            self._proc = subprocess.Popen(
                [*prefix, *self.command()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(),
                umask=0o077,  # /dev/shm tensors and files it creates: 0600, not 0644
                **grouping(self.own_session),
            )
        if on_spawn is not None:
            on_spawn(self._proc.pid)
        deadline = time.monotonic() + self.startup_timeout_s
        delay = 0.05
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._reap_group()
                if self._shim is not None and native.UNPATCHED_OPTION_MARKER in self.log_tail():
                    # the library did not take effect (not preloaded): Triton refused the
                    # option without its key, as designed; start again the old way
                    native.disable(f"tritonserver did not load {self._shim}")
                    self._proc = None
                    return self.start(on_spawn)
                raise Unavailable(
                    f"tritonserver exited with code {code} while starting; log tail:\n"
                    f"{self.log_tail()}",
                    reason="TRITON_START_FAILED",
                )
            # Ready only when *this* process logged its endpoints: another server on a port we
            # picked could otherwise answer the readiness probe while ours fails to bind.
            if self._started_here() and self.is_ready():
                return self
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        self.stop()
        raise Unavailable(
            f"tritonserver not ready after {self.startup_timeout_s:.0f}s; log tail:\n"
            f"{self.log_tail()}",
            reason="TRITON_START_TIMEOUT",
        )

    def _started_here(self) -> bool:
        if self._proc is None:
            return False
        pid = f" {self._proc.pid} "
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        lines = [ln for ln in text.splitlines() if pid in ln]
        return any("Started GRPCInferenceService" in ln for ln in lines) and any(
            "Started HTTPService" in ln for ln in lines
        )

    def is_ready(self) -> bool:
        """HTTP ``/v2/health/ready`` answers 200 (strict: every model in the repo is ready)."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1.0) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, *, graceful: bool = True) -> None:
        """SIGTERM the server (in-flight requests finish, models unload, stubs exit), then
        SIGKILL whatever is left of its process group. ``graceful=False`` kills at once."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if graceful:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=self.stop_timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._reap_group()
        self._proc = None

    def _reap_group(self) -> None:
        """Kill whatever is left in the server's process group (orphaned stubs)."""
        if self._proc is None:
            return
        pgid = self._proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.05)
        # a killed python backend cannot unlink its shared memory: the prefix is ours alone
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def log_tail(self, lines: int = 30) -> str:
        """Triton's error lines (``E…``, where a failing model is named) plus the last lines."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        all_lines = [line for line in text.splitlines() if line.strip()]
        errors = [line for line in all_lines[:-lines] if line.startswith("E")][-10:]
        return "\n".join([*errors, *(["..."] if errors else []), *all_lines[-lines:]])

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    """True while any process (not a zombie) is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clinisynth_server.triton.launcher --model-repository R``: run in foreground."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model-repository", required=True, type=Path)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-path", type=Path, default=None)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--startup-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--lenient", action="store_true", help="keep serving when a model fails to load"
    )
    parser.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="the restricted-protocol key: read from this file when it exists, "
        "else made and written there (0600)",
    )
    args = parser.parse_args(argv)
    key = None
    if args.key_file is not None and args.key_file.is_file():
        key = args.key_file.read_text().strip() or None
    server = TritonServer(
        args.model_repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        host=args.host,
        log_path=args.log_path,
        log_verbose=args.log_verbose,
        startup_timeout_s=args.startup_timeout_s,
        strict=not args.lenient,
        key=key,
        key_file=args.key_file,
    )
    stop = {"now": False}

    def _on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with server:
        print(
            f"tritonserver ready: grpc {server.grpc_url}  http {server.http_url}  "
            f"metrics {server.metrics_url}  log {server.log_path}  "
            f"key file {server.key_file}",
            flush=True,
        )
        while not stop["now"] and server.is_running():
            time.sleep(0.5)
        code = 0 if stop["now"] else 1
        if code:
            print(f"tritonserver exited; log tail:\n{server.log_tail()}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
