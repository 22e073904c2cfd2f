"""Distributed training through the running finetune service: real ``torchrun`` processes on
CPU (gloo), tiny models and few steps.

Two processes train the same model as one with the same global batch (the per-process batch is
``batch_size / 2``; per-sample noise is drawn for the global batch and sharded; BatchNorm
statistics span the global batch), a kill -9 of one rank is resumed from the last checkpoint,
and a checkpoint written by two processes resumes in one.

Tolerance: two processes sum fp32 gradients (gloo all-reduce) and per-shard loss means in a
different order than one process: a few ulps per step (measured: at most 2e-7 relative over
20 steps for both kinds on this model). ``REL_TOL`` is ten times that.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Callable

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
