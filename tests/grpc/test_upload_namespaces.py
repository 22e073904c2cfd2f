"""Store namespaces through the running services (real gRPC, real Triton behind the services).

``UploadDatasetFile`` writes only under ``datasets/``: every service-owned namespace (catalog,
feedback, review items, jobs and their checkpoints, the model repository) and every escape is
INVALID_ARGUMENT naming ``key``, and the target is unchanged. An uploaded DICOM is stored
de-identified. One corrupt record never takes a listing down: ListModels / ListJobs serve the
rest, the corrupt name is FAILED_PRECONDITION, and the skip is counted in the metrics.

The store is private to this module, laid out as ``clinisynth up`` lays out its home (``store/``
next to ``triton-models/``), so ``../triton-models`` would reach a model repository if a key
could escape.
"""

from __future__ import annotations

import copy
import io
import pathlib
import urllib.request

import grpc
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

import clinisynth
from clinisynth.v1 import (
    common_pb2,
    finetune_pb2,
    finetune_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

pytestmark = pytest.mark.stack

JOB = "ft-lv2x0k1a-0a1b2c"
CORRUPT_JOB = "ft-lv2x0k1b-badbad"
# What a caller must never write, with what the owning service put there (b"" = absent).
TARGETS: dict[str, bytes] = {
    "feedback/records/2026/fb-1.json": b'{"plausible": true, "rater_id": "expert-1"}',
    "feedback/images/abc.png": b"expert image",
    "review/items/it-1.json": b'{"item": 1}',
    "catalog/rogue/000001.json": b"",
    "catalog/good/000002.json": b"",
    f"finetune/jobs/{JOB}/job.json": b'{"state": "succeeded"}',
    f"finetune/jobs/{JOB}/checkpoints/000000010/state/trainer.pt": b"trusted trainer state",
    f"finetune/jobs/{JOB}/checkpoints/000000010/checkpoint.json": b'{"step": 10}',
    "finetune/secrets/deid.txt": b"",
    "counterfactual/guidance/g.json": b'{"g": 1}',
    "jobs/j1.json": b"",
    "checkpoints/c1/trainer.pt": b"",
    "triton-models/denoiser/config.pbtxt": b"",
    "outputs/2026/01/01/r1/0000.png": b"",
}
ESCAPES = [
    "../triton-models/denoiser/config.pbtxt",
    "datasets/../catalog/rogue/000001.json",
    "datasets/../../triton-models/denoiser/1/model.py",
    "/datasets/abs.bin",
    "datasets\\win.bin",
    "datasets//empty-segment.bin",
    "datasets/./dot.bin",
    "datasets/ctl\x01.bin",
    "datasets/nul\x00.bin",
    "datasets/",
    "datasets",
    "datasets/.clinisynth-tmp-x",
]
IDENTIFIERS = {
    "PatientName": "DOE^JANE",
    "PatientID": "MRN-20260101-77",
    "InstitutionName": "St Example Hospital",
    "StudyDate": "20240117",
    "PatientBirthDate": "19610203",
    "ReferringPhysicianName": "HOUSE^GREGORY",
}
WINDOWING = (
    "WindowCenter",
    "WindowWidth",
    "RescaleIntercept",
    "RescaleSlope",
    "PhotometricInterpretation",
    "BitsStored",
    "Rows",
    "Columns",
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    home = tmp_path_factory.mktemp("namespaces")
    repo = home / "triton-models" / "denoiser"
    (repo / "1").mkdir(parents=True)
    (repo / "config.pbtxt").write_text('name: "denoiser"\n')
    (repo / "1" / "model.py").write_text("# the trusted backend\n")
    return home


@pytest.fixture(scope="module")
def store(home):  # type: ignore[no-untyped-def]
    """The private store, seeded with the owners' objects, a good model and corrupt records."""
    from clinisynth_server.catalog import Catalog, ModelRecord
    from clinisynth_server.store import open_store

    store = open_store(str(home / "store"))
    for key, data in TARGETS.items():
        if data:
            store.put_bytes(key, data)
    catalog = Catalog(store, ttl_s=0)
    catalog.put(
        ModelRecord(
            name="good",
            version=1,
            kind="unconditional",
            components={"denoiser": "good.denoiser"},
            component_versions={"denoiser": 1},
            width=8,
            height=8,
        )
    )
    catalog.put(
        ModelRecord(
            name="good-reward",
            version=1,
            kind="reward",
            components={"scorer": "good-reward.scorer"},
            component_versions={"scorer": 1},
            width=8,
            height=8,
        )
    )
    store.put_bytes("catalog/broken/000001.json", b"{}")  # the review's one-upload outage
    store.put_bytes("catalog/garbled/000001.json", b"\xff not json")
    store.put_bytes(f"finetune/jobs/{CORRUPT_JOB}/job.json", b"{}")
    return store


@pytest.fixture(scope="module")
def finetune_server(triton_server, store, home):  # type: ignore[no-untyped-def]
    from conftest import start_service

    running = start_service(
        "finetune",
        triton_server.grpc_url,
        str(home / "store"),
        home,
        workdir=str(home / "work"),
        model_repository=str(home / "triton-models"),
    )
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def generator_server(triton_server, store, home):  # type: ignore[no-untyped-def]
    from conftest import start_service

    running = start_service("generator", triton_server.grpc_url, str(home / "store"), home)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def reward_server(triton_server, store, home):  # type: ignore[no-untyped-def]
    from conftest import start_service

    running = start_service("reward", triton_server.grpc_url, str(home / "store"), home)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(finetune_server):  # type: ignore[no-untyped-def]
    with clinisynth.Client(endpoints={"finetune": finetune_server.address}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(finetune_server):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(finetune_server.address) as channel:
        yield finetune_pb2_grpc.FinetuneServiceStub(channel)


def upload(stub, key: str, data: bytes) -> common_pb2.ArtifactRef:  # type: ignore[no-untyped-def]
    return stub.UploadDatasetFile(iter([finetune_pb2.UploadChunk(key=key, data=data)]), timeout=30)


def snapshot(home: pathlib.Path) -> dict[str, bytes]:
    """Every file under the module's home except the service's own work folders."""
    return {
        p.relative_to(home).as_posix(): p.read_bytes()
        for p in sorted(home.rglob("*"))
        if p.is_file()
        # the audit trail records every call, refused ones too: not an upload's effect
        and not p.relative_to(home)
        .as_posix()
        .startswith(("work/", "cache/", "store/audit/", "store/.clinisynth/meta/audit/"))
    }


def assert_refused(stub, key: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        upload(stub, key, b"ROGUE " + key.encode("utf-8", "replace"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (key, err.value.details())
    assert err.value.details().startswith("key:"), err.value.details()


# ---------------------------------------------------------------------------------------------
# uploads: the data-set namespace only
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(TARGETS))
def test_upload_into_a_service_namespace_is_refused_and_changes_nothing(stub, home, key):  # type: ignore[no-untyped-def]
    before = snapshot(home)
    assert_refused(stub, key)
    assert snapshot(home) == before


@pytest.mark.parametrize("key", ESCAPES)
def test_upload_escapes_are_refused_and_change_nothing(stub, home, key):  # type: ignore[no-untyped-def]
    before = snapshot(home)
    assert_refused(stub, key)
    assert snapshot(home) == before
    assert (home / "triton-models/denoiser/config.pbtxt").read_text() == 'name: "denoiser"\n'


def test_dataset_uploads_land_exactly_where_named(client, store, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "a.bin"
    path.write_bytes(b"training bytes")
    ref = client.finetune.upload_file(path, "datasets/mine/a.bin")
    assert ref["key"] == "datasets/mine/a.bin"
    assert store.get_bytes("datasets/mine/a.bin") == b"training bytes"


def test_job_and_dataset_reads_stay_out_of_service_namespaces(client):  # type: ignore[no-untyped-def]
    for prefix in ("feedback/records", "catalog", f"finetune/jobs/{JOB}", "review/items"):
        with pytest.raises(clinisynth.InvalidArgumentError) as err:
            client.finetune.validate_dataset(prefix)
        assert err.value.fields == ["prefix"]
        with pytest.raises(clinisynth.InvalidArgumentError) as err:
            client.finetune.create("classifier", prefix)
        assert "dataset" in err.value.fields
    for job_id in ("../../catalog/good", f"{JOB}/../{CORRUPT_JOB}"):
        with pytest.raises(clinisynth.InvalidArgumentError) as err:
            client.finetune.get(job_id)
        assert err.value.fields == ["id"]


# ---------------------------------------------------------------------------------------------
# de-identification of uploaded DICOM
# ---------------------------------------------------------------------------------------------


def patient_dicom(sop_suffix: str) -> tuple[pydicom.Dataset, bytes]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1001"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1002"
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.2{sop_suffix}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return ds, out.getvalue()


def test_uploaded_dicom_is_stored_deidentified_with_pixels_and_windowing(stub, store):  # type: ignore[no-untyped-def]
    original, data = patient_dicom("1")
    _, second = patient_dicom("2")
    ref = upload(stub, "datasets/ct-study/lung/0001.dcm", data)
    upload(stub, "datasets/ct-study/lung/0002.dcm", second)
    upload(stub, "datasets/other-study/lung/0001.dcm", data)
    upload(stub, "datasets/ct-study/disguised.png", data)  # DICOM by its magic, any name

    stored = store.get_bytes("datasets/ct-study/lung/0001.dcm")
    assert ref.sha256 == store.stat("datasets/ct-study/lung/0001.dcm").sha256
    for text in (*IDENTIFIERS.values(), original.StudyInstanceUID, original.SOPInstanceUID):
        assert text.encode() not in stored, text
    assert IDENTIFIERS["PatientName"].encode() not in store.get_bytes(
        "datasets/ct-study/disguised.png"
    )
    ds = pydicom.dcmread(io.BytesIO(stored))
    for keyword in (
        "PatientName",
        "PatientID",
        "InstitutionName",
        "ReferringPhysicianName",
        "PatientBirthDate",
    ):
        assert str(ds.get(keyword, "") or "") == "", keyword
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.StudyDate and ds.StudyDate != IDENTIFIERS["StudyDate"]  # shifted, not dropped
    for keyword in WINDOWING:
        assert ds.get(keyword) == original.get(keyword), keyword
    assert ds.PixelData == original.PixelData
    np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)

    # One data set keeps its cross-references and dates consistent; another data set does not
    # share them (a different salt), so objects cannot be linked across data sets.
    two = pydicom.dcmread(io.BytesIO(store.get_bytes("datasets/ct-study/lung/0002.dcm")))
    other = pydicom.dcmread(io.BytesIO(store.get_bytes("datasets/other-study/lung/0001.dcm")))
    assert two.StudyInstanceUID == ds.StudyInstanceUID != original.StudyInstanceUID
    assert two.SeriesInstanceUID == ds.SeriesInstanceUID
    assert two.SOPInstanceUID != ds.SOPInstanceUID
    assert two.StudyDate == ds.StudyDate
    assert other.StudyInstanceUID != ds.StudyInstanceUID


def test_unreadable_dicom_upload_is_invalid_argument_and_not_stored(stub, store):  # type: ignore[no-untyped-def]
    _, data = patient_dicom("3")
    for key, payload in (
        ("datasets/bad/cut.dcm", data[:200]),  # inside the file meta
        ("datasets/bad/junk.dcm", b"DICM? no"),
        ("datasets/bad/magic.png", b"\0" * 128 + b"DICM" + b"\xff" * 40),
    ):
        with pytest.raises(grpc.RpcError) as err:
            upload(stub, key, payload)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith("data:"), err.value.details()
        assert not store.exists(key)
    burned = copy.deepcopy(pydicom.dcmread(io.BytesIO(data)))
    burned.BurnedInAnnotation = "YES"
    out = io.BytesIO()
    burned.save_as(out, enforce_file_format=True)
    with pytest.raises(grpc.RpcError) as err:
        upload(stub, "datasets/bad/burned.dcm", out.getvalue())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not store.exists("datasets/bad/burned.dcm")


# ---------------------------------------------------------------------------------------------
# corrupt records: listings serve the rest
# ---------------------------------------------------------------------------------------------


def scrape(running) -> str:  # type: ignore[no-untyped-def]
    url = f"http://{running.config.host}:{running.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_list_models_serves_the_good_records_past_corrupt_ones(generator_server):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(generator_server.address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        names = {m.name for m in stub.ListModels(common_pb2.ListModelsRequest(), timeout=30).models}
        assert {"good", "good-reward"} <= names
        assert not names & {"broken", "garbled"}
        only = stub.ListModels(common_pb2.ListModelsRequest(name="broken"), timeout=30)
        assert list(only.models) == []
    with clinisynth.Client(endpoints={"generator": generator_server.address}, timeout=60) as c:
        with pytest.raises(clinisynth.FailedPreconditionError) as err:
            c.generate("broken", n=1, seed=0)
        assert "broken" in err.value.message and "cannot be read" in err.value.message
    text = scrape(generator_server)
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith(
            'clinisynth_store_corrupt_records_total{namespace="catalog",service="generator"}'
        )
    )
    assert float(line.split()[-1]) == 2.0  # each corrupt record once, however often listed


def test_a_corrupt_job_record_does_not_stop_the_finetune_service(client, finetune_server):  # type: ignore[no-untyped-def]
    assert isinstance(client.finetune.list(), list)  # the service started and lists
    with pytest.raises(clinisynth.FailedPreconditionError) as err:
        client.finetune.get(CORRUPT_JOB)
    assert "corrupt" in err.value.message
    assert 'namespace="finetune"' in scrape(finetune_server)


# ---------------------------------------------------------------------------------------------
# the other services' caller-chosen prefixes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["catalog/good", "feedback/records", f"finetune/jobs/{JOB}"])
def test_generate_output_prefix_stays_out_of_service_namespaces(generator_server, home, prefix):  # type: ignore[no-untyped-def]
    before = snapshot(home)
    with grpc.insecure_channel(generator_server.address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(
                generator_pb2.GenerateRequest(
                    model=common_pb2.ModelRef(name="good"), num_images=1, output_prefix=prefix
                ),
                timeout=60,
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "output_prefix" in err.value.details()
    assert snapshot(home) == before


@pytest.mark.parametrize("prefix", ["feedback/records/", "catalog/evil/", "review/items/"])
def test_feedback_export_prefix_stays_out_of_service_namespaces(reward_server, home, prefix):  # type: ignore[no-untyped-def]
    before = snapshot(home)
    with grpc.insecure_channel(reward_server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ExportFeedback(reward_pb2.ExportFeedbackRequest(prefix=prefix), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith("prefix:"), err.value.details()
    assert snapshot(home) == before
