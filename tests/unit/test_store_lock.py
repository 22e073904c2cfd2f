"""The local store's commit lock has a bounded wait: a writer frozen mid-commit in another
process makes other writers fail fast with Unavailable naming the store, never hang forever.

The holder is a real second process that takes the store's own lock (``LocalStore._commit_lock``)
and then freezes (SIGSTOP) inside it, as a debugger or a cgroup freezer would leave it.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from google.rpc import error_details_pb2, status_pb2

from clinisynth_server.errors import ClinisynthError, InvalidArgument, Unavailable
from clinisynth_server.runtime.errors_map import to_status
from clinisynth_server.store import open_store
from clinisynth_server.store.local import LocalStore

HOLDER = """
import os, signal, sys
from clinisynth_server.store.local import LocalStore
store = LocalStore(sys.argv[1])
with store._commit_lock():  # the real commit lock, as a writer mid-commit holds it
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen mid-commit
"""


@pytest.fixture()
def frozen_writer(tmp_path: pathlib.Path) -> Iterator[subprocess.Popen[str]]:
    """A second process frozen while it holds the store's commit lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until it is really stopped ("T" in /proc stat)
        if pathlib.Path(f"/proc/{proc.pid}/stat").read_text().split()[2] == "T":
            break
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait(10)


def _put_in_thread(store: LocalStore, key: str) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(store.put_bytes(key, b"payload"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_writer_frozen_mid_commit_makes_others_fail_fast(tmp_path, frozen_writer):
    store = LocalStore(tmp_path, lock_timeout_s=0.5)
    started = time.monotonic()
    thread, outcome = _put_in_thread(store, "datasets/a/one.bin")
    thread.join(10)  # before: flock(LOCK_EX) blocked here forever
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), "the write still waits on the frozen writer's lock"
    (err,) = outcome
    assert isinstance(err, Unavailable), err
    assert 0.5 <= elapsed < 5, elapsed  # waited its bound, not much more
    assert str(tmp_path.resolve()) in err.message and "lock" in err.message
    assert err.metadata["store"] == str(tmp_path.resolve())
    # Over gRPC: UNAVAILABLE with a RetryInfo hint (the one error mapping).
    status = to_status(err)
    assert status.code.name == "UNAVAILABLE"
    proto = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in proto.details if d.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.ToNanoseconds() > 0
    assert not store.exists("datasets/a/one.bin")  # nothing half-written
    leftovers = [p for p in tmp_path.rglob("*") if ".clinisynth-tmp-" in p.name]
    assert leftovers == [], leftovers  # staged data and sidecar were cleaned up


def test_the_store_works_again_once_the_frozen_writer_is_gone(tmp_path, frozen_writer):
    store = LocalStore(tmp_path, lock_timeout_s=0.3)
    with pytest.raises(Unavailable):
        store.put_bytes("datasets/a/two.bin", b"x")
    thread, outcome = _put_in_thread(store, "datasets/a/two.bin")
    time.sleep(0.05)
    frozen_writer.kill()  # a dead holder's flock is released by the kernel
    frozen_writer.wait(10)
    thread.join(10)
    assert not thread.is_alive()
    assert not isinstance(outcome[0], BaseException), outcome
    assert store.get_bytes("datasets/a/two.bin") == b"payload"
    assert store.stat("datasets/a/two.bin").sha256 is not None


def test_a_long_wait_still_succeeds_once_the_lock_is_released(tmp_path, frozen_writer):
    store = LocalStore(tmp_path, lock_timeout_s=20)
    thread, outcome = _put_in_thread(store, "datasets/a/three.bin")
    time.sleep(0.3)
    assert thread.is_alive()  # waiting within its bound
    os.kill(frozen_writer.pid, signal.SIGCONT)  # thawed: it finishes its commit and unlocks
    thread.join(10)
    assert not thread.is_alive() and not isinstance(outcome[0], BaseException), outcome


def test_lock_timeout_is_configurable_and_validated(tmp_path):
    assert LocalStore(tmp_path).lock_timeout_s == 30.0
    store = open_store(str(tmp_path), env={"CLINISYNTH_STORE_LOCK_TIMEOUT_S": "2.5"})
    assert isinstance(store, LocalStore) and store.lock_timeout_s == 2.5
    configured = open_store(str(tmp_path), lock_timeout_s=4)
    assert isinstance(configured, LocalStore) and configured.lock_timeout_s == 4
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(InvalidArgument) as info:
            LocalStore(tmp_path, lock_timeout_s=bad)
        assert info.value.violations[0].field == "lock_timeout_s"
    with pytest.raises(ClinisynthError) as info2:
        open_store(str(tmp_path), env={"CLINISYNTH_STORE_LOCK_TIMEOUT_S": "soon"})
    assert info2.value.code == "INVALID_ARGUMENT"
