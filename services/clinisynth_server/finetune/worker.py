"""``python -m clinisynth_server.finetune.worker --run-id=ID``: run one job's training.

Started by the service's launcher (a local subprocess, ``torchrun`` for several processes, or a
Kubernetes Job from ``deploy/k8s/base/finetune/job-template.yaml``). Everything it needs is in the
store: it reads the job record, downloads the data set, resumes from the newest committed
checkpoint (model, optimiser, LR schedule, EMA, RNG, data position) and then:

1. runs optimiser steps, reporting progress events every ``log_every`` steps;
2. writes a checkpoint every ``checkpoint_every`` steps (files first, ``checkpoint.json`` last),
   prunes old ones, keeps the best;
3. stops at ``max_steps`` (result ``succeeded``), on an error (``failed``), when the service asks
   (``cancel.json``, then ``cancelled``), or on SIGTERM without a cancel (preempted: it writes a
   checkpoint and exits 143 without a result, so the service resumes it).

A heartbeat thread keeps ``progress.json`` fresh so a restarted service can tell a live worker it
may adopt from a dead one it must resume. Only the main process (rank 0) writes to the store.

Nothing on the resume path is unpickled. Training state is ``state/trainer.safetensors`` +
``state/trainer.json`` (:func:`~clinisynth_server.methods._checkpoint.save_state`), and
``checkpoint.json`` — the manifest, written last — lists every file of the checkpoint with its
sha256; the manifest's own sha256 goes into the ``checkpoint`` event, from which the service
records it in the job record (``JobRecord.checkpoints``), which only the service writes. Before
resuming, the worker checks the manifest against that recorded digest and every file against the
manifest: a checkpoint that fails (a replaced or altered file, an extra file, a manifest rewritten
to match rewritten files, one the service never recorded, the old pickled ``trainer.pt`` format)
is refused with an ``error`` event and the previous one is tried; when none passes, training
starts over from step 0 (with an event saying why) rather than load unverified bytes.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from clinisynth_server.errors import (
    Cancelled,
    ClinisynthError,
    FailedPrecondition,
    InvalidArgument,
)

log = logging.getLogger("clinisynth.finetune.worker")
PREEMPTED_EXIT = 143
HEARTBEAT_S = float(os.environ.get("CLINISYNTH_FINETUNE_HEARTBEAT_S", "2"))
CANCEL_POLL_S = 1.0


class Preempted(Exception):
    """SIGTERM without a cancel request: checkpoint and leave the job to be resumed."""


class CheckpointRefused(Exception):
    """A checkpoint that failed verification: it is never loaded."""


def group_torn_down(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank is gone.

    torchrun tears the whole group down when one rank dies (kill -9, OOM): the survivors' next
    all-reduce fails. That is not the job's failure: they leave without a result, the launcher
    sees the worker gone and the service resumes the job from its last checkpoint.
    """
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed by peer", "connection reset")
    )


class Worker:
    def __init__(
        self, run_id: str, *, store_url: str, workdir: pathlib.Path, model_repository: str
    ) -> None:
        from clinisynth_server.catalog import Catalog
        from clinisynth_server.finetune.records import JobStore
        from clinisynth_server.store import open_store

        self.run_id = run_id
        self.store = open_store(store_url)
        self.jobs = JobStore(self.store)
        self.catalog = Catalog(self.store)
        self.workdir = workdir / run_id
        self.model_repository = model_repository
        self.record = self.jobs.get(run_id)
        self._lock = threading.Lock()
        self._progress: dict[str, Any] = {}
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._term = threading.Event()
        self._writes: queue.Queue[Any] = queue.Queue()
        self.is_main = True
        self.world_size = 1

    # -- store side effects (main process only), written by one writer thread ---------------
    # The training thread only enqueues: it never waits on the store (fsync, S3 round trips),
    # and the writes keep their order (events, then the result).
    def event(self, type: str, **fields: Any) -> None:
        if self.is_main:
            self._writes.put(("event", type, fields))

    def heartbeat(self, **update: Any) -> None:
        if not self.is_main:
            return
        with self._lock:
            self._progress.update(update)
        self._writes.put(("progress", None, None))

    def _write_progress(self) -> None:
        from clinisynth_server.finetune.records import pid_start_time

        with self._lock:
            self._progress.update(
                {
                    "time": time.time(),
                    "pid": os.getpid(),
                    "start_time": pid_start_time(os.getpid()),
                    "host": socket.gethostname(),
                    "attempt": self.record.attempt,
                }
            )
            snapshot = dict(self._progress)
        self.jobs.put_progress(self.run_id, snapshot)

    def _writer(self) -> None:
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                what, type_, fields = item
                if what == "event":
                    self.jobs.append_event(self.run_id, type_, **fields)
                else:  # progress or the final flush
                    self._write_progress()
            except ClinisynthError:
                log.warning("store write failed", exc_info=True)
            finally:
                self._writes.task_done()

    def _drain(self) -> None:
        self._writes.put(("flush", None, None))
        self._writes.join()

    def _background(self) -> None:
        next_beat = 0.0
        while not self._stop.wait(0.25):
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + HEARTBEAT_S
                self.heartbeat()
                try:
                    if self.jobs.cancel_requested(self.run_id):
                        self._cancel.set()
                except ClinisynthError:
                    log.warning("store unreachable for the cancel check", exc_info=True)

    def check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled by request")
        if self._term.is_set():
            if self.jobs.cancel_requested(self.run_id):
                self._cancel.set()
                raise Cancelled("cancelled by request")
            raise Preempted("SIGTERM")

    def _on_sigterm(self, signum: int, _frame: Any) -> None:
        self._term.set()

    # -- artifacts surviving a crash -----------------------------------------------------
    def save_artifact(self, name: str, path: pathlib.Path) -> None:
        if self.is_main:
            self.store.put_file(self.jobs.key(self.run_id, f"artifacts/{name}"), path)

    def load_artifact(self, name: str, path: pathlib.Path) -> bool:
        key = self.jobs.key(self.run_id, f"artifacts/{name}")
        if not self.store.exists(key):
            return False
        self.store.get_file(key, path)
        return True

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        if self.record.terminal:
            log.info("job %s is %s: nothing to do", self.run_id, self.record.state)
            return 0
        signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self._writer, daemon=True, name="store-writer").start()
        threading.Thread(target=self._background, daemon=True, name="heartbeat").start()
        outcome: dict[str, Any] = {"attempt": self.record.attempt}
        code = 0
        try:
            outcome.update(self._train())
            outcome["state"] = "succeeded"
        except Cancelled as exc:
            outcome.update(state="cancelled", reason=str(exc))
        except Preempted:
            code = PREEMPTED_EXIT
        except Exception as exc:
            if self.world_size > 1 and group_torn_down(exc):
                log.warning("job %s: the process group is gone, leaving: %s", self.run_id, exc)
                return 1  # no result: the service resumes from the last checkpoint

            reason = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ClinisynthError):
                log.error("job %s failed:\n%s", self.run_id, traceback.format_exc())
            self.event("error", message=reason)
            outcome.update(state="failed", reason=reason)
        finally:
            self._stop.set()
            self._drain()
        if code == 0 and self.is_main:
            outcome["time"] = time.time()
            outcome.setdefault("step", self._progress.get("step", 0))
            outcome.setdefault("metrics", self._progress.get("metrics", {}))
            self.jobs.put_result(self.run_id, outcome)
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def _accelerator(self, mixed_precision: str, device: str = "auto") -> Any:
        import torch

        if device == "gpu" and not torch.cuda.is_available():
            raise FailedPrecondition(
                "params[device] is gpu but this worker sees no CUDA device (a CPU build of "
                "torch, or no GPU given to the process)"
            )
        try:
            from accelerate import Accelerator
        except ImportError:  # accelerate is optional: one process, CPU or one GPU
            return None
        cpu = device == "cpu" or not torch.cuda.is_available()
        return Accelerator(cpu=cpu, mixed_precision=mixed_precision)

    def _train(self) -> dict[str, Any]:
        import torch

        from clinisynth_server.finetune import datasets, kinds
        from clinisynth_server.finetune.kinds.base import (
            TrainContext,
            load_rng_state,
            rng_state,
            seed_everything,
        )
        from clinisynth_server.finetune.params import typed, world_size_violations
        from clinisynth_server.finetune.records import CheckpointInfo, JobStore

        threads = int(os.environ.get("CLINISYNTH_FINETUNE_TORCH_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        spec = kinds.load(self.record.kind)
        p = typed(spec.params, self.record.params)
        accelerator = self._accelerator(p["mixed_precision"], p.get("device", "auto"))
        self.is_main = accelerator is None or accelerator.is_main_process
        self.world_size = world = accelerator.num_processes if accelerator is not None else 1
        # Also refused at creation; the service's default world size may have changed since.
        uneven = world_size_violations({**p, "nproc_per_node": world, "nnodes": 1}, world)
        if uneven:
            raise InvalidArgument.for_field(uneven[0].field, uneven[0].description)
        t_setup = time.monotonic()
        self.heartbeat(step=0, phase="setup")
        self.event(
            "log",
            message=(
                f"worker attempt {self.record.attempt} started: pid {os.getpid()} on "
                f"{socket.gethostname()}, {accelerator.num_processes if accelerator else 1} "
                f"process(es), device {accelerator.device if accelerator else 'cpu'}"
            ),
        )

        # 1. Data: the prefix copied to local scratch once per attempt, then read locally.
        # A sharded set is never copied: it streams through a bounded cache per process.
        data_dir = self.workdir / "data"
        store_source = datasets.StoreSource(self.store, self.record.dataset)
        source: datasets.Source | None = datasets.sharded(store_source)
        if source is None:
            if accelerator is None or accelerator.is_local_main_process:  # one copy per machine
                shutil.rmtree(data_dir, ignore_errors=True)
                self.store.download_dir(self.record.dataset, data_dir)
            if accelerator is not None:
                accelerator.wait_for_everyone()
            source = datasets.FolderSource(data_dir)
        report = datasets.validate(
            source, self.record.dataset, spec.dataset_layout, decode_images=False
        )
        datasets.raise_if_bad(report)
        # Sizes were measured when the job was created (every image decoded then).
        size, channels = (
            int(self.record.data.get("size", 0)),
            int(self.record.data.get("channels", 1)),
        )
        report.shapes = {(size, size, channels): report.images} if size else {}

        # 2. The trainer, built identically on every attempt (same seed) ...
        seed_everything(p["seed"])
        ctx = TrainContext(
            job_id=self.run_id,
            params=p,
            source=source,
            report=report,
            workdir=self.workdir,
            store=self.store,
            catalog=self.catalog,
            model_repository=self.model_repository,
            accelerator=accelerator,
            log=lambda msg: self.event("log", message=msg),
            save_artifact=self.save_artifact,
            load_artifact=self.load_artifact,
            # With several ranks, stopping is agreed at step boundaries (see _agree_on_stop).
            check_cancel=self.check_cancel if world == 1 else lambda: None,
        )
        trainer = spec.trainer(ctx)

        # 3. ... then overwritten by the newest checkpoint that passes verification, if any.
        start = 0
        checkpoints = self.jobs.checkpoints(self.run_id)
        resumed = self._newest_verified(checkpoints) if checkpoints else None
        if resumed is not None:
            t_resume = time.monotonic()
            last, state = resumed
            trainer.load_state(state["trainer"])
            load_rng_state(state["rng"])
            start = last.step
            self.event(
                "log",
                step=start,
                metrics={
                    "resume_s": time.monotonic() - t_resume,
                    "setup_s": time.monotonic() - t_setup,
                },
                message=f"resumed from checkpoint {last.id} (step {last.step})",
            )

        # 4. The loop.
        max_steps, every = p["max_steps"], p["checkpoint_every"]
        log_every = p["log_every"]
        setup_s = time.monotonic() - t_setup
        self.heartbeat(step=start, phase="train", setup_s=setup_s)
        window: list[float] = []
        extra: dict[str, list[float]] = {}
        t_window, steps_window = time.monotonic(), 0
        metrics: dict[str, float] = {}
        last_ckpt = start
        try:
            for step in range(start + 1, max_steps + 1):
                if world > 1:
                    self._agree_on_stop(ctx.device)
                self.check_cancel()
                out = trainer.step(step)
                if world > 1:
                    out = self._mean_over_ranks(out, ctx.device)
                window.append(out["loss"])
                for k, v in out.items():
                    if k != "loss":
                        extra.setdefault(k, []).append(v)
                steps_window += 1
                if step % log_every == 0 or step == max_steps:
                    now = time.monotonic()
                    metrics = {
                        "loss": sum(window) / len(window),
                        "steps_per_s": steps_window / max(now - t_window, 1e-9),
                    }
                    metrics.update({k: sum(v) / len(v) for k, v in extra.items()})
                    window, extra, t_window, steps_window = [], {}, now, 0
                    self.heartbeat(step=step, metrics=metrics)
                    self.event("progress", step=step, metrics=metrics)
                if step % every == 0 or step == max_steps:
                    self._checkpoint(trainer, step, metrics, CheckpointInfo, JobStore, rng_state, p)
                    last_ckpt = step
        except Preempted:
            if self.is_main and step - 1 > last_ckpt:
                self._checkpoint(trainer, step - 1, metrics, CheckpointInfo, JobStore, rng_state, p)
            raise
        return {"step": max_steps, "metrics": metrics}

    # -- several ranks ----------------------------------------------------------------------
    def _agree_on_stop(self, device: Any) -> None:
        """Every rank sees a cancel / SIGTERM at the same step: one leaving alone would leave
        the others waiting in the next all-reduce."""
        import torch
        import torch.distributed as dist

        flags = torch.tensor(
            [float(self._cancel.is_set()), float(self._term.is_set())], device=device
        )
        dist.all_reduce(flags)
        if flags[0] > 0:
            self._cancel.set()
        if flags[1] > 0:
            self._term.set()

    def _mean_over_ranks(self, out: dict[str, float], device: Any) -> dict[str, float]:
        """Metrics of the global batch: each rank's shard mean, averaged (equal shards)."""
        import torch
        import torch.distributed as dist

        keys = sorted(out)
        values = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        return {k: float(v) / self.world_size for k, v in zip(keys, values.tolist(), strict=True)}

    # -- resume: verify, then load ------------------------------------------------------------
    def _recorded_manifests(self) -> tuple[dict[str, str], bool]:
        """Expected manifest digests (id → sha256) and whether the service recorded them.

        The service's job record is the authority. A record from before it kept digests falls
        back to this job's own ``checkpoint`` events (newest wins), as workers did then.
        """
        from clinisynth_server.finetune.records import reported_checkpoints

        if self.record.checkpoints is not None:
            return dict(self.record.checkpoints), True
        return reported_checkpoints(self.jobs.events(self.run_id)), False

    def _newest_verified(self, checkpoints: list[Any]) -> tuple[Any, dict[str, Any]] | None:
        """The newest checkpoint that verifies, with its decoded state; refused ones are skipped.

        None when none verifies (an event says which were refused and that training starts
        over): nothing unverified is ever loaded.
        """
        recorded, authoritative = self._recorded_manifests()
        refused = []
        for ckpt in reversed(checkpoints):
            try:
                if authoritative and ckpt.id not in recorded:
                    raise CheckpointRefused("the finetune service never recorded its digest")
                return ckpt, self._load_verified(ckpt, recorded.get(ckpt.id))
            except CheckpointRefused as exc:
                refused.append(ckpt.id)
                log.warning("job %s: checkpoint %s refused: %s", self.run_id, ckpt.id, exc)
                self.event(
                    "error",
                    step=ckpt.step,
                    message=f"checkpoint {ckpt.id} refused, not loaded: {exc}",
                )
        message = (
            f"no checkpoint of job {self.run_id} passed verification (refused: "
            f"{', '.join(refused)}); starting over from step 0, nothing unverified was loaded"
        )
        log.warning("%s", message)
        self.event("error", step=0, message=message)
        return None

    def _load_verified(self, ckpt: Any, recorded_sha256: str | None) -> dict[str, Any]:
        """Check the manifest and every file's sha256, then decode the state (no unpickling)."""
        from clinisynth_server.errors import NotFound
        from clinisynth_server.finetune.records import JobStore
        from clinisynth_server.methods._checkpoint import (
            MANIFEST_NAME,
            STATE_FILES,
            DigestMismatch,
            StateFormatError,
            load_state,
            manifest_files,
            sha256_of,
        )

        # The manifest names its own id and prefix: trust neither, derive the prefix from the step.
        if not isinstance(ckpt.step, int) or ckpt.id != JobStore.checkpoint_id(ckpt.step):
            raise CheckpointRefused(f"its id does not match its step {ckpt.step}")
        prefix = self.jobs.checkpoint_prefix(self.run_id, ckpt.id)
        if ckpt.prefix != prefix:
            raise CheckpointRefused(f"its manifest points at another prefix {ckpt.prefix!r}")
        try:
            raw = self.store.get_bytes(prefix + MANIFEST_NAME)
        except NotFound as exc:
            raise CheckpointRefused("its manifest disappeared") from exc
        try:
            files = manifest_files(raw, recorded_sha256)
        except DigestMismatch as exc:
            raise CheckpointRefused(str(exc)) from None
        present = {info.key[len(prefix) :] for info in self.store.list(prefix)} - {MANIFEST_NAME}
        if present != set(files):
            diff = sorted(present ^ set(files))
            raise CheckpointRefused(f"files differ from its manifest: {', '.join(diff[:5])}")
        needed = {f"state/{name}" for name in STATE_FILES}
        if not needed <= set(files):
            raise CheckpointRefused(f"no {', '.join(sorted(needed - set(files)))}")
        # The state files are hashed as downloaded and loaded from that same local copy.
        local = self.workdir / "resume" / f"{ckpt.id}-{os.getpid()}"  # one per rank process
        shutil.rmtree(local, ignore_errors=True)
        for name in STATE_FILES:
            self.store.get_file(f"{prefix}state/{name}", local / name)
            if sha256_of(local / name) != files[f"state/{name}"]:
                raise CheckpointRefused(f"state/{name} does not match its manifest sha256")
        # The promotable model/ folder is not read on resume; its digests come from the store.
        for rel in sorted(set(files) - needed):
            if self.store.stat(prefix + rel).sha256 != files[rel]:
                raise CheckpointRefused(f"{rel} does not match its manifest sha256")
        try:
            state = load_state(local)
        except StateFormatError as exc:
            raise CheckpointRefused(str(exc)) from exc
        finally:
            shutil.rmtree(local, ignore_errors=True)
        if not {"trainer", "rng"} <= set(state) or state.get("step") != ckpt.step:
            raise CheckpointRefused("its state lacks the trainer / RNG or is for another step")
        return state

    def _checkpoint(
        self,
        trainer: Any,
        step: int,
        metrics: dict[str, float],
        CheckpointInfo: Any,
        JobStore: Any,
        rng_state: Any,
        p: dict[str, Any],
    ) -> None:
        import hashlib

        from clinisynth_server.methods._checkpoint import (
            MANIFEST_NAME,
            MANIFEST_VERSION,
            file_digests,
            save_state,
        )
        from clinisynth_server.store.base import encode_json

        t0 = time.monotonic()
        evaluation = trainer.evaluate()
        if not self.is_main:
            return
        ckpt_id = JobStore.checkpoint_id(step)
        local = self.workdir / "checkpoints" / ckpt_id
        shutil.rmtree(local, ignore_errors=True)
        (local / "state").mkdir(parents=True)
        trainer.save_model(local / "model")
        save_state(local / "state", {"trainer": trainer.state(), "rng": rng_state(), "step": step})
        files = file_digests(local)
        prefix = self.jobs.checkpoint_prefix(self.run_id, ckpt_id)
        self.store.delete_prefix(prefix)  # leftovers of an attempt that died mid-upload
        self.store.upload_dir(local, prefix)
        all_metrics = {**{k: v for k, v in metrics.items() if k != "steps_per_s"}, **evaluation}
        info = CheckpointInfo(
            id=ckpt_id,
            step=step,
            metrics=all_metrics,
            created=time.time(),
            best=False,
            prefix=prefix,
            attempt=self.record.attempt,
        )
        manifest = {
            **info.to_json(),
            "best_metric": trainer.best_metric,
            "best_mode": trainer.best_mode,
            "format_version": MANIFEST_VERSION,
            "files": files,
        }
        data = encode_json(manifest)
        manifest_sha256 = hashlib.sha256(data).hexdigest()
        self._drain()  # earlier events keep their order before the checkpoint event
        # Last, in one atomic put: the checkpoint exists (and is listed) only from here on.
        self.store.put_bytes(prefix + MANIFEST_NAME, data, content_type="application/json")
        # Reported at once, not queued: the service records the digest from this event, and a
        # checkpoint it never recorded is refused on resume.
        try:
            self.jobs.append_event(
                self.run_id,
                "checkpoint",
                step=step,
                metrics={**all_metrics, "write_s": time.monotonic() - t0},
                checkpoint={
                    "id": ckpt_id,
                    "step": step,
                    "prefix": prefix,
                    "manifest_sha256": manifest_sha256,
                },
            )
        except ClinisynthError:  # unrecorded, so never resumed from: safe, only wasteful
            log.warning("checkpoint %s could not be reported", ckpt_id, exc_info=True)
        shutil.rmtree(local, ignore_errors=True)
        self._prune(p["keep_checkpoints"], trainer.best_metric, trainer.best_mode, step)
        self.heartbeat(
            checkpoint=ckpt_id, checkpoint_time=time.time(), checkpoint_sha256=manifest_sha256
        )
        if evaluation:
            self.event("metrics", step=step, metrics=evaluation)

    def _prune(self, keep: int, best_metric: str, best_mode: str, step: int) -> None:
        """Keep the newest ``keep`` and the best, counting only checkpoints up to ``step``.

        Later ones are left by an attempt whose checkpoints were refused; this attempt
        overwrites them when it gets there, and they must not push its own out.
        """
        from clinisynth_server.finetune.records import best_checkpoint

        checkpoints = [c for c in self.jobs.checkpoints(self.run_id) if c.step <= step]
        best = best_checkpoint(checkpoints, best_metric, best_mode)
        for ckpt in checkpoints[:-keep]:
            if best is None or ckpt.id != best.id:
                self.jobs.delete_checkpoint(self.run_id, ckpt.id)


def die_with_launcher() -> None:
    """Under torchrun, end this rank when the launcher process dies.

    torchrun starts every rank in a session of its own, so killing the launched process group
    (the service's stop, or a kill -9 of the agent) would leave the ranks training on and
    writing to the store as a job's ghost. A parent-death signal ties them to the agent; a
    rank whose agent is already gone leaves at once.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return
    try:
        parent = pathlib.Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        parent = b""
    if b"torch.distributed.run" not in parent and b"torchrun" not in parent:
        log.warning("torchrun is gone before this rank started: leaving")
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    from clinisynth_server.runtime.config import default_home, load_config
    from clinisynth_server.runtime.logs import setup_logging

    parser = argparse.ArgumentParser(prog="clinisynth-finetune-worker", description=__doc__)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--store-url", help="default: the finetune service's store_url config")
    parser.add_argument("--workdir", help="local scratch (default: CLINISYNTH_FINETUNE_WORKDIR)")
    parser.add_argument("--model-repository", help="Triton model repository folder")
    ns = parser.parse_args(argv)
    die_with_launcher()
    config = load_config("finetune")
    setup_logging("finetune-worker", config.log_format, config.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = pathlib.Path(ns.workdir or config.get("workdir") or default_home() / "finetune-work")
    model_repository = (
        ns.model_repository
        or config.get("model_repository")
        or os.environ.get("CLINISYNTH_MODEL_REPOSITORY", "")
    )
    worker = Worker(
        ns.run_id,
        store_url=ns.store_url or config.store_url,
        workdir=workdir,
        model_repository=model_repository,
    )
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
