"""One unreadable stored record never takes a listing down; caller keys stay in their namespace.

Unit level (a local store, no Triton): the catalog and the finetune job store skip a corrupt
record, log its key once (never its content), count it, and serve the rest; the namespace
helpers refuse every key outside the data-set namespace and every service-owned prefix.
"""

from __future__ import annotations

import json
import logging
import pathlib

import pytest

from clinisynth_server.catalog import Catalog, ModelRecord, record_key
from clinisynth_server.errors import FailedPrecondition, InvalidArgument
from clinisynth_server.finetune.records import CheckpointInfo, JobRecord, JobStore
from clinisynth_server.runtime.metrics import create_metrics
from clinisynth_server.store import open_store
from clinisynth_server.store.base import (
    DATASETS_NAMESPACE,
    SERVICE_NAMESPACES,
    confine_key,
    outside_service_namespaces,
)

# Each is stored at catalog/<name>/000001.json; every one must be skipped, none may fail a listing.
CORRUPT = {
    "empty-object": b"{}",
    "not-json": b"\x00\x01 not json",
    "a-list": b"[1, 2]",
    "wrong-types": b'{"name": "wrong-types", "version": 1, "kind": "unconditional",'
    b' "components": "denoiser", "component_versions": {}}',
    "unknown-kind": b'{"name": "unknown-kind", "version": 1, "kind": "rootkit",'
    b' "components": {}, "component_versions": {}}',
    "other-name": b'{"name": "good", "version": 1, "kind": "unconditional",'
    b' "components": {}, "component_versions": {}}',
}
SECRET_MARK = "PATIENT-SECRET-42"  # content that must never reach a log line


def good(name: str, version: int = 1) -> ModelRecord:
    return ModelRecord(
        name=name,
        version=version,
        kind="unconditional",
        components={"denoiser": f"{name}.denoiser"},
        component_versions={"denoiser": version},
        width=8,
        height=8,
    )


@pytest.fixture()
def env(tmp_path: pathlib.Path):  # type: ignore[no-untyped-def]
    store = open_store(str(tmp_path / "store"))
    metrics = create_metrics("generator")
    catalog = Catalog(store, ttl_s=0, metrics=metrics)
    catalog.put(good("good"))
    catalog.put(good("good", 2))
    return store, catalog, metrics


def corrupt_count(metrics, namespace: str) -> float:  # type: ignore[no-untyped-def]
    value = metrics.registry.get_sample_value(
        "clinisynth_store_corrupt_records_total",
        {"service": metrics.service, "namespace": namespace},
    )
    return value or 0.0


def test_corrupt_catalog_records_are_skipped_logged_once_and_counted(env, caplog) -> None:  # type: ignore[no-untyped-def]
    store, catalog, metrics = env
    for name, data in CORRUPT.items():
        if data.startswith(b"{"):  # a JSON object: carry a value that must not be logged
            data = json.dumps({**json.loads(data), "description": SECRET_MARK}).encode()
        store.put_bytes(record_key(name, 1), data)
    caplog.set_level(logging.WARNING, logger="clinisynth_server.catalog")
    for _ in range(3):  # listings are re-read per request: one log line / count per record
        listed = catalog.list(all_versions=True)
        assert [r.ref for r in listed] == ["good@1", "good@2"]
        assert [r.ref for r in catalog.list()] == ["good@2"]
    lines = [r.getMessage() for r in caplog.records]
    for name in CORRUPT:
        assert sum(record_key(name, 1) in line for line in lines) == 1, (name, lines)
    assert not any(SECRET_MARK in line for line in lines)
    assert corrupt_count(metrics, "catalog") == len(CORRUPT)


def test_get_of_a_corrupt_model_is_failed_precondition_not_internal(env) -> None:  # type: ignore[no-untyped-def]
    store, catalog, _ = env
    store.put_bytes(record_key("rogue", 1), b"{}")
    with pytest.raises(FailedPrecondition) as err:
        catalog.get("rogue")
    assert "rogue" in err.value.message and "cannot be read" in err.value.message
    # A corrupt version next to good ones: the good ones are served, the bad one is named.
    store.put_bytes(record_key("good", 3), b"{}")
    assert catalog.get("good").ref == "good@2"
    with pytest.raises(FailedPrecondition):
        catalog.get("good", 3)
    with pytest.raises(InvalidArgument):
        catalog.get("never-registered")
    # A new version never collides with the unreadable one.
    assert catalog.next_version("good") == 4
    assert catalog.next_version("rogue") == 2


def test_job_store_skips_corrupt_jobs_events_and_checkpoints(tmp_path: pathlib.Path) -> None:
    store = open_store(str(tmp_path / "store"))
    jobs = JobStore(store)
    rec = JobRecord(
        id="ft-good-000001", kind="classifier", dataset="datasets/d", params={}, model_name="m"
    )
    jobs.put(rec)
    jobs.append_event(rec.id, "state", state="queued", message="queued")
    jobs.append_event(rec.id, "log", message="two")
    store.put_bytes("finetune/jobs/ft-bad-000002/job.json", b"{}")
    store.put_bytes("finetune/jobs/ft-bad-000003/job.json", b"not json")
    store.put_bytes(jobs.key(rec.id, "events/000000000003.json"), b'{"sequence": "x"}')
    jobs.append_event(rec.id, "log", message="four")
    ok = CheckpointInfo(
        id="000000010",
        step=10,
        metrics={},
        created=1.0,
        best=False,
        prefix=jobs.checkpoint_prefix(rec.id, "000000010"),
    )
    jobs.commit_checkpoint(rec.id, ok)
    store.put_bytes(jobs.checkpoint_prefix(rec.id, "000000020") + "checkpoint.json", b"{}")
    store.put_bytes(jobs.key(rec.id, "progress.json"), b"[")

    assert [r.id for r in jobs.all()] == [rec.id]
    with pytest.raises(FailedPrecondition):
        jobs.get("ft-bad-000002")
    assert [e.message for e in jobs.events(rec.id)] == ["queued", "two", "four"]
    assert [c.id for c in jobs.checkpoints(rec.id)] == ["000000010"]
    assert jobs.progress(rec.id) == {}


@pytest.mark.parametrize(
    "key",
    [
        "feedback/records/x.json",
        "catalog/m/000001.json",
        "finetune/jobs/j/job.json",
        "finetune/jobs/j/checkpoints/000000010/state/trainer.pt",
        "jobs/j.json",
        "checkpoints/c/trainer.pt",
        "triton-models/m/config.pbtxt",
        "outputs/x.png",
        "x.png",
        "datasets",
        "datasets/",
        "datasets/../catalog/m/000001.json",
        "../datasets/x",
        "/datasets/x",
        "datasets\\x",
        "datasets//x",
        "datasets/./x",
        "datasets/a\x00b",
        "datasets/a\nb",
        "datasets/.clinisynth-tmp",
        "DATASETS/x",
    ],
)
def test_confine_key_refuses_everything_outside_the_dataset_namespace(key: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        confine_key(key, DATASETS_NAMESPACE, "key")
    assert [v.field for v in err.value.violations] == ["key"]


def test_confine_key_keeps_dataset_keys_as_sent() -> None:
    assert confine_key("datasets/cells/a/0.png", DATASETS_NAMESPACE) == "datasets/cells/a/0.png"


@pytest.mark.parametrize("namespace", SERVICE_NAMESPACES)
def test_service_namespaces_are_refused_as_caller_prefixes(namespace: str) -> None:
    for prefix in (namespace, namespace.rstrip("/"), namespace + "x/y"):
        with pytest.raises(InvalidArgument) as err:
            outside_service_namespaces(prefix, "dataset")
        assert [v.field for v in err.value.violations] == ["dataset"]
    assert outside_service_namespaces("datasets/" + namespace, "dataset")  # a name, not a place
