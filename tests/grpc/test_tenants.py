"""Tenants over real gRPC: generator, reward (and its review page) and finetune with JWT auth on,
one real Triton, one store. Tenants A and B hold the same roles; an admin belongs to a third.

For every object type A makes (data set, job, checkpoints, feedback record, review item, export,
stored output, private model), B's answer on A's object is compared with B's answer on a random
id of the same length: same code, same message, same error details once the ids are swapped.
B's listings lack A's objects; the admin's list and show them.
"""

from __future__ import annotations

import io
import json
import pathlib
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from auth_helpers import Issuer
from conftest import start_service
from PIL import Image

from clinisynth.v1 import (
    common_pb2,
    counterfactual_pb2,
    counterfactual_pb2_grpc,
    finetune_pb2,
    finetune_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)
from clinisynth_server.finetune.records import new_job_id
from clinisynth_server.reward import app as reward_app
from clinisynth_server.runtime.config import load_config
from clinisynth_server.runtime.server import start_server

pytestmark = pytest.mark.stack

ROLES = ("requester", "scorer", "expert", "trainer")
CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]
LYMPHOCYTE = common_pb2.Condition(class_name="lymphocyte")
# A's objects are named "...ta..."; the random ids B is compared against have the same length.
DATASET, NO_DATASET = "datasets/ta-cells", "datasets/zz-cells"
EXPORT, NO_EXPORT = "exports/ta-export", "exports/zz-export"
OUTPUTS = "outputs/ta-out"
MODEL, NO_MODEL = "cells-ta", "cells-zz"
Answer = tuple[grpc.StatusCode, str, bytes]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Caller:
    """One identity's stubs: every call carries its bearer token."""

    def __init__(self, stack: dict[str, Any], token: str) -> None:
        self.md = (("authorization", f"Bearer {token}"),)
        self.gen = generator_pb2_grpc.GeneratorServiceStub(stack["channels"]["generator"])
        self.rw = reward_pb2_grpc.RewardServiceStub(stack["channels"]["reward"])
        self.ft = finetune_pb2_grpc.FinetuneServiceStub(stack["channels"]["finetune"])
        self.cf = counterfactual_pb2_grpc.CounterfactualServiceStub(
            stack["channels"]["counterfactual"]
        )
        self.token = token
        self.page = stack["page"]

    def __call__(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, metadata=self.md, timeout=120)

    def stream(self, method: Callable[..., Any], request: Any) -> list[Any]:
        return list(method(request, metadata=self.md, timeout=120))

    def fails(self, method: Callable[..., Any], request: Any, *, stream: bool = False) -> Answer:
        """The error answer of a call that must fail: code, message, rich details."""
        with pytest.raises(grpc.RpcError) as err:
            self.stream(method, request) if stream else self(method, request)
        md = dict(err.value.trailing_metadata() or ())
        return err.value.code(), err.value.details() or "", md.get("grpc-status-details-bin", b"")

    def http(self, path: str) -> tuple[int, bytes]:
        req = urllib.request.Request(self.page + path, headers={"Authorization": self.md[0][1]})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def same_answer(foreign: Answer, missing: Answer, foreign_id: str, missing_id: str) -> None:
    """B's answer on A's object is B's answer on a missing one, ids swapped (equal lengths)."""
    assert len(foreign_id) == len(missing_id)
    assert foreign[0] == missing[0], (foreign, missing)
    assert foreign[1] == missing[1].replace(missing_id, foreign_id)
    assert foreign[2] == missing[2].replace(missing_id.encode(), foreign_id.encode())


@pytest.fixture(scope="module")
def stack(  # type: ignore[no-untyped-def]  # the session fixtures are untyped
    tmp_path_factory: pytest.TempPathFactory,
    triton_server,
    store_url,
    registered_models,
    model_repository,
) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("tenants")
    issuer = Issuer()
    auth = issuer.settings(home)
    url = triton_server.grpc_url
    running: dict[str, Any] = {}
    channels: dict[str, grpc.Channel] = {}
    try:
        running["generator"] = start_service("generator", url, store_url, home, **auth)
        running["counterfactual"] = start_service("counterfactual", url, store_url, home, **auth)
        running["finetune"] = start_service(
            "finetune",
            url,
            store_url,
            home,
            workdir=str(home / "work"),
            heartbeat_s="0.5",
            poll_s="0.2",
            heartbeat_timeout_s="60",
            model_repository=str(model_repository),
            torch_threads="1",
            **auth,
        )
        env = {f"CLINISYNTH_{k.upper()}": v for k, v in auth.items()}
        env.update(CLINISYNTH_TRITON_URL=url, CLINISYNTH_STORE_URL=store_url)
        config = load_config("reward", env={**env, "CLINISYNTH_REWARD_HTTP_PORT": "0"}, port=0)
        register = reward_app.create(config)
        running["reward"] = start_server(config, register, serve_metrics=False)
        # a function attribute app.create sets (as the conftest fixture reads it)
        page = register.app.web.url.rsplit("/review", 1)[0]  # type: ignore[attr-defined]
        channels = {n: grpc.insecure_channel(s.address) for n, s in running.items()}
        stack = {"channels": channels, "page": page}
        tokens = {
            "a": issuer.token(*ROLES, sub="alice", clinisynth_tenant="tenant-a"),
            "b": issuer.token(*ROLES, sub="bob", clinisynth_tenant="tenant-b"),
            "admin": issuer.token("admin", sub="root", clinisynth_tenant="ops"),
        }
        yield {name: Caller(stack, token) for name, token in tokens.items()}
    finally:
        for channel in channels.values():
            channel.close()
        for server in running.values():
            server.stop(0)


@pytest.fixture(scope="module")
def made(stack: dict[str, Caller]) -> dict[str, Any]:
    """A's objects (and a few of B's), made once through the services."""
    from clinisynth_lab.phantoms import cells

    a, b = stack["a"], stack["b"]
    images, labels = cells.generate(16, seed=5, size=24)
    for i, (im, label) in enumerate(zip(images, labels, strict=True)):
        key = f"{DATASET}/{CLASSES[int(label)]}/{i:03d}.png"
        a(a.ft.UploadDatasetFile, iter([finetune_pb2.UploadChunk(key=key, data=png(im))]))
    job = a(
        a.ft.CreateJob,
        finetune_pb2.CreateJobRequest(
            kind="diffusion_pretrain",
            dataset=DATASET,
            params={
                "max_steps": "4",
                "checkpoint_every": "2",
                "batch_size": "4",
                "log_every": "2",
                "block_out_channels": "16,32",
                "seed": "3",
            },
            model_name=MODEL,
        ),
    )
    shown = png(images[0])  # A and B both queue and judge this very image
    out: dict[str, Any] = {"job": job.id}
    for who, caller in (("a", a), ("b", b)):
        item = caller(
            caller.rw.EnqueueReview,
            reward_pb2.EnqueueReviewRequest(
                images=[reward_pb2.NamedImage(name="x", image=common_pb2.Image(encoded=shown))],
                condition=LYMPHOCYTE,
            ),
        ).items[0]
        fb = caller(
            caller.rw.SubmitFeedback,
            reward_pb2.SubmitFeedbackRequest(
                feedback=reward_pb2.Feedback(
                    client_request_id="same-request-id",
                    image=common_pb2.Image(encoded=shown),
                    condition=LYMPHOCYTE,
                    plausible=who == "a",
                )
            ),
        )
        out[f"{who}_item"], out[f"{who}_feedback"] = item.id, fb.feedback.id
        out[f"{who}_duplicate"] = fb.duplicate
    out["export"] = a(a.rw.ExportFeedback, reward_pb2.ExportFeedbackRequest(prefix=EXPORT))
    gen = a(
        a.gen.Generate,
        generator_pb2.GenerateRequest(
            model=common_pb2.ModelRef(name="cells-tiny"),
            class_name="lymphocyte",
            steps=2,
            seed=1,
            store_outputs=True,
            output_prefix=OUTPUTS,
        ),
    )
    out["output"] = gen.images[0].image.ref.key
    return out


def _ids(items: Any) -> set[str]:
    return {i.id for i in items}


# ---------------------------------------------------------------------------------------------
def test_data_set(stack: dict[str, Caller], made: dict[str, Any]) -> None:
    a, b, admin = stack["a"], stack["b"], stack["admin"]
    validate = finetune_pb2.ValidateDatasetRequest
    report = a(a.ft.ValidateDataset, validate(prefix=DATASET))
    assert report.images == 16 and not report.problems
    assert admin(admin.ft.ValidateDataset, validate(prefix=DATASET)).images == 16
    # B: reads as a missing data set, word for word
    theirs = b(b.ft.ValidateDataset, validate(prefix=DATASET))
    missing = b(b.ft.ValidateDataset, validate(prefix=NO_DATASET))
    assert theirs.images == 0 and theirs.problems
    assert [p.replace(DATASET, NO_DATASET) for p in theirs.problems] == list(missing.problems)
    files = finetune_pb2.ListDatasetFilesRequest
    assert len(a(a.ft.ListDatasetFiles, files(prefix=DATASET)).files) == 16
    assert len(admin(admin.ft.ListDatasetFiles, files(prefix=DATASET)).files) == 16
    assert not b(b.ft.ListDatasetFiles, files(prefix=DATASET)).files
    assert not b(b.ft.ListDatasetFiles, files(prefix=NO_DATASET)).files
    create = finetune_pb2.CreateJobRequest
    params = {"max_steps": "2"}
    same_answer(
        b.fails(b.ft.CreateJob, create(kind="classifier", dataset=DATASET, params=params)),
        b.fails(b.ft.CreateJob, create(kind="classifier", dataset=NO_DATASET, params=params)),
        DATASET,
        NO_DATASET,
    )
    # A data-set name is taken by its first upload: B cannot add files to A's.
    chunk = finetune_pb2.UploadChunk(key=f"{DATASET}/lymphocyte/999.png", data=b"x")
    code, message, _ = b.fails(b.ft.UploadDatasetFile, iter([chunk]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another tenant" in message
    assert len(a(a.ft.ListDatasetFiles, files(prefix=DATASET)).files) == 16


def test_job(stack: dict[str, Caller], made: dict[str, Any]) -> None:
    a, b, admin = stack["a"], stack["b"], stack["admin"]
    job, nobody = made["job"], new_job_id()
    assert a(a.ft.GetJob, finetune_pb2.GetJobRequest(id=job)).id == job
    assert admin(admin.ft.GetJob, finetune_pb2.GetJobRequest(id=job)).id == job
    for method, request, stream in (
        (b.ft.GetJob, finetune_pb2.GetJobRequest, False),
        (b.ft.CancelJob, finetune_pb2.CancelJobRequest, False),
        (b.ft.WatchJob, finetune_pb2.WatchJobRequest, True),
    ):
        theirs = b.fails(method, request(id=job), stream=stream)
        assert theirs[0] == grpc.StatusCode.NOT_FOUND
        same_answer(theirs, b.fails(method, request(id=nobody), stream=stream), job, nobody)
    listing = finetune_pb2.ListJobsRequest()
    assert job in _ids(a(a.ft.ListJobs, listing).jobs)
    assert job in _ids(admin(admin.ft.ListJobs, listing).jobs)
    assert job not in _ids(b(b.ft.ListJobs, listing).jobs)


def _finished(caller: Caller, job_id: str, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    for _ in caller.stream(caller.ft.WatchJob, finetune_pb2.WatchJobRequest(id=job_id)):
        pass  # the stream ends when the job has ended
    job = caller(caller.ft.GetJob, finetune_pb2.GetJobRequest(id=job_id))
    ended = (
        finetune_pb2.JOB_STATE_SUCCEEDED,
        finetune_pb2.JOB_STATE_FAILED,
        finetune_pb2.JOB_STATE_CANCELLED,
    )
    while job.state not in ended and time.monotonic() < deadline:
        time.sleep(0.2)
        job = caller(caller.ft.GetJob, finetune_pb2.GetJobRequest(id=job_id))
    return job


@pytest.fixture(scope="module")
def promoted(stack: dict[str, Caller], made: dict[str, Any]) -> Any:
    """A's finished job, its checkpoints checked across tenants, then promoted by A."""
    a, b, admin = stack["a"], stack["b"], stack["admin"]
    job, nobody = made["job"], new_job_id()
    state = _finished(a, job)
    assert state.state == finetune_pb2.JOB_STATE_SUCCEEDED, state.failure_reason
    listing = finetune_pb2.ListCheckpointsRequest
    steps = [c.step for c in a(a.ft.ListCheckpoints, listing(job_id=job)).checkpoints]
    assert steps == [2, 4]
    assert [c.step for c in admin(admin.ft.ListCheckpoints, listing(job_id=job)).checkpoints] == [
        2,
        4,
    ]
    theirs = b.fails(b.ft.ListCheckpoints, listing(job_id=job))
    assert theirs[0] == grpc.StatusCode.NOT_FOUND
    same_answer(theirs, b.fails(b.ft.ListCheckpoints, listing(job_id=nobody)), job, nobody)
    promote = finetune_pb2.PromoteCheckpointRequest
    theirs = b.fails(b.ft.PromoteCheckpoint, promote(job_id=job, model_name="cells-tb"))
    missing = b.fails(b.ft.PromoteCheckpoint, promote(job_id=nobody, model_name="cells-tb"))
    assert theirs[0] == grpc.StatusCode.NOT_FOUND
    same_answer(theirs, missing, job, nobody)
    return a(a.ft.PromoteCheckpoint, promote(job_id=job)).model


def test_checkpoints_and_private_model(stack: dict[str, Caller], promoted: Any) -> None:
    a, b, admin = stack["a"], stack["b"], stack["admin"]
    assert promoted.name == MODEL and promoted.labels["tenant"] == "tenant-a"
    ref = common_pb2.ModelRef
    models = common_pb2.ListModelsRequest
    assert MODEL in {m.name for m in a(a.gen.ListModels, models()).models}
    assert MODEL in {m.name for m in admin(admin.gen.ListModels, models()).models}
    listed = {m.name for m in b(b.gen.ListModels, models()).models}
    assert MODEL not in listed and "cells-tiny" in listed  # shared models stay shared
    get = finetune_pb2.GetModelRequest
    assert a(a.ft.GetModel, get(model=ref(name=MODEL))).model.labels["tenant"] == "tenant-a"
    same_answer(
        b.fails(b.ft.GetModel, get(model=ref(name=MODEL))),
        b.fails(b.ft.GetModel, get(model=ref(name=NO_MODEL))),
        MODEL,
        NO_MODEL,
    )

    def generate(name: str) -> generator_pb2.GenerateRequest:
        return generator_pb2.GenerateRequest(
            model=ref(name=name), class_name="lymphocyte", steps=2, seed=2
        )

    assert len(a(a.gen.Generate, generate(MODEL)).images) == 1
    assert len(admin(admin.gen.Generate, generate(MODEL)).images) == 1
    same_answer(
        b.fails(b.gen.Generate, generate(MODEL)),
        b.fails(b.gen.Generate, generate(NO_MODEL)),
        MODEL,
        NO_MODEL,
    )


def test_feedback_record(stack: dict[str, Caller], made: dict[str, Any]) -> None:
    a, b, admin = stack["a"], stack["b"], stack["admin"]
    # the same client request id in two tenants: two records, neither a retry of the other
    assert made["a_feedback"] != made["b_feedback"] and not made["b_duplicate"]
    listing = reward_pb2.ListFeedbackRequest()
    mine = _ids(a(a.rw.ListFeedback, listing).feedback)
    theirs = _ids(b(b.rw.ListFeedback, listing).feedback)
    assert made["a_feedback"] in mine and made["b_feedback"] not in mine
    assert made["b_feedback"] in theirs and made["a_feedback"] not in theirs
    assert {made["a_feedback"], made["b_feedback"]} <= _ids(
        admin(admin.rw.ListFeedback, listing).feedback
    )
    assert b(b.rw.ListFeedback, listing).total == len(theirs)

    def raters(caller: Caller) -> set[str]:
        report = caller(caller.rw.GetAgreement, reward_pb2.GetAgreementRequest())
        return {r.rater_id for r in report.raters}

    assert raters(b) == {"bob"} and raters(a) == {"alice"}  # agreement: one's own judgements
    assert {"alice", "bob"} <= raters(admin)


def test_review_item(stack: dict[str, Caller], made: dict[str, Any]) -> None:
    a, b, admin = stack["a"], stack["b"], stack["admin"]
    item, nobody = made["a_item"], "ri-" + secrets.token_hex(12)
    assert item != made["b_item"]  # one image, one condition: still one item per tenant
    nxt = reward_pb2.NextReviewItemsRequest(condition=LYMPHOCYTE, limit=100)
    assert item in _ids(a(a.rw.NextReviewItems, nxt).items)
    seen = b(b.rw.NextReviewItems, nxt)
    assert item not in _ids(seen.items) and made["b_item"] in _ids(seen.items)
    assert seen.pending == 1  # B's pending count is B's own
    assert {item, made["b_item"]} <= _ids(admin(admin.rw.NextReviewItems, nxt).items)

    def judge(item_id: str) -> reward_pb2.SubmitFeedbackRequest:
        return reward_pb2.SubmitFeedbackRequest(
            feedback=reward_pb2.Feedback(
                client_request_id=f"judge-{item_id}", item_id=item_id, plausible=True
            )
        )

    theirs = b.fails(b.rw.SubmitFeedback, judge(item))
    assert theirs[0] == grpc.StatusCode.INVALID_ARGUMENT  # an unknown item is a bad field
    same_answer(theirs, b.fails(b.rw.SubmitFeedback, judge(nobody)), item, nobody)
    # the review page signed in as B: B's queue, A's image answered as a missing one
    status, body = b.http("/api/next?class_name=lymphocyte&limit=100")
    assert status == 200
    page_ids = {i["id"] for i in json.loads(body)["items"]}
    assert made["b_item"] in page_ids and item not in page_ids
    theirs_page = b.http(f"/api/image/{item}")
    missing_page = b.http(f"/api/image/{nobody}")
    assert theirs_page[0] == missing_page[0] != 200
    assert theirs_page[1] == missing_page[1].replace(nobody.encode(), item.encode())
    assert a.http(f"/api/image/{item}")[0] == 200


def test_export(stack: dict[str, Caller], made: dict[str, Any]) -> None:
    a, b, admin = stack["a"], stack["b"], stack["admin"]
    assert made["export"].judgements == 1  # A's judgement only
    download = reward_pb2.DownloadExportRequest
    for caller in (a, admin):
        paths = {c.path for c in caller.stream(caller.rw.DownloadExport, download(prefix=EXPORT))}
        assert "labels.jsonl" in paths
    same_answer(
        b.fails(b.rw.DownloadExport, download(prefix=EXPORT), stream=True),
        b.fails(b.rw.DownloadExport, download(prefix=NO_EXPORT), stream=True),
        EXPORT,
        NO_EXPORT,
    )
    code, message, _ = b.fails(b.rw.ExportFeedback, reward_pb2.ExportFeedbackRequest(prefix=EXPORT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another tenant" in message
    own = b(b.rw.ExportFeedback, reward_pb2.ExportFeedbackRequest(prefix="exports/tb-export"))
    assert own.judgements == 1  # B's judgement only
    everyone = admin(
        admin.rw.ExportFeedback, reward_pb2.ExportFeedbackRequest(prefix="exports/ops")
    )
    assert everyone.judgements >= 2


def test_stored_output(stack: dict[str, Caller], made: dict[str, Any]) -> None:
    a, b, admin = stack["a"], stack["b"], stack["admin"]
    key = made["output"]
    assert key.startswith(OUTPUTS + "/")
    nobody = key.replace("ta-out", "zz-out")

    def enqueue(ref_key: str) -> reward_pb2.EnqueueReviewRequest:
        image = common_pb2.Image(ref=common_pb2.ArtifactRef(key=ref_key))
        return reward_pb2.EnqueueReviewRequest(
            images=[reward_pb2.NamedImage(name="out", image=image)], condition=LYMPHOCYTE
        )

    assert a(a.rw.EnqueueReview, enqueue(key)).items
    assert admin(admin.rw.EnqueueReview, enqueue(key)).items
    theirs = b.fails(b.rw.EnqueueReview, enqueue(key))
    assert theirs[0] == grpc.StatusCode.INVALID_ARGUMENT
    same_answer(theirs, b.fails(b.rw.EnqueueReview, enqueue(nobody)), key, nobody)
    # a counterfactual of it: B is refused at the input, as for a missing key; A's input is read
    # (what follows depends on which counterfactual models the session registered)
    ref = common_pb2.ArtifactRef

    def edit(ref_key: str) -> counterfactual_pb2.CounterfactualRequest:
        image = common_pb2.Image(ref=ref(key=ref_key))
        return counterfactual_pb2.CounterfactualRequest(image=image, target_class="neutrophil")

    theirs = b.fails(b.cf.CreateCounterfactual, edit(key))
    assert theirs[0] == grpc.StatusCode.INVALID_ARGUMENT and "image.ref.key" in str(theirs[2])
    same_answer(theirs, b.fails(b.cf.CreateCounterfactual, edit(nobody)), key, nobody)
    try:
        a(a.cf.CreateCounterfactual, edit(key))
    except grpc.RpcError as err:
        assert "image.ref.key" not in str(dict(err.trailing_metadata() or ()))
    # and B cannot write its outputs over A's
    request = generator_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name="cells-tiny"),
        class_name="lymphocyte",
        steps=2,
        seed=1,
        store_outputs=True,
        output_prefix=OUTPUTS,
    )
    code, message, _ = b.fails(b.gen.Generate, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another tenant" in message
    assert a(a.rw.EnqueueReview, enqueue(key)).items  # A's output is still A's


def test_store_layout_records_owners(made: dict[str, Any], store_url: str) -> None:
    """The owner is in the objects themselves (what a second replica reads back)."""
    from clinisynth_server.store import open_store
    from clinisynth_server.tenancy import object_owner

    store = open_store(store_url)
    assert object_owner(store, made["output"]) == "tenant-a"
    assert object_owner(store, f"{EXPORT}/export.json") == "tenant-a"
    manifest = json.loads(store.get_bytes(f"{EXPORT}/export.json"))
    assert manifest["tenant"] == "tenant-a"
    item = json.loads(store.get_bytes(f"review/items/{made['a_item']}.json"))
    assert item["tenant"] == "tenant-a"
    record = json.loads(store.get_bytes(f"feedback/records/{made['b_feedback']}.json"))
    assert record["tenant"] == "tenant-b"
    assert pathlib.PurePosixPath(made["output"]).suffix == ".png"
