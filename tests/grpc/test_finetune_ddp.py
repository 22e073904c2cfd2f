"""Distributed training through the running finetune service: real ``torchrun`` processes on
CPU (gloo), tiny models and few steps.

Two processes train the same model as one with the same global batch (the per-process batch is
``batch_size / 2``; per-sample noise is drawn for the global batch and sharded; BatchNorm
statistics span the global batch), a kill -9 of one rank is resumed from the last checkpoint,
and a checkpoint written by two processes resumes in one.

Tolerance: two processes sum fp32 gradients (gloo all-reduce) and per-shard loss means in a
different order than one process: a few ulps per step (measured: at most 2e-7 relative over
20 steps for both kinds on this model). ``REL_TOL`` is ten times that.

The other kinds (text_to_image_adaptation, reward_model, reward_finetune) run their 2-process
jobs through the CLI (``clinisynth finetune create --param nproc_per_node=2``) against a service
with Triton and promote the result. The same tolerance holds for them (measured: at most 4e-7
over their few steps): their noise, prompt dropout and prior draws are made for the global
batch and sharded too, and reward_finetune's synthetic pool is sampled in full by every rank
from the same weights with per-image seeds, so every rank trains on the pool one process
samples (the second round's pool comes from weights a few ulps apart, which the sampler's
two steps do not amplify beyond the tolerance).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from test_finetune_durability import (  # noqa: F401 - fixtures by import
    describe_job,
    home,
    in_process,
    poll,
    progress_step,
    record,
    service_proc,
    store_dir,
)

import clinisynth
from clinisynth.cli import main as cli

pytestmark = pytest.mark.stack

REL_TOL = 2e-6
DIFFUSION = {
    "max_steps": 40,
    "checkpoint_every": 10,
    "log_every": 1,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "seed": 5,
    "block_out_channels": "16,32",
}
CLASSIFIER = {
    "max_steps": 12,
    "checkpoint_every": 12,
    "log_every": 1,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "seed": 5,
    "backbone_width": "8",
}


def losses(client: clinisynth.Client, job_id: str) -> dict[int, float]:
    """Loss per step from the progress events (a resumed attempt's replace the first's)."""
    return {
        e.step: e.metrics["loss"] for e in client.finetune.watch(job_id) if e.type == "progress"
    }


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert set(steps) <= set(got), f"steps without a loss: {sorted(set(steps) - set(got))}"
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    assert worst <= REL_TOL, {s: (got[s], want[s]) for s in steps}


def processes_started(client: clinisynth.Client, job_id: str) -> list[str]:
    """'N process(es)' of each worker attempt, in order."""
    return [
        e.message.split(", ")[1]
        for e in client.finetune.watch(job_id)
        if e.type == "log" and e.message.startswith("worker attempt")
    ]


@pytest.fixture(scope="module")
def one_process_diffusion(in_process: str) -> dict[int, float]:  # noqa: F811
    """The 1-process diffusion run every 2-process one is compared with."""
    with clinisynth.Client(endpoints={"finetune": in_process}, timeout=60) as client:
        job = client.finetune.create(
            "diffusion_pretrain", "data/cells", params={**DIFFUSION, "nproc_per_node": 1}
        )
        done = client.finetune.wait(job.id, timeout=300)
        assert done.state == "succeeded", done.failure_reason
        return losses(client, job.id)


def test_batch_that_does_not_divide_among_processes_is_refused(in_process: str) -> None:  # noqa: F811
    with (
        clinisynth.Client(endpoints={"finetune": in_process}, timeout=60) as client,
        pytest.raises(clinisynth.InvalidArgumentError) as err,
    ):
        client.finetune.create(
            "classifier", "data/cells", params={"batch_size": 7, "nproc_per_node": 2}
        )
    assert err.value.fields == ["params[batch_size]"]
    assert "2 processes" in err.value.field_violations[0].description


@pytest.mark.parametrize("kind", ["diffusion_pretrain", "classifier"])
def test_two_processes_train_like_one(
    kind: str,
    store_dir: str,  # noqa: F811 - the imported fixture
    in_process: str,  # noqa: F811
    one_process_diffusion: dict[int, float],
) -> None:
    params = DIFFUSION if kind == "diffusion_pretrain" else CLASSIFIER
    with clinisynth.Client(endpoints={"finetune": in_process}, timeout=60) as client:
        two = client.finetune.create(kind, "data/cells", params={**params, "nproc_per_node": 2})
        one = (
            None
            if kind == "diffusion_pretrain"
            else client.finetune.create(kind, "data/cells", params={**params, "nproc_per_node": 1})
        )
        done = client.finetune.wait(two.id, timeout=300)
        assert done.state == "succeeded", describe_job(store_dir, two.id)
        assert done.step == params["max_steps"]
        assert processes_started(client, two.id) == ["2 process(es)"]
        if one is None:
            want = one_process_diffusion
        else:
            assert client.finetune.wait(one.id, timeout=300).state == "succeeded"
            want = losses(client, one.id)
        assert_same_losses(losses(client, two.id), want, range(1, params["max_steps"] + 1))
        # Written once: one checkpoint per interval, not one per rank.
        steps = [c.step for c in client.finetune.checkpoints(two.id)]
        assert steps == sorted(set(steps)) and steps[-1] == params["max_steps"]


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """LOCAL_RANK → pid of torchrun's worker processes (children of the launched process)."""
    out = {}
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            env = dict(
                item.split("=", 1)
                for item in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
        except (OSError, ValueError, IndexError):
            continue
        if "LOCAL_RANK" in env:
            out[int(env["LOCAL_RANK"])] = int(proc.name)
    return out


def test_kill_one_rank_resumes_from_checkpoint(
    store_dir: str,  # noqa: F811 - the imported fixture
    in_process: str,  # noqa: F811
    one_process_diffusion: dict[int, float],
) -> None:
    every, max_steps = DIFFUSION["checkpoint_every"], DIFFUSION["max_steps"]
    with clinisynth.Client(endpoints={"finetune": in_process}, timeout=60) as client:
        job = client.finetune.create(
            "diffusion_pretrain", "data/cells", params={**DIFFUSION, "nproc_per_node": 2}
        )
        poll(
            lambda: (
                client.finetune.checkpoints(job.id) and progress_step(store_dir, job.id) > every
            ),
            "a checkpoint and a step past it",
            job=(store_dir, job.id),
            every=0.02,
        )
        ranks = rank_pids(int(record(store_dir, job.id).worker["pid"]))
        assert sorted(ranks) == [0, 1], ranks
        step_at_kill = progress_step(store_dir, job.id)
        os.kill(ranks[1], signal.SIGKILL)  # the rank that writes nothing: rank 0 must not fail
        done = client.finetune.wait(job.id, timeout=300)
        assert done.state == "succeeded", describe_job(store_dir, job.id)
        assert done.restarts == 1 and done.step == max_steps
        assert step_at_kill < max_steps, "the job ended before the kill: no resume was tested"
        events = list(client.finetune.watch(job.id))
        errors = [e.message for e in events if e.type == "error"]
        assert any("exited without a result" in m for m in errors), errors
        resumed = [e for e in events if e.message.startswith("resumed from checkpoint")]
        assert len(resumed) == 1 and every <= resumed[0].step <= step_at_kill, resumed
        assert processes_started(client, job.id) == ["2 process(es)", "2 process(es)"]
        # Model, optimiser, sampler and noise generator restored: the uninterrupted numbers.
        assert_same_losses(losses(client, job.id), one_process_diffusion, range(1, max_steps + 1))


def test_two_process_checkpoint_resumes_in_one_process(
    store_dir: str,  # noqa: F811
    service_proc: Callable[[], tuple[subprocess.Popen[str], str, pathlib.Path]],  # noqa: F811
    one_process_diffusion: dict[int, float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service's default world size changes (a node with fewer GPUs) while a job is out:
    the checkpoint of two processes resumes in one, with the uninterrupted numbers."""
    every, max_steps = DIFFUSION["checkpoint_every"], DIFFUSION["max_steps"]
    monkeypatch.setenv("CLINISYNTH_FINETUNE_NPROC_PER_NODE", "2")
    first, address, log = service_proc()
    with clinisynth.Client(endpoints={"finetune": address}, timeout=60) as client:
        job = client.finetune.create("diffusion_pretrain", "data/cells", params=DIFFUSION)
        poll(
            lambda: (
                client.finetune.checkpoints(job.id) and progress_step(store_dir, job.id) > every
            ),
            "a checkpoint and a step past it",
            job=(store_dir, job.id),
            log=log,
            every=0.02,
        )
    first.kill()  # the service first, so it cannot relaunch with two processes
    os.killpg(int(record(store_dir, job.id).worker["pid"]), signal.SIGKILL)  # torchrun + ranks
    first.wait()
    step_at_kill = progress_step(store_dir, job.id)
    time.sleep(0.5)
    monkeypatch.setenv("CLINISYNTH_FINETUNE_NPROC_PER_NODE", "1")
    second, address, log = service_proc()
    with clinisynth.Client(endpoints={"finetune": address}, timeout=60) as client:
        done = client.finetune.wait(job.id, timeout=300)
        assert done.state == "succeeded", describe_job(store_dir, job.id, log)
        assert done.restarts == 1 and done.step == max_steps
        assert step_at_kill < max_steps, "the job ended before the kill: no resume was tested"
        assert processes_started(client, job.id) == ["2 process(es)", "1 process(es)"]
        resumed = [e for e in client.finetune.watch(job.id) if e.message.startswith("resumed from")]
        assert len(resumed) == 1 and every <= resumed[0].step <= step_at_kill, resumed
        assert_same_losses(losses(client, job.id), one_process_diffusion, range(1, max_steps + 1))
    second.terminate()
    second.wait(30)


# ---------------------------------------------------------------------------------------------
# the other kinds: 2 processes through the CLI, the same losses as 1, and the result promotes
# ---------------------------------------------------------------------------------------------

CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]
#: Triton components a promoted folder of each kind becomes (``<model>.<role>``).
SERVED_ROLES = {
    "text_to_image_adaptation": ["denoiser", "text_encoder", "vae_decode"],
    "reward_model": ["reward_scorer"],
    "reward_finetune": ["denoiser"],
}


@pytest.fixture(scope="module")
def kind_data(store_dir: str, home: pathlib.Path) -> dict[str, str]:  # noqa: F811
    """A feedback export, an image–text manifest, a tiny SD pipeline, a pixel generator and
    an (untrained) reward model, in the store the services use."""
    import json

    import numpy as np

    from clinisynth_lab import builders
    from clinisynth_lab.phantoms import cells, datasets
    from clinisynth_server.finetune.kinds.classifier import scorer_meta
    from clinisynth_server.methods.reward_model import RewardModel, RewardModelConfig
    from clinisynth_server.store import open_store

    store = open_store(store_dir)
    imgs, labels = cells.generate(24, seed=12, size=24)
    plausible = np.arange(24) % 2 == 0
    shown = np.where(plausible, labels, (labels + 1) % 4)
    datasets.write_feedback_to_store(
        store, "data/feedback", imgs, [CLASSES[i] for i in shown], plausible.tolist()
    )
    chest = np.full((8, 32, 32), 40, np.uint8)
    for i in range(8):
        chest[i, 8:24, 4 + 16 * (i % 2) : 12 + 16 * (i % 2)] = 220
    texts = ["left pleural effusion" if i % 2 == 0 else "right pleural effusion" for i in range(8)]
    datasets.write_manifest_to_store(store, "data/chest", chest, texts)
    store.upload_dir(
        builders.build_text_to_image(home / "sd", size=32, image_channels=1), "models/sd"
    )
    store.upload_dir(builders.build_pixel_unet(home / "px", classes=CLASSES, size=24), "models/px")
    reward = RewardModel(RewardModelConfig(num_classes=4, in_channels=1, backbone_width=4))
    folder = reward.save(home / "reward")
    meta = scorer_meta("reward", "reward_scorer", CLASSES, 24, 1, conditioning="class")
    (folder / "clinisynth.json").write_text(json.dumps(meta))
    store.upload_dir(folder, "models/reward")
    return {"feedback": "data/feedback", "chest": "data/chest", "cells": "data/cells"}


KIND_JOBS: dict[str, tuple[str, dict[str, object]]] = {
    "text_to_image_adaptation": (
        "chest",
        {
            "max_steps": 4,
            "checkpoint_every": 4,
            "log_every": 1,
            "batch_size": 4,
            "learning_rate": 2e-3,
            "seed": 5,
            "base_model": "models/sd",
            "method": "lora",
            "train_text_encoder": True,  # two DDP modules; prompt dropout draws per row
        },
    ),
    "reward_model": (
        "feedback",
        {
            "max_steps": 6,
            "checkpoint_every": 6,
            "log_every": 1,
            "batch_size": 8,
            "learning_rate": 2e-3,
            "seed": 5,
            "backbone_width": 4,
            "classes": ",".join(CLASSES),
        },
    ),
    "reward_finetune": (
        "cells",
        {
            "max_steps": 4,
            "checkpoint_every": 4,
            "log_every": 1,
            "batch_size": 8,
            "learning_rate": 2e-3,
            "seed": 5,
            "base_model": "models/px",
            "reward_model": "models/reward",
            "pool_size": 4,
            "pool_steps": 2,
            "rounds": 2,  # the second pool is sampled from the trained (EMA) weights
            "ema_decay": 0.9,
        },
    ),
}


@pytest.fixture(scope="module")
def with_triton(
    home: pathlib.Path,  # noqa: F811
    store_dir: str,  # noqa: F811
    triton_server: object,
    model_repository: pathlib.Path,
) -> Iterator[str]:
    """A finetune service that can promote (Triton and its model repository): its address."""
    from conftest import start_service

    running = start_service(
        "finetune",
        triton_server.grpc_url,  # type: ignore[attr-defined]
        store_dir,
        home / "svc-triton",
        max_concurrent_jobs="2",
        workdir=str(home / "work-triton"),
        heartbeat_s="0.5",
        poll_s="0.2",
        torch_threads="1",
        model_repository=str(model_repository),
    )
    yield running.address
    running.stop(0)


@pytest.mark.parametrize("kind", list(KIND_JOBS))
def test_other_kinds_train_like_one_through_the_cli_and_promote(
    kind: str,
    kind_data: dict[str, str],
    store_dir: str,  # noqa: F811
    with_triton: str,
    triton_client: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, params = KIND_JOBS[kind]
    monkeypatch.setenv("CLINISYNTH_FINETUNE_ADDRESS", with_triton)
    sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]
    argv = ["finetune", "create", "--kind", kind, "--data", kind_data[data]]
    for pair in [*sets, "nproc_per_node=2"]:
        argv += ["--param", pair]
    assert cli(argv) == 0
    two = capsys.readouterr().out.strip()
    with clinisynth.Client(endpoints={"finetune": with_triton}, timeout=120) as client:
        one = client.finetune.create(
            kind, kind_data[data], params={**params, "nproc_per_node": 1}
        ).id
        done = client.finetune.wait(two, timeout=300)
        assert done.state == "succeeded", describe_job(store_dir, two)
        assert processes_started(client, two) == ["2 process(es)"]
        assert client.finetune.wait(one, timeout=300).state == "succeeded"
        steps = range(1, int(params["max_steps"]) + 1)  # type: ignore[call-overload]
        assert_same_losses(losses(client, two), losses(client, one), steps)
        # Written once, by rank 0; and it becomes a served model.
        (ckpt,) = client.finetune.checkpoints(two)
        promoted = client.finetune.promote(two, ckpt.id, model_name=f"ddp-{kind}".replace("_", "-"))
    model = promoted.model
    assert model.labels["finetune_job"] == two
    for role in SERVED_ROLES[kind]:
        assert triton_client.model_ready(f"{model.name}.{role}", model.version), role  # type: ignore[attr-defined]
