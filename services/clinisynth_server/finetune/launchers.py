"""Where workers run: a local subprocess (``torchrun`` for several processes) or a Kubernetes Job.

A launcher starts ``python -m clinisynth_server.finetune.worker --run-id=ID`` for a job, says
whether it still runs, and stops it. The returned handle is stored in the job record, so a
restarted service can still find (adopt) workers a previous service process started: local
workers run in their own session and survive the service; their pid + start time identify them.
"""

from __future__ import annotations

import contextlib
import copy
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
from dataclasses import dataclass, replace
from typing import Any, Protocol

from clinisynth_server.errors import FailedPrecondition
from clinisynth_server.finetune.records import JobRecord, pid_alive, pid_start_time

WORKER_MODULE = "clinisynth_server.finetune.worker"


class Launcher(Protocol):
    #: The most machines (``params[nnodes]``) one job may span; None: no limit of its own.
    max_nnodes: int | None

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
    max_nnodes: int | None = 1  # one machine: torchrun --standalone
    """Subprocesses in their own session (they outlive a killed service)."""

    def __init__(self, *, env: dict[str, str], log_dir: pathlib.Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.host = socket.gethostname()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def launch(self, record: JobRecord, nproc_per_node: int) -> dict[str, Any]:
        nnodes = Placement.of(record, nproc_per_node).nnodes
        if nnodes > 1:
            raise FailedPrecondition(
                f"params[nnodes] is {nnodes}: the local launcher runs one machine's processes; "
                "several nodes need the kubernetes launcher (CLINISYNTH_FINETUNE_LAUNCHER)"
            )
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
RDZV_PORT = 29500
GPU = "nvidia.com/gpu"
#: Words of environment names that hold credentials: never a literal ``value`` in a manifest.
_SECRET_WORDS = frozenset({"SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL", "CREDENTIALS"})


def holds_credential(env_name: str) -> bool:
    """Whether an environment variable's name says it holds a credential (``…_SECRET_KEY``,
    ``…_ACCESS_KEY``, ``HF_TOKEN``, ``…_PASSWORD``; not ``TOKENIZERS_PARALLELISM``)."""
    words = env_name.upper().split("_")
    return bool(_SECRET_WORDS & set(words)) or words[-1] == "KEY" or "ACCESS_KEY" in env_name


PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
K8S_APIS = ("job", "pytorchjob", "auto")


@dataclass(frozen=True)
class Placement:
    """Where a job's processes run, from its parameters (what torchrun is told)."""

    nnodes: int = 1
    nproc_per_node: int = 1
    rdzv_backend: str = "static"
    rdzv_timeout_s: int = 900
    device: str = "auto"

    @classmethod
    def of(cls, record: JobRecord, nproc_per_node: int) -> Placement:
        """The job's placement; a record from before these parameters gets the defaults."""
        p = record.params
        return cls(
            nnodes=max(1, int(p.get("nnodes", "1") or 1)),
            nproc_per_node=max(1, nproc_per_node),
            rdzv_backend=p.get("rdzv_backend", "static") or "static",
            rdzv_timeout_s=int(p.get("rdzv_timeout_s", "900") or 900),
            device=p.get("device", "auto") or "auto",
        )


def k8s_name(run_id: str, attempt: int) -> str:
    """DNS-1123 label of at most 52 characters for one attempt's Job and Service."""
    base = re.sub(r"[^a-z0-9-]", "-", f"cs-{run_id}-a{attempt}".lower()).strip("-")
    return base[:52].rstrip("-")


def torchrun_args(name: str, run_id: str, placement: Placement, *, api: str = "job") -> list[str]:
    """torchrun's arguments in a worker pod: the job's nodes, processes and rendezvous.

    Indexed Job, static: node rank = the pod's completion index (``PET_NODE_RANK``, set by the
    template), rank 0's pod ``<name>-0`` is the master, reached through the headless Service.
    Indexed Job, c10d: torchrun's elastic rendezvous hosted at that same address, node ranks
    by arrival. PyTorchJob: the operator's ``MASTER_ADDR`` / ``MASTER_PORT`` and ``RANK`` (the
    replica's node rank), expanded by Kubernetes from the container's environment.
    """
    n = placement
    args = [f"--nnodes={n.nnodes}", f"--nproc-per-node={n.nproc_per_node}"]
    if api == "pytorchjob":
        args += [
            "--node-rank=$(RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
            f"--rdzv-conf=timeout={n.rdzv_timeout_s}",
        ]
    elif n.rdzv_backend == "c10d":
        args += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={name}-0.{name}:{RDZV_PORT}",
            f"--rdzv-id={name}",
            f"--rdzv-conf=join_timeout={n.rdzv_timeout_s}",
        ]
    else:
        args += [
            f"--master-addr={name}-0.{name}",
            f"--master-port={RDZV_PORT}",
            f"--rdzv-conf=timeout={n.rdzv_timeout_s}",
        ]
    return [*args, "--module", WORKER_MODULE, f"--run-id={run_id}"]


def render_template(
    text: str,
    record: JobRecord,
    *,
    image: str,
    nproc_per_node: int,
    nnodes: int | None = None,
    api: str = "job",
) -> list[dict[str, Any]]:
    """The manifests of one attempt: the template's documents with the job's placement.

    The template (``deploy/k8s/base/finetune/job-template.yaml``) gives the cluster's side:
    image, service account, security context, volumes, resources, store credentials. The job's
    side is set here: ``nnodes`` pods (completions = parallelism, Indexed), torchrun's
    arguments, and GPUs (``device=gpu``: ``nproc_per_node`` ``nvidia.com/gpu`` per pod;
    ``device=cpu``: none, whatever the template asks). ``api="pytorchjob"`` turns the Job into
    a Kubeflow ``PyTorchJob`` (its operator makes the pods' Services: no headless Service).
    Refused (``FailedPrecondition``) when a container's environment holds a literal credential.
    """
    import yaml

    placement = Placement.of(record, nproc_per_node)
    if nnodes is not None:
        placement = replace(placement, nnodes=max(1, nnodes))
    name = k8s_name(record.id, record.attempt)
    rendered = string.Template(text).substitute(
        NAME=name,
        RUN_ID=record.id,
        KIND=_KIND_LABEL.get(record.kind, "generator"),
        IMAGE=image,
        NNODES=str(placement.nnodes),
        NPROC_PER_NODE=str(placement.nproc_per_node),
    )
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    jobs = [d for d in docs if d.get("kind") == "Job"]
    if len(jobs) != 1:
        raise FailedPrecondition(f"the job template must hold one Job, not {len(jobs)}")
    job = jobs[0]
    spec = job["spec"]
    spec.update(
        completionMode="Indexed", completions=placement.nnodes, parallelism=placement.nnodes
    )
    pod = spec["template"]["spec"]
    worker = _worker_container(pod)
    worker["command"] = ["torchrun"]
    worker["args"] = torchrun_args(name, record.id, placement, api=api)
    _set_gpus(pod, worker, placement)
    check_no_literal_secrets(docs)
    if api == "pytorchjob":
        return [pytorchjob(job, placement)]
    return docs


def _worker_container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod.get("containers") or []
    named = [c for c in containers if c.get("name") == "worker"]
    if not named and len(containers) != 1:
        raise FailedPrecondition("the job template's pod needs one container named 'worker'")
    container: dict[str, Any] = (named or containers)[0]
    return container


def _set_gpus(pod: dict[str, Any], worker: dict[str, Any], placement: Placement) -> None:
    if placement.device == "auto":
        return
    resources = worker.setdefault("resources", {})
    for part in ("requests", "limits"):
        values = resources.setdefault(part, {})
        if placement.device == "gpu":
            values[GPU] = str(placement.nproc_per_node)
        else:
            values.pop(GPU, None)
    if placement.device == "cpu":
        selector = pod.get("nodeSelector") or {}
        selector.pop(f"{GPU}.present", None)
        if not selector:
            pod.pop("nodeSelector", None)


def check_no_literal_secrets(docs: list[dict[str, Any]]) -> None:
    """A credential in a manifest must come from a Secret (``secretKeyRef``, ``secretRef``
    or a mounted secret file), never as a literal ``value``: manifests are readable by anyone
    who may list Jobs, and land in logs and events."""
    for doc in docs:
        for container in _containers(doc):
            for env in container.get("env") or []:
                if holds_credential(str(env.get("name", ""))) and env.get("value"):
                    raise FailedPrecondition(
                        f"the job template sets {env['name']} of container "
                        f"{container.get('name')!r} to a literal value: take credentials "
                        "from a Secret (valueFrom.secretKeyRef or a mounted secret file)"
                    )


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container of a Job's or a PyTorchJob's pod templates."""
    spec = doc.get("spec") or {}
    templates = [spec.get("template")] + [
        r.get("template") for r in (spec.get("pytorchReplicaSpecs") or {}).values()
    ]
    return [
        c
        for t in templates
        if t
        for c in [*t["spec"].get("initContainers", []), *t["spec"].get("containers", [])]
    ]


def pytorchjob(job: dict[str, Any], placement: Placement) -> dict[str, Any]:
    """The Kubeflow training operator's ``PyTorchJob`` running the Job's pod template: one
    Master replica (node rank 0) and ``nnodes - 1`` Workers; the operator sets their
    ``MASTER_ADDR`` / ``MASTER_PORT`` / ``RANK`` and makes the Services they reach it by."""
    template = copy.deepcopy(job["spec"]["template"])
    pod = template["spec"]
    pod.pop("subdomain", None)  # the operator's own Services name the pods
    pod["restartPolicy"] = "Never"
    worker = _worker_container(pod)
    worker["name"] = "pytorch"  # the operator finds its container by this name
    worker["env"] = [e for e in worker.get("env") or [] if e.get("name") != "PET_NODE_RANK"]
    worker["ports"] = [{"name": "pytorchjob-port", "containerPort": RDZV_PORT}]
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "Never", "template": template}
    }
    if placement.nnodes > 1:
        replicas["Worker"] = {
            "replicas": placement.nnodes - 1,
            "restartPolicy": "Never",
            "template": copy.deepcopy(template),
        }
    spec = job["spec"]
    run_policy: dict[str, Any] = {"backoffLimit": 0, "cleanPodPolicy": "None"}
    if "ttlSecondsAfterFinished" in spec:
        run_policy["ttlSecondsAfterFinished"] = spec["ttlSecondsAfterFinished"]
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}",
        "kind": "PyTorchJob",
        "metadata": copy.deepcopy(job["metadata"]),
        "spec": {"runPolicy": run_policy, "pytorchReplicaSpecs": replicas},
    }


class KubernetesLauncher:
    max_nnodes: int | None = None
    """One attempt = an Indexed Job + a headless Service for torchrun's rendezvous, or a
    Kubeflow ``PyTorchJob`` (``api``: job, pytorchjob, or auto = a PyTorchJob when the cluster
    serves the ``kubeflow.org/v1`` API).

    Needs the ``kubernetes`` package and in-cluster credentials (the finetune ServiceAccount of
    ``deploy/k8s/base/finetune-rbac.yaml``). The template is checked when the launcher is made
    (a probe render): a bad one stops the service from starting, not a job from running.
    """

    def __init__(self, *, template_path: str, namespace: str, image: str, api: str = "job") -> None:
        if not template_path or not pathlib.Path(template_path).is_file():
            raise FailedPrecondition(
                f"CLINISYNTH_FINETUNE_JOB_TEMPLATE {template_path!r} is not a readable file"
            )
        if api not in K8S_APIS:
            raise FailedPrecondition(
                f"CLINISYNTH_FINETUNE_K8S_API {api!r}: one of {', '.join(K8S_APIS)}"
            )
        self.template = pathlib.Path(template_path).read_text()
        self.namespace = namespace or "default"
        self.image = image
        self.api = api
        self._api: Any = None
        probe = JobRecord(id="probe", kind="classifier", dataset="", params={}, model_name="")
        import yaml

        try:
            render_template(self.template, probe, image=image, nproc_per_node=1)
        except (KeyError, ValueError, TypeError, yaml.YAMLError) as exc:
            raise FailedPrecondition(
                f"the job template {template_path} does not render: {exc}"
            ) from exc

    def _clients(self) -> tuple[Any, Any, Any]:
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
            self._api = (client.BatchV1Api(), client.CoreV1Api(), client.CustomObjectsApi())
            if self.api == "auto":
                groups = client.ApisApi().get_api_versions().groups or []
                served = {(g.name, v.version) for g in groups for v in g.versions}
                has = (PYTORCHJOB_GROUP, PYTORCHJOB_VERSION) in served
                self.api = "pytorchjob" if has else "job"
        return self._api

    def launch(self, record: JobRecord, nproc_per_node: int) -> dict[str, Any]:
        batch, core, custom = self._clients()
        docs = render_template(
            self.template, record, image=self.image, nproc_per_node=nproc_per_node, api=self.api
        )
        for doc in docs:
            if doc["kind"] == "Service":
                core.create_namespaced_service(self.namespace, doc)
            elif doc["kind"] == "Job":
                batch.create_namespaced_job(self.namespace, doc)
            elif doc["kind"] == "PyTorchJob":
                custom.create_namespaced_custom_object(
                    PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, self.namespace, PYTORCHJOB_PLURAL, doc
                )
        return {
            "launcher": "kubernetes",
            "api": self.api,
            "name": k8s_name(record.id, record.attempt),
            "namespace": self.namespace,
            "launched": time.time(),
        }

    def alive(self, record: JobRecord) -> bool | None:
        if record.worker.get("launcher") != "kubernetes":
            return None
        batch, _, custom = self._clients()
        name = record.worker["name"]
        try:
            if record.worker.get("api") == "pytorchjob":
                obj = custom.get_namespaced_custom_object(
                    PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, self.namespace, PYTORCHJOB_PLURAL, name
                )
                return pytorchjob_running(obj)
            job = batch.read_namespaced_job(name, self.namespace)
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
        batch, core, custom = self._clients()
        name = record.worker["name"]
        if record.worker.get("api") == "pytorchjob":
            with contextlib.suppress(Exception):
                custom.delete_namespaced_custom_object(
                    PYTORCHJOB_GROUP,
                    PYTORCHJOB_VERSION,
                    self.namespace,
                    PYTORCHJOB_PLURAL,
                    name,
                    grace_period_seconds=int(grace_s),
                    propagation_policy="Foreground",
                )
            return
        with contextlib.suppress(Exception):
            batch.delete_namespaced_job(
                name,
                self.namespace,
                propagation_policy="Foreground",
                grace_period_seconds=int(grace_s),
            )
        with contextlib.suppress(Exception):
            core.delete_namespaced_service(name, self.namespace)


def pytorchjob_running(obj: dict[str, Any]) -> bool:
    """Whether a PyTorchJob still runs: not yet Succeeded or Failed (its last condition)."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    done = {c.get("type") for c in conditions if c.get("status") == "True"}
    return not done & {"Succeeded", "Failed"}
