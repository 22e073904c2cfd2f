"""Job records in the store: events with claimed sequence numbers, checkpoints, best, pids."""

from __future__ import annotations

import os
import pathlib
import threading

from clinisynth_server.finetune.launchers import k8s_name, render_template
from clinisynth_server.finetune.records import (
    CheckpointInfo,
    JobRecord,
    JobStore,
    best_checkpoint,
    new_job_id,
    pid_alive,
    pid_start_time,
)
from clinisynth_server.store import open_store

TEMPLATE = pathlib.Path(__file__).parents[2] / "deploy/k8s/base/finetune/job-template.yaml"


def test_events_from_two_writers_never_collide(tmp_path: pathlib.Path) -> None:
    url = str(tmp_path / "s")
    a, b = JobStore(open_store(url)), JobStore(open_store(url))  # service and worker

    def write(js: JobStore, tag: str) -> None:
        for i in range(20):
            js.append_event("j1", "log", message=f"{tag}{i}")

    threads = [threading.Thread(target=write, args=(js, t)) for js, t in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = a.events("j1")
    assert [e.sequence for e in events] == list(range(1, 41))
    assert len({e.message for e in events}) == 40
    assert [e.sequence for e in a.events("j1", since=38)] == [39, 40]


def test_record_roundtrip_and_request_claims(tmp_path: pathlib.Path) -> None:
    js = JobStore(open_store(str(tmp_path / "s")))
    rec = JobRecord(
        id=new_job_id(),
        kind="classifier",
        dataset="d",
        params={"seed": "1"},
        model_name="m",
        created=1.0,
    )
    js.put(rec)
    assert js.get(rec.id) == rec and [r.id for r in js.all()] == [rec.id]
    assert js.claim_request("req", rec.id) == rec.id
    assert js.claim_request("req", "other") == rec.id


def test_uncommitted_checkpoints_are_invisible_and_best_is_chosen(tmp_path: pathlib.Path) -> None:
    store = open_store(str(tmp_path / "s"))
    js = JobStore(store)
    for step, acc in ((10, 0.5), (20, 0.9), (30, 0.7)):
        prefix = js.checkpoint_prefix("j", js.checkpoint_id(step))
        store.put_bytes(prefix + "model/config.json", b"{}")
        js.commit_checkpoint(
            "j",
            CheckpointInfo(
                js.checkpoint_id(step),
                step,
                {"val_accuracy": acc},
                0.0,
                False,
                prefix,
                best_metric="val_accuracy",
                best_mode="max",
            ),
        )
    store.put_bytes(js.checkpoint_prefix("j", js.checkpoint_id(40)) + "model/x", b"half")
    checkpoints = js.checkpoints("j")
    assert [c.step for c in checkpoints] == [10, 20, 30]
    assert best_checkpoint(checkpoints).step == 20  # type: ignore[union-attr]
    assert best_checkpoint(checkpoints, "val_accuracy", "min").step == 10  # type: ignore[union-attr]
    js.delete_checkpoint("j", checkpoints[0].id)
    assert [c.step for c in js.checkpoints("j")] == [20, 30]


def test_pid_identity() -> None:
    me = os.getpid()
    assert pid_alive(me, pid_start_time(me))
    assert not pid_alive(me, "1")  # same pid, another start time: a reused pid
    assert not pid_alive(2**22 + 12345)


def test_kubernetes_template_renders() -> None:
    rec = JobRecord(
        id="ft-abc-123456", kind="reward_model", dataset="d", params={}, model_name="m", attempt=2
    )
    docs = render_template(
        TEMPLATE.read_text(), rec, image="clinisynth/services:1", nproc_per_node=4
    )
    kinds = {d["kind"]: d for d in docs}
    job = kinds["Job"]
    assert job["metadata"]["name"] == k8s_name(rec.id, 2) == "cs-ft-abc-123456-a2"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "--nproc-per-node=4" in container["args"]
    assert "--run-id=ft-abc-123456" in container["args"]
    assert container["image"] == "clinisynth/services:1"
    assert job["metadata"]["labels"]["clinisynth.io/kind"] == "reward"
    assert kinds["Service"]["spec"]["clusterIP"] == "None"
