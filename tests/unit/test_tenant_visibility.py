"""The tenancy rule in one place: who sees which object and which model (no services here).

Catalog records are written directly (no Triton): visibility is a property of the records.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

from clinisynth_server import paging
from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import ClinisynthError, InvalidArgument
from clinisynth_server.finetune.records import JobStore
from clinisynth_server.reward.feedback import FeedbackRecord, ReviewItem, feedback_id, item_id
from clinisynth_server.reward.queue import QueueIndex
from clinisynth_server.reward.scoring import Condition
from clinisynth_server.runtime.roles import ANONYMOUS, Principal
from clinisynth_server.store import open_store
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.tenancy import (
    Viewer,
    dataset_root,
    object_owner,
    owner_metadata,
    prefix_owner,
    refuse_foreign_prefix,
    sees_object,
    sees_prefix,
    viewer_of,
)

A, B, ADMIN = Viewer("a"), Viewer("b"), Viewer("ops", admin=True)


@pytest.fixture()
def store(tmp_path: pathlib.Path) -> ArtifactStore:
    return open_store(str(tmp_path / "store"))


def _record(name: str, version: int, tenant: str = "") -> ModelRecord:
    labels = {"tenant": tenant} if tenant else {}
    return ModelRecord(
        name, version, "unconditional", {"denoiser": f"{name}.denoiser"}, {}, labels=labels
    )


@pytest.fixture()
def catalog(store: ArtifactStore) -> Catalog:
    catalog = Catalog(store, ttl_s=0.0)
    catalog.put(_record("shared", 1))
    catalog.put(_record("shared", 2, tenant="a"))  # A's private fine-tune of a shared name
    catalog.put(_record("secret", 1, tenant="a"))
    return catalog


Answer = tuple[str, str, tuple[str, ...]]


def _answer(fn: Callable[..., object], *args: object) -> Answer:
    """The error a call raises: code, message, field violations."""
    with pytest.raises(ClinisynthError) as err:
        fn(*args)
    e = err.value
    return e.code, e.message, tuple(f"{v.field}: {v.description}" for v in e.violations)


def _swapped(answer: Answer, old: str, new: str) -> Answer:
    code, message, violations = answer
    return code, message.replace(old, new), tuple(v.replace(old, new) for v in violations)


def test_viewer_rule() -> None:
    assert A.sees("a") and not A.sees("b") and not A.sees("")
    assert Viewer().sees("") and not Viewer().sees("a")
    assert ADMIN.sees("a") and ADMIN.sees("b") and ADMIN.sees("")
    assert A.sees_model(_record("m", 1)) and B.sees_model(_record("m", 1))  # shared
    assert A.sees_model(_record("m", 1, "a")) and not B.sees_model(_record("m", 1, "a"))
    assert ADMIN.sees_model(_record("m", 1, "a"))


def test_principals_become_viewers() -> None:
    assert viewer_of(Principal("x", frozenset({"trainer"}), "a")) == Viewer("a", False)
    assert viewer_of(Principal("x", frozenset({"admin"}), "a")) == Viewer("a", True)
    # authentication off: anonymous holds every role, so it sees everything (as before)
    assert viewer_of(ANONYMOUS) == Viewer("", True)


def test_private_models_are_unknown_to_other_tenants(catalog: Catalog) -> None:
    b = catalog.seen_by(B)
    assert {r.ref for r in b.list(all_versions=True)} == {"shared@1"}
    assert {r.ref for r in catalog.seen_by(A).list(all_versions=True)} == {
        "secret@1",
        "shared@1",
        "shared@2",
    }
    assert catalog.seen_by(ADMIN) is catalog and catalog.seen_by(None) is catalog
    # the same answer as for a name nobody registered (same length, same "known" list)
    hidden, missing = _answer(b.get, "secret"), _answer(b.get, "nosuch")
    assert hidden[0] == "INVALID_ARGUMENT"
    assert hidden == _swapped(missing, "nosuch", "secret")
    assert "secret" not in hidden[2][0].split("known:")[1]
    # a version of a shared name: B's latest is the newest version B sees
    assert b.get("shared").version == 1
    assert catalog.seen_by(A).get("shared").version == 2
    assert _answer(b.get, "shared", "2") == _swapped(_answer(b.get, "shared", "3"), "3", "2")


def test_aliases_of_a_private_model_do_not_resolve(catalog: Catalog) -> None:
    catalog.set_alias(catalog.get("secret", "1"), "prod")
    assert catalog.seen_by(A).get("secret", "prod").version == 1
    b = catalog.seen_by(B)
    missing = _answer(b.get, "nosuch", "prod")
    assert _answer(b.get, "secret", "prod") == _swapped(missing, "nosuch", "secret")
    assert b.aliases("secret") == {}


def test_list_models_pages_what_the_viewer_sees(catalog: Catalog) -> None:
    page = paging.list_models(catalog, viewer=B, all_versions=True)
    assert [(m.record.ref, m.latest) for m in page.items] == [("shared@1", True)]
    page = paging.list_models(catalog, viewer=A, all_versions=True)
    assert [(m.record.ref, m.latest) for m in page.items] == [
        ("secret@1", True),
        ("shared@1", False),
        ("shared@2", True),
    ]
    assert len(paging.list_models(catalog, all_versions=True).items) == 3


def test_object_owners_in_metadata(store: ArtifactStore) -> None:
    store.put_bytes("outputs/x/a.png", b"1", metadata=owner_metadata("a"))
    store.put_bytes("outputs/x/legacy.png", b"2")  # written before tenants: tenant ""
    store.put_bytes("outputs/y/u.png", b"3", metadata=owner_metadata("Zürich ward 3"))
    assert object_owner(store, "outputs/x/a.png") == "a"
    assert object_owner(store, "outputs/x/legacy.png") == ""
    assert object_owner(store, "outputs/y/u.png") == "Zürich ward 3"  # hex-encoded on disk
    assert sees_object(store, "outputs/x/a.png", A) and not sees_object(store, "outputs/x/a.png", B)
    assert sees_object(store, "outputs/x/legacy.png", Viewer())
    assert not sees_object(store, "outputs/x/legacy.png", A)
    assert not sees_object(store, "outputs/x/missing.png", ADMIN)
    # content-addressed review images are read by whoever names their digest
    store.put_bytes("feedback/images/abc.png", b"4")
    assert sees_object(store, "feedback/images/abc.png", A)
    # a prefix is taken by its first writer
    refuse_foreign_prefix(store, "outputs/x/a.png", "a", "output_prefix")
    refuse_foreign_prefix(store, "outputs/z/none.json", "b", "output_prefix")
    with pytest.raises(InvalidArgument) as err:
        refuse_foreign_prefix(store, "outputs/x/a.png", "b", "output_prefix")
    assert [v.field for v in err.value.violations] == ["output_prefix"]


def test_data_set_owner_is_its_first_file(store: ArtifactStore) -> None:
    assert dataset_root("datasets/cells/sub/") == "datasets/cells/"
    assert dataset_root("datasets/cells") == "datasets/cells/"
    assert dataset_root("exports/feedback/x") == "exports/feedback/x/"
    store.put_bytes("datasets/cells/a/0.png", b"1", metadata=owner_metadata("a"))
    assert prefix_owner(store, "datasets/cells/") == "a"
    assert prefix_owner(store, "datasets/empty/") is None
    assert sees_prefix(store, "datasets/cells/a", A)
    assert not sees_prefix(store, "datasets/cells/a", B)
    assert sees_prefix(store, "datasets/cells", ADMIN)
    assert sees_prefix(store, "datasets/empty", B)  # nothing there: empty for everyone


def test_ids_are_per_tenant_and_unchanged_for_tenant_none(store: ArtifactStore) -> None:
    cond = Condition(class_name="lymphocyte")
    assert feedback_id("r", "q") == feedback_id("r", "q", "")
    assert feedback_id("r", "q", "a") != feedback_id("r", "q", "b") != feedback_id("r", "q")
    assert item_id(cond, "d" * 64, "a") != item_id(cond, "d" * 64)
    jobs = JobStore(store)
    assert jobs.claim_request("req", "job-a", "a") == "job-a"
    assert jobs.claim_request("req", "job-b", "b") == "job-b"  # not A's job
    assert jobs.claim_request("req", "job-c", "a") == "job-a"  # A's retry
    assert jobs.claim_request("req", "job-d") == "job-d"


def test_records_from_before_tenants_belong_to_tenant_none() -> None:
    cond = {"class_name": "lymphocyte"}
    old = {
        "id": "fb-1",
        "client_request_id": "q",
        "rater_id": "r",
        "condition": cond,
        "plausible": True,
        "image_key": "k",
        "image_sha256": "s",
    }
    assert FeedbackRecord.from_json(old).tenant == ""
    item = {"id": "ri-1", "condition": cond, "image_key": "k", "image_sha256": "s"}
    assert ReviewItem.from_json(item).tenant == ""


def test_queue_index_pending_and_next_per_tenant() -> None:
    index = QueueIndex()
    cond = Condition(class_name="lymphocyte")
    for i, tenant in enumerate(["a", "a", "b", ""]):
        index.add_item(
            ReviewItem(f"ri-{i}", cond, f"k{i}", f"s{i}", created=float(i), tenant=tenant)
        )
    assert index.pending(cond, A) == 2 and index.pending(cond, B) == 1
    assert index.pending(cond, Viewer()) == 1 and index.pending(cond, ADMIN) == 4
    assert index.pending(cond) == 4
    assert index.pending_by_condition(B) == {cond: 1}
    assert [q.item.id for q in index.next("r", cond, 10, B)] == ["ri-2"]
    assert len(index.next("r", cond, 10, ADMIN)) == 4
    # a full item leaves the tenant's count
    index.add_record(
        FeedbackRecord("fb-x", "q", "r", cond, True, "k0", "s0", item_id="ri-0", tenant="a")
    )
    assert index.pending(cond, A) == 1 and index.pending(cond) == 3
