"""The embedded one-machine stack behind ``clinisynth up``: Triton + store + four services.

The supervisor (``python -m clinisynth_server.stack``) starts Triton on the model repository,
then each service as its own process (``clinisynth-serve <service>``), waits until every one
answers grpc.health.v1 SERVING, writes ``$CLINISYNTH_HOME/stack.json`` (what the SDK reads to find
the stack), restarts a service that dies on the same port, and on SIGTERM / SIGINT stops all of it.

Triton is supervised the same way: when it dies its whole process group is killed (the python
stubs would live on as orphans), and it is started again on the same ports with the same key,
loading every registered model (``--load-model=*``). Meanwhile the services' own dependency
check answers NOT_SERVING and their calls fail UNAVAILABLE.

With ``CLINISYNTH_TLS_CERT`` / ``_KEY`` set the services serve TLS only, so the readiness probes
speak TLS too (trusting ``CLINISYNTH_TLS_CA``, else the certificate itself), and ``stack.json``
tells the SDK to. Every process the supervisor starts has its own process group, recorded in
``$CLINISYNTH_HOME/stack.pids`` before it runs: a failed, timed-out or killed ``up`` leaves none.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clinisynth_server import __version__
from clinisynth_server.runtime.config import (
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    SERVICES,
    default_home,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "models"
# Demo models shipped in the repo (checkpoint folders + clinisynth.json), registered on first start.
SHIPPED_MODELS = REPO_ROOT / "deploy" / "models"


def state_path(home: pathlib.Path) -> pathlib.Path:
    return home / "stack.json"


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    """The well-known port when free, else any free port."""
    return preferred if _port_free(preferred) else 0


def pids_path(home: pathlib.Path) -> pathlib.Path:
    return home / "stack.pids"


@dataclass(frozen=True)
class TlsSettings:
    """The services' TLS material as the supervisor and the SDK need it (empty: plaintext)."""

    cert: str = ""
    key: str = ""
    ca: str = ""  # what clients trust; the certificate itself (self-signed) when not given
    # The services require client certificates (CLINISYNTH_TLS_CLIENT_CA): the supervisor's
    # probes present the services' own certificate (it needs the "client auth" usage).
    client_auth: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TlsSettings:
        env = dict(os.environ if env is None else env)
        cert, key = env.get("CLINISYNTH_TLS_CERT", ""), env.get("CLINISYNTH_TLS_KEY", "")
        if not (cert and key):
            return cls()
        ca = env.get("CLINISYNTH_TLS_CA", "") or cert
        return cls(
            str(pathlib.Path(cert).resolve()),
            str(pathlib.Path(key).resolve()),
            str(pathlib.Path(ca).resolve()),
            client_auth=bool(env.get("CLINISYNTH_TLS_CLIENT_CA", "").strip()),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)

    def channel(self, address: str) -> grpc.Channel:
        if not self.enabled:
            return grpc.insecure_channel(address)
        roots = pathlib.Path(self.ca).read_bytes()
        key = pathlib.Path(self.key).read_bytes() if self.client_auth else None
        chain = pathlib.Path(self.cert).read_bytes() if self.client_auth else None
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots, private_key=key, certificate_chain=chain
        )
        return grpc.secure_channel(address, creds)


def wait_serving(
    address: str,
    timeout_s: float,
    *,
    tls: TlsSettings | None = None,
    stop: threading.Event | None = None,
) -> bool:
    """Poll grpc.health.v1 (over TLS when the services serve it) until SERVING, the time runs
    out or ``stop`` is set."""
    deadline = time.monotonic() + timeout_s
    with (tls or TlsSettings()).channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            try:
                # types-grpcio-health-checking declares HealthStub without its methods
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)  # type: ignore[attr-defined]
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError as err:
                if tls is not None and tls.enabled and _certificate_refused(err):
                    # Retrying cannot help: the service is up and its certificate is not trusted.
                    raise RuntimeError(
                        f"{address}: TLS verification failed: the CA in CLINISYNTH_TLS_CA"
                        f" ({tls.ca}) does not verify the certificate the services serve"
                    ) from None
            time.sleep(0.2)
    return False


def _certificate_refused(err: grpc.RpcError) -> bool:
    """Whether a failed probe was a TLS handshake that rejected the peer's certificate."""
    details = str(getattr(err, "details", lambda: "")() or "").lower()
    return "certificate_verify_failed" in details or "handshake failed" in details


def kill_group(pgid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM process group ``pgid``, SIGKILL what is left after ``timeout_s``."""
    from clinisynth_server.triton.launcher import _group_alive

    if pgid <= 1 or pgid == os.getpgrp():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class ServiceProcess:
    name: str
    port: int
    metrics_port: int
    log_path: pathlib.Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clinisynth_server.serve",
                self.name,
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()

    def read_ports(self, timeout_s: float, stop: threading.Event | None = None) -> None:
        """Learn the bound ports from the READY line the service prints."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                raise RuntimeError("stopped while starting")
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}); see {self.log_path}"
                )
            for line in self.log_path.read_text(errors="replace").splitlines()[::-1]:
                if line.startswith(f"READY {self.name} "):
                    parts = dict(p.split("=") for p in line.split()[2:])
                    self.port, self.metrics_port = int(parts["grpc"]), int(parts["metrics"])
                    return
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} did not start within {timeout_s:.0f}s; see {self.log_path}"
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever the service itself started


@dataclass
class Stack:
    home: pathlib.Path
    store_url: str = ""
    host: str = "127.0.0.1"
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    triton: Any = None
    tls: TlsSettings = field(default_factory=TlsSettings.from_env)
    triton_restarts: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def model_repository(self) -> pathlib.Path:
        return self.home / "triton-models"

    def _prepare_repository(self) -> None:
        """Seed the model repository with the shipped models the first time."""
        repo = self.model_repository
        repo.mkdir(parents=True, exist_ok=True)
        if SAMPLE_REPOSITORY.is_dir():
            for model_dir in SAMPLE_REPOSITORY.iterdir():
                if model_dir.is_dir() and not (repo / model_dir.name).exists():
                    shutil.copytree(model_dir, repo / model_dir.name)

    @property
    def triton_key_file(self) -> pathlib.Path:
        return self.home / "triton.key"

    def _record_pids(self) -> None:
        """Every process group started so far, for `down` / a failed `up` to kill."""
        groups = [svc.proc.pid for svc in self.services.values() if svc.proc is not None]
        if self.triton is not None and self.triton.pid:
            groups.append(self.triton.pid)
        path = pids_path(self.home)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"supervisor": os.getpid(), "groups": groups}))
        os.replace(tmp, path)

    def start(self, timeout_s: float = 300.0) -> dict[str, Any]:
        from clinisynth_server.triton.launcher import TritonServer

        self.home.mkdir(parents=True, exist_ok=True)
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        self.store_url = self.store_url or str(self.home / "store")
        self._prepare_repository()
        self.triton = TritonServer(
            self.model_repository,
            log_path=logs / "tritonserver.log",
            strict=False,
            grpc_port=pick_port(8001) or None,
            http_port=pick_port(8000) or None,
            metrics_port=pick_port(8002) or None,
            startup_timeout_s=timeout_s,
            key_file=self.triton_key_file,
        )
        self.triton.start(on_spawn=lambda _pid: self._record_pids())
        self._register_shipped()
        env = dict(os.environ)
        env.update(
            {
                "CLINISYNTH_TRITON_URL": self.triton.grpc_url,
                # The path of the 0600 key file; the key itself is in no environment.
                "CLINISYNTH_TRITON_KEY_FILE": str(self.triton_key_file),
                "CLINISYNTH_STORE_URL": self.store_url,
                "CLINISYNTH_MODEL_REPOSITORY": str(self.model_repository),
                # The services that write Triton models (promote, guidance models) need the folder.
                "CLINISYNTH_FINETUNE_MODEL_REPOSITORY": str(self.model_repository),
                "CLINISYNTH_COUNTERFACTUAL_MODEL_REPOSITORY": str(self.model_repository),
                "CLINISYNTH_HOME": str(self.home),
                "PYTHONUNBUFFERED": "1",
            }
        )
        for name in SERVICES:
            svc = ServiceProcess(
                name=name,
                port=pick_port(DEFAULT_PORTS[name]),
                metrics_port=pick_port(DEFAULT_METRICS_PORTS[name]),
                log_path=logs / f"{name}.log",
                env=env,
            )
            svc.log_path.write_bytes(b"")
            svc.start()
            self.services[name] = svc
            self._record_pids()
        deadline = time.monotonic() + timeout_s
        for svc in self.services.values():
            svc.read_ports(max(1.0, deadline - time.monotonic()), self._stop)
            left = max(1.0, deadline - time.monotonic())
            if not wait_serving(f"{self.host}:{svc.port}", left, tls=self.tls, stop=self._stop):
                why = "stopped while starting" if self._stop.is_set() else "is not SERVING"
                raise RuntimeError(f"{svc.name} {why}; see {svc.log_path}")
        info = self.describe()
        self._write_state(info)
        return info

    def _register_shipped(self) -> None:
        """Register shipped model folders that are new, or newer than their registration."""
        from clinisynth_server import registry
        from clinisynth_server.catalog import Catalog
        from clinisynth_server.store import open_store
        from clinisynth_server.triton.client import TritonClient

        store = open_store(self.store_url)
        catalog = Catalog(store, ttl_s=0)
        updates = registry.shipped_updates(SHIPPED_MODELS, catalog)
        if not updates:
            return
        with TritonClient(
            self.triton.grpc_url, timeout_s=300, key_file=self.triton_key_file
        ) as triton:
            for folder, digest in updates:
                registry.register_folder(
                    folder,
                    folder.name,
                    catalog=catalog,
                    store=store,
                    model_repository=self.model_repository,
                    triton=triton,
                    labels={registry.SHIPPED_LABEL: digest},
                )

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            name: f"{self.host}:{svc.port}" for name, svc in self.services.items()
        }
        info["triton"] = self.triton.grpc_url if self.triton else ""
        info["triton_metrics"] = self.triton.metrics_url if self.triton else ""
        info["metrics"] = {
            name: f"http://{self.host}:{svc.metrics_port}/metrics"
            for name, svc in self.services.items()
        }
        review_port = self.services["reward"].env.get("CLINISYNTH_REWARD_HTTP_PORT")
        info["review_url"] = self._review_url(review_port)
        info.update(
            {
                "pid": os.getpid(),
                "store": self.store_url,
                "home": str(self.home),
                "model_repository": str(self.model_repository),
                "version": __version__,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "ready": True,
                "tls": self.tls.enabled,
                "ca_cert": self.tls.ca if self.tls.enabled else "",
                "triton_key_file": str(self.triton_key_file),
                # True only where the argv_key library could not be built (no C compiler)
                "triton_key_in_argv": bool(self.triton and self.triton.key_in_argv),
            }
        )
        return info

    def _review_url(self, port: str | None) -> str:
        log = self.services["reward"].log_path
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("REVIEW "):
                return line.split(maxsplit=1)[1].strip()
        return f"http://{self.host}:{port}/review" if port else ""

    def _write_state(self, info: dict[str, Any]) -> None:
        path = state_path(self.home)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)

    def supervise(self) -> None:
        """Restart services and Triton when they die (same ports, same key) until asked to
        stop."""
        triton_backoff = 1.0
        while not self._stop.wait(1.0):
            for svc in self.services.values():
                if svc.proc is not None and svc.proc.poll() is not None and not self._stop.is_set():
                    svc.restarts += 1
                    svc.start()
                    self._record_pids()
            if self.triton is not None and not self.triton.is_running() and not self._stop.is_set():
                if self._restart_triton():
                    triton_backoff = 1.0
                else:
                    self._stop.wait(triton_backoff)
                    triton_backoff = min(triton_backoff * 2, 30.0)

    def _restart_triton(self) -> bool:
        """Kill what is left of the dead server's process group, start it again; True if up."""
        from clinisynth_server.errors import ClinisynthError

        old = self.triton.pid
        self.triton_restarts += 1
        print(f"TRITON DIED pid={old}; restarting (restart {self.triton_restarts})", flush=True)
        self.triton.stop(graceful=False)  # reaps the group: no orphaned python stub survives
        try:
            self.triton.start()
        except ClinisynthError as exc:
            print(f"TRITON RESTART FAILED {exc}", flush=True)
            self.triton.stop(graceful=False)
            return False
        self._record_pids()
        print(f"TRITON RESTARTED pid={self.triton.pid}", flush=True)
        return True

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        for svc in self.services.values():
            svc.stop()
        if self.triton is not None:
            self.triton.stop()
        for path in (state_path(self.home), pids_path(self.home)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _run(store_url: str | None, timeout_s: float = 300.0) -> int:
    stack = Stack(home=default_home(), store_url=store_url or "")

    starting = threading.Event()
    starting.set()

    def on_signal(signum: int, _frame: Any) -> None:
        stack.request_stop()
        if starting.is_set():  # blocked in a start-up wait: abandon it, `finally` cleans up
            raise _StoppedWhileStarting(f"signal {signum} while starting")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        info = stack.start(timeout_s)
        starting.clear()
        print("READY " + json.dumps(info), flush=True)
        stack.supervise()
    except (Exception, _StoppedWhileStarting) as exc:
        print(f"FAILED {exc}", flush=True)
        return 1
    finally:
        starting.clear()
        stack.stop()
    return 0


class _StoppedWhileStarting(BaseException):
    """Raised by the signal handler to leave a blocking start-up wait (not an Exception, so no
    ``except Exception`` on the way swallows it)."""


def run_foreground(store_url: str | None = None) -> int:
    """``clinisynth up``: run until Ctrl-C."""
    print("starting Triton and the four services (Ctrl-C stops everything) …", flush=True)
    return _run(store_url)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_recorded(home: pathlib.Path) -> None:
    """Kill every process group a supervisor recorded (it may have died before cleaning up)."""
    path = pids_path(home)
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    for pgid in recorded.get("groups", []):
        kill_group(int(pgid), timeout_s=5.0)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def start_detached(store_url: str | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
    """``clinisynth up --detach``: start a supervisor in the background, return when ready.

    On any failure (the supervisor exits, or is not ready in ``timeout_s``) every process it
    started is gone before this raises.
    """
    home = default_home()
    home.mkdir(parents=True, exist_ok=True)
    path = state_path(home)
    if path.exists():
        info = json.loads(path.read_text())
        if _alive(int(info.get("pid", 0))):
            return info
        path.unlink()
    kill_recorded(home)  # leftovers of a supervisor that was killed
    log_path = home / "logs" / "supervisor.log"
    log_path.parent.mkdir(exist_ok=True)
    # The supervisor gives up a little before we do, so it cleans up after itself.
    inner_timeout = max(10.0, timeout_s - 20.0)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clinisynth_server.stack",
                *(["--store", store_url] if store_url else []),
                "--timeout",
                str(inner_timeout),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            kill_recorded(home)
            raise RuntimeError(
                f"the stack failed to start:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        if path.exists():
            info = json.loads(path.read_text())
            if info.get("pid") == proc.pid and info.get("ready"):
                return info
        time.sleep(0.25)
    stop_pid(proc.pid, 30)
    with contextlib.suppress(ChildProcessError, OSError):
        proc.wait(5)
    kill_recorded(home)
    raise RuntimeError(f"the stack was not ready within {timeout_s:.0f}s; see {log_path}")


def stop_pid(pid: int, timeout_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def stop_detached(timeout_s: float = 60.0) -> bool:
    """``clinisynth down``."""
    path = state_path(default_home())
    if not path.exists():
        kill_recorded(default_home())
        return False
    info = json.loads(path.read_text())
    pid = int(info.get("pid", 0))
    if pid and _alive(pid):
        stop_pid(pid, timeout_s)
    kill_recorded(default_home())
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clinisynth_server.stack")
    parser.add_argument("--store", default=None)
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds for Triton and every service to become ready",
    )
    ns = parser.parse_args(argv)
    return _run(ns.store, ns.timeout)


if __name__ == "__main__":
    sys.exit(main())
