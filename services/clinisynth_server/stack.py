"""The embedded one-machine stack behind ``clinisynth up``: Triton + store + four services.

The supervisor (``python -m clinisynth_server.stack``) starts Triton on the model repository,
then each service as its own process (``clinisynth-serve <service>``), waits until every one
answers grpc.health.v1 SERVING, writes ``$CLINISYNTH_HOME/stack.json`` (what the SDK reads to find
the stack), restarts a service that dies on the same port, and on SIGTERM / SIGINT stops all of it.
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


def wait_serving(address: str, timeout_s: float) -> bool:
    """Poll grpc.health.v1 until SERVING or the time runs out."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


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

    def read_ports(self, timeout_s: float) -> None:
        """Learn the bound ports from the READY line the service prints."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
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
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@dataclass
class Stack:
    home: pathlib.Path
    store_url: str = ""
    host: str = "127.0.0.1"
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    triton: Any = None
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
        )
        self.triton.start()
        self._register_shipped()
        env = dict(os.environ)
        env.update(
            {
                "CLINISYNTH_TRITON_URL": self.triton.grpc_url,
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
        for svc in self.services.values():
            svc.read_ports(timeout_s)
            if not wait_serving(f"{self.host}:{svc.port}", timeout_s):
                raise RuntimeError(f"{svc.name} is not SERVING; see {svc.log_path}")
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
        with TritonClient(self.triton.grpc_url, timeout_s=300) as triton:
            for folder, digest in updates:
                registry.register_folder(folder, folder.name, catalog=catalog, store=store,
                                         model_repository=self.model_repository,
                                         triton=triton, labels={registry.SHIPPED_LABEL: digest})

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
        """Restart services that die (same ports) until asked to stop."""
        while not self._stop.wait(1.0):
            for svc in self.services.values():
                if svc.proc is not None and svc.proc.poll() is not None and not self._stop.is_set():
                    svc.restarts += 1
                    svc.start()

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        for svc in self.services.values():
            svc.stop()
        if self.triton is not None:
            self.triton.stop()
        with contextlib.suppress(FileNotFoundError):
            state_path(self.home).unlink()


def _run(store_url: str | None) -> int:
    stack = Stack(home=default_home(), store_url=store_url or "")

    def on_signal(signum: int, _frame: Any) -> None:
        stack.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        info = stack.start()
        print("READY " + json.dumps(info), flush=True)
        stack.supervise()
    except Exception as exc:
        print(f"FAILED {exc}", flush=True)
        return 1
    finally:
        stack.stop()
    return 0


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


def start_detached(store_url: str | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
    """``clinisynth up --detach``: start a supervisor in the background, return when ready."""
    home = default_home()
    home.mkdir(parents=True, exist_ok=True)
    path = state_path(home)
    if path.exists():
        info = json.loads(path.read_text())
        if _alive(int(info.get("pid", 0))):
            return info
        path.unlink()
    log_path = home / "logs" / "supervisor.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clinisynth_server.stack",
                *(["--store", store_url] if store_url else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the stack failed to start:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        if path.exists():
            info = json.loads(path.read_text())
            if info.get("pid") == proc.pid and info.get("ready"):
                return info
        time.sleep(0.25)
    stop_pid(proc.pid, 30)
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
        return False
    info = json.loads(path.read_text())
    pid = int(info.get("pid", 0))
    if pid and _alive(pid):
        stop_pid(pid, timeout_s)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clinisynth_server.stack")
    parser.add_argument("--store", default=None)
    ns = parser.parse_args(argv)
    return _run(ns.store)


if __name__ == "__main__":
    sys.exit(main())
