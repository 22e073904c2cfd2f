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
sha256; the manifest's own sha256 goes into the ``checkpoint`` event. Before resuming, the worker
checks all of it; a checkpoint that fails (a replaced or altered file, an extra file, a manifest
that differs from the recorded one, the old pickled ``trainer.pt`` format) is refused with an
``error`` event and the previous one is tried; when none passes the job fails.
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

from clinisynth_server.errors import Cancelled, ClinisynthError

log = logging.getLogger("clinisynth.finetune.worker")
PREEMPTED_EXIT = 143
HEARTBEAT_S = float(os.environ.get("CLINISYNTH_FINETUNE_HEARTBEAT_S", "2"))
CANCEL_POLL_S = 1.0


MANIFEST = "checkpoint.json"
MANIFEST_VERSION = 2  # 1: pickled state/trainer.pt, no file digests (refused, never unpickled)


class Preempted(Exception):
    """SIGTERM without a cancel request: checkpoint and leave the job to be resumed."""


class CheckpointRefused(Exception):
    """A checkpoint that failed verification: it is never loaded."""


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

    def _accelerator(self, mixed_precision: str) -> Any:
        try:
            from accelerate import Accelerator
        except ImportError:  # accelerate is optional: one process, CPU or one GPU
            return None
        import torch

        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)

    def _train(self) -> dict[str, Any]:
        import torch

        from clinisynth_server.finetune import datasets, kinds
        from clinisynth_server.finetune.kinds.base import (
            TrainContext,
            load_rng_state,
            rng_state,
            seed_everything,
        )
        from clinisynth_server.finetune.params import typed
        from clinisynth_server.finetune.records import CheckpointInfo, JobStore

        threads = int(os.environ.get("CLINISYNTH_FINETUNE_TORCH_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        spec = kinds.load(self.record.kind)
        p = typed(spec.params, self.record.params)
        accelerator = self._accelerator(p["mixed_precision"])
        self.is_main = accelerator is None or accelerator.is_main_process
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
        data_dir = self.workdir / "data"
        if self.is_main:
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
            check_cancel=self.check_cancel,
        )
        trainer = spec.trainer(ctx)

        # 3. ... then overwritten by the newest checkpoint that passes verification, if any.
        start = 0
        checkpoints = self.jobs.checkpoints(self.run_id)
        if checkpoints:
            t_resume = time.monotonic()
            last, state = self._newest_verified(checkpoints)
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
                self.check_cancel()
                out = trainer.step(step)
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

    # -- resume: verify, then load ------------------------------------------------------------
    def _recorded_manifests(self) -> dict[str, str]:
        """Manifest digests from this job's ``checkpoint`` events (id → sha256), newest wins."""
        recorded: dict[str, str] = {}
        for e in self.jobs.events(self.run_id):
            ckpt = e.checkpoint or {}
            if e.type == "checkpoint" and ckpt.get("id") and ckpt.get("manifest_sha256"):
                recorded[str(ckpt["id"])] = str(ckpt["manifest_sha256"])
        return recorded

    def _newest_verified(self, checkpoints: list[Any]) -> tuple[Any, dict[str, Any]]:
        """The newest checkpoint that verifies, with its decoded state; refused ones are skipped."""
        from clinisynth_server.errors import FailedPrecondition

        recorded = self._recorded_manifests()
        refused = []
        for ckpt in reversed(checkpoints):
            try:
                return ckpt, self._load_verified(ckpt, recorded.get(ckpt.id))
            except CheckpointRefused as exc:
                refused.append(ckpt.id)
                log.warning("job %s: checkpoint %s refused: %s", self.run_id, ckpt.id, exc)
                self.event(
                    "error",
                    step=ckpt.step,
                    message=f"checkpoint {ckpt.id} refused, not loaded: {exc}",
                )
        raise FailedPrecondition(
            f"no checkpoint of job {self.run_id} passed verification (refused: "
            f"{', '.join(refused)}); not resuming from unverified state"
        )

    def _load_verified(self, ckpt: Any, recorded_sha256: str | None) -> dict[str, Any]:
        """Check the manifest and every file's sha256, then decode the state (no unpickling)."""
        import hashlib
        import json

        from clinisynth_server.errors import NotFound
        from clinisynth_server.finetune.records import JobStore
        from clinisynth_server.methods._checkpoint import (
            STATE_FILES,
            StateFormatError,
            load_state,
            sha256_of,
        )

        # The manifest names its own id and prefix: trust neither, derive the prefix from the step.
        if not isinstance(ckpt.step, int) or ckpt.id != JobStore.checkpoint_id(ckpt.step):
            raise CheckpointRefused(f"its id does not match its step {ckpt.step}")
        prefix = self.jobs.checkpoint_prefix(self.run_id, ckpt.id)
        if ckpt.prefix != prefix:
            raise CheckpointRefused(f"its manifest points at another prefix {ckpt.prefix!r}")
        try:
            raw = self.store.get_bytes(prefix + MANIFEST)
        except NotFound as exc:
            raise CheckpointRefused("its manifest disappeared") from exc
        digest = hashlib.sha256(raw).hexdigest()
        if recorded_sha256 is not None and digest != recorded_sha256:
            raise CheckpointRefused(
                f"{MANIFEST} has sha256 {digest[:12]}…, not the {recorded_sha256[:12]}… recorded "
                "when it was written"
            )
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise CheckpointRefused(f"{MANIFEST} is not JSON") from exc
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if manifest.get("format_version") != MANIFEST_VERSION or not isinstance(files, dict):
            raise CheckpointRefused(
                "written in an older format without file digests (pickled state/trainer.pt), "
                "which is never unpickled"
            )
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise CheckpointRefused(f"{MANIFEST}: malformed file list")
        present = {info.key[len(prefix) :] for info in self.store.list(prefix)} - {MANIFEST}
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

        from clinisynth_server.methods._checkpoint import file_digests, save_state
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
        # Last, in one atomic put: the checkpoint exists (and is listed) only from here on.
        self.store.put_bytes(prefix + MANIFEST, data, content_type="application/json")
        shutil.rmtree(local, ignore_errors=True)
        write_s = time.monotonic() - t0
        self._prune(p["keep_checkpoints"], trainer.best_metric, trainer.best_mode)
        self.heartbeat(
            checkpoint=ckpt_id, checkpoint_time=time.time(), checkpoint_sha256=manifest_sha256
        )
        self.event(
            "checkpoint",
            step=step,
            metrics={**all_metrics, "write_s": write_s},
            checkpoint={
                "id": ckpt_id,
                "step": step,
                "prefix": prefix,
                "manifest_sha256": manifest_sha256,
            },
        )
        if evaluation:
            self.event("metrics", step=step, metrics=evaluation)

    def _prune(self, keep: int, best_metric: str, best_mode: str) -> None:
        from clinisynth_server.finetune.records import best_checkpoint

        checkpoints = self.jobs.checkpoints(self.run_id)
        best = best_checkpoint(checkpoints, best_metric, best_mode)
        for ckpt in checkpoints[:-keep]:
            if best is None or ckpt.id != best.id:
                self.jobs.delete_checkpoint(self.run_id, ckpt.id)


def main(argv: list[str] | None = None) -> int:
    from clinisynth_server.runtime.config import default_home, load_config
    from clinisynth_server.runtime.logs import setup_logging

    parser = argparse.ArgumentParser(prog="clinisynth-finetune-worker", description=__doc__)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--store-url", help="default: the finetune service's store_url config")
    parser.add_argument("--workdir", help="local scratch (default: CLINISYNTH_FINETUNE_WORKDIR)")
    parser.add_argument("--model-repository", help="Triton model repository folder")
    ns = parser.parse_args(argv)
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
