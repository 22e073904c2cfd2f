"""Killing the reward service (SIGKILL, separate process) in the middle of a burst of concurrent
submissions loses no acknowledged judgement: acknowledged = durable in the store."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import clinisynth
from clinisynth_lab.benchmarks.memory import serve_process

pytestmark = pytest.mark.stack


def start(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc, address, printed = serve_process("reward", env, stderr=subprocess.DEVNULL)
    review = next((line.split()[1] for line in printed if line.startswith("REVIEW ")), "")
    assert review.startswith("http://127.0.0.1:") and review.endswith("/review"), printed
    return proc, address


def test_sigkill_mid_burst_loses_no_acknowledged_judgement(triton_server, tmp_path):
    env = {
        **os.environ,
        "CLINISYNTH_TRITON_URL": triton_server.grpc_url,
        "CLINISYNTH_STORE_URL": str(tmp_path / "store"),
        "CLINISYNTH_HOME": str(tmp_path / "home"),
        "CLINISYNTH_REWARD_HTTP_PORT": "0",
    }
    proc, address = start(env)
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    acked: dict[str, tuple[str, bool]] = {}
    failed: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    client = clinisynth.Client(endpoints={"reward": address}, timeout=30, retries=0)

    def submit(i: int) -> None:
        crid = f"burst-{i}"
        try:
            fb = client.feedback.submit(
                image,
                rater_id=f"dr_{i % 7}",
                plausible=i % 3 == 0,
                class_name="neutrophil",
                client_request_id=crid,
            )
        except clinisynth.ClinisynthError:
            with lock:
                failed.append(crid)
            return
        with lock:
            acked[crid] = (fb.id, fb.plausible)
            if len(acked) >= 40:
                enough.set()

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(submit, i) for i in range(400)]
        assert enough.wait(120), "the service acknowledged too few submissions"
        proc.send_signal(signal.SIGKILL)  # mid-burst: calls in flight never get their reply
        proc.wait(30)
        for f in futures:
            f.result()
    client.close()
    assert failed, "the kill came after the burst; nothing was interrupted"

    proc, address = start(env)  # same store, new process
    try:
        with clinisynth.Client(endpoints={"reward": address}, timeout=60) as c:
            stored = {f.client_request_id: f for f in c.feedback.list(class_name="neutrophil")}
            missing = [crid for crid in acked if crid not in stored]
            assert not missing, f"{len(missing)} acknowledged judgements lost: {missing[:5]}"
            for crid, (fid, plausible) in acked.items():
                assert stored[crid].id == fid and stored[crid].plausible == plausible
            # Retrying the unacknowledged ones is safe: stored-but-unacknowledged ones come
            # back as duplicates, the rest are stored now; nothing is stored twice.
            i_of = {f"burst-{i}": i for i in range(400)}
            for crid in failed:
                i = i_of[crid]
                c.feedback.submit(
                    image,
                    rater_id=f"dr_{i % 7}",
                    plausible=i % 3 == 0,
                    class_name="neutrophil",
                    client_request_id=crid,
                )
            final = c.feedback.list(class_name="neutrophil")
            assert len(final) == 400 == len({f.client_request_id for f in final})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
