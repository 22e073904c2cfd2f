"""Where workers run: a local subprocess (``torchrun`` for several processes) or a Kubernetes Job.

A launcher starts ``python -m clinisynth_server.finetune.worker --run-id=ID`` for a job, says
whether it still runs, and stops it. The returned handle is stored in the job record, so a
restarted service can still find (adopt) workers a previous service process started: local
workers run in their own session and survive the service; their pid + start time identify them.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from typing import Any, Protocol

from clinisynth_server.errors import FailedPrecondition
from clinisynth_server.finetune.records import JobRecord, pid_alive, pid_start_time

WORKER_MODULE = "clinisynth_server.finetune.worker"


class Launcher(Protocol):
    def launch(self, record: JobRecord, nproc_per_node: int) -> dict[str, Any]: ...

    def alive(self, record: JobRecord) -> bool | None:
        """True / False when known; None when this launcher cannot tell (use the heartbeat)."""

    def exit_code(self, record: JobRecord) -> int | None: ...

    def stop(self, record: JobRecord, grace_s: float) -> None: ...


def worker_command(run_id: str, nproc_per_node: int) -> list[str]:
    if nproc_per_node > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc_per_node}",
            "--module",
            WORKER_MODULE,
            f"--run-id={run_id}",
        ]
    return [sys.executable, "-m", WORKER_MODULE, f"--run-id={run_id}"]


class LocalLauncher:
    """Subprocesses in their own session (they outlive a killed service)."""

    def __init__(self, *, env: dict[str, str], log_dir: pathlib.Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.host = socket.gethostname()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def launch(self, record: JobRecord, nproc_per_node: int) -> dict[str, Any]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{record.id}.{record.attempt}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                worker_command(record.id, nproc_per_node),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        with self._lock:
            self._procs[record.id] = proc
        return {
            "launcher": "local",
            "pid": proc.pid,
            "start_time": pid_start_time(proc.pid),
            "host": self.host,
            "log": str(log_path),
            "launched": time.time(),
        }

    def _proc(self, record: JobRecord) -> subprocess.Popen[bytes] | None:
        with self._lock:
            proc = self._procs.get(record.id)
        if proc is not None and proc.pid == record.worker.get("pid"):
            return proc
        return None

    def alive(self, record: JobRecord) -> bool | None:
        proc = self._proc(record)
        if proc is not None:
            return proc.poll() is None
        if record.worker.get("launcher") != "local" or record.worker.get("host") != self.host:
            return None
        return pid_alive(int(record.worker.get("pid", 0)), record.worker.get("start_time", ""))

    def exit_code(self, record: JobRecord) -> int | None:
        proc = self._proc(record)
        return None if proc is None else proc.poll()

    def forget(self, record: JobRecord) -> None:
        with self._lock:
            proc = self._procs.pop(record.id, None)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.poll()

    def stop(self, record: JobRecord, grace_s: float) -> None:
        pid = int(record.worker.get("pid", 0))
        if not pid or not self.alive(record):
            return
        # The worker leads its own process group; torchrun's ranks run in sessions of their
        # own, get the SIGTERM from torchrun and die with it (worker.die_with_launcher).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)

        def reap() -> None:
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if not self.alive(record):
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            self.forget(record)

        threading.Thread(target=reap, daemon=True, name=f"stop-{record.id}").start()


_KIND_LABEL = {"reward_model": "reward", "classifier": "classifier"}


def k8s_name(run_id: str, attempt: int) -> str:
    """DNS-1123 label of at most 52 characters for one attempt's Job and Service."""
    base = re.sub(r"[^a-z0-9-]", "-", f"cs-{run_id}-a{attempt}".lower()).strip("-")
    return base[:52].rstrip("-")


def render_template(
    text: str, record: JobRecord, *, image: str, nproc_per_node: int, nnodes: int = 1
) -> list[dict[str, Any]]:
    """Substitute the template's placeholders and parse its documents."""
    import yaml

    rendered = string.Template(text).substitute(
        NAME=k8s_name(record.id, record.attempt),
        RUN_ID=record.id,
        KIND=_KIND_LABEL.get(record.kind, "generator"),
        IMAGE=image,
        NNODES=str(nnodes),
        NPROC_PER_NODE=str(max(1, nproc_per_node)),
    )
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


class KubernetesLauncher:
    """One Kubernetes Job (+ headless Service for torchrun's rendezvous) per attempt.

    Needs the ``kubernetes`` package and in-cluster credentials (the finetune ServiceAccount of
    ``deploy/k8s/base/finetune-rbac.yaml``).
    """

    def __init__(self, *, template_path: str, namespace: str, image: str) -> None:
        if not template_path or not pathlib.Path(template_path).is_file():
            raise FailedPrecondition(
                f"CLINISYNTH_FINETUNE_JOB_TEMPLATE {template_path!r} is not a readable file"
            )
        self.template = pathlib.Path(template_path).read_text()
        self.namespace = namespace or "default"
        self.image = image
        self._api: Any = None

    def _clients(self) -> tuple[Any, Any]:
        if self._api is None:
            try:
                from kubernetes import client, config
            except ImportError as exc:
                raise FailedPrecondition(
                    "the kubernetes launcher needs the 'kubernetes' package"
                ) from exc
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = (client.BatchV1Api(), client.CoreV1Api())
        return self._api

    def launch(self, record: JobRecord, nproc_per_node: int) -> dict[str, Any]:
        batch, core = self._clients()
        docs = render_template(
            self.template, record, image=self.image, nproc_per_node=nproc_per_node
        )
        for doc in docs:
            if doc["kind"] == "Service":
                core.create_namespaced_service(self.namespace, doc)
            elif doc["kind"] == "Job":
                batch.create_namespaced_job(self.namespace, doc)
        return {
            "launcher": "kubernetes",
            "name": k8s_name(record.id, record.attempt),
            "namespace": self.namespace,
            "launched": time.time(),
        }

    def alive(self, record: JobRecord) -> bool | None:
        if record.worker.get("launcher") != "kubernetes":
            return None
        batch, _ = self._clients()
        try:
            job = batch.read_namespaced_job(record.worker["name"], self.namespace)
        except Exception:
            return None
        status = job.status
        if (status.active or 0) > 0:
            return True
        return not (status.succeeded or status.failed)

    def exit_code(self, record: JobRecord) -> int | None:
        return None

    def stop(self, record: JobRecord, grace_s: float) -> None:
        if record.worker.get("launcher") != "kubernetes":
            return
        batch, core = self._clients()
        name = record.worker["name"]
        with contextlib.suppress(Exception):
            batch.delete_namespaced_job(
                name,
                self.namespace,
                propagation_policy="Foreground",
                grace_period_seconds=int(grace_s),
            )
        with contextlib.suppress(Exception):
            core.delete_namespaced_service(name, self.namespace)
