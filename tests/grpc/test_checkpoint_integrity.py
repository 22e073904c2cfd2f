"""Checkpoint digests are the service's: through the running finetune service (real worker
processes, real Triton), a checkpoint whose files and manifest were rewritten consistently after
the service recorded it — with a forged worker report to match — is refused when the job
resumes and when it is promoted; an untampered checkpoint of the same job promotes and serves."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import signal
import time
from typing import Any

import pytest

import clinisynth

pytestmark = pytest.mark.stack

CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]
PARAMS = {
    "max_steps": 60,
    "checkpoint_every": 20,
    "log_every": 5,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "seed": 5,
    "block_out_channels": "16,32",
    "keep_checkpoints": 5,
}
WEIGHTS = "model/unet/diffusion_pytorch_model.safetensors"
MODEL = "integrity-cells"


def poll(predicate: Any, timeout_s: float = 240, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def jobs(store_url: str) -> Any:
    from clinisynth_server.finetune.records import JobStore
    from clinisynth_server.store import open_store

    return JobStore(open_store(store_url))


def tamper(store_url: str, job_id: str, ckpt_id: str) -> int:
    """Flip one weight byte (still loadable), rewrite the manifest to match, report it as the
    worker would: the folder and the event log agree; only the service's record differs."""
    js = jobs(store_url)
    prefix = js.checkpoint_prefix(job_id, ckpt_id)
    data = bytearray(js.store.get_bytes(prefix + WEIGHTS))
    data[-1] ^= 0x01
    js.store.put_bytes(prefix + WEIGHTS, bytes(data))
    manifest = js.store.get_json(prefix + "checkpoint.json")
    manifest["files"][WEIGHTS] = hashlib.sha256(bytes(data)).hexdigest()
    raw = json.dumps(manifest).encode()
    js.store.put_bytes(prefix + "checkpoint.json", raw)
    digest = hashlib.sha256(raw).hexdigest()
    forged = js.append_event(
        job_id,
        "checkpoint",
        step=int(ckpt_id),
        checkpoint={
            "id": ckpt_id,
            "step": int(ckpt_id),
            "prefix": prefix,
            "manifest_sha256": digest,
        },
    )
    return int(forged.sequence)


def test_tampered_checkpoint_refused_on_resume_and_promotion_untampered_one_serves(
    triton_server: Any,
    store_url: str,
    store: Any,
    model_repository: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    from conftest import start_service

    from clinisynth_lab.phantoms import cells, datasets
    from clinisynth_server.catalog import Catalog
    from clinisynth_server.triton import repository

    imgs, labels = cells.generate(32, seed=21, size=24)
    datasets.write_image_folder_to_store(store, "integrity/cells", imgs, labels, CLASSES)
    service = start_service(
        "finetune",
        triton_server.grpc_url,
        store_url,
        tmp_path / "svc",
        workdir=str(tmp_path / "work"),
        heartbeat_s="0.5",
        poll_s="0.2",
        heartbeat_timeout_s="60",
        model_repository=str(model_repository),
        torch_threads="1",
    )
    try:
        with clinisynth.Client(endpoints={"finetune": service.address}, timeout=60) as client:
            job = client.finetune.create(
                "diffusion_pretrain", "integrity/cells", params=PARAMS, model_name=MODEL
            )
            # 1. Resume. Once the service recorded a checkpoint, freeze the worker, tamper with
            # the newest recorded checkpoint, let the service see the forged report, kill -9.
            poll(lambda: "000000020" in (jobs(store_url).get(job.id).checkpoints or {}))
            record = jobs(store_url).get(job.id)
            pid = int(record.worker["pid"])
            os.kill(pid, signal.SIGSTOP)
            try:
                record = jobs(store_url).get(job.id)
                newest = max(record.checkpoints or {})
                recorded = dict(record.checkpoints or {})
                forged_seq = tamper(store_url, job.id, newest)
                poll(lambda: jobs(store_url).get(job.id).checkpoint_events >= forged_seq)
                assert (
                    jobs(store_url).get(job.id).checkpoints == recorded
                )  # the forgery changed nothing
            finally:
                # On a loaded host the frozen worker may already have been declared lost (no
                # heartbeat for heartbeat_timeout_s) and killed by the service: the same restart.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            done = client.finetune.wait(job.id, timeout=400)
            assert done.state == "succeeded" and done.restarts == 1, done.failure_reason
            messages = [e.message for e in client.finetune.watch(job.id)]
            refused = [m for m in messages if m.startswith(f"checkpoint {newest} refused")]
            assert refused and "recorded when it was written" in refused[0], messages
            assert not any(m.startswith(f"resumed from checkpoint {newest}") for m in messages)
            assert any(
                m.startswith("resumed from checkpoint") or "starting over from step 0" in m
                for m in messages
            ), messages

            # 2. Promotion: the final checkpoint, tampered after the job ended, is refused and
            # nothing is registered.
            ids = [c.id for c in client.finetune.checkpoints(job.id)]
            assert ids[-2:] == ["000000040", "000000060"], ids
            tamper(store_url, job.id, "000000060")
            with pytest.raises(clinisynth.FailedPreconditionError) as err:
                client.finetune.promote(job.id, "000000060")
            assert WEIGHTS in str(err.value) and "nothing was registered" in str(err.value)
            assert Catalog(store, ttl_s=0.0).versions(MODEL) == []
            assert not any(
                m.startswith(f"{MODEL}.") for m in repository.list_models(model_repository)
            )

            # 3. An untampered checkpoint of the same job still promotes and serves.
            promoted = client.finetune.promote(job.id, "000000040")
            assert (promoted.model.name, promoted.model.version) == (MODEL, "1")
    finally:
        service.stop(0)
    generator = start_service("generator", triton_server.grpc_url, store_url, tmp_path / "gen")
    try:
        with clinisynth.Client(endpoints={"generator": generator.address}, timeout=120) as gen:
            image = gen.generate(MODEL, class_name="eosinophil", seed=1, steps=3).images[0]
        assert image.to_numpy().shape == (24, 24)
        assert image.provenance["model"]["version"] in ("1", 1)
    finally:
        generator.stop(0)
