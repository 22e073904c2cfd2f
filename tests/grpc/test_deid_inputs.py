"""Patient identifiers never reach the store or an export (issue #14 item 5), through the
running reward and counterfactual services (real gRPC, real Triton, real store).

The input is a DICOM image with every identifying attribute of PS3.15 Table E.1-1 that the
profile lists filled with a traceable value (``tests/unit/test_deid_profile.identified_dicom``);
each stored or exported object is read back and checked tag by tag: identifying attributes
absent or emptied, UIDs remapped, private / overlay / curve / unknown tags gone, pixels and the
windowing attributes unchanged, PatientIdentityRemoved = YES, no secret left in the bytes.
"""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pydicom
import pytest

from clinisynth.v1 import (
    common_pb2,
    counterfactual_pb2,
    counterfactual_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)
from tests.grpc.test_counterfactual import MODELS, QUICK, TARGET, cf_server  # noqa: F401
from tests.unit.test_deid_profile import assert_deidentified, identified_dicom

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def reward_stub(triton_server, store_url, session_dir):
    from tests.conftest import start_service

    running = start_service("reward", triton_server.grpc_url, store_url, session_dir / "deid")
    channel = grpc.insecure_channel(running.address)
    yield reward_pb2_grpc.RewardServiceStub(channel)
    channel.close()
    running.stop(0)


def _feedback(image: common_pb2.Image, request_id: str) -> reward_pb2.SubmitFeedbackRequest:
    return reward_pb2.SubmitFeedbackRequest(
        feedback=reward_pb2.Feedback(
            client_request_id=request_id,
            rater_id="deid-rater",
            image=image,
            condition=common_pb2.Condition(class_name="neutrophil"),
            plausible=True,
        )
    )


def test_feedback_review_and_export_hold_no_identifiers(reward_stub, store):
    data, secrets = identified_dicom(size=32)
    got = reward_stub.SubmitFeedback(_feedback(common_pb2.Image(dicom=data), "deid-1"), timeout=60)
    key = got.feedback.image_ref.key
    assert key.endswith(".dcm")
    assert_deidentified(store.get_bytes(key), data, secrets)
    # The same DICOM sent as `encoded` (sniffed) lands on the same de-identified object.
    again = reward_stub.SubmitFeedback(
        _feedback(common_pb2.Image(encoded=data), "deid-2"), timeout=60
    )
    assert again.feedback.image_ref.key == key

    queued = reward_stub.EnqueueReview(
        reward_pb2.EnqueueReviewRequest(
            images=[reward_pb2.NamedImage(name="x", image=common_pb2.Image(dicom=data))],
            condition=common_pb2.Condition(class_name="neutrophil"),
        ),
        timeout=60,
    )
    assert_deidentified(store.get_bytes(queued.items[0].image_ref.key), data, secrets)

    # An object stored before uploads were de-identified, judged by reference: the export
    # copies it out de-identified all the same.
    legacy, legacy_secrets = identified_dicom(size=32)
    store.put_bytes("feedback/images/legacy-identified.dcm", legacy)
    reward_stub.SubmitFeedback(
        _feedback(
            common_pb2.Image(
                ref=common_pb2.ArtifactRef(key="feedback/images/legacy-identified.dcm")
            ),
            "deid-3",
        ),
        timeout=60,
    )
    export = reward_stub.ExportFeedback(
        reward_pb2.ExportFeedbackRequest(prefix="exports/deid-test"), timeout=120
    )
    manifest = json.loads(store.get_bytes(f"{export.prefix}export.json"))
    dicoms = [f for f in manifest["files"] if f.endswith(".dcm")]
    assert len(dicoms) == 2, manifest["files"]
    exported = [store.get_bytes(export.prefix + f) for f in dicoms]
    by_pixels = {pydicom.dcmread(io.BytesIO(d)).PixelData: d for d in exported}
    assert_deidentified(by_pixels[pydicom.dcmread(io.BytesIO(data)).PixelData], data, secrets)
    assert_deidentified(
        by_pixels[pydicom.dcmread(io.BytesIO(legacy)).PixelData], legacy, legacy_secrets
    )
    labels = store.get_bytes(export.labels.key)
    assert all(s.encode() not in labels for s in secrets + legacy_secrets)


def test_burned_in_annotation_is_refused_naming_the_field(reward_stub):
    data, _ = identified_dicom()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.BurnedInAnnotation = "YES"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(grpc.RpcError) as info:
        reward_stub.SubmitFeedback(
            _feedback(common_pb2.Image(dicom=buf.getvalue()), "deid-burned"), timeout=60
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "feedback.image.dicom" in info.value.details()


def test_counterfactual_outputs_hold_no_identifiers(cf_server, store, caplog):  # noqa: F811
    data, secrets = identified_dicom(size=16)
    stub = counterfactual_pb2_grpc.CounterfactualServiceStub(
        grpc.insecure_channel(cf_server.address)
    )
    caplog.set_level("DEBUG")
    request = counterfactual_pb2.CounterfactualRequest(
        image=common_pb2.Image(dicom=data),
        target_class=TARGET,
        diffusion_model=common_pb2.ModelRef(name=MODELS["diffusion_model"]),
        robust_classifier=common_pb2.ModelRef(name=MODELS["robust_classifier"]),
        plain_classifier=common_pb2.ModelRef(name=MODELS["plain_classifier"]),
        steps=QUICK["steps"],
        start_depth=QUICK["start_depth"],
        seed=0,
        format=common_pb2.IMAGE_FORMAT_DICOM,
        store_outputs=True,
        request_id="deid-cf",
    )
    res = stub.CreateCounterfactual(request, timeout=300)
    prefix = res.counterfactual.ref.key.rsplit("/", 1)[0] + "/"
    stored = {info.key: store.get_bytes(info.key) for info in store.list(prefix)}
    assert len(stored) == 4, sorted(stored)
    for key, blob in stored.items():
        for secret in secrets:
            assert secret.encode() not in blob, (key, secret)
    out = pydicom.dcmread(io.BytesIO(stored[res.counterfactual.ref.key]))
    # derived from a patient's pixels: marked de-identified, with none of the input's identity
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    source = pydicom.dcmread(io.BytesIO(data))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert out[keyword].value != source[keyword].value
    # the input was windowed as sent (window 500 / 1001 over values 0..1000 → the ramp)
    summary = json.loads(stored[prefix + "result.json"])
    assert summary["provenance"]["extra"]["kind"] == "counterfactual"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "SECRET" not in logged and "Secret" not in logged
    assert "PatientIdentityRemoved=YES" in logged  # the log line describes the clean object
    np.testing.assert_equal(res.counterfactual.height, 16)
