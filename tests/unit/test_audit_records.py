"""The audit trail on a real local store: record building, key layout, listing and failures."""

from __future__ import annotations

import datetime as dt
import json
import pathlib

import pytest

from clinisynth import _audit
from clinisynth.v1 import common_pb2, generator_pb2, reward_pb2
from clinisynth_server.errors import InvalidArgument, Unavailable
from clinisynth_server.runtime import audit
from clinisynth_server.runtime.audit import AuditLog, AuditRecord, CallAudit, ModelUse
from clinisynth_server.runtime.metrics import create_metrics
from clinisynth_server.runtime.roles import Principal
from clinisynth_server.store import LocalStore

SECRET_PROMPT = "chest x-ray of Jane Doe MRN 0012345, left lower lobe opacity"
GEN = "/clinisynth.v1.GeneratorService/Generate"
FEEDBACK = "/clinisynth.v1.RewardService/SubmitFeedback"
T0 = dt.datetime(2026, 12, 3, 7, 59, 58, 500000, tzinfo=dt.UTC).timestamp()


@pytest.fixture()
def store(tmp_path: pathlib.Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _record(t: float, principal: str = "dr_a", method: str = GEN, **over: object) -> AuditRecord:
    values: dict[str, object] = {
        "id": f"{int(t * 1e6) % (16**32):032x}",
        "time": t,
        "service": "generator",
        "method": method,
        "code": "OK",
        "principal": principal,
    }
    values.update(over)
    return AuditRecord(**values)  # type: ignore[arg-type]


def test_a_generate_call_records_who_what_model_sizes_and_no_content(store: LocalStore) -> None:
    metrics = create_metrics("generator")
    trail = AuditLog("generator", store, metrics.audit)
    request = generator_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name="chest-sd"), prompt=SECRET_PROMPT, request_id="req-7"
    )
    response = generator_pb2.GenerateResponse(
        images=[
            generator_pb2.GeneratedImage(
                image=common_pb2.Image(encoded=b"\x89PNG pixels"),
                provenance=common_pb2.Provenance(
                    model=common_pb2.ModelRef(name="chest-sd", version="3"),
                    model_digest="sha256:abc",
                    prompt=SECRET_PROMPT,
                ),
            )
        ],
    )
    call = trail.begin(GEN, [("x-request-id", "ignored-when-the-request-has-one")])
    assert call is not None
    call.principal = Principal("dr_a", frozenset({"requester"}), tenant="north", via="jwt")
    call.peer = "ipv4:10.0.0.7:4242"
    call.incoming(request)
    call.outgoing(response)
    record = trail.commit(call, "OK")

    assert (record.principal, record.tenant, record.via) == ("dr_a", "north", "jwt")
    assert (record.method, record.code, record.service) == (GEN, "OK", "generator")
    assert record.request_id == "ignored-when-the-request-has-one"  # metadata came first
    assert record.models == [ModelUse("chest-sd", "3", "sha256:abc", "model")]
    assert (record.request_bytes, record.response_bytes) == (
        request.ByteSize(),
        response.ByteSize(),
    )
    assert (record.request_messages, record.response_messages) == (1, 1)
    stored = store.get_bytes(record.key)
    assert b"Jane Doe" not in stored and b"0012345" not in stored and b"PNG" not in stored
    assert AuditRecord.from_json(json.loads(stored)) == record
    assert (
        metrics.registry.get_sample_value(
            "clinisynth_audit_records_total", {"service": "generator", "outcome": "OK"}
        )
        == 1.0
    )


def test_request_id_from_nested_fields_and_the_reply() -> None:
    feedback = reward_pb2.SubmitFeedbackRequest(
        feedback=reward_pb2.Feedback(client_request_id="crid-1", comment="patient said X")
    )
    assert audit.request_id_of(feedback) == "crid-1"
    call = CallAudit("generator", GEN, [])
    call.incoming(generator_pb2.GenerateRequest(prompt="p"))
    call.outgoing(generator_pb2.GenerateResponse(request_id="server-made"))
    assert call.record("OK").request_id == "server-made"
    assert audit.request_id_of(generator_pb2.GenerateRequest(request_id="a\nb" * 100)) == (
        "ab" * 64
    )


def test_keys_are_the_layout_and_sort_as_their_times() -> None:
    times = [T0, T0 + 0.000001, T0 + 1.5, T0 + 3600 * 24 * 40]
    keys = [_record(t).key for t in times]
    assert keys[0] == (
        f"audit/2026/12/03/07/20261203T075958.500000Z-generator-{_record(T0).id}.json"
    )
    assert keys[2].startswith("audit/2026/12/03/08/20261203T080000.000000Z-")
    assert keys == sorted(keys) and all(audit.RECORD_KEY.fullmatch(k) for k in keys)


def test_listing_by_time_principal_and_method_with_paging(store: LocalStore) -> None:
    trail = AuditLog("generator", store)
    records = [
        _record(T0 + i * 900, principal=("dr_a", "dr_b")[i % 2], method=(GEN, FEEDBACK)[i % 3 == 0])
        for i in range(12)
    ]
    for r in records:
        trail.write(r)

    def ids(page: list[AuditRecord]) -> list[str]:
        return [r.id for r in page]

    assert ids(trail.list().items) == ids(records)
    # since inclusive, until exclusive, to the microsecond
    window = trail.list(since=records[3].time, until=records[7].time).items
    assert ids(window) == ids(records[3:7])
    assert ids(trail.list(principal="dr_b").items) == ids(records[1::2])
    assert ids(trail.list(method="SubmitFeedback").items) == ids(records[::3])
    assert ids(trail.list(method=FEEDBACK, principal="dr_a").items) == ids(
        [r for r in records[::3] if r.principal == "dr_a"]
    )
    assert trail.list(method="/clinisynth.v1.X/SubmitFeedback").items == []
    # pages of 5 cover everything once, in order, and the last token is ""
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = trail.list(page_size=5, page_token=token)
        seen += ids(page.items)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == ids(records) and pages == 3
    page = trail.list(principal="dr_a", since=records[2].time, page_size=2)
    rest = trail.list(principal="dr_a", since=records[2].time, page_token=page.next_page_token)
    assert ids(page.items + rest.items) == ids([r for r in records[2:] if r.principal == "dr_a"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"page_token": "bm90LWF1ZGl0"}, "page_token"),  # base64 of "not-audit"
        ({"page_token": "%%%"}, "page_token"),
        ({"page_size": -1}, "page_size"),
        ({"since": T0, "until": T0 - 1}, "until"),
    ],
)
def test_bad_list_arguments_are_invalid_argument_naming_the_field(
    store: LocalStore, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        AuditLog("generator", store).list(**kwargs)  # type: ignore[arg-type]
    assert err.value.violations[0].field == field


def test_only_well_formed_record_keys_are_read(store: LocalStore) -> None:
    trail = AuditLog("reward", store)
    good = _record(T0, service="reward")
    trail.write(good)
    garbled = _record(T0 + 1, service="reward")
    store.put_bytes(garbled.key, b"\xff not json")
    store.put_json("audit/2026/12/03/07/forged.json", _record(T0 + 2).to_json())
    store.put_json(good.key.removesuffix(".json") + "/provenance.json", {"id": "x"})
    assert [r.id for r in trail.list().items] == [good.id]


def test_records_are_append_only_and_a_failed_write_is_unavailable(store: LocalStore) -> None:
    metrics = create_metrics("finetune")
    trail = AuditLog("finetune", store, metrics.audit)
    record = _record(T0, service="finetune")
    trail.write(record)
    with pytest.raises(Unavailable):
        trail.write(_record(T0, service="finetune", principal="someone-else"))
    assert AuditRecord.from_json(store.get_json(record.key)).principal == "dr_a"

    # the audit prefix made unwritable (a file where its folder must be): every write fails
    moved = store.root / "audit-moved"
    (store.root / "audit").rename(moved)
    (store.root / "audit").write_text("in the way")
    with pytest.raises(Unavailable) as err:
        trail.write(_record(T0 + 5, service="finetune"))
    assert err.value.reason == "AUDIT_UNAVAILABLE"
    value = metrics.registry.get_sample_value
    assert value("clinisynth_audit_failures_total", {"service": "finetune"}) == 2.0
    assert value("clinisynth_audit_records_total", {"service": "finetune", "outcome": "OK"}) == 1


def test_without_a_store_nothing_is_audited_and_listing_is_unavailable() -> None:
    trail = AuditLog("generator")
    assert trail.begin(GEN, []) is None
    with pytest.raises(Unavailable):
        trail.list()


def test_probes_and_reflection_are_not_audited(store: LocalStore) -> None:
    trail = AuditLog("generator", store)
    assert trail.begin("/grpc.health.v1.Health/Check", []) is None
    assert trail.begin("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", []) is None
    assert trail.begin(GEN, []) is not None


def test_proto_round_trip_through_the_sdk_types() -> None:
    record = _record(T0, models=[ModelUse("m", "2", "d", "model")], request_bytes=10, peer="p")
    entry = _audit.entry_from(audit.record_proto(record))
    assert (entry.id, entry.method, entry.rpc, entry.principal) == (
        record.id,
        GEN,
        "Generate",
        "dr_a",
    )
    assert abs(entry.time - T0) < 1e-6
    assert [(m.name, m.version, m.digest, m.field) for m in entry.models] == [
        ("m", "2", "d", "model")
    ]


def test_sdk_time_arguments() -> None:
    now = 1_800_000_000.0
    assert _audit.to_seconds("15m", "since", now=now) == now - 900
    assert _audit.to_seconds("2h", "since", now=now) == now - 7200
    assert _audit.to_seconds("2026-12-03T07:59:58.5Z", "since") == T0
    assert _audit.to_seconds(dt.datetime(2026, 12, 3, 7, 59, 58, 500000), "since") == T0
    assert _audit.to_seconds(None, "since") is None
    with pytest.raises(ValueError, match="since"):
        _audit.to_seconds("yesterday-ish", "since")


def test_cli_line_names_who_what_and_how_it_ended() -> None:
    from clinisynth.cli.audit import _line

    record = _record(T0, models=[ModelUse("m", "2", "d", "model")], tenant="north", code="OK")
    line = _line(_audit.entry_from(audit.record_proto(record)))
    assert line.startswith("2026-12-03T07:59:58.500000Z  generator")
    assert "dr_a/north" in line and "Generate" in line and "models=m@2" in line
