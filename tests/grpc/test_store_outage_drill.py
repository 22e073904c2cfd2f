"""Store-outage drill: the S3 endpoint goes away in the middle of a burst of concurrent writes.

The reward service runs as its own process over an ``s3://`` store served by a real
S3-protocol server on loopback (moto), reached through a TCP forwarder that can vanish. Mid-burst
the forwarder resets every connection and refuses new ones; then it comes back on the same
address; then it wedges (accepts connections, never answers); then it is back again. What must
hold, counted by ``client_request_id``:

* while the endpoint is gone or wedged every write answers UNAVAILABLE naming what is down
  (never INTERNAL, never a hang past the call's deadline, never OK-then-lost);
* once it is back the *same* service process (no restart) acknowledges writes again;
* every acknowledged judgement is readable, the readable ones are exactly the acknowledged ones
  plus some that answered UNAVAILABLE after their write reached the store (their reply was cut),
  and retrying those with their ids makes acknowledged and readable equal.

The same, briefly, for a finetune write (UploadDatasetFile), and for a local store folder the
service user may not write (the service runs as ``nobody``; skipped where that can't be done).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from s3_peers import CREDS, Moto, Proxy

import clinisynth
from clinisynth.v1 import finetune_pb2, finetune_pb2_grpc
from clinisynth_lab.benchmarks.memory import serve_process
from clinisynth_server.store import ArtifactStore, open_store

pytestmark = [pytest.mark.stack, pytest.mark.timeout(150)]

CLASS = "neutrophil"
WORKERS = 6
PER_PHASE = 24  # calls each phase must see before the drill moves on
NOBODY = 65534
READ_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = Moto()
    server.start()
    yield server
    server.stop()


class Endpoint:
    """The S3 endpoint the service sees: a forwarder to moto that can go away and come back."""

    def __init__(self, moto: Moto) -> None:
        self.moto = moto
        self.proxy = Proxy(moto.port)
        self.port = self.proxy.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        """Gone: every connection reset, the port refusing."""
        self.proxy.close()

    def up(self) -> None:
        self.proxy.close()
        self.proxy = Proxy(self.moto.port, port=self.port)

    def wedge(self) -> None:
        """Wedged: connections accepted (the old ones reset), never answered."""
        self.proxy.close()
        self.proxy = Proxy(self.moto.port, port=self.port, hang=True)


def _bucket(moto: Moto, prefix: str) -> tuple[str, ArtifactStore]:
    """A fresh bucket; the URL the service opens and a direct (not proxied) view of it."""
    bucket = f"drill-{uuid.uuid4().hex[:12]}"
    direct = open_store(
        f"s3://{bucket}/{prefix}", env={}, endpoint=moto.endpoint, create_bucket=True, **CREDS
    )
    return f"s3://{bucket}/{prefix}", direct


def _s3_env(store_url: str, endpoint: str, home: pathlib.Path, triton_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "CLINISYNTH_TRITON_URL": triton_url,
        "CLINISYNTH_STORE_URL": store_url,
        "CLINISYNTH_STORE_ENDPOINT": endpoint,
        "CLINISYNTH_STORE_ACCESS_KEY": CREDS["access_key"],
        "CLINISYNTH_STORE_SECRET_KEY": CREDS["secret_key"],
        "CLINISYNTH_HOME": str(home),
        "CLINISYNTH_REWARD_HTTP_PORT": "0",
        # A wedged endpoint fails each store request after this long (not retried).
        "CLINISYNTH_STORE_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
    }


@dataclass
class Call:
    crid: str
    started: int  # the drill's phase when the call went out
    ended: int = -1  # ... and when its answer came back
    code: str = ""
    message: str = ""
    fid: str = ""
    plausible: bool = False


@dataclass
class Burst:
    """Concurrent writes from a pool of threads while the main thread moves through phases
    (:func:`_drill`); each call records the phase it started and ended in."""

    write: Callable[[int, str], tuple[str, bool]]
    phase: int = 0
    calls: list[Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _changed: threading.Condition = field(init=False)
    _stop: threading.Event = field(default_factory=threading.Event)
    _next: int = 0

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)

    def _worker(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                i, self._next = self._next, self._next + 1
                call = Call(f"drill-{i}", self.phase)
            try:
                call.fid, call.plausible = self.write(i, call.crid)
                call.code = "OK"
            except clinisynth.ClinisynthError as exc:
                call.code, call.message = exc.code, str(exc)
            with self._changed:
                call.ended = self.phase
                self.calls.append(call)
                self._changed.notify_all()

    def wait_for(self, n: int, predicate: Callable[[Call], bool], what: str) -> None:
        with self._changed:
            ok = self._changed.wait_for(lambda: sum(map(predicate, self.calls)) >= n, 60)
        assert ok, f"the drill saw fewer than {n} {what}: {self.codes()}"

    def set_phase(self, phase: int) -> None:
        with self._lock:
            self.phase = phase

    def codes(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for c in self.calls:
                out[c.code] = out.get(c.code, 0) + 1
            return out

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = [pool.submit(self._worker) for _ in range(WORKERS)]
            try:
                yield
            finally:
                self._stop.set()
                for f in futures:
                    f.result()


@dataclass(frozen=True)
class Step:
    """One phase of a drill: what happens to the store, then how every call made wholly within
    the phase must be answered, and how many such calls the phase lasts for."""

    name: str
    change: Callable[[], None] | None
    code: str
    calls: int = PER_PHASE


def _drill(burst: Burst, steps: list[Step]) -> None:
    """Run the steps mid-burst. Step k is phase 2k; phase 2k-1 is its change taking effect
    (calls that straddle a change may answer either way, OK or UNAVAILABLE)."""
    with burst.running():
        for k, step in enumerate(steps):
            if step.change is not None:
                burst.set_phase(2 * k - 1)
                step.change()
            burst.set_phase(2 * k)
            burst.wait_for(
                step.calls, lambda c, p=2 * k: c.started == c.ended == p, f"calls: {step.name}"
            )


def _check_answers(burst: Burst, steps: list[Step], names_down: tuple[str, ...]) -> None:
    """Only OK and UNAVAILABLE ever (never INTERNAL, never past the deadline); within each step
    the step's code, an UNAVAILABLE naming what is down."""
    odd = [c for c in burst.calls if c.code not in ("OK", "UNAVAILABLE")]
    assert not odd, f"{len(odd)} calls neither OK nor UNAVAILABLE, e.g. {odd[:3]}"
    for k, step in enumerate(steps):
        within = [c for c in burst.calls if c.started == c.ended == 2 * k]
        wrong = [c for c in within if c.code != step.code]
        assert len(within) >= step.calls and not wrong, (step.name, wrong[:3])
        for c in within:
            if c.code == "UNAVAILABLE":
                assert any(name in c.message for name in names_down), c.message


def _image(i: int) -> np.ndarray:
    """A distinct image per call (uploaded images are stored by content)."""
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    image.flat[i % 64] = (i // 64 % 200 + 1) / 256
    image.flat[(i + 7) % 64] = (i % 200 + 1) / 256
    return image


def _feedback_burst(address: str) -> tuple[Burst, clinisynth.Client]:
    client = clinisynth.Client(endpoints={"reward": address}, timeout=30, retries=0)

    def submit(i: int, crid: str) -> tuple[str, bool]:
        fb = client.feedback.submit(
            _image(i),
            rater_id=f"dr_{i % 5}",
            plausible=i % 3 == 0,
            class_name=CLASS,
            client_request_id=crid,
        )
        return fb.id, fb.plausible

    return Burst(submit), client


def _reconcile(burst: Burst, address: str) -> tuple[int, int, int]:
    """Acknowledged vs readable, then the unacknowledged retried: (acked, stored-unacked, total)."""
    acked = {c.crid: c for c in burst.calls if c.code == "OK"}
    failed = {c.crid: c for c in burst.calls if c.code != "OK"}
    with clinisynth.Client(endpoints={"reward": address}, timeout=60) as c:
        readable = {f.client_request_id: f for f in c.feedback.list(class_name=CLASS)}
        lost = sorted(set(acked) - set(readable))
        assert not lost, f"{len(lost)} acknowledged judgements not readable: {lost[:5]}"
        for crid, call in acked.items():
            assert (readable[crid].id, readable[crid].plausible) == (call.fid, call.plausible)
        # A write can reach the store and still answer UNAVAILABLE (its reply was cut): never
        # the reverse. Nothing else is readable.
        extra = set(readable) - set(acked)
        assert extra <= set(failed), sorted(extra - set(failed))[:5]
        # Retried with their ids, the unacknowledged ones are stored once each: now every
        # submission is acknowledged, and acknowledged == readable.
        i_of = {call.crid: int(call.crid.split("-")[1]) for call in failed.values()}
        duplicates = 0
        for crid in failed:
            i = i_of[crid]
            fb = c.feedback.submit(
                _image(i),
                rater_id=f"dr_{i % 5}",
                plausible=i % 3 == 0,
                class_name=CLASS,
                client_request_id=crid,
            )
            duplicates += fb.duplicate
        assert duplicates == len(extra)
        final = c.feedback.list(class_name=CLASS)
        assert len(final) == len(burst.calls) == len({f.client_request_id for f in final})
    return len(acked), len(extra), len(burst.calls)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_s3_endpoint_gone_mid_burst_then_back(
    moto: Moto, triton_server, tmp_path: pathlib.Path
) -> None:
    endpoint = Endpoint(moto)
    store_url, direct = _bucket(moto, "clinisynth")
    env = _s3_env(store_url, endpoint.url, tmp_path / "home", triton_server.grpc_url)
    with open(tmp_path / "reward.log", "wb") as log:
        proc, address, _ = serve_process("reward", env, stderr=log)
    try:
        burst, client = _feedback_burst(address)
        steps = [
            Step("store up", None, "OK"),
            Step("endpoint gone", endpoint.down, "UNAVAILABLE"),
            Step("endpoint back", endpoint.up, "OK"),
            # Each call here waits out read timeouts (image, then the audit record): fewer.
            Step("endpoint wedged", endpoint.wedge, "UNAVAILABLE", calls=WORKERS),
            Step("endpoint back again", endpoint.up, "OK"),
        ]
        _drill(burst, steps)
        client.close()
        assert proc.poll() is None  # the same process throughout: recovered without a restart
        _check_answers(burst, steps, (endpoint.url, "audit trail"))
        acked, stored_unacked, total = _reconcile(burst, address)
        # The store's own listing agrees with the service's.
        records = [i for i in direct.list("feedback/records/") if i.key.endswith(".json")]
        assert len(records) == total
        print(
            f"\nS3 drill: {total} submissions, {acked} acknowledged, {burst.codes()}, "
            f"{stored_unacked} stored but unacknowledged (retried as duplicates)"
        )
    finally:
        _stop(proc)
        endpoint.down()


def test_finetune_upload_fails_unavailable_then_recovers(
    moto: Moto, tmp_path: pathlib.Path
) -> None:
    from conftest import start_service

    endpoint = Endpoint(moto)
    store_url, direct = _bucket(moto, "ft")
    running = start_service(
        "finetune",
        "127.0.0.1:1",
        store_url,
        tmp_path / "home",
        store_endpoint=endpoint.url,
        store_access_key=CREDS["access_key"],
        store_secret_key=CREDS["secret_key"],
        workdir=str(tmp_path / "work"),
    )
    try:
        with clinisynth.Client(
            endpoints={"finetune": running.address}, timeout=30, retries=0
        ) as client:
            acked: dict[str, str] = {}
            codes: list[str] = []

            def upload(n: int) -> None:
                path = tmp_path / f"f{n}.bin"
                path.write_bytes(os.urandom(2048) + n.to_bytes(4, "big"))
                key = f"datasets/drill/f{n}.bin"
                try:
                    ref = client.finetune.upload_file(path, key)
                except clinisynth.ClinisynthError as exc:
                    codes.append(exc.code)
                    assert exc.code == "UNAVAILABLE", exc
                    assert endpoint.url in str(exc) or "audit trail" in str(exc), exc
                    return
                codes.append("OK")
                acked[key] = ref["sha256"]

            upload(0)
            endpoint.down()
            for n in range(1, 4):
                upload(n)
            assert codes == ["OK", "UNAVAILABLE", "UNAVAILABLE", "UNAVAILABLE"]
            endpoint.up()
            for n in range(4, 6):
                upload(n)
            assert codes[4:] == ["OK", "OK"]
            with grpc.insecure_channel(running.address) as channel:
                listed = finetune_pb2_grpc.FinetuneServiceStub(channel).ListDatasetFiles(
                    finetune_pb2.ListDatasetFilesRequest(prefix="datasets/drill"), timeout=30
                )
            readable = {f.key: f.sha256 for f in listed.files}
            assert readable == acked
            assert {i.key for i in direct.list("datasets/drill/")} == set(acked)
    finally:
        running.stop(0)
        endpoint.down()


# ---- a local store folder the service user may not write -------------------------------------


def _can_run_as_nobody() -> str:
    """Why the service can't run as an unprivileged user here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root to start the service as another user"
    if not shutil.which("setpriv"):
        return "setpriv (util-linux) is not installed"
    probe = subprocess.run(
        [*_AS_NOBODY, sys.executable, "-c", "import clinisynth_server.serve"],
        capture_output=True,
        cwd="/",
        check=False,
    )
    if probe.returncode:
        return f"the interpreter is not usable by uid {NOBODY}: {probe.stderr.decode()[-200:]}"
    return ""


_AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def _chown_tree(root: pathlib.Path, uid: int) -> None:
    for dirpath, _dirs, filenames in os.walk(root):
        os.chown(dirpath, uid, uid)
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), uid, uid)


def test_store_folder_not_writable_then_writable(
    triton_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    why = _can_run_as_nobody()
    if why:
        pytest.skip(why)
    # Under /tmp, not pytest's tmp_path: that one lies in a folder only root may enter.
    work = pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-drill-"))
    try:
        os.chmod(work, 0o755)
        store, home = work / "store", work / "home"
        store.mkdir()
        home.mkdir()
        _chown_tree(store, NOBODY)
        _chown_tree(home, NOBODY)
        env = {
            **os.environ,
            "CLINISYNTH_TRITON_URL": triton_server.grpc_url,
            "CLINISYNTH_STORE_URL": str(store),
            "CLINISYNTH_HOME": str(home),
            "CLINISYNTH_REWARD_HTTP_PORT": "0",
        }
        import clinisynth_lab.benchmarks.memory as memory

        # The same launcher, the service dropped to uid/gid nobody (no capabilities).
        monkeypatch.setattr(memory, "SERVE", [*_AS_NOBODY, *memory.SERVE])
        with open(work / "reward.log", "wb") as log:
            proc, address, _ = serve_process("reward", env, stderr=log)
        try:
            burst, client = _feedback_burst(address)
            steps = [
                Step("folder writable", None, "OK"),
                # Every directory root's, 0755: the service (nobody) may read, not write.
                Step("folder not writable", lambda: _chown_tree(store, 0), "UNAVAILABLE"),
                Step("folder writable again", lambda: _chown_tree(store, NOBODY), "OK"),
            ]
            _drill(burst, steps)
            client.close()
            assert proc.poll() is None
            _check_answers(burst, steps, (str(store), "audit trail"))
            acked, stored_unacked, total = _reconcile(burst, address)
            print(
                f"\nfolder drill: {total} submissions, {acked} acknowledged, {burst.codes()}, "
                f"{stored_unacked} stored but unacknowledged"
            )
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
