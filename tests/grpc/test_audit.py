"""The audit trail over real gRPC: the reward and finetune services with JWT authentication on,
one shared local store, no Triton (no call here needs a forward pass; Score answers UNAVAILABLE,
which is an outcome like any other).

Calls are made as three principals, then the trail is listed as an admin (SDK and CLI): every
call is there once with its principal, method and code, health probes are not, no request
content reached any audit object, and a write whose record cannot be written answers UNAVAILABLE.
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from auth_helpers import Issuer
from conftest import start_service
from grpc_health.v1 import health_pb2, health_pb2_grpc

import clinisynth
from clinisynth import cli
from clinisynth.v1 import audit_pb2, audit_pb2_grpc, finetune_pb2, finetune_pb2_grpc

SECRET_PROMPT = "portable chest film of Jane Roe MRN 0098765, right effusion"
SECRET_COMMENT = "patient Jane Roe born 1950-01-02 says it hurts"
SECRET_BYTES = b"UPLOADED-DATASET-BYTES-0098765"
F = "/clinisynth.v1.FinetuneService/"
R = "/clinisynth.v1.RewardService/"
A = "/clinisynth.v1.AuditService/ListAudit"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("audit")
    issuer = Issuer()
    auth = issuer.settings(home)
    store = home / "store"
    running: dict[str, Any] = {}
    try:
        running["finetune"] = start_service(
            "finetune", "127.0.0.1:1", str(store), home, workdir=str(home / "work"), **auth
        )
        running["reward"] = start_service(
            "reward", "127.0.0.1:1", str(store), home, http_port="0", **auth
        )
        yield {"servers": running, "issuer": issuer, "store": store, "home": home}
    finally:
        for server in running.values():
            server.stop(0)


def _client(stack: dict[str, Any], token: str) -> clinisynth.Client:
    s = stack["servers"]
    return clinisynth.Client(
        endpoints={"finetune": s["finetune"].address, "reward": s["reward"].address},
        token=token,
        timeout=30,
        retries=0,  # one attempt, one record
    )


def _fails(fn: Any, *args: Any, **kwargs: Any) -> str:
    """The error code of a call that must fail."""
    with pytest.raises(clinisynth.ClinisynthError) as err:
        fn(*args, **kwargs)
    return err.value.code


def _expect(code: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    assert _fails(fn, *args, **kwargs) == code


def _audit_files(store: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in (store / "audit").rglob("*") if p.is_file())


def test_every_call_is_recorded_with_principal_method_and_code(
    stack: dict[str, Any],
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issuer, store = stack["issuer"], stack["store"]
    admin = issuer.token("admin", sub="auditor")
    since = time.time()
    made: list[tuple[str, str, str]] = []  # (principal, method, code) of every call below

    data = tmp_path / "a.bin"
    data.write_bytes(SECRET_BYTES)
    with _client(stack, issuer.token("trainer", sub="curator")) as c:
        item = c.review.enqueue(
            [np.full((8, 8), 0.25, np.float32)], prompt=SECRET_PROMPT, names=["case-1"]
        )[0]
        made.append(("curator", R + "EnqueueReview", "OK"))
        c.finetune.upload_file(data, "datasets/audit/a.bin")
        made.append(("curator", F + "UploadDatasetFile", "OK"))
        _expect("INVALID_ARGUMENT", c.finetune.validate_dataset, "catalog")
        made.append(("curator", F + "ValidateDataset", "INVALID_ARGUMENT"))
    with _client(stack, issuer.token("expert", sub="dr_a")) as c:
        c.feedback.submit(item_id=item.id, rater_id="dr_a", plausible=False, comment=SECRET_COMMENT)
        made.append(("dr_a", R + "SubmitFeedback", "OK"))
        other = {"item_id": item.id, "rater_id": "dr_b", "plausible": True}
        _expect("PERMISSION_DENIED", c.feedback.submit, **other)  # judged as someone else
        made.append(("dr_a", R + "SubmitFeedback", "PERMISSION_DENIED"))
        _expect("PERMISSION_DENIED", c.finetune.kinds)  # an expert is no trainer
        made.append(("dr_a", F + "ListJobKinds", "PERMISSION_DENIED"))
        _expect("PERMISSION_DENIED", c.audit)  # nor an admin
        made.append(("dr_a", A, "PERMISSION_DENIED"))
    with _client(stack, issuer.token("trainer", sub="curator")) as c:
        export = c.feedback.export(out=tmp_path / "export")  # a server stream, read to its end
        assert export.judgements == 1
        made.append(("curator", R + "ExportFeedback", "OK"))
        made.append(("curator", R + "DownloadExport", "OK"))
    with _client(stack, issuer.token("scorer", sub="bob")) as c:
        pixels = np.zeros((8, 8), np.float32)
        code = _fails(c.score, [pixels], prompt=SECRET_PROMPT, model="chest-reward@4")
        assert code != "OK"  # no such model here (and no Triton): still a call, still recorded
        made.append(("bob", R + "Score", code))
    with _client(stack, issuer.token("expert", aud="someone-else")) as c:
        _expect("UNAUTHENTICATED", c.feedback.list)
        made.append(("", R + "ListFeedback", "UNAUTHENTICATED"))
    for server in stack["servers"].values():  # probes: never audited
        with grpc.insecure_channel(server.address) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    with _client(stack, admin) as c:
        entries = c.audit(since=since)
    got = [(e.principal, e.method, e.code) for e in entries]
    assert sorted(got) == sorted(made)  # each call once; nothing else (no health probe)
    by_call = {(e.principal, e.method, e.code): e for e in entries}
    score = by_call[("bob", R + "Score", code)]
    assert score.service == "reward" and score.request_bytes > 0
    assert [(m.name, m.version, m.field) for m in score.models] == [("chest-reward", "4", "model")]
    upload = by_call[("curator", F + "UploadDatasetFile", "OK")]
    assert upload.service == "finetune" and upload.via == "jwt"
    assert upload.request_bytes > len(SECRET_BYTES) and upload.response_bytes > 0
    download = by_call[("curator", R + "DownloadExport", "OK")]
    assert download.response_messages >= 2 and download.response_bytes > download.request_bytes
    submit = by_call[("dr_a", R + "SubmitFeedback", "OK")]
    assert submit.request_id  # the SDK's client_request_id

    with _client(stack, admin) as c:
        mine = c.audit(since=since, principal="dr_a", method="SubmitFeedback")
        assert [e.code for e in mine] == ["OK", "PERMISSION_DENIED"]
        paged = c.audit(since=since, page_size=2, limit=len(entries))
        assert [e.id for e in paged] == [e.id for e in entries]  # pages of 2: same, in order
        assert c.audit(since=since, until=since) == []
        listed = c.audit(since=since)
    assert listed[-1].principal == "auditor" and listed[-1].method == A  # the listing itself

    # nothing the callers sent reached the trail
    blob = b"".join(p.read_bytes() for p in _audit_files(store))
    for secret in (SECRET_PROMPT, SECRET_COMMENT, "Jane Roe", "0098765", "case-1"):
        assert secret.encode() not in blob
    assert SECRET_BYTES not in blob

    # the CLI, once, as the admin: the same records as JSON
    monkeypatch.setenv("CLINISYNTH_HOME", str(tmp_path / "no-stack"))
    monkeypatch.setenv("CLINISYNTH_FINETUNE_ADDRESS", stack["servers"]["finetune"].address)
    monkeypatch.setenv("CLINISYNTH_TOKEN", admin)
    iso = dt.datetime.fromtimestamp(since, dt.UTC).isoformat()
    capsys.readouterr()
    assert cli.main(["audit", "--since", iso, "--principal", "curator", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["code"]) for r in rows] == [
        (method, outcome) for who, method, outcome in made if who == "curator"
    ]

    # the counter by outcome
    reward_metrics = stack["servers"]["reward"].metrics.registry
    assert (
        reward_metrics.get_sample_value(
            "clinisynth_audit_records_total", {"service": "reward", "outcome": "PERMISSION_DENIED"}
        )
        == 1.0
    )


def test_a_write_whose_record_cannot_be_written_is_unavailable(
    stack: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    store, issuer = stack["store"], stack["issuer"]
    finetune = stack["servers"]["finetune"]
    data = tmp_path / "b.bin"
    data.write_bytes(b"more training bytes")
    token = issuer.token("trainer", sub="curator")
    failures = {"service": "finetune"}
    before = finetune.metrics.registry.get_sample_value("clinisynth_audit_failures_total", failures)
    moved = store / "audit-moved"
    (store / "audit").rename(moved)
    (store / "audit").write_text("the audit prefix is not writable")
    try:
        with _client(stack, token) as c:
            _expect("UNAVAILABLE", c.finetune.upload_file, data, "datasets/audit/b.bin")
    finally:
        (store / "audit").unlink()
        moved.rename(store / "audit")
    after = finetune.metrics.registry.get_sample_value("clinisynth_audit_failures_total", failures)
    assert after == (before or 0.0) + 1
    with _client(stack, token) as c:  # back without a restart
        assert c.finetune.upload_file(data, "datasets/audit/b.bin")["key"] == "datasets/audit/b.bin"


def test_list_audit_over_raw_grpc_is_admin_only_and_validates(stack: dict[str, Any]) -> None:
    issuer = stack["issuer"]
    with grpc.insecure_channel(stack["servers"]["reward"].address) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        for role in ("requester", "scorer", "expert", "trainer"):
            meta = (("authorization", f"Bearer {issuer.token(role)}"),)
            with pytest.raises(grpc.RpcError) as err:
                stub.ListAudit(audit_pb2.ListAuditRequest(), metadata=meta, timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        meta = (("authorization", f"Bearer {issuer.token('admin')}"),)
        for bad, field in (
            (audit_pb2.ListAuditRequest(page_token="x"), "page_token"),
            (audit_pb2.ListAuditRequest(page_size=-1), "page_size"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.ListAudit(bad, metadata=meta, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith(field)
        # one trail: the reward service lists what the finetune service recorded
        with grpc.insecure_channel(stack["servers"]["finetune"].address) as ft:
            kinds = finetune_pb2_grpc.FinetuneServiceStub(ft).ListJobKinds
            kinds(finetune_pb2.ListJobKindsRequest(), metadata=meta, timeout=10)
        reply = stub.ListAudit(
            audit_pb2.ListAuditRequest(method="ListJobKinds", principal="dr_a"),
            metadata=meta,
            timeout=10,
        )
        assert [(r.service, r.code) for r in reply.records][-1:] == [("finetune", "OK")]
