"""The finetune domain: validate and queue jobs, run the queue, watch, promote. No grpc here.

The service process is the only writer of ``job.json``: a scheduler thread starts queued jobs
(at most ``max_concurrent_jobs`` at once, oldest first), notices workers that finished (their
``result.json``), died (no result: resumed from the last checkpoint, up to ``max_restarts``) or
hang (stale heartbeat), and after a restart re-adopts workers that still run.

It is also the authority on checkpoints: when a worker reports one (its ``checkpoint`` event),
the service records the manifest's sha256 and file digests in ``job.json``. A relaunched worker
resumes only from a checkpoint that matches that record, and promotion verifies the bytes it
registers against it, so rewriting a checkpoint's files and manifest together is caught.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import hmac
import logging
import pathlib
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import IO, Any

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import (
    ClinisynthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ValidationErrors,
)
from clinisynth_server.finetune import datasets, shards
from clinisynth_server.finetune.kinds import NAMES, load
from clinisynth_server.finetune.kinds.base import CheckContext, KindSpec
from clinisynth_server.finetune.params import parse_params, world_size_violations
from clinisynth_server.finetune.records import (
    STATES,
    CheckpointInfo,
    Event,
    JobRecord,
    JobStore,
    best_checkpoint,
    new_job_id,
    reported_checkpoints,
)
from clinisynth_server.imaging import deid
from clinisynth_server.methods._checkpoint import (
    MANIFEST_NAME,
    DigestMismatch,
    manifest_files,
    verify_tree,
)
from clinisynth_server.runtime.metrics import FinetuneMetrics
from clinisynth_server.runtime.quotas import Quotas
from clinisynth_server.store.base import (
    DATASETS_NAMESPACE,
    ArtifactStore,
    ObjectInfo,
    confine_key,
    outside_service_namespaces,
)
from clinisynth_server.tenancy import (
    TENANT_LABEL,
    Viewer,
    dataset_root,
    owner_metadata,
    prefix_owner,
    sees_prefix,
)

log = logging.getLogger(__name__)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# One clean key segment: a job id never reaches outside its own finetune/jobs/<id>/ folder.
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CHECKPOINT_ID_RE = re.compile(r"^[0-9]{9}$")  # JobStore.checkpoint_id(step)
MODEL_FOLDER = "model/"  # the promotable part of a checkpoint
#: The de-identification secret (UID salt and date shift of uploaded DICOM derive from it).
DEID_SECRET_KEY = "finetune/secrets/deid.txt"
DICOM_SUFFIXES = (".dcm", ".dicom")
MAX_PAGE = 1000
# Where a job record keeps the tenant of the principal that created it: its owner (only that
# tenant and admins see the job and its checkpoints) and whose concurrent_jobs it counts against.
TENANT_KEY = "tenant"


def job_tenant(record: JobRecord) -> str:
    """The job's owner; a record written before tenants existed belongs to tenant ``""``."""
    return str(record.data.get(TENANT_KEY, ""))


class _NoFiles(datasets.Source):
    """What a data set of another tenant reads as: nothing, exactly like a missing prefix."""

    def names(self) -> builtins.list[str]:
        return []

    def read(self, name: str) -> bytes:
        raise NotFound(f"no object {name!r}")


@dataclass(frozen=True)
class Settings:
    max_concurrent_jobs: int = 1
    max_restarts: int = 3
    heartbeat_timeout_s: float = 120.0
    poll_s: float = 0.5
    stop_grace_s: float = 10.0
    nproc_per_node: int = 1
    model_repository: str = ""
    max_upload_bytes: int = 4 * 1024**3
    # A DICOM upload is de-identified in memory: bound what one upload may cost.
    max_dicom_bytes: int = 512 * 1024**2


@dataclass(frozen=True)
class JobView:
    """A record plus what the worker reported and the queue position."""

    record: JobRecord
    step: int
    metrics: dict[str, float]
    queue_position: int = 0


class FinetuneService:
    def __init__(
        self,
        store: ArtifactStore,
        catalog: Catalog,
        triton: Any,
        launcher: Any,
        settings: Settings,
        metrics: FinetuneMetrics | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self.store = store
        # Per-tenant concurrent_jobs, counted over queued + running jobs at create.
        self.quotas = quotas or Quotas(service="finetune")
        self._create_lock = threading.Lock()
        self.catalog = catalog
        self.triton = triton
        self.launcher = launcher
        self.settings = settings
        self.metrics = metrics
        # Corrupt job records are reported (log line, metric) like corrupt catalog records.
        self.jobs = JobStore(store, corrupt=getattr(catalog, "corrupt", None))
        self._lock = threading.RLock()
        self._records: dict[str, JobRecord] = {}
        self._seen_alive: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._promote_lock = threading.Lock()
        self._live_labels: set[tuple[str, str]] = set()
        self._kinds: dict[str, KindSpec] = {name: load(name) for name in NAMES}
        self._deid_lock = threading.Lock()
        self._deid_key: str | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Load every record from the store and start the scheduler thread."""
        for record in self.jobs.all():
            self._records[record.id] = record
        self._thread = threading.Thread(target=self._run, daemon=True, name="finetune-scheduler")
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling; running workers keep going and are adopted by the next service."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except ClinisynthError as exc:
                log.warning("scheduler tick failed: %s", exc)
            except Exception:  # the scheduler must survive anything
                log.exception("scheduler tick failed")
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()

    # -- create ---------------------------------------------------------------------------
    def create(
        self,
        kind: str,
        dataset: str,
        params: dict[str, str],
        *,
        model_name: str = "",
        request_id: str = "",
        tenant: str = "",
        admin: bool = False,
    ) -> JobRecord:
        """Validate everything up front (all problems at once), then queue the job.

        The job belongs to ``tenant`` and counts against its ``concurrent_jobs`` until it ends.
        Another tenant's data set reads as a missing one, its private models as unknown ones
        (``admin``: every data set and model).
        """
        viewer = Viewer(tenant, admin)
        if request_id:
            existing = self._by_request(request_id, tenant)
            if existing is not None:
                return existing
        errors = ValidationErrors()
        spec = self._kinds.get(kind)
        if spec is None:
            errors.add("kind", f"unknown job kind {kind!r}; one of {', '.join(NAMES)}")
        dataset = dataset.strip().strip("/")
        if not dataset:
            errors.add("dataset", "required: the store prefix of the data set")
        else:
            try:
                outside_service_namespaces(dataset, "dataset")
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
                dataset = ""
        if model_name and not _NAME_RE.match(model_name):
            errors.add(
                "model_name",
                "letters, digits, '_', '-', '.' (at most 100), starting "
                f"with a letter or digit; got {model_name!r}",
            )
        report = None
        parsed = None
        if spec is not None:
            parsed = parse_params(spec.params, params)
            errors.violations.extend(parsed.violations)
            errors.violations.extend(
                world_size_violations(parsed.values, self.settings.nproc_per_node)
            )
            nnodes = int(parsed.values.get("nnodes", 1) or 1)
            most = getattr(self.launcher, "max_nnodes", None)
            if most is not None and nnodes > most:
                errors.add(
                    "params[nnodes]",
                    f"{nnodes} machines; this service's launcher runs jobs on at most {most} "
                    "(several nodes need the kubernetes launcher: CLINISYNTH_FINETUNE_LAUNCHER)",
                )
            if dataset:
                report = datasets.validate(
                    self._dataset_source(dataset, viewer), dataset, spec.dataset_layout
                )
                errors.violations.extend(report.violations("dataset"))
            if report is not None and not parsed.violations and not report.problems:
                ctx = CheckContext(
                    self.catalog.seen_by(viewer), self.store, self.settings.model_repository
                )
                errors.violations.extend(spec.check(parsed.values, report, ctx))
        elif dataset and (
            not sees_prefix(self.store, dataset, viewer)
            or not any(True for _ in self.store.list(dataset + "/", limit=1))
        ):
            errors.add("dataset", f"no files under {dataset!r} (empty or missing data set)")
        errors.raise_if_any()
        assert spec is not None and parsed is not None and report is not None

        record = JobRecord(
            id=new_job_id(),
            kind=kind,
            dataset=dataset,
            params=parsed.strings,
            model_name=model_name or self._default_model_name(spec, dataset, parsed.values),
            request_id=request_id,
            state="queued",
            created=time.time(),
            max_steps=int(parsed.values["max_steps"]),
            checkpoints={},
            data={
                "images": report.images,
                "classes": report.classes,
                "per_class": report.per_class,
                "size": report.size,
                "channels": report.channels,
                TENANT_KEY: tenant,
            },
        )
        with self._create_lock:  # count and queue as one step: two creates cannot both fit
            with self._lock:
                active = sum(
                    1 for r in self._records.values() if not r.terminal and job_tenant(r) == tenant
                )
            self.quotas.check_jobs(tenant, active)
            if request_id:
                owner = self.jobs.claim_request(request_id, record.id, tenant)
                if owner != record.id:
                    return self.jobs.get(owner)
            self.jobs.put(record)
            self.jobs.append_event(
                record.id, "state", state="queued", message=f"queued {kind} on {dataset}"
            )
            with self._lock:
                self._records[record.id] = record
        self._wake.set()
        return record

    def _by_request(self, request_id: str, tenant: str) -> JobRecord | None:
        """A retried create: request ids are per tenant (another's never answers)."""
        with self._lock:
            for record in self._records.values():
                if record.request_id == request_id and job_tenant(record) == tenant:
                    return record
        return None

    def _dataset_source(self, prefix: str, viewer: Viewer) -> datasets.Source:
        """The data set at ``prefix`` as ``viewer`` sees it: another tenant's has no files."""
        if sees_prefix(self.store, prefix, viewer):
            return datasets.StoreSource(self.store, prefix)
        return _NoFiles()

    def _default_model_name(self, spec: KindSpec, dataset: str, values: dict[str, Any]) -> str:
        base = str(values.get("base_model", "") or "")
        if (
            base
            and "/" not in base
            and spec.name in ("text_to_image_adaptation", "reward_finetune")
        ):
            return base.partition("@")[0]  # a new version of the model it fine-tunes
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", dataset.rstrip("/").rsplit("/", 1)[-1]).strip("-.")
        suffix = {
            "diffusion_pretrain": "diffusion",
            "text_to_image_adaptation": "t2i",
            "reward_model": "reward",
            "reward_finetune": "aligned",
            "classifier": "classifier",
        }[spec.name]
        return f"{stem or 'data'}-{suffix}"[:100]

    # -- read -----------------------------------------------------------------------------
    def _record(self, job_id: str, viewer: Viewer | None = None) -> JobRecord:
        """The job ``job_id``; with a ``viewer``, another tenant's job is NOT_FOUND exactly as
        a missing one (same message)."""
        if not job_id:
            raise InvalidArgument.for_field("id", "required")
        if not _JOB_ID_RE.match(job_id):
            raise InvalidArgument.for_field("id", f"not a job id: {job_id!r}")
        with self._lock:
            record = self._records.get(job_id)
        if record is None:
            record = self.jobs.get(job_id)  # another replica's job, or NotFound
        if viewer is not None and not viewer.sees(job_tenant(record)):
            raise NotFound(f"no job {job_id!r}")  # what JobStore.get says of a missing one
        return record

    def view(self, record: JobRecord) -> JobView:
        step, metrics = record.step, dict(record.metrics)
        if record.state == "running":
            progress = self.jobs.progress(record.id)
            if progress.get("attempt", -1) >= 0:
                step = int(progress.get("step", step))
                metrics = dict(progress.get("metrics", metrics))
        position = 0
        if record.state == "queued":
            with self._lock:
                queued = sorted(
                    (r for r in self._records.values() if r.state == "queued"),
                    key=lambda r: (r.created, r.id),
                )
            position = 1 + next((i for i, r in enumerate(queued) if r.id == record.id), 0)
        return JobView(record, step, metrics, position)

    def get(self, job_id: str, *, tenant: str = "", admin: bool = False) -> JobView:
        return self.view(self._record(job_id, Viewer(tenant, admin)))

    def list(
        self,
        *,
        state: str = "",
        kind: str = "",
        page_size: int = 0,
        page_token: str = "",
        tenant: str = "",
        admin: bool = False,
    ) -> tuple[list[JobView], str]:
        """``tenant``'s jobs, newest first (``admin``: every tenant's)."""
        viewer = Viewer(tenant, admin)
        errors = ValidationErrors()
        if state and state not in STATES:
            errors.add("state", f"one of {', '.join(STATES)}")
        if kind and kind not in NAMES:
            errors.add("kind", f"unknown job kind {kind!r}; one of {', '.join(NAMES)}")
        if page_size < 0:
            errors.add("page_size", "must be >= 0")
        start = 0
        if page_token:
            try:
                start = int(page_token)
            except ValueError:
                errors.add("page_token", "not a token from this API")
        errors.raise_if_any()
        with self._lock:
            records = [
                r
                for r in self._records.values()
                if (not state or r.state == state)
                and (not kind or r.kind == kind)
                and viewer.sees(job_tenant(r))
            ]
        records.sort(key=lambda r: (r.created, r.id), reverse=True)  # newest first
        size = min(page_size or 100, MAX_PAGE)
        page = records[start : start + size]
        nxt = str(start + size) if start + size < len(records) else ""
        return [self.view(r) for r in page], nxt

    # -- cancel ---------------------------------------------------------------------------
    def cancel(
        self, job_id: str, *, strict: bool = False, tenant: str = "", admin: bool = False
    ) -> JobView:
        with self._lock:
            record = self._record(job_id, Viewer(tenant, admin))
            if record.terminal:
                if strict:
                    raise FailedPrecondition(
                        f"job {job_id} already {record.state}", reason="JOB_FINISHED"
                    )
                return self.view(record)
            was_running = record.state == "running"
            if was_running:
                self.jobs.request_cancel(job_id)
            self._finish(record, "cancelled", "cancelled by request")
        if was_running:
            self.launcher.stop(record, self.settings.stop_grace_s)
        self._wake.set()
        return self.view(self._record(job_id))

    # -- watch ----------------------------------------------------------------------------
    def watch(
        self,
        job_id: str,
        since: int,
        sink: Callable[[Event], None],
        check: Callable[[], None],
        poll_s: float = 0.2,
        *,
        tenant: str = "",
        admin: bool = False,
    ) -> None:
        """Send events after ``since`` until the job has ended and its last event went out."""
        if since < 0:
            raise InvalidArgument.for_field("since_sequence", "must be >= 0")
        self._record(job_id, Viewer(tenant, admin))
        last = since
        while True:
            check()
            terminal = self._record(job_id).terminal  # read before the events: no lost tail
            for event in self.jobs.events(job_id, last):
                sink(event)
                last = event.sequence
            if terminal:
                return
            time.sleep(poll_s)

    # -- checkpoints and promote ------------------------------------------------------------
    def checkpoints(
        self, job_id: str, *, tenant: str = "", admin: bool = False
    ) -> builtins.list[CheckpointInfo]:
        """The job's checkpoints (another tenant's job: NOT_FOUND, as a missing one)."""
        self._record(job_id, Viewer(tenant, admin))
        checkpoints = self.jobs.checkpoints(job_id)
        best = best_checkpoint(checkpoints)
        return [replace(c, best=best is not None and c.id == best.id) for c in checkpoints]

    def promote(
        self,
        job_id: str,
        checkpoint_id: str = "",
        model_name: str = "",
        *,
        tenant: str = "",
        admin: bool = False,
    ) -> tuple[ModelRecord, str]:
        """Register a checkpoint as a catalog version.

        The version of a tenant's job is private to that tenant (label ``tenant``); a job of
        tenant ``""`` (authentication off, or records from before tenants) gives a shared one.
        """
        viewer = Viewer(tenant, admin)
        record = self._record(job_id, viewer)
        with self._lock:
            if self._records.get(job_id) is record:
                self._record_checkpoints(record)  # what the worker reported since the last tick
        checkpoints = self.checkpoints(job_id, tenant=tenant, admin=admin)
        if not checkpoints:
            raise FailedPrecondition(
                f"job {job_id} ({record.state}) has no checkpoint yet", reason="NO_CHECKPOINT"
            )
        if checkpoint_id:
            chosen = next((c for c in checkpoints if c.id == checkpoint_id), None)
            if chosen is None:
                raise InvalidArgument.for_field(
                    "checkpoint_id",
                    f"job {job_id} has no checkpoint {checkpoint_id!r}; "
                    f"checkpoints: {', '.join(c.id for c in checkpoints)}",
                )
        else:
            chosen = next(c for c in checkpoints if c.best)
        name = model_name or record.model_name
        if not _NAME_RE.match(name):
            raise InvalidArgument.for_field("model_name", f"not a valid model name: {name!r}")
        repo = self.settings.model_repository
        if not repo or not pathlib.Path(repo).is_dir():
            raise FailedPrecondition(
                f"model repository {repo!r} is not a folder: set CLINISYNTH_MODEL_REPOSITORY "
                "(or the finetune service's model_repository) to Triton's repository"
            )
        from clinisynth_server import registry

        with self._promote_lock, tempfile.TemporaryDirectory(prefix="promote-") as tmp:
            folder = pathlib.Path(tmp) / "model"
            self._download_verified(record, chosen, folder)
            versions = self.catalog.seen_by(viewer).versions(name)
            previous = str(versions[-1].version) if versions else ""
            self.catalog.invalidate()
            try:
                model = registry.register_folder(
                    folder,
                    name,
                    catalog=self.catalog,
                    store=self.store,
                    model_repository=repo,
                    triton=self.triton,
                    labels={
                        "finetune_job": job_id,
                        "checkpoint": chosen.id,
                        "finetune_kind": record.kind,
                        **({TENANT_LABEL: job_tenant(record)} if job_tenant(record) else {}),
                    },
                    # A promoted version is served the way the name's latest one is.
                    layout=str(versions[-1].extra.get("layout", "split")) if versions else "split",
                )
            except NotFound as exc:
                raise FailedPrecondition(
                    f"cannot serve this checkpoint: {exc.message} (the Triton role for "
                    f"{record.kind} checkpoints is not available in this build)",
                    reason="TRITON_ROLE_MISSING",
                ) from exc
        self.jobs.append_event(
            job_id,
            "log",
            step=chosen.step,
            message=f"checkpoint {chosen.id} promoted as {model.ref}",
        )
        return model, previous

    def _download_verified(
        self, record: JobRecord, chosen: CheckpointInfo, folder: pathlib.Path
    ) -> None:
        """Download ``chosen``'s model folder and check it against the digests recorded for it.

        The bytes checked are the bytes registered (no second read). ``FailedPrecondition``
        naming the file when any differs, is missing or was added; nothing is registered then.
        """

        def refuse(path: str, why: str) -> FailedPrecondition:
            return FailedPrecondition(
                f"checkpoint {chosen.id} of job {record.id} does not match what the finetune "
                f"service recorded when it was written: {path}: {why}; nothing was registered",
                reason="CHECKPOINT_TAMPERED",
                metadata={"checkpoint": chosen.id, "file": path},
            )

        recorded = (
            record.checkpoints
            if record.checkpoints is not None
            else reported_checkpoints(self.jobs.events(record.id))  # a record from before
        )
        expected = recorded.get(chosen.id)
        prefix = self.jobs.checkpoint_prefix(record.id, chosen.id)
        if expected is None:
            raise refuse(MANIFEST_NAME, "the service never recorded its digest")
        if chosen.prefix != prefix:
            raise refuse(MANIFEST_NAME, f"it points at another prefix {chosen.prefix!r}")
        self.store.download_dir(prefix + MODEL_FOLDER, folder)
        files = record.checkpoint_files.get(chosen.id)
        try:
            if files is not None:  # names the rewritten file, whatever the manifest says now
                verify_tree(folder, _under(files, MODEL_FOLDER), label=MODEL_FOLDER)
            try:
                raw = self.store.get_bytes(prefix + MANIFEST_NAME)
            except NotFound:
                raise refuse(MANIFEST_NAME, "missing") from None
            listed = manifest_files(raw, expected)
            verify_tree(folder, _under(listed, MODEL_FOLDER), label=MODEL_FOLDER)
        except DigestMismatch as exc:
            log.warning("job %s: promotion of checkpoint %s refused: %s", record.id, chosen.id, exc)
            raise refuse(exc.path, str(exc).removeprefix(f"{exc.path}: ")) from None

    # -- checkpoint digests: the service's record ----------------------------------------------
    def _record_checkpoints(self, record: JobRecord) -> None:
        """Record the digests of checkpoints the worker reported since the last look.

        The caller holds ``self._lock`` and ``record`` is one of ``self._records``. A running
        job's reports are taken every tick; a finished job's account is closed, except that a
        record from before digests were kept is filled in once from its events. A report whose
        manifest no longer hashes to the reported digest is not recorded (and an older entry
        for that id is dropped): such a checkpoint is never resumed from or promoted.
        """
        if record.terminal and record.checkpoints is not None:
            return
        events = self.jobs.events(record.id, record.checkpoint_events)
        if not events and record.checkpoints is not None:
            return
        recorded = dict(record.checkpoints or {})
        files = dict(record.checkpoint_files)
        attempts = dict(record.checkpoint_attempts)
        for ckpt_id, digest in reported_checkpoints(events).items():  # newest report wins
            if not _CHECKPOINT_ID_RE.match(ckpt_id) or recorded.get(ckpt_id) == digest:
                continue
            if ckpt_id in recorded and attempts.get(ckpt_id) == record.attempt:
                self._not_recorded(
                    record.id, ckpt_id, "reported again with another digest by the same attempt"
                )
                continue
            recorded.pop(ckpt_id, None)
            files.pop(ckpt_id, None)
            listed = self._first_sight(record.id, ckpt_id, digest)
            if listed is not None:
                recorded[ckpt_id], files[ckpt_id] = digest, listed
                attempts[ckpt_id] = record.attempt
        if events:
            record.checkpoint_events = events[-1].sequence
            # Forget the ones the worker pruned (a later report is needed to bring one back).
            present = {
                info.key.rstrip("/").rsplit("/", 1)[-1]
                for info in self.store.list(
                    self.jobs.key(record.id, "checkpoints/"), recursive=False
                )
                if info.is_prefix
            }
            recorded = {k: v for k, v in recorded.items() if k in present}
        files = {k: v for k, v in files.items() if k in recorded}
        attempts = {k: v for k, v in attempts.items() if k in recorded}
        if (recorded, files, attempts) != (
            record.checkpoints,
            record.checkpoint_files,
            record.checkpoint_attempts,
        ):
            record.checkpoints, record.checkpoint_files = recorded, files
            record.checkpoint_attempts = attempts
            self.jobs.put(record)

    def _first_sight(self, job_id: str, ckpt_id: str, digest: str) -> dict[str, str] | None:
        """The reported checkpoint's file list if its manifest still hashes to ``digest``."""
        key = self.jobs.checkpoint_prefix(job_id, ckpt_id) + MANIFEST_NAME
        try:
            return manifest_files(self.store.get_bytes(key), digest)
        except NotFound:
            return None  # pruned (or rewritten by a later attempt, whose report follows)
        except DigestMismatch as exc:
            self._not_recorded(job_id, ckpt_id, str(exc))
            return None

    def _not_recorded(self, job_id: str, ckpt_id: str, why: str) -> None:
        log.warning("job %s: checkpoint %s not recorded: %s", job_id, ckpt_id, why)
        self.jobs.append_event(
            job_id,
            "error",
            message=(
                f"checkpoint {ckpt_id} report not recorded: {why}; only what the service "
                "recorded is resumed from or promoted"
            ),
        )

    # -- kinds, uploads, data-set checks ---------------------------------------------------------
    def kinds(self) -> builtins.list[KindSpec]:
        return list(self._kinds.values())

    def upload(
        self,
        chunks: Iterable[tuple[str, bytes, str]],
        *,
        namespace: str = DATASETS_NAMESPACE,
        tenant: str = "",
    ) -> ObjectInfo:
        """(key, data, sha256) chunks of one file → the stored object; digest checked.

        Only data sets are written here: the key must lie under ``datasets/`` (the rest of the
        store belongs to the services that write it), or under ``namespace`` for the model
        upload RPC (``imports/``). A DICOM data-set file is de-identified before it is stored,
        so the stored digest differs from the one sent.

        A data set belongs to the tenant that uploaded its first file: each file records
        ``tenant`` (object metadata), and an upload into another tenant's data set is refused.
        """
        key = ""
        expected = ""
        digest = hashlib.sha256()
        size = 0
        with tempfile.TemporaryFile() as spool:
            for chunk_key, data, sha in chunks:
                if chunk_key and not key:
                    key = confine_key(chunk_key, namespace, "key")
                    if namespace == DATASETS_NAMESPACE:
                        self._check_dataset_owner(key, tenant)
                elif chunk_key and chunk_key != key:
                    raise InvalidArgument.for_field("key", "one upload carries one file")
                if not key:
                    raise InvalidArgument.for_field("key", "the first chunk must name the key")
                size += len(data)
                if size > self.settings.max_upload_bytes:
                    raise InvalidArgument.for_field(
                        "data", f"larger than {self.settings.max_upload_bytes} bytes"
                    )
                digest.update(data)
                spool.write(data)
                if sha:
                    expected = sha.lower()
            if not key:
                raise InvalidArgument.for_field("key", "empty upload: no chunk named a key")
            if expected and expected != digest.hexdigest():
                raise InvalidArgument.for_field(
                    "sha256",
                    f"mismatch: sent {expected}, received bytes hash to "
                    f"{digest.hexdigest()} ({size} bytes); nothing was stored",
                )
            spool.seek(0)
            owner = owner_metadata(tenant) if namespace == DATASETS_NAMESPACE else {}
            if namespace == DATASETS_NAMESPACE and shards.is_shard_key(key):
                return self._store_shard(key, spool, digest.hexdigest(), owner)
            if namespace == DATASETS_NAMESPACE and _is_dicom(key, spool):
                return self.store.put_bytes(
                    key,
                    self._deidentify(key, spool, size),
                    content_type="application/dicom",
                    metadata=owner,
                )
            spool.seek(0)
            return self.store.put_stream(key, spool, metadata=owner)

    def _check_dataset_owner(self, key: str, tenant: str) -> None:
        """Refuse a file for a data set another tenant owns (a data-set name is taken once)."""
        root = dataset_root(key)
        owner = prefix_owner(self.store, root)
        if owner is None:  # a file directly under datasets/ is a data set of its own
            owner = prefix_owner(self.store, key)
        if owner is not None and owner != tenant:
            raise InvalidArgument.for_field(
                "key", f"data set {root.rstrip('/')!r} is taken by another tenant; use another name"
            )

    def _store_shard(
        self, key: str, spool: IO[bytes], sent_sha256: str, owner: dict[str, str]
    ) -> ObjectInfo:
        """A data-set shard: named by its digest, every member checked, DICOM de-identified.

        The name ``<nnnnnn>-<first 16 hex of the sha256 sent>.tar`` makes a stored shard its
        own proof of a complete, verified upload, so a resumed upload skips it by name.
        """
        name = key.rsplit("/", 1)[-1]
        if not _SHARD_NAME_RE.match(name) or name[7:23] != sent_sha256[:16]:
            raise InvalidArgument.for_field(
                "key", f"a shard is named <6 digits>-<first 16 hex of its sha256>.tar; got {name!r}"
            )

        def deidentify(member: str, data: bytes) -> bytes:
            with tempfile.TemporaryFile() as one:
                one.write(data)
                return self._deidentify(key, one, len(data))

        with shards.sanitize(spool, deidentify) as clean:
            return self.store.put_stream(key, clean, metadata=owner)

    def list_dataset_files(
        self, prefix: str, *, tenant: str = "", admin: bool = False
    ) -> builtins.list[ObjectInfo]:
        """Files under a data set prefix, each with its sha256 (a resumed upload's check).

        Another tenant's data set lists as a missing one: no files."""
        prefix = prefix.strip().strip("/")
        if not prefix:
            raise InvalidArgument.for_field("prefix", "required")
        outside_service_namespaces(prefix, "prefix")
        if not sees_prefix(self.store, prefix, Viewer(tenant, admin)):
            return []
        return [
            info if info.sha256 else self.store.stat(info.key)
            for info in self.store.list(prefix + "/")
        ]

    def _deidentify(self, key: str, spool: IO[bytes], size: int) -> bytes:
        """PS3.15 basic profile on an uploaded DICOM, consistent across one data set.

        The UID salt and the date shift derive from a service secret and the data set (the
        first folder under ``datasets/``), so every file of one data set keeps its
        cross-references and intervals while neither can be recomputed without the secret.
        """
        if size > self.settings.max_dicom_bytes:
            raise InvalidArgument.for_field(
                "data",
                f"DICOM of {size} bytes: at most {self.settings.max_dicom_bytes} bytes "
                "can be de-identified in one upload",
            )
        spool.seek(0)
        data = spool.read()
        scope = key[len(DATASETS_NAMESPACE) :].split("/", 1)[0]
        secret = self._deid_secret()
        salt = hmac.new(secret.encode(), f"uid\x00{scope}".encode(), "sha256").hexdigest()
        shift = deid.date_shift_for(scope, secret=secret)
        try:
            return deid.deidentify_bytes(data, date_shift_days=shift, uid_salt=salt, field="data")
        except ClinisynthError:
            raise
        except Exception as exc:  # a malformed file is the caller's, never INTERNAL
            # The message is not echoed: pydicom quotes element values, which may identify.
            raise InvalidArgument.for_field(
                "data",
                f"this DICOM cannot be de-identified ({type(exc).__name__}); nothing was stored",
            ) from None

    def _deid_secret(self) -> str:
        """The de-identification secret, created once in the finetune namespace."""
        with self._deid_lock:
            if self._deid_key is None:
                fresh = secrets.token_hex(32)
                self.store.put_if_absent(DEID_SECRET_KEY, fresh.encode())
                self._deid_key = self.store.get_bytes(DEID_SECRET_KEY).decode("ascii").strip()
            return self._deid_key

    def validate_dataset(
        self, prefix: str, layout: str = "", *, tenant: str = "", admin: bool = False
    ) -> datasets.DatasetReport:
        """The data set's report; another tenant's reads as a missing one (no files)."""
        prefix = prefix.strip().strip("/")
        if not prefix:
            raise InvalidArgument.for_field("prefix", "required")
        outside_service_namespaces(prefix, "prefix")
        if layout and layout not in datasets.LAYOUTS:
            raise InvalidArgument.for_field("layout", f"one of {', '.join(datasets.LAYOUTS)}")
        source = self._dataset_source(prefix, Viewer(tenant, admin))
        if not layout:
            names = set(source.names())
            layout = (
                "image_text_manifest"
                if datasets.MANIFEST in names
                else "feedback_export"
                if datasets.LABELS in names
                else "image_folder"
            )
        return datasets.validate(source, prefix, layout, decode_shards=True)

    # -- the scheduler ------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.time()
        with self._lock:
            running = [r for r in self._records.values() if r.state == "running"]
        for record in running:
            self._check_running(record, now)
        with self._lock:
            active = sum(1 for r in self._records.values() if r.state == "running")
            queued = sorted(
                (r for r in self._records.values() if r.state == "queued"),
                key=lambda r: (r.created, r.id),
            )
        for record in queued[: max(0, self.settings.max_concurrent_jobs - active)]:
            self._launch(record)
        self._export_metrics()

    def _check_running(self, record: JobRecord, now: float) -> None:
        with self._lock:
            if record.state == "running":
                self._record_checkpoints(record)
        result = self.jobs.result(record.id)
        if result and int(result.get("attempt", -1)) == record.attempt and result.get("state"):
            with self._lock:
                if self._records[record.id].state == "running":
                    record.step = int(result.get("step", record.step))
                    record.metrics = dict(result.get("metrics", record.metrics))
                    self._finish(record, result["state"], result.get("reason", ""))
            return
        alive = self.launcher.alive(record)
        progress = self.jobs.progress(record.id)
        beat = float(progress.get("time", 0)) if progress.get("attempt") == record.attempt else 0
        last_sign = max(beat, float(record.worker.get("launched", record.started)))
        stale = now - last_sign > self.settings.heartbeat_timeout_s
        if alive and not stale:
            if record.id not in self._seen_alive:
                self._seen_alive.add(record.id)
                if not self._launched_here(record):
                    self.jobs.append_event(
                        record.id,
                        "log",
                        step=int(progress.get("step", 0)),
                        message="worker adopted by a restarted service",
                    )
            return
        if alive is None and not stale:
            return  # cannot tell and the heartbeat is fresh: still running
        # Dead (or hung): re-read the result once, the worker may have just finished.
        result = self.jobs.result(record.id)
        if result and int(result.get("attempt", -1)) == record.attempt and result.get("state"):
            return self._check_running(record, now)
        if alive:
            self.launcher.stop(record, 0.0)
        code = self.launcher.exit_code(record)
        why = (
            f"worker heartbeat stale for {now - last_sign:.0f} s"
            if alive
            else f"worker exited without a result (exit code {code})"
            if code is not None
            else "worker process is gone"
        )
        self._restart(record, why)

    def _launched_here(self, record: JobRecord) -> bool:
        return getattr(self.launcher, "_proc", lambda r: None)(record) is not None

    def _restart(self, record: JobRecord, why: str) -> None:
        with self._lock:
            self._seen_alive.discard(record.id)
            if record.restarts >= self.settings.max_restarts:
                self._finish(record, "failed", f"{why}; gave up after {record.restarts} restarts")
                return
            record.restarts += 1
            self._record_checkpoints(record)  # the relaunched worker trusts only these
            checkpoints = self.jobs.checkpoints(record.id)
            resume = f"checkpoint {checkpoints[-1].id}" if checkpoints else "the start"
            self.jobs.append_event(
                record.id,
                "error",
                message=f"{why}; resuming from {resume} (restart {record.restarts})",
            )
            record.state = "queued"
            record.worker = {}
            self.jobs.put(record)
            self.jobs.append_event(record.id, "state", state="queued", message="re-queued")

    def _launch(self, record: JobRecord) -> None:
        with self._lock:
            if record.state != "queued":
                return
            record.state = "running"
            record.started = record.started or time.time()
            record.attempt = record.restarts
            record.worker = {"launched": time.time()}
            self.jobs.put(record)
        try:
            nproc = int(record.params.get("nproc_per_node", "0")) or self.settings.nproc_per_node
            handle = self.launcher.launch(record, nproc)
        except ClinisynthError as exc:
            with self._lock:
                self._finish(record, "failed", f"could not start a worker: {exc.message}")
            return
        with self._lock:
            record.worker = handle
            self._seen_alive.add(record.id)
            self.jobs.put(record)
        self.jobs.append_event(
            record.id, "state", state="running", message=f"worker attempt {record.attempt} launched"
        )

    def _finish(self, record: JobRecord, state: str, reason: str) -> None:
        """Terminal transition (caller holds the lock): event first, then the record."""
        if state not in ("succeeded", "failed", "cancelled"):
            state, reason = "failed", f"unknown worker outcome {state!r}"
        try:
            self._record_checkpoints(record)  # the last reports, before the account closes
        except ClinisynthError as exc:
            log.warning("job %s: checkpoint reports not read: %s", record.id, exc)
        self.jobs.append_event(
            record.id, "state", state=state, step=record.step, message=reason or state
        )
        record.state = state
        record.failure_reason = reason if state == "failed" else ""
        record.finished = time.time()
        if state == "succeeded":
            record.step = record.max_steps
        self.jobs.put(record)
        self._records[record.id] = record
        forget = getattr(self.launcher, "forget", None)
        if forget is not None and state != "cancelled":
            forget(record)
        if self.metrics is not None and state == "failed":
            self.metrics.failures.labels(record.kind).inc()

    def _export_metrics(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            records = list(self._records.values())
        counts = {(s, k): 0 for s in STATES for k in NAMES}
        live: set[tuple[str, str]] = set()
        for r in records:
            counts[(r.state, r.kind)] = counts.get((r.state, r.kind), 0) + 1
            if r.state == "running":
                live.add((r.id, r.kind))
                progress = self.jobs.progress(r.id)
                metrics = progress.get("metrics", {})
                if "loss" in metrics:
                    self.metrics.job_loss.labels(r.id, r.kind).set(metrics["loss"])
                self.metrics.job_step.labels(r.id, r.kind).set(int(progress.get("step", 0)))
                if progress.get("checkpoint_time"):
                    self.metrics.checkpoint_time.labels(r.id, r.kind).set(
                        progress["checkpoint_time"]
                    )
        for (state, kind), n in counts.items():
            self.metrics.jobs.labels(state, kind).set(n)
        for labels in self._live_labels - live:
            for gauge in (
                self.metrics.job_loss,
                self.metrics.job_step,
                self.metrics.checkpoint_time,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self._live_labels = live


def _under(files: dict[str, str], folder: str) -> dict[str, str]:
    """The entries of a checkpoint file list under ``folder``, relative to it."""
    return {k[len(folder) :]: v for k, v in files.items() if k.startswith(folder)}


_SHARD_NAME_RE = re.compile(r"^[0-9]{6}-[0-9a-f]{16}\.tar$")


def _is_dicom(key: str, spool: IO[bytes]) -> bool:
    """A DICOM by name or by its Part 10 magic (a DICOM under any other name is one too)."""
    spool.seek(0)
    head = spool.read(132)
    return key.lower().endswith(DICOM_SUFFIXES) or head[128:132] == b"DICM"


def iter_upload(chunks: Iterator[Any]) -> Iterator[tuple[str, bytes, str]]:
    for chunk in chunks:
        yield chunk.key, bytes(chunk.data), chunk.sha256


def cleanup_dir(path: pathlib.Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
