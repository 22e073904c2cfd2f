"""Jobs survive kill -9: of the worker (resumed from the last checkpoint, bit-for-bit the same
result as an uninterrupted run) and of the service itself (a new service process adopts the
still-running worker, and resumes the job when that worker dies too)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import clinisynth

pytestmark = pytest.mark.stack

PARAMS = {
    "max_steps": 80,
    "checkpoint_every": 20,
    "log_every": 5,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "seed": 5,
    "block_out_channels": "16,32",
}
CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("ft-durable")


@pytest.fixture(scope="module")
def store_dir(home: pathlib.Path) -> str:
    from clinisynth_server.phantoms import cells, datasets
    from clinisynth_server.store import open_store

    url = str(home / "store")
    imgs, labels = cells.generate(32, seed=21, size=24)
    datasets.write_image_folder_to_store(open_store(url), "data/cells", imgs, labels, CLASSES)
    return url


def poll(predicate, timeout_s: float = 180, every: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def record(store_url: str, job_id: str):  # type: ignore[no-untyped-def]
    from clinisynth_server.finetune.records import JobStore
    from clinisynth_server.store import open_store

    return JobStore(open_store(store_url)).get(job_id)


def progress_step(store_url: str, job_id: str) -> int:
    from clinisynth_server.finetune.records import JobStore
    from clinisynth_server.store import open_store

    return int(JobStore(open_store(store_url)).progress(job_id).get("step", 0))


def weights_digest(store_url: str, key: str) -> str:
    from clinisynth_server.store import open_store

    return hashlib.sha256(
        open_store(store_url).get_bytes(key + "unet/diffusion_pytorch_model.safetensors")
    ).hexdigest()


def messages_so_far(store_url: str, job_id: str) -> list[str]:
    """Event messages already written (WatchJob would wait for the job's end)."""
    from clinisynth_server.finetune.records import JobStore
    from clinisynth_server.store import open_store

    return [e.message for e in JobStore(open_store(store_url)).events(job_id)]


def _checkpoints(store_url: str, job_id: str) -> list[object]:
    from clinisynth_server.finetune.records import JobStore
    from clinisynth_server.store import open_store

    return list(JobStore(open_store(store_url)).checkpoints(job_id))


def kill_worker(store_url: str, job_id: str) -> int:
    pid = int(record(store_url, job_id).worker["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


def test_worker_sigkill_resumes_from_checkpoint_reproducibly(home, store_dir):  # type: ignore[no-untyped-def]
    from conftest import start_service

    running = start_service(
        "finetune",
        "127.0.0.1:1",
        store_dir,
        home / "svc1",
        max_concurrent_jobs="2",
        workdir=str(home / "work1"),
        heartbeat_s="0.5",
        poll_s="0.2",
        torch_threads="1",
    )
    try:
        with clinisynth.Client(endpoints={"finetune": running.address}, timeout=60) as client:
            killed = client.finetune.create("diffusion_pretrain", "data/cells", params=PARAMS)
            intact = client.finetune.create("diffusion_pretrain", "data/cells", params=PARAMS)
            # Kill -9 once a checkpoint exists and training went past it.
            poll(
                lambda: (
                    client.finetune.checkpoints(killed.id)
                    and progress_step(store_dir, killed.id) >= 25
                ),
                every=0.02,
            )
            step_at_kill = progress_step(store_dir, killed.id)
            kill_worker(store_dir, killed.id)
            done = client.finetune.wait(killed.id, timeout=300)
            other = client.finetune.wait(intact.id, timeout=300)
            assert done.state == other.state == "succeeded", done.failure_reason
            assert done.restarts == 1 and other.restarts == 0
            events = list(client.finetune.watch(killed.id))
            errors = [e.message for e in events if e.type == "error"]
            assert any("exited without a result" in m for m in errors), errors
            resumed = [e for e in events if e.message.startswith("resumed from checkpoint")]
            assert len(resumed) == 1
            # At most one checkpoint interval lost.
            assert step_at_kill - resumed[0].step <= PARAMS["checkpoint_every"]
            assert resumed[0].step >= PARAMS["checkpoint_every"]
            # Model, optimiser, LR, RNG and data position restored: the same weights as a run
            # that never died.
            a = client.finetune.checkpoints(killed.id)[-1]
            b = client.finetune.checkpoints(intact.id)[-1]
            assert a.step == b.step == PARAMS["max_steps"]
            assert weights_digest(store_dir, a.key) == weights_digest(store_dir, b.key)
    finally:
        running.stop(0)


def code_running_pickle(marker: pathlib.Path) -> bytes:
    """A pickle that creates ``marker`` when unpickled (``torch.load(weights_only=False)`` too)."""
    import pickle

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    return pickle.dumps({"trainer": Payload(), "rng": {}, "step": 0})


def test_tampered_checkpoints_are_refused_and_resume_falls_back(home, store_dir):  # type: ignore[no-untyped-def]
    """Kill -9 with three checkpoints; the newest holds a code-running pickle, the next a flipped
    byte. The resumed worker runs no code, refuses both with an event, resumes from the third
    and still ends with the weights of a run that never died."""
    from conftest import start_service

    from clinisynth_server.store import open_store

    params = {**PARAMS, "max_steps": 140}
    marker = home / "pickle-ran"
    store = open_store(store_dir)
    running = start_service(
        "finetune",
        "127.0.0.1:1",
        store_dir,
        home / "svc3",
        max_concurrent_jobs="2",
        workdir=str(home / "work3"),
        heartbeat_s="0.5",
        poll_s="0.2",
        torch_threads="1",
    )
    try:
        with clinisynth.Client(endpoints={"finetune": running.address}, timeout=60) as client:
            job = client.finetune.create("diffusion_pretrain", "data/cells", params=params)
            intact = client.finetune.create("diffusion_pretrain", "data/cells", params=params)
            poll(lambda: len(_checkpoints(store_dir, job.id)) >= 3, timeout_s=300, every=0.02)
            pid = int(record(store_dir, job.id).worker["pid"])
            os.kill(pid, signal.SIGSTOP)  # nothing written while the files are swapped
            try:
                ckpts = _checkpoints(store_dir, job.id)
                newest, second, third = ckpts[-1], ckpts[-2], ckpts[-3]
                bomb = code_running_pickle(marker)
                # The previous format's file name (what the old worker unpickled) and the new one.
                store.put_bytes(newest.prefix + "state/trainer.pt", bomb)
                if store.exists(newest.prefix + "state/trainer.safetensors"):
                    store.put_bytes(newest.prefix + "state/trainer.safetensors", bomb)
                for name in ("state/trainer.safetensors", "state/trainer.pt"):
                    if store.exists(second.prefix + name):  # still parses: only the digest tells
                        data = bytearray(store.get_bytes(second.prefix + name))
                        data[-1] ^= 0x01
                        store.put_bytes(second.prefix + name, bytes(data))
            finally:
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            done = client.finetune.wait(job.id, timeout=300)
            other = client.finetune.wait(intact.id, timeout=300)
            assert not marker.exists(), "a pickled checkpoint ran code in the worker"
            assert done.state == other.state == "succeeded", done.failure_reason
            messages = [e.message for e in client.finetune.watch(job.id)]
            refused = [m for m in messages if "refused" in m]
            assert any(m.startswith(f"checkpoint {newest.id} refused") for m in refused), refused
            assert any(m.startswith(f"checkpoint {second.id} refused") for m in refused), refused
            resumed = [m for m in messages if m.startswith("resumed from checkpoint")]
            assert resumed == [f"resumed from checkpoint {third.id} (step {third.step})"]
            a = client.finetune.checkpoints(job.id)[-1]
            b = client.finetune.checkpoints(intact.id)[-1]
            assert a.step == b.step == params["max_steps"]
            assert weights_digest(store_dir, a.key) == weights_digest(store_dir, b.key)
    finally:
        running.stop(0)


@pytest.fixture()
def service_proc(home, store_dir) -> Iterator[object]:  # type: ignore[no-untyped-def]
    procs: list[subprocess.Popen[str]] = []

    def start() -> tuple[subprocess.Popen[str], str]:
        env = {
            **os.environ,
            "CLINISYNTH_STORE_URL": store_dir,
            "CLINISYNTH_TRITON_URL": "127.0.0.1:1",
            "CLINISYNTH_FINETUNE_WORKDIR": str(home / "work2"),
            "CLINISYNTH_FINETUNE_HEARTBEAT_S": "0.5",
            "CLINISYNTH_FINETUNE_POLL_S": "0.2",
            "CLINISYNTH_FINETUNE_HEARTBEAT_TIMEOUT_S": "60",
            "PYTHONUNBUFFERED": "1",
            "CLINISYNTH_FINETUNE_TORCH_THREADS": "1",
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clinisynth_server.serve",
                "finetune",
                "--port",
                "0",
                "--metrics-port",
                "0",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY finetune"):
                port = line.split("grpc=")[1].split()[0]
                return proc, f"127.0.0.1:{port}"
        raise AssertionError("the finetune service did not start")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def test_service_sigkill_adopts_running_worker_then_resumes(home, store_dir, service_proc):  # type: ignore[no-untyped-def]
    first, address = service_proc()  # type: ignore[operator]
    with clinisynth.Client(endpoints={"finetune": address}, timeout=60) as client:
        job = client.finetune.create(
            "diffusion_pretrain", "data/cells", params={**PARAMS, "max_steps": 120}
        )
        poll(lambda: progress_step(store_dir, job.id) >= 5)
    first.kill()  # SIGKILL the service: its worker runs on in its own session
    first.wait()
    worker_pid = int(record(store_dir, job.id).worker["pid"])
    seen = progress_step(store_dir, job.id)
    poll(lambda: progress_step(store_dir, job.id) > seen)  # training goes on, no service
    poll(lambda: _checkpoints(store_dir, job.id))
    # Freeze the worker (however fast this machine) so it is still mid-job when it dies below.
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        second, address = service_proc()  # type: ignore[operator]
        with clinisynth.Client(endpoints={"finetune": address}, timeout=60) as client:
            poll(lambda: any("adopted" in m for m in messages_so_far(store_dir, job.id)))
            assert client.finetune.get(job.id).state == "running"
            assert int(record(store_dir, job.id).worker["pid"]) == worker_pid
            # Now the adopted worker dies too: the new service resumes from the last checkpoint.
            os.kill(worker_pid, signal.SIGKILL)
            done = client.finetune.wait(job.id, timeout=300)
            assert done.state == "succeeded", done.failure_reason
            assert done.restarts == 1 and done.step == 120
            messages = [e.message for e in client.finetune.watch(job.id)]
            assert any(m.startswith("resumed from checkpoint") for m in messages)
    finally:  # never leave a stopped worker behind, even when an assertion fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGKILL)
    second.terminate()
    second.wait(30)
