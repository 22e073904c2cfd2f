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
import threading
import time
from collections.abc import Iterator

import pytest

import clinisynth
from clinisynth_lab.benchmarks.memory import serve_process

pytestmark = pytest.mark.stack

PARAMS = {
    "max_steps": 50,
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
    from clinisynth_lab.phantoms import cells, datasets
    from clinisynth_server.store import open_store

    url = str(home / "store")
    imgs, labels = cells.generate(32, seed=21, size=24)
    datasets.write_image_folder_to_store(open_store(url), "data/cells", imgs, labels, CLASSES)
    return url


@pytest.fixture(scope="module")
def in_process(home: pathlib.Path, store_dir: str) -> Iterator[str]:
    """One in-process finetune service for the worker-kill tests: its address."""
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
    yield running.address
    running.stop(0)


def poll(  # type: ignore[no-untyped-def]
    predicate,
    what: str,
    *,
    job: tuple[str, str] | None = None,
    give_up=None,
    log: pathlib.Path | None = None,
    timeout_s: float = 180,
    every: float = 0.1,
):
    """``predicate()`` once truthy; else fail with the job's record, progress and events.

    ``give_up()`` returns a reason once the condition can no longer come (fail at once).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        reason = give_up() if give_up is not None else ""
        if not reason and time.monotonic() >= deadline:
            reason = f"not within {timeout_s:.0f} s"
        if reason:
            details = describe_job(*job, log=log) if job is not None else ""
            raise AssertionError(f"{what}: {reason}\n{details}")
        time.sleep(every)


def describe_job(store_url: str, job_id: str, log: pathlib.Path | None = None) -> str:
    """What the store says about a job (and a service log's tail): a failure's evidence."""
    from clinisynth_server.finetune.records import JobStore
    from clinisynth_server.store import open_store

    jobs = JobStore(open_store(store_url))
    try:
        rec = jobs.get(job_id)
        head = (
            f"job {job_id}: state={rec.state} attempt={rec.attempt} restarts={rec.restarts} "
            f"worker={rec.worker}"
        )
    except Exception as exc:  # the evidence must never hide the failure it explains
        head = f"job {job_id}: no record ({exc})"
    lines = [
        head,
        f"progress: {jobs.progress(job_id)}",
        f"now: {time.time():.3f}",
        "events:",
        *(
            f"  {e.sequence} {e.time:.3f} {e.type} step={e.step} {e.message}"
            for e in jobs.events(job_id)
        ),
    ]
    if log is not None and log.exists():
        lines += [f"{log.name} (last 30 lines):", *log.read_text().splitlines()[-30:]]
    return "\n".join(lines)


def stop_outside_store_lock(store_url: str, pid: int) -> None:
    """SIGSTOP ``pid`` while this process holds the local store's commit lock, and wait until
    every thread of it has stopped: so it never freezes mid-commit holding that lock.

    A stopped lock holder blocks every other writer of the store (the tests' own writes and a
    restarted service's scheduler alike), which no live worker does.
    """
    from clinisynth_server.store import open_store
    from clinisynth_server.store.local import LocalStore

    store = open_store(store_url)
    assert isinstance(store, LocalStore), "freezing needs the local store's lock"
    with store._commit_lock():
        os.kill(pid, signal.SIGSTOP)
        poll(lambda: all_threads_stopped(pid), f"process {pid} stopped", timeout_s=30, every=0.01)


@contextlib.contextmanager
def frozen(store_url: str, pid: int) -> Iterator[None]:
    """The worker ``pid`` stopped (outside the store's lock) for the block, then SIGKILLed."""
    stop_outside_store_lock(store_url, pid)
    try:
        yield
    finally:  # never leave a stopped worker behind, even when an assertion fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)


def all_threads_stopped(pid: int) -> bool:
    states = []
    for stat in pathlib.Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError):
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
    return bool(states) and all(state in ("T", "t", "Z", "X") for state in states)


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


# A store writer as busy as a worker around a checkpoint: a heartbeat and a burst of files.
BUSY_WRITER = """
import os, sys, time
from clinisynth_server.store import open_store
store = open_store(sys.argv[1])
for i in range(10**9):
    store.put_json("busy/progress.json", {"i": i})
    if i % 10 == 0:
        for k in range(8):
            store.put_bytes(f"busy/ckpt/{i % 30}/f{k}", os.urandom(4096))
    time.sleep(0.01)
"""


def test_a_frozen_writer_never_blocks_the_other_writers_of_the_store(tmp_path):  # type: ignore[no-untyped-def]
    """Why the restarted service once never logged its adoption: SIGSTOP had caught the worker
    mid-commit, holding the store's lock, so the new scheduler's first write waited forever."""
    from clinisynth_server.store import open_store

    url = str(tmp_path / "store")
    store = open_store(url)
    writer = subprocess.Popen([sys.executable, "-c", BUSY_WRITER, url])
    try:
        poll(lambda: store.exists("busy/ckpt/0/f7"), "the writer's first burst", timeout_s=120)
        for attempt in range(40):
            time.sleep(0.005 * (attempt % 7))
            stop_outside_store_lock(url, writer.pid)
            wrote = threading.Thread(target=store.put_json, args=("other/x.json", {"n": attempt}))
            wrote.start()
            wrote.join(10)
            assert not wrote.is_alive(), f"freeze {attempt}: a write waited on the frozen writer"
            os.kill(writer.pid, signal.SIGCONT)
    finally:
        writer.kill()
        os.kill(writer.pid, signal.SIGCONT)
        writer.wait(30)


def test_worker_sigkill_resumes_from_checkpoint_reproducibly(store_dir, in_process):  # type: ignore[no-untyped-def]
    with clinisynth.Client(endpoints={"finetune": in_process}, timeout=60) as client:
        killed = client.finetune.create("diffusion_pretrain", "data/cells", params=PARAMS)
        intact = client.finetune.create("diffusion_pretrain", "data/cells", params=PARAMS)
        # Kill -9 once a checkpoint exists and training went past it.
        poll(
            lambda: (
                client.finetune.checkpoints(killed.id) and progress_step(store_dir, killed.id) >= 25
            ),
            "a checkpoint and step 25",
            job=(store_dir, killed.id),
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


def code_running_pickle(marker: pathlib.Path) -> bytes:
    """A pickle that creates ``marker`` when unpickled (``torch.load(weights_only=False)`` too)."""
    import pickle

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    return pickle.dumps({"trainer": Payload(), "rng": {}, "step": 0})


def test_tampered_checkpoints_are_refused_and_resume_falls_back(home, store_dir, in_process):  # type: ignore[no-untyped-def]
    """Kill -9 with three checkpoints; the newest holds a code-running pickle, the next a flipped
    byte. The resumed worker runs no code, refuses both with an event, resumes from the third
    and still ends with the weights of a run that never died."""
    from clinisynth_server.store import open_store

    # Three checkpoints by step 30, then 30 steps of margin: the worker is frozen mid-job.
    params = {**PARAMS, "max_steps": 60, "checkpoint_every": 10}
    marker = home / "pickle-ran"
    store = open_store(store_dir)
    with clinisynth.Client(endpoints={"finetune": in_process}, timeout=60) as client:
        job = client.finetune.create("diffusion_pretrain", "data/cells", params=params)
        intact = client.finetune.create("diffusion_pretrain", "data/cells", params=params)
        poll(
            lambda: len(_checkpoints(store_dir, job.id)) >= 3,
            "three checkpoints",
            job=(store_dir, job.id),
            timeout_s=300,
            every=0.02,
        )
        pid = int(record(store_dir, job.id).worker["pid"])
        with frozen(store_dir, pid):  # nothing written while the files are swapped
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


@pytest.fixture()
def service_proc(home, store_dir) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """``start()`` → (process, address, log): a finetune service in its own process."""
    procs: list[subprocess.Popen[str]] = []

    def start() -> tuple[subprocess.Popen[str], str, pathlib.Path]:
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
        log = home / f"service-{len(procs)}.log"
        try:
            with open(log, "ab") as err:
                proc, address, _ = serve_process("finetune", env, stderr=err)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n{log.read_text()[-3000:]}") from None
        procs.append(proc)
        return proc, address, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def test_service_sigkill_adopts_running_worker_then_resumes(home, store_dir, service_proc):  # type: ignore[no-untyped-def]
    first, address, log = service_proc()  # type: ignore[operator]
    with clinisynth.Client(endpoints={"finetune": address}, timeout=60) as client:
        job = client.finetune.create(
            "diffusion_pretrain", "data/cells", params={**PARAMS, "max_steps": 60}
        )
        poll(
            lambda: progress_step(store_dir, job.id) >= 5,
            "step 5",
            job=(store_dir, job.id),
            log=log,
        )
    first.kill()  # SIGKILL the service: its worker runs on in its own session
    first.wait()
    worker_pid = int(record(store_dir, job.id).worker["pid"])
    seen = progress_step(store_dir, job.id)
    poll(
        lambda: progress_step(store_dir, job.id) > seen and _checkpoints(store_dir, job.id),
        "training goes on without a service, to a checkpoint",
        job=(store_dir, job.id),
    )
    # Freeze the worker (however fast this machine) so it is still mid-job when it dies below.
    with frozen(store_dir, worker_pid):
        events_before = len(messages_so_far(store_dir, job.id))
        second, address, log = service_proc()  # type: ignore[operator]

        def restarted_instead() -> str:
            """Why adoption can no longer come: the new service gave the worker up, or died."""
            if second.poll() is not None:
                return f"the restarted service exited ({second.returncode})"
            later = messages_so_far(store_dir, job.id)[events_before:]
            return next((f"the service gave the worker up: {m}" for m in later if "resum" in m), "")

        with clinisynth.Client(endpoints={"finetune": address}, timeout=60) as client:
            # The scheduler ticks every 0.2 s once READY: a minute is ample, and it fails at
            # once when the service restarts the job instead.
            poll(
                lambda: any("adopted" in m for m in messages_so_far(store_dir, job.id)),
                "the restarted service adopts the running worker",
                job=(store_dir, job.id),
                give_up=restarted_instead,
                log=log,
                timeout_s=60,
            )
            assert client.finetune.get(job.id).state == "running"
            assert int(record(store_dir, job.id).worker["pid"]) == worker_pid
            # Now the adopted worker dies too: the new service resumes from the last checkpoint.
            os.kill(worker_pid, signal.SIGKILL)
            done = client.finetune.wait(job.id, timeout=300)
            assert done.state == "succeeded", describe_job(store_dir, job.id, log)
            assert done.restarts == 1 and done.step == 60
            messages = [e.message for e in client.finetune.watch(job.id)]
            assert any(m.startswith("resumed from checkpoint") for m in messages)
    second.terminate()
    second.wait(30)
