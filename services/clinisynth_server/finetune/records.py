"""Durable job state in the artifact store: one writer per object, atomic writes.

Layout (``finetune/jobs/<id>/``)::

    job.json                 the service's record (state, timestamps, restarts, reason, and the
                             checkpoint digests it recorded from the worker's reports)
    cancel.json              the service asks the worker to stop
    progress.json            the worker's heartbeat: step, metrics, pid, attempt
    result.json              the worker's outcome (succeeded / failed / cancelled) per attempt
    events/<seq:012d>.json   the event log; sequence numbers are claimed with put_if_absent
    checkpoints/<step:09d>/  model/ (promotable folder), state/ (resume), checkpoint.json last
    artifacts/               kind-specific files that must survive a crash (synthetic pools)

A stored object that cannot be read (truncated, tampered with) is skipped by every listing, logged
by key and counted (:class:`~clinisynth_server.catalog.CorruptRecords`); the rest is served.

Each object has one writer (job.json the service, progress / result the worker), so no
read-modify-write races cross processes; events from both sides meet only in put_if_absent.
A checkpoint exists once its ``checkpoint.json`` does: it is written after every file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from clinisynth_server.catalog import CorruptRecords, check_fields
from clinisynth_server.errors import ClinisynthError, FailedPrecondition, NotFound
from clinisynth_server.store.base import ArtifactStore

ROOT = "finetune/jobs/"
REQUESTS = "finetune/requests/"
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")


def new_job_id() -> str:
    """Sortable by creation time (base-36 milliseconds) plus randomness."""
    ms = int(time.time() * 1000)
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    stamp = ""
    while ms:
        ms, r = divmod(ms, 36)
        stamp = digits[r] + stamp
    return f"ft-{stamp}-{secrets.token_hex(3)}"


@dataclass
class JobRecord:
    id: str
    kind: str
    dataset: str
    params: dict[str, str]
    model_name: str
    request_id: str = ""
    state: str = "queued"
    created: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    failure_reason: str = ""
    restarts: int = 0
    # Attempt number the current worker runs (result.json of older attempts is ignored).
    attempt: int = 0
    max_steps: int = 0
    # Where the worker runs: {"launcher": "local", "pid": ..., "start_time": ..., "host": ...}
    # or {"launcher": "kubernetes", "name": ...}.
    worker: dict[str, Any] = field(default_factory=dict)
    # Last known progress (copied from progress.json when the job ends).
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # Summary of the data set at creation (images, classes, size, channels).
    data: dict[str, Any] = field(default_factory=dict)
    # The service's account of each committed checkpoint (id → sha256 of its checkpoint.json),
    # taken when the worker reported it. Resume and promotion trust these digests, never the
    # checkpoint folder itself. None: a record written before digests were recorded.
    checkpoints: dict[str, str] | None = None
    # id → {relative path: sha256} from that manifest, to name a rewritten file.
    checkpoint_files: dict[str, dict[str, str]] = field(default_factory=dict)
    # id → the attempt during which it was recorded: within one attempt a worker writes a
    # checkpoint once, so a second report of it then is refused (a later attempt may rewrite it).
    checkpoint_attempts: dict[str, int] = field(default_factory=dict)
    # Sequence number of the last event read for checkpoint reports.
    checkpoint_events: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Event:
    sequence: int
    time: float
    job_id: str
    type: str  # state | progress | metrics | checkpoint | log | error
    state: str = ""
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    message: str = ""


@dataclass(frozen=True)
class CheckpointInfo:
    id: str
    step: int
    metrics: dict[str, float]
    created: float
    best: bool
    prefix: str  # checkpoints/<id>/ in the store
    attempt: int = 0
    best_metric: str = ""  # the evaluate() metric ranking checkpoints ("" = newest is best)
    best_mode: str = "max"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class JobStore:
    """Typed access to the job objects; safe to use from the service and the workers."""

    def __init__(self, store: ArtifactStore, *, corrupt: CorruptRecords | None = None) -> None:
        self.store = store
        self.corrupt = corrupt or CorruptRecords()
        self._seq_lock = threading.Lock()
        self._next_seq: dict[str, int] = {}

    # -- keys ---------------------------------------------------------------------------
    @staticmethod
    def prefix(job_id: str) -> str:
        return f"{ROOT}{job_id}/"

    def key(self, job_id: str, name: str) -> str:
        return f"{ROOT}{job_id}/{name}"

    # -- the record (service-owned) ------------------------------------------------------
    def put(self, record: JobRecord) -> None:
        self.store.put_json(self.key(record.id, "job.json"), record.to_json())

    def get(self, job_id: str) -> JobRecord:
        key = self.key(job_id, "job.json")
        try:
            return self._read(key, JobRecord)
        except NotFound:
            raise NotFound(f"no job {job_id!r}") from None
        except ValueError:
            raise FailedPrecondition(
                f"job {job_id!r} cannot be read: its record is corrupt", reason="CORRUPT_RECORD"
            ) from None

    def all(self) -> list[JobRecord]:
        out = []
        for info in self.store.list(ROOT):
            if info.key.endswith("/job.json") and info.key.count("/") == 3:
                try:
                    out.append(self._read(info.key, JobRecord))
                except (ClinisynthError, ValueError):
                    continue
        return out

    def _read(self, key: str, cls: type[Any]) -> Any:
        """One stored record as ``cls``; ``ValueError`` (reported once) if it is corrupt."""
        try:
            data = self.store.get_json(key)
            check_fields(cls, data)
            return cls(**{k: v for k, v in data.items() if k in _field_names(cls)})
        except NotFound:
            raise
        except (ClinisynthError, ValueError, TypeError) as exc:
            why = getattr(exc, "message", None) or str(exc)
            self.corrupt.report("finetune", key, why)
            raise ValueError(why) from None

    def claim_request(self, request_id: str, job_id: str, tenant: str = "") -> str:
        """Bind ``request_id`` to ``job_id``; returns the job id that owns it (maybe older).

        Request ids are per tenant: tenant ``""`` keeps the key it always had."""
        scoped = f"{tenant}\0{request_id}" if tenant else request_id
        digest = hashlib.sha256(scoped.encode()).hexdigest()[:40]
        key = f"{REQUESTS}{digest}.json"
        from clinisynth_server.store.base import encode_json

        if self.store.put_if_absent(key, encode_json({"request_id": request_id, "job": job_id})):
            return job_id
        return str(self.store.get_json(key)["job"])

    # -- cancel marker ----------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> None:
        self.store.put_json(self.key(job_id, "cancel.json"), {"time": time.time()})

    def cancel_requested(self, job_id: str) -> bool:
        return self.store.exists(self.key(job_id, "cancel.json"))

    # -- worker-owned objects ------------------------------------------------------------
    def put_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        self.store.put_json(self.key(job_id, "progress.json"), progress)

    def progress(self, job_id: str) -> dict[str, Any]:
        return self._object(self.key(job_id, "progress.json"))

    def put_result(self, job_id: str, result: dict[str, Any]) -> None:
        self.store.put_json(self.key(job_id, "result.json"), result)

    def result(self, job_id: str) -> dict[str, Any]:
        return self._object(self.key(job_id, "result.json"))

    def _object(self, key: str) -> dict[str, Any]:
        """A worker-written JSON object; ``{}`` when missing or unreadable (reported)."""
        try:
            data = self.store.get_json(key)
        except NotFound:
            return {}
        except ClinisynthError as exc:
            self.corrupt.report("finetune", key, exc.message)
            return {}
        if not isinstance(data, dict):
            self.corrupt.report("finetune", key, "not a JSON object")
            return {}
        return data

    # -- events ------------------------------------------------------------------------------
    def append_event(self, job_id: str, type: str, **fields: Any) -> Event:
        """Append with the next free sequence number (claimed with put_if_absent)."""
        from clinisynth_server.store.base import encode_json

        with self._seq_lock:
            seq = self._next_seq.get(job_id)
            if seq is None:
                seq = self.last_sequence(job_id) + 1
            while True:
                event = Event(sequence=seq, time=time.time(), job_id=job_id, type=type, **fields)
                data = encode_json(dataclasses.asdict(event))
                if self.store.put_if_absent(self.key(job_id, f"events/{seq:012d}.json"), data):
                    self._next_seq[job_id] = seq + 1
                    return event
                seq = max(seq + 1, self.last_sequence(job_id) + 1)

    def last_sequence(self, job_id: str) -> int:
        last = 0
        for info in self.store.list(self.key(job_id, "events/")):
            name = info.key.rsplit("/", 1)[-1].removesuffix(".json")
            if name.isdigit():
                last = max(last, int(name))
        return last

    def events(self, job_id: str, since: int = 0) -> list[Event]:
        start_after = self.key(job_id, f"events/{since:012d}.json") if since > 0 else None
        out = []
        for info in self.store.list(self.key(job_id, "events/"), start_after=start_after):
            try:
                out.append(self._read(info.key, Event))
            except NotFound:
                continue
            except ValueError:
                continue  # reported; the stream goes on with the next event
        return out

    # -- checkpoints -------------------------------------------------------------------------
    @staticmethod
    def checkpoint_id(step: int) -> str:
        return f"{step:09d}"

    def checkpoint_prefix(self, job_id: str, ckpt_id: str) -> str:
        return self.key(job_id, f"checkpoints/{ckpt_id}/")

    def checkpoints(self, job_id: str) -> list[CheckpointInfo]:
        """Committed checkpoints (those with a checkpoint.json), oldest first."""
        out = []
        for info in self.store.list(self.key(job_id, "checkpoints/"), recursive=False):
            if not info.is_prefix:
                continue
            manifest = info.key + "checkpoint.json"
            try:
                out.append(self._read(manifest, CheckpointInfo))
            except NotFound:
                continue  # a checkpoint cut short by a crash: never committed
            except ValueError:
                continue  # reported; never offered for resume or promotion
        out.sort(key=lambda c: c.step)
        return out

    def commit_checkpoint(self, job_id: str, info: CheckpointInfo) -> None:
        self.store.put_json(info.prefix + "checkpoint.json", info.to_json())

    def delete_checkpoint(self, job_id: str, ckpt_id: str) -> None:
        prefix = self.checkpoint_prefix(job_id, ckpt_id)
        # The manifest goes first so a half-deleted checkpoint is never listed.
        self.store.delete(prefix + "checkpoint.json")
        self.store.delete_prefix(prefix)


def reported_checkpoints(events: list[Event]) -> dict[str, str]:
    """Manifest digests the worker's ``checkpoint`` events report (id → sha256), newest wins."""
    reported: dict[str, str] = {}
    for e in events:
        ckpt = e.checkpoint or {}
        if e.type == "checkpoint" and ckpt.get("id") and ckpt.get("manifest_sha256"):
            reported[str(ckpt["id"])] = str(ckpt["manifest_sha256"])
    return reported


def _field_names(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def best_checkpoint(
    checkpoints: list[CheckpointInfo], metric: str = "", mode: str = "max"
) -> CheckpointInfo | None:
    """The checkpoint with the best ``metric`` (ties: the later); the newest without one."""
    if not checkpoints:
        return None
    if not metric:
        metric, mode = checkpoints[-1].best_metric, checkpoints[-1].best_mode
    scored = [c for c in checkpoints if metric and metric in c.metrics]
    if not scored:
        return checkpoints[-1]
    sign = 1.0 if mode == "max" else -1.0
    return max(reversed(scored), key=lambda c: sign * c.metrics[metric])


def pid_start_time(pid: int) -> str:
    """Start time of a process (clock ticks since boot) to tell a reused pid apart; "" if none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, start_time: str = "") -> bool:
    """Whether ``pid`` runs (not a zombie) and, if given, started at ``start_time``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
    except OSError:
        return True  # no procfs: trust kill(0)
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return False
    return not start_time or fields[19] == start_time
