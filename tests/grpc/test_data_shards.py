"""Sharded data sets through the running finetune service: an archive (DICOM tree + report CSV)
uploads as de-identified shards, resumes by skipping stored shards, validates, and a tiny job
streams it; a corrupt image fails a job or is skipped and named; hostile shards are refused.

Cost: four tiny jobs (4 steps, 16 px; one on two processes) run at once.
"""

from __future__ import annotations

import io
import pathlib
import tarfile
from typing import Any

import grpc
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

import clinisynth
from clinisynth import _shards
from clinisynth.v1 import finetune_pb2, finetune_pb2_grpc
from clinisynth_lab.phantoms.datasets import encode_png

pytestmark = pytest.mark.stack

TINY = {
    "max_steps": 4,
    "batch_size": 4,
    "size": 16,
    "checkpoint_every": 2,
    "log_every": 1,
    "data_workers": 1,
}
UNET = {"block_out_channels": "16,32"}


def write_dicom(path: pathlib.Path, value: int) -> None:
    """A 16×16 8-bit DICOM that names a patient (the upload must remove it)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.PatientName, ds.PatientID, ds.Modality = "DOE^JANE", "MRN123", "DX"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    pixels = np.full((16, 16), value, np.uint8)
    pixels[4:12, 4:12] = 255 - value
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def finetune_server(triton_server, store_url, tmp_path_factory, model_repository):  # type: ignore[no-untyped-def]
    from conftest import start_service

    home = tmp_path_factory.mktemp("shards")
    running = start_service(
        "finetune",
        triton_server.grpc_url,
        store_url,
        home,
        max_concurrent_jobs="4",
        workdir=str(home / "work"),
        heartbeat_s="0.5",
        poll_s="0.2",
        heartbeat_timeout_s="60",
        model_repository=str(model_repository),
        torch_threads="1",
    )
    yield running
    client = clinisynth.Client(endpoints={"finetune": running.address}, timeout=30)
    for job in client.finetune.list():
        if not job.done:
            client.finetune.cancel(job.id)
    client.close()
    running.stop(0)


@pytest.fixture(scope="module")
def client(finetune_server):  # type: ignore[no-untyped-def]
    with clinisynth.Client(endpoints={"finetune": finetune_server.address}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    root = tmp_path_factory.mktemp("archive")
    rows = ["study_id,finding,report"]
    for s in range(8):
        study = f"s50{s}"
        for i in range(2):
            write_dicom(root / "files" / f"p1{s}" / study / f"{s}-{i}.dcm", 30 + 20 * (s % 2))
        finding = "effusion" if s % 2 else "normal"
        text = "Small effusion." if s % 2 else "No acute disease."
        rows.append(f'{study},{finding},"FINDINGS: see text.\nIMPRESSION: {text}"')
    write_dicom(root / "files" / "p99" / "s999" / "orphan.dcm", 10)  # no report: left out
    reports = root / "reports.csv"
    reports.write_text("\n".join(rows) + "\n")
    return root / "files", reports


@pytest.fixture(scope="module")
def uploaded(client, archive) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    files, reports = archive
    events: list[clinisynth.ProgressEvent] = []
    with pytest.warns(UserWarning, match=r"1 image\(s\) .* left out:\n  p99/s999/orphan.dcm: no"):
        report = client.finetune.upload_dataset(
            files,
            "datasets/shards-archive",
            layout="dicom_archive",
            reports_csv=reports,
            class_column="finding",
            shard_mb=0.004,  # ~4 KB: a few DICOMs per shard, so there are several shards
            progress=events.append,
        )
    return {"report": report, "events": events}


@pytest.fixture(scope="module")
def corrupt_set(client, tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    """A sharded ImageFolder with one undecodable PNG (written as the SDK would write it)."""
    root = tmp_path_factory.mktemp("corrupt")
    members = []
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir()
        for i in range(6):
            path = root / cls / f"{i}.png"
            path.write_bytes(encode_png(np.full((16, 16), 40 * i + 30 * c, np.uint8)))
            members.append(_shards.Member(f"{cls}/{i}.png", path))
    (root / "a" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    entries = []
    for shard in _shards.plan(members, shard_bytes=10**6):
        data = shard.bytes()
        name, _digest = _shards.shard_name(shard.number, data)
        (root / "shard.tar").write_bytes(data)
        ref = client.finetune.upload_file(root / "shard.tar", f"datasets/shards-bad/{name}")
        entries.append(
            {"name": name, "sha256": ref["sha256"], "paths": [m.name for m in shard.members]}
        )
    (root / "index.json").write_bytes(_shards.index_json("image_folder", entries))
    client.finetune.upload_file(root / "index.json", "datasets/shards-bad/index.json")
    return "datasets/shards-bad"


def failing_step(store: Any, prefix: str) -> tuple[int, int]:
    """(seed, step) such that the corrupt image is in the batch of that step (batch 4), step > 1."""
    from clinisynth_server.finetune import shards
    from clinisynth_server.finetune.shards_loader import epoch_order

    index = shards.parse_index(store.get_bytes(f"{prefix}/index.json"))
    for seed in range(50):
        step = epoch_order(index, seed, 0, frozenset()).index("a/3.png") // 4 + 1
        if step > 1:
            return seed, step
    raise AssertionError("no seed puts the corrupt image after the first batch")


@pytest.fixture(scope="module")
def jobs(client, uploaded, corrupt_set, store) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Queued together so the three workers share the cores' time."""
    return {
        "archive": client.finetune.create(
            "diffusion_pretrain",
            "datasets/shards-archive",
            params={**TINY, **UNET, "augment": "hflip"},
        ).id,
        "ddp": client.finetune.create(
            "diffusion_pretrain",
            "datasets/shards-archive",
            params={**TINY, **UNET, "nproc_per_node": 2, "data_workers": 0},
        ).id,
        "fail": client.finetune.create(
            "diffusion_pretrain",
            corrupt_set,
            params={
                **TINY,
                **UNET,
                "checkpoint_every": 1,
                "seed": failing_step(store, corrupt_set)[0],
            },
        ).id,
        "skip": client.finetune.create(
            "classifier",
            corrupt_set,
            params={
                **TINY,
                "on_bad_image": "skip",
                "val_fraction": 0.2,
                "batch_size": 8,
                "backbone_width": 8,
            },
        ).id,
    }


def test_archive_uploads_as_deidentified_shards_and_resumes(  # type: ignore[no-untyped-def]
    client, uploaded, archive, store
):
    report = uploaded["report"]
    assert report.ok, report.problems
    assert report.layout == "image_text_manifest" and report.images == 16
    listed = {f.key.rsplit("/", 1)[-1] for f in _list(client, "datasets/shards-archive")}
    shard_names = sorted(n for n in listed if n.endswith(".tar"))
    assert len(shard_names) >= 3 and {"index.json", "manifest.jsonl"} <= listed
    # Every DICOM inside every stored shard was de-identified on the way in.
    for name in shard_names:
        data = store.get_bytes(f"datasets/shards-archive/shards/{name}")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for info in tar:
                stream = tar.extractfile(info)
                assert stream is not None
                ds = pydicom.dcmread(io.BytesIO(stream.read()))
                assert "DOE" not in str(ds.get("PatientName", "")) and ds.PatientID != "MRN123"
    assert [e.message.endswith("uploaded") for e in uploaded["events"]] == [True] * len(shard_names)
    # A re-run skips every shard (their names carry their digests) and changes nothing.
    files, reports = archive
    again: list[clinisynth.ProgressEvent] = []
    with pytest.warns(UserWarning, match="left out"):
        report2 = client.finetune.upload_dataset(
            files,
            "datasets/shards-archive",
            layout="dicom_archive",
            reports_csv=reports,
            class_column="finding",
            shard_mb=0.004,
            progress=again.append,
        )
    assert report2.ok and report2.images == 16
    assert [e.message.endswith("already stored") for e in again] == [True] * len(shard_names)
    assert {f.key.rsplit("/", 1)[-1] for f in _list(client, "datasets/shards-archive")} == listed
    # It is an ImageFolder too: the CSV's class column is the folder.
    folder = client.finetune.validate_dataset("datasets/shards-archive", layout="image_folder")
    assert folder.ok and folder.per_class == {"effusion": 8, "normal": 8}


def _list(client, prefix: str) -> list[Any]:  # type: ignore[no-untyped-def]
    stub = finetune_pb2_grpc.FinetuneServiceStub(client._t.channel("finetune"))
    return list(stub.ListDatasetFiles(finetune_pb2.ListDatasetFilesRequest(prefix=prefix)).files)


def test_validate_reports_the_corrupt_file_by_path(client, corrupt_set):  # type: ignore[no-untyped-def]
    report = client.finetune.validate_dataset(corrupt_set, layout="image_folder")
    assert report.images == 12
    assert len(report.problems) == 1 and report.problems[0].startswith("a/3.png: unreadable")


def test_a_tiny_job_streams_the_archive(client, jobs):  # type: ignore[no-untyped-def]
    events: list[Any] = []
    job = client.finetune.wait(jobs["archive"], progress=events.append, timeout=300)
    assert job.state == "succeeded", job.failure_reason
    assert any(e.message.startswith("streaming 16 images from ") for e in events)
    assert job.step == 4 and np.isfinite(job.metrics["loss"])
    assert [c.step for c in client.finetune.checkpoints(job.id)] == [2, 4]
    # The memorization gate's index: one streamed pass over the sharded set, every image in it.
    assert any(e.message == "similarity index: 16 training images" for e in events)


def test_two_processes_stream_the_sharded_set(client, jobs):  # type: ignore[no-untyped-def]
    events: list[Any] = []
    job = client.finetune.wait(jobs["ddp"], progress=events.append, timeout=300)
    assert job.state == "succeeded", job.failure_reason
    logs = [e.message for e in events if e.type == "log"]
    assert any("2 process(es)" in m for m in logs)
    assert any(m.startswith("streaming 16 images from ") for m in logs)
    assert job.step == 4 and np.isfinite(job.metrics["loss"])


def test_corrupt_image_fails_the_job_or_is_skipped(client, jobs, store, corrupt_set):  # type: ignore[no-untyped-def]
    failed = client.finetune.wait(jobs["fail"], timeout=300)
    assert failed.state == "failed" and "a/3.png: unreadable image" in failed.failure_reason
    # It failed at the step whose batch holds the image; the checkpoints before it stay.
    _seed, step = failing_step(store, corrupt_set)
    assert [c.step for c in client.finetune.checkpoints(failed.id)] == list(range(1, step))
    events: list[Any] = []
    skipped = client.finetune.wait(jobs["skip"], progress=events.append, timeout=300)
    assert skipped.state == "succeeded", skipped.failure_reason
    logs = [e.message for e in events if e.type == "log" and "on_bad_image=skip" in e.message]
    assert logs and all("a/3.png" in m for m in logs)
    assert [c.step for c in client.finetune.checkpoints(skipped.id)] == [2, 4]


def test_hostile_shards_are_refused(client, tmp_path: pathlib.Path):  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        info = tarfile.TarInfo("../../finetune/evil.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    data = buf.getvalue()
    name, _ = _shards.shard_name(0, data)
    path = tmp_path / "evil.tar"
    path.write_bytes(data)
    with pytest.raises(clinisynth.InvalidArgumentError) as err:
        client.finetune.upload_file(path, f"datasets/shards-evil/{name}")
    assert err.value.fields == ["data"] and "not a clean relative path" in err.value.message
    with pytest.raises(clinisynth.InvalidArgumentError) as err:  # a name not carrying its digest
        client.finetune.upload_file(path, "datasets/shards-evil/shards/000000-0000000000000000.tar")
    assert err.value.fields == ["key"]
    assert _list(client, "datasets/shards-evil") == []
    with pytest.raises(grpc.RpcError) as rpc_err:  # the listing reads only callers' prefixes
        _list(client, "finetune/secrets")
    assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_streaming_job_killed_resumes_where_it_was(client, uploaded, store):  # type: ignore[no-untyped-def]
    """kill -9 of a streaming job's worker: the resumed attempt restarts the DataLoader at the
    checkpoint's batch count, so every step's loss equals an uninterrupted run's."""
    import os
    import signal
    import time

    from clinisynth_server.finetune.records import JobStore

    params = {**TINY, **UNET, "max_steps": 12, "checkpoint_every": 4, "augment": "hflip"}
    records = JobStore(store)
    straight = client.finetune.create(
        "diffusion_pretrain", "datasets/shards-archive", params=params
    )
    killed = client.finetune.create("diffusion_pretrain", "datasets/shards-archive", params=params)
    deadline = time.monotonic() + 240
    while not (
        records.checkpoints(killed.id) and int(records.progress(killed.id).get("step", 0)) > 4
    ):
        assert time.monotonic() < deadline, "no checkpoint and step past it"
        time.sleep(0.05)
    step_at_kill = int(records.progress(killed.id).get("step", 0))
    os.kill(int(records.get(killed.id).worker["pid"]), signal.SIGKILL)
    done = client.finetune.wait(killed.id, timeout=300)
    base = client.finetune.wait(straight.id, timeout=300)
    assert done.state == base.state == "succeeded", (done.failure_reason, base.failure_reason)
    assert step_at_kill < 12 and done.restarts == 1
    events = list(client.finetune.watch(killed.id))
    assert any(e.message.startswith("resumed from checkpoint") for e in events)

    def losses(job_id: str) -> dict[int, float]:
        return {
            e.step: e.metrics["loss"] for e in client.finetune.watch(job_id) if e.type == "progress"
        }

    got, want = losses(killed.id), losses(straight.id)
    assert set(got) == set(want) == set(range(1, 13))
    # Same process count, same batches, same noise: only kernel rounding may differ.
    assert all(abs(got[s] - want[s]) <= 1e-6 * abs(want[s]) for s in want), (got, want)
