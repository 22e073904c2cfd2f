"""Store reads by caller-chosen keys stay in the caller's namespaces; no caller-written patient ID
(issue #14 follow-ups), through the running services (real gRPC, real Triton, real store).

Every RPC that takes a store reference (``Image.ref.key``: reward Score / ScoreStream /
SubmitFeedback / EnqueueReview, counterfactual Create / Stream) or a read prefix (ScoreStream
``config.store_prefix``, CounterfactualBatch ``input_prefix``, DownloadExport ``prefix``) is sent
a key into each protected namespace (catalog, feedback records, review items, job records and
checkpoints, the de-identification secret, guidance records, model repositories), each seeded
with a readable image that carries a marker, and every escape form. Each is INVALID_ARGUMENT
naming exactly the field, streams nothing, writes nothing, and returns none of the protected
bytes; an existing and an absent protected key get the same answer (no existence oracle). A
generator output, a data-set file and a reward image reference (``feedback/images/``, which the
reward service hands to callers) still work, and give the same result as the bytes sent inline.

``DicomOptions.patient_id`` accepts only the service's synthetic form (``SYN-`` + 16 hex);
anything else is INVALID_ARGUMENT on ``dicom.patient_id``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import numpy as np
import pydicom
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image, PngImagePlugin

from clinisynth.v1 import (
    common_pb2,
    counterfactual_pb2,
    counterfactual_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)
from tests.grpc.test_counterfactual import (  # noqa: F401 - fixtures
    MODELS,
    QUICK,
    TARGET,
    _healthy,
    cf_server,
)
from tests.grpc.test_upload_namespaces import ESCAPES as UPLOAD_ESCAPES

pytestmark = pytest.mark.stack

MARKER = b"PROTECTED-OBJECT-7f3a"
# A readable image under every namespace a caller must not read (each would decode and score).
PROTECTED_IMAGES = [
    "catalog/planted/000001.png",
    "feedback/records/planted.png",
    "review/items/planted.png",
    "finetune/jobs/ft-planted-000000/job.png",
    "finetune/jobs/ft-planted-000000/checkpoints/000000010/state/trainer.png",
    "finetune/secrets/planted.png",
    "counterfactual/guidance/planted.png",
    "jobs/planted.png",
    "checkpoints/planted/model.png",
    "triton-models/planted/1/model.png",
    "model-repository/planted/1/model.png",
]
SECRET_KEY = "finetune/secrets/deid.txt"
ABSENT = "catalog/absent/000001.png"
ESCAPES = [
    *UPLOAD_ESCAPES,
    "../triton-models/planted/1/model.png",  # the Triton model repository next to the store
    "datasets/../finetune/secrets/deid.txt",
    "datasets/../../store/catalog/planted/000001.png",
    "/finetune/secrets/deid.txt",
    "finetune\\secrets\\deid.txt",
    "datasets/ok\x00.png",
    "datasets//planted.png",
    "feedback/images/",  # the opening itself is not an object
]
PROTECTED_PREFIXES = [
    "catalog/planted",
    "feedback/records/",
    "feedback/images/",  # single images may be named; the namespace is not listed
    "review/items",
    "finetune/jobs/ft-planted-000000/",
    "finetune/secrets/",
    "counterfactual/guidance",
    "jobs/",
    "checkpoints/planted",
    "triton-models/planted",
    "model-repository/",
    "feedback/planted-export/",
    "../triton-models/",
    "datasets/../catalog/",
]


def marked_png(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG carrying MARKER in a text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", MARKER.decode())
    buf = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)).save(
        buf, "PNG", pnginfo=info
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def planted(store) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """What the owners keep where callers must not read: marked images, the secret, an export."""
    data = marked_png(_healthy())
    out = {key: data for key in PROTECTED_IMAGES}
    for key, blob in out.items():
        store.put_bytes(key, blob)
    store.put_if_absent(SECRET_KEY, b"0123456789abcdef" * 4)
    out[SECRET_KEY] = store.get_bytes(SECRET_KEY)
    manifest = {"kind": "clinisynth-feedback-export", "files": ["secret.txt"]}
    store.put_bytes("feedback/planted-export/export.json", json.dumps(manifest).encode())
    store.put_bytes("feedback/planted-export/secret.txt", MARKER)
    # A caller-uploaded manifest in the data-set namespace that lists files outside its prefix.
    sneaky = {"kind": "clinisynth-feedback-export", "files": ["../../finetune/secrets/deid.txt"]}
    store.put_bytes("datasets/sneaky-export/export.json", json.dumps(sneaky).encode())
    return out


@pytest.fixture(scope="module")
def reward_stub(triton_server, store_url, session_dir, reward_model, planted):  # type: ignore[no-untyped-def]
    from tests.conftest import start_service

    running = start_service("reward", triton_server.grpc_url, store_url, session_dir / "reads")
    channel = grpc.insecure_channel(running.address)
    yield reward_pb2_grpc.RewardServiceStub(channel)
    channel.close()
    running.stop(0)


@pytest.fixture(scope="module")
def cf_stub(cf_server, planted):  # type: ignore[no-untyped-def]  # noqa: F811
    channel = grpc.insecure_channel(cf_server.address)
    yield counterfactual_pb2_grpc.CounterfactualServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def gen_stub(generator_server):  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(generator_server.address)
    yield generator_pb2_grpc.GeneratorServiceStub(channel)
    channel.close()


#: Every message a refused stream delivered before its error (must stay empty).
RECEIVED: list[object] = []


def drain(events: Iterable[object]) -> list[object]:
    """Read a response stream, keeping what arrives in RECEIVED even when the stream fails."""
    got = []
    for event in events:
        RECEIVED.append(event)
        got.append(event)
    return got


def ref(key: str) -> common_pb2.Image:
    return common_pb2.Image(ref=common_pb2.ArtifactRef(key=key))


NEUTROPHIL = common_pb2.Condition(class_name="neutrophil")
REWARD = common_pb2.ModelRef(name="cells-reward")


def cf_request(image: common_pb2.Image, **extra: Any) -> counterfactual_pb2.CounterfactualRequest:
    return counterfactual_pb2.CounterfactualRequest(
        image=image,
        target_class=TARGET,
        diffusion_model=common_pb2.ModelRef(name=MODELS["diffusion_model"]),
        robust_classifier=common_pb2.ModelRef(name=MODELS["robust_classifier"]),
        plain_classifier=common_pb2.ModelRef(name=MODELS["plain_classifier"]),
        steps=QUICK["steps"],
        start_depth=QUICK["start_depth"],
        seed=0,
        **extra,
    )


def score_stream(stub, image: common_pb2.Image) -> list[reward_pb2.ScoreStreamEvent]:  # type: ignore[no-untyped-def]
    config = reward_pb2.ScoreStreamConfig(model=REWARD, condition=NEUTROPHIL, resize=True)
    requests = iter(
        [
            reward_pb2.ScoreStreamRequest(config=config),
            reward_pb2.ScoreStreamRequest(image=reward_pb2.NamedImage(name="x", image=image)),
        ]
    )
    return drain(stub.ScoreStream(requests, timeout=120))  # type: ignore[return-value]


# Each RPC that takes an Image: (call with one image, the field its ref key is reported on).
Call = Callable[[Any, common_pb2.Image], object]
REF_RPCS: dict[str, tuple[str, str, Call]] = {
    "Score": (
        "reward",
        "images[0].ref.key",
        lambda s, im: s.Score(
            reward_pb2.ScoreRequest(model=REWARD, condition=NEUTROPHIL, images=[im], resize=True),
            timeout=120,
        ),
    ),
    "ScoreStream": ("reward", "images[0].ref.key", score_stream),
    "SubmitFeedback": (
        "reward",
        "feedback.image.ref.key",
        lambda s, im: s.SubmitFeedback(
            reward_pb2.SubmitFeedbackRequest(
                feedback=reward_pb2.Feedback(
                    client_request_id=f"reads-{abs(hash(im.ref.key))}",
                    rater_id="reads-rater",
                    image=im,
                    condition=NEUTROPHIL,
                    plausible=True,
                )
            ),
            timeout=120,
        ),
    ),
    "EnqueueReview": (
        "reward",
        "images[0].image.ref.key",
        lambda s, im: s.EnqueueReview(
            reward_pb2.EnqueueReviewRequest(
                images=[reward_pb2.NamedImage(name="x", image=im)], condition=NEUTROPHIL
            ),
            timeout=120,
        ),
    ),
    "CreateCounterfactual": (
        "cf",
        "image.ref.key",
        lambda s, im: s.CreateCounterfactual(cf_request(im), timeout=300),
    ),
    "CounterfactualStream": (
        "cf",
        "image.ref.key",
        lambda s, im: drain(s.CounterfactualStream(cf_request(im), timeout=300)),
    ),
}


def refused(call: Callable[[], object], field: str, secrets: list[bytes]) -> str:
    """Assert INVALID_ARGUMENT naming exactly ``field``, revealing none of ``secrets``."""
    RECEIVED.clear()
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(f"{field}:"), err.details()
    status = rpc_status.from_call(err)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [violation.field for violation in bad.field_violations]
    assert fields == [field], fields
    values: list[str | bytes] = [item[1] for item in err.trailing_metadata() or ()]
    trailer = b"".join(v if isinstance(v, bytes) else v.encode() for v in values)
    details: str = err.details() or ""
    for secret in secrets:
        assert secret not in details.encode() and secret not in trailer
    assert RECEIVED == []  # a refused stream delivers nothing
    return details


def snapshot(store) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    """Keys and digests of everything the reward service writes for a judgement or a queue."""
    return {
        info.key: info.sha256
        for prefix in ("feedback/", "review/", "counterfactuals/")
        for info in store.list(prefix)
    }


@pytest.mark.parametrize("rpc", list(REF_RPCS))
def test_refs_into_protected_namespaces_and_escapes_are_refused(  # type: ignore[no-untyped-def]
    rpc, reward_stub, cf_stub, store, planted
):
    service, field, call = REF_RPCS[rpc]
    stub = reward_stub if service == "reward" else cf_stub
    secrets = [MARKER, planted[SECRET_KEY]]
    before = snapshot(store)
    answers = {}
    for key in [*PROTECTED_IMAGES, SECRET_KEY, ABSENT, *ESCAPES]:
        answers[key] = refused(lambda key=key: call(stub, ref(key)), field, secrets)
    assert snapshot(store) == before  # no judgement, queue item or output was written
    # An existing protected object and an absent one get the same answer: nothing was looked up.
    for key in ("catalog/planted/000001.png", ABSENT):
        assert answers[key].replace(key, "<key>") == answers[ABSENT].replace(ABSENT, "<key>")


def test_read_prefixes_stay_out_of_service_namespaces(reward_stub, cf_stub, store, planted):  # type: ignore[no-untyped-def]
    secrets = [MARKER, planted[SECRET_KEY]]
    for prefix in PROTECTED_PREFIXES:
        refused(
            lambda p=prefix: drain(
                reward_stub.DownloadExport(reward_pb2.DownloadExportRequest(prefix=p), timeout=60)
            ),
            "prefix",
            secrets,
        )
        config = reward_pb2.ScoreStreamConfig(model=REWARD, store_prefix=prefix, resize=True)
        refused(
            lambda c=config: drain(
                reward_stub.ScoreStream(iter([reward_pb2.ScoreStreamRequest(config=c)]), timeout=60)
            ),
            "config.store_prefix",
            secrets,
        )
        batch = counterfactual_pb2.CounterfactualBatchRequest(
            input_prefix=prefix, options=cf_request(common_pb2.Image())
        )
        refused(
            lambda b=batch: drain(cf_stub.CounterfactualBatch(b, timeout=60)),
            "input_prefix",
            secrets,
        )
    # A manifest a caller placed in its own namespace cannot list files outside its prefix.
    refused(
        lambda: drain(
            reward_stub.DownloadExport(
                reward_pb2.DownloadExportRequest(prefix="datasets/sneaky-export"), timeout=60
            )
        ),
        "prefix",
        secrets,
    )


def test_legitimate_references_still_work(reward_stub, cf_stub, gen_stub, store):  # type: ignore[no-untyped-def]
    # A generator output, referenced by the key the generator returned.
    gen = gen_stub.Generate(
        generator_pb2.GenerateRequest(
            model=common_pb2.ModelRef(name="cells-tiny"),
            class_name="neutrophil",
            num_images=1,
            seed=3,
            store_outputs=True,
            request_id="reads-gen",
        ),
        timeout=300,
    )
    out_key = gen.images[0].image.ref.key
    assert out_key.startswith("outputs/")
    inline = common_pb2.Image(encoded=store.get_bytes(out_key))

    def score(image: common_pb2.Image) -> float:
        resp = reward_stub.Score(
            reward_pb2.ScoreRequest(
                model=REWARD, condition=NEUTROPHIL, images=[image], resize=True
            ),
            timeout=120,
        )
        return resp.scores[0].p_aligned

    by_ref = score(ref(out_key))
    assert 0.0 <= by_ref <= 1.0
    assert by_ref == pytest.approx(score(inline), abs=1e-6)  # the same object was read
    streamed = [
        e.score.p_aligned for e in score_stream(reward_stub, ref(out_key)) if e.HasField("score")
    ]
    assert streamed == [pytest.approx(by_ref, abs=1e-6)]
    fb = reward_stub.SubmitFeedback(
        reward_pb2.SubmitFeedbackRequest(
            feedback=reward_pb2.Feedback(
                client_request_id="reads-legit-1",
                rater_id="reads-rater",
                image=ref(out_key),
                condition=NEUTROPHIL,
                plausible=True,
            )
        ),
        timeout=120,
    )
    assert fb.feedback.image_ref.key == out_key
    queued = reward_stub.EnqueueReview(
        reward_pb2.EnqueueReviewRequest(
            images=[reward_pb2.NamedImage(name="gen", image=ref(out_key))], condition=NEUTROPHIL
        ),
        timeout=120,
    )
    assert queued.items[0].image_ref.key == out_key

    # The reward service's own image reference (feedback/images/<sha256>) may be named again.
    first = reward_stub.SubmitFeedback(
        reward_pb2.SubmitFeedbackRequest(
            feedback=reward_pb2.Feedback(
                client_request_id="reads-legit-2",
                rater_id="reads-rater",
                image=inline,
                condition=NEUTROPHIL,
                plausible=False,
            )
        ),
        timeout=120,
    )
    image_key = first.feedback.image_ref.key
    assert image_key.startswith("feedback/images/")
    assert score(ref(image_key)) == pytest.approx(by_ref, abs=1e-6)

    # An export written by ExportFeedback still downloads.
    export = reward_stub.ExportFeedback(
        reward_pb2.ExportFeedbackRequest(prefix="exports/reads-test"), timeout=120
    )
    chunks = list(
        reward_stub.DownloadExport(reward_pb2.DownloadExportRequest(prefix=export.prefix))
    )
    assert {c.path for c in chunks if c.last} >= {"labels.jsonl", "export.json"}

    # A data-set file, as a counterfactual input: the same result as the bytes sent inline.
    healthy = marked_png(_healthy(1))
    store.put_bytes("datasets/reads/healthy.png", healthy)
    raw = common_pb2.IMAGE_FORMAT_RAW
    got = cf_stub.CreateCounterfactual(
        cf_request(ref("datasets/reads/healthy.png"), format=raw), timeout=300
    )
    want = cf_stub.CreateCounterfactual(
        cf_request(common_pb2.Image(encoded=healthy), format=raw), timeout=300
    )
    assert got.counterfactual.raw.data == want.counterfactual.raw.data
    events = list(cf_stub.CounterfactualStream(cf_request(ref(out_key), format=raw), timeout=300))
    assert events[-1].HasField("done")


# ---------------------------------------------------------------------------------------------
# DicomOptions.patient_id: only the service's synthetic form
# ---------------------------------------------------------------------------------------------


def generate_dicom(stub, patient_id: str, request_id: str) -> pydicom.Dataset:  # type: ignore[no-untyped-def]
    resp = stub.Generate(
        generator_pb2.GenerateRequest(
            model=common_pb2.ModelRef(name="cells-tiny"),
            class_name="neutrophil",
            num_images=1,
            seed=1,
            format=common_pb2.IMAGE_FORMAT_DICOM,
            dicom=generator_pb2.DicomOptions(patient_id=patient_id),
            request_id=request_id,
        ),
        timeout=300,
    )
    return pydicom.dcmread(io.BytesIO(resp.images[0].image.dicom))


@pytest.mark.parametrize(
    "patient_id",
    [
        "MRN-20260101-77",
        "DOE^JANE",
        "1234567",
        "syn-0123456789abcdef",  # the service's form is uppercase hex
        "SYN-0123456789ABCDE",
        "SYN-0123456789ABCDEF0",
        "SYN-0123456789ABCDEF\\MRN-1",  # a second value smuggled after the separator
        " SYN-0123456789ABCDEF",
    ],
)
def test_a_caller_written_patient_id_is_refused(gen_stub, patient_id):  # type: ignore[no-untyped-def]
    refused(
        lambda: generate_dicom(gen_stub, patient_id, "reads-pid-bad"),
        "dicom.patient_id",
        [patient_id.encode()] if patient_id.startswith("MRN") else [],
    )


def test_synthetic_patient_ids_are_kept_and_marked(gen_stub):  # type: ignore[no-untyped-def]
    from clinisynth_server.imaging.encode import synthetic_patient_id

    derived = generate_dicom(gen_stub, "", "reads-pid-1")
    assert derived.PatientID == synthetic_patient_id("reads-pid-1")
    # The ID of an earlier synthetic image groups a new one under the same synthetic patient.
    again = generate_dicom(gen_stub, derived.PatientID, "reads-pid-2")
    assert again.PatientID == derived.PatientID != synthetic_patient_id("reads-pid-2")
    for ds in (derived, again):
        assert ds.PatientName == "SYNTHETIC^IMAGE"
        assert ds.IssuerOfPatientID == "CLINISYNTH-SYNTHETIC"
        assert ds.ConversionType == "SYN" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
