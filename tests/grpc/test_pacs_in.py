"""PACS in against a real Orthanc (issue #19 items 2-3): inputs named by Study / Series / SOP
Instance UID, fetched by WADO-RS (Orthanc's DICOMweb plugin) or DIMSE C-GET (Orthanc's DICOM
port), de-identified before anything is stored or logged, through the running reward and
counterfactual services (raw gRPC stubs, real Triton, real store).

The input is ``identified_dicom`` (every identifying attribute of PS3.15 Table E.1-1 filled
with a traceable value, fresh instance UIDs) uploaded to Orthanc through its REST API.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pydicom
import pytest
from pacs_peers import OrthancPeer, require_peers

from clinisynth.v1 import (
    common_pb2,
    counterfactual_pb2,
    counterfactual_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)
from tests.grpc.test_counterfactual import MODELS, QUICK, TARGET
from tests.unit.test_deid_profile import identified_dicom

pytestmark = pytest.mark.stack

CLASS = "neutrophil"
MISSING_UID = "1.2.826.0.1.3680043.8.498.1"  # well formed, never uploaded


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    plugin = require_peers()
    peer = OrthancPeer(tmp_path_factory.mktemp("pacs-in") / "orthanc", plugin)
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def servers(
    orthanc: OrthancPeer,
    triton_server: Any,
    store_url: str,
    session_dir: Any,
    model_repository: Any,
    reward_model: Any,
    cf_models: Any,
) -> Iterator[dict[str, Any]]:
    """Reward and counterfactual services with two routes to the same Orthanc."""
    from tests.conftest import start_service

    home = session_dir / "pacs-in"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "clinisynth.toml"
    config.write_text(
        f'[pacs.orthanc]\ndicomweb_url = "{orthanc.dicomweb_url}"\ntimeout_s = 10\n\n'
        f'[pacs.orthanc-dimse]\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        'called_ae = "ORTHANC"\ntimeout_s = 10\n'
    )
    reward = start_service(
        "reward", triton_server.grpc_url, store_url, home / "reward", config_file=str(config)
    )
    cf = start_service(
        "counterfactual",
        triton_server.grpc_url,
        store_url,
        home / "cf",
        model_repository=str(model_repository),
        config_file=str(config),
    )
    yield {"reward": reward, "counterfactual": cf}
    reward.stop(0)
    cf.stop(0)


@pytest.fixture(scope="module")
def services(servers: dict[str, Any]) -> Iterator[tuple[reward_pb2_grpc.RewardServiceStub, Any]]:
    channels = [grpc.insecure_channel(servers[s].address) for s in ("reward", "counterfactual")]
    yield (
        reward_pb2_grpc.RewardServiceStub(channels[0]),
        counterfactual_pb2_grpc.CounterfactualServiceStub(channels[1]),
    )
    for channel in channels:
        channel.close()


def _uploaded(orthanc: OrthancPeer, size: int) -> tuple[bytes, list[str], dict[str, str]]:
    data, secrets = identified_dicom(size=size)
    orthanc.upload(data)
    ds = pydicom.dcmread(io.BytesIO(data))
    uids = {
        "study_uid": str(ds.StudyInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
        "sop_uid": str(ds.SOPInstanceUID),
    }
    return data, secrets + list(uids.values()), uids


@pytest.fixture(scope="module")
def cell(orthanc: OrthancPeer) -> tuple[bytes, list[str], dict[str, str]]:
    """An identified 32² image in Orthanc, for Score."""
    return _uploaded(orthanc, 32)


@pytest.fixture(scope="module")
def blob(orthanc: OrthancPeer) -> tuple[bytes, list[str], dict[str, str]]:
    """An identified 16² image in Orthanc, for the toy counterfactual models."""
    return _uploaded(orthanc, 16)


def _pacs(name: str, **uids: str) -> common_pb2.Image:
    return common_pb2.Image(pacs=common_pb2.PacsRef(pacs=name, **uids))


def _score(image: common_pb2.Image) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        images=[image], condition=common_pb2.Condition(class_name=CLASS), resize=True
    )


def _cf(image: common_pb2.Image, **extra: Any) -> counterfactual_pb2.CounterfactualRequest:
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


def _no_secret(text: str | bytes, secrets: list[str], where: str) -> None:
    blob = text.encode() if isinstance(text, str) else text
    for secret in secrets:
        assert secret.encode() not in blob, (where, secret)


def test_score_by_reference_equals_score_of_the_deidentified_upload(services, cell, caplog):
    reward, _ = services
    data, secrets, uids = cell
    caplog.set_level(logging.DEBUG)
    by_ref = reward.Score(_score(_pacs("orthanc", **uids)), timeout=60)
    by_cget = reward.Score(_score(_pacs("orthanc-dimse", **uids)), timeout=60)
    inline = reward.Score(_score(common_pb2.Image(dicom=data)), timeout=60)
    assert 0.0 <= by_ref.scores[0].p_aligned <= 1.0
    assert by_ref.scores[0].p_aligned == pytest.approx(inline.scores[0].p_aligned, abs=1e-6)
    assert by_cget.scores[0].p_aligned == pytest.approx(inline.scores[0].p_aligned, abs=1e-6)
    stream = [
        reward_pb2.ScoreStreamRequest(
            config=reward_pb2.ScoreStreamConfig(
                condition=common_pb2.Condition(class_name=CLASS), resize=True
            )
        ),
        reward_pb2.ScoreStreamRequest(
            image=reward_pb2.NamedImage(name="from-pacs", image=_pacs("orthanc", **uids))
        ),
    ]
    scored = [e.score for e in reward.ScoreStream(iter(stream), timeout=60) if e.HasField("score")]
    assert [s.name for s in scored] == ["from-pacs"]
    assert scored[0].p_aligned == pytest.approx(inline.scores[0].p_aligned, abs=1e-6)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "fetched from PACS orthanc" in logged and "lineage hmac-sha256:" in logged
    assert "PatientIdentityRemoved=YES" in logged  # what was decoded is the de-identified object
    _no_secret(logged, secrets, "log")
    assert "Secret^" not in logged


def test_counterfactual_by_reference_stores_and_records_no_identifier(
    services, blob, store, caplog
):
    _, cf = services
    _, secrets, uids = blob
    caplog.set_level(logging.DEBUG)
    res = cf.CreateCounterfactual(
        _cf(
            _pacs("orthanc", **uids),
            format=common_pb2.IMAGE_FORMAT_DICOM,
            store_outputs=True,
            request_id="pacs-in-cf",
        ),
        timeout=300,
    )
    extra = dict(res.provenance.extra)
    assert extra["input_source"] == "pacs" and extra["input_pacs"] == "orthanc"
    assert extra["input_lineage"].startswith("hmac-sha256:")
    _no_secret(res.SerializeToString(), secrets, "response")
    prefix = res.counterfactual.ref.key.rsplit("/", 1)[0] + "/"
    stored = {info.key: store.get_bytes(info.key) for info in store.list(prefix)}
    assert len(stored) == 4, sorted(stored)
    for key, data in stored.items():
        _no_secret(data, secrets, key)
    out = pydicom.dcmread(io.BytesIO(stored[res.counterfactual.ref.key]))
    assert out.PatientIdentityRemoved == "YES"
    assert "Secret" not in str(out.PatientName)  # the synthetic-patient module's name
    summary = json.loads(stored[prefix + "result.json"])
    assert summary["provenance"]["extra"]["input_lineage"] == extra["input_lineage"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    _no_secret(logged, secrets, "log")
    assert "PatientIdentityRemoved=YES" in logged  # the log describes the de-identified object

    # The same instance by C-GET: the same pixels in, the same lineage.
    again = cf.CreateCounterfactual(
        _cf(_pacs("orthanc-dimse", **uids), format=common_pb2.IMAGE_FORMAT_RAW), timeout=300
    )
    assert again.provenance.extra["input_pacs"] == "orthanc-dimse"
    assert again.provenance.extra["input_lineage"] == extra["input_lineage"]
    assert again.provenance.extra["input_pixels_sha256"] == extra["input_pixels_sha256"]


def _refused(call: Any, code: grpc.StatusCode, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert field in info.value.details(), info.value.details()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sop_uid": "1.02.3"}, "images[0].pacs.sop_uid"),  # leading zero
        ({"study_uid": "1.2." + "3" * 61}, "images[0].pacs.study_uid"),  # 65 characters
        ({"series_uid": "1.2.x"}, "images[0].pacs.series_uid"),
        ({"sop_uid": ""}, "images[0].pacs.sop_uid"),
        ({"pacs": "nowhere"}, "images[0].pacs.pacs"),
    ],
)
def test_bad_references_are_invalid_argument_naming_the_field(services, cell, change, field):
    reward, _ = services
    ref = {**cell[2], **change}
    name = ref.pop("pacs", "orthanc")
    _refused(
        lambda: reward.Score(_score(_pacs(name, **ref)), timeout=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )


def test_missing_instance_is_not_found_by_either_route(services, cell, blob):
    reward, cf = services
    for name in ("orthanc", "orthanc-dimse"):
        ref = {**cell[2], "sop_uid": MISSING_UID}
        _refused(
            lambda: reward.Score(_score(_pacs(name, **ref)), timeout=60),  # noqa: B023
            grpc.StatusCode.NOT_FOUND,
            "images[0].pacs.sop_uid",
        )
    _refused(
        lambda: cf.CreateCounterfactual(
            _cf(_pacs("orthanc", **{**blob[2], "sop_uid": MISSING_UID})), timeout=60
        ),
        grpc.StatusCode.NOT_FOUND,
        "image.pacs.sop_uid",
    )
    _refused(
        lambda: cf.CreateCounterfactual(_cf(_pacs("nowhere", **blob[2])), timeout=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "image.pacs.pacs",
    )


def test_feedback_and_review_do_not_take_pacs_references(services, cell):
    reward, _ = services
    request = reward_pb2.SubmitFeedbackRequest(
        feedback=reward_pb2.Feedback(
            client_request_id="pacs-in-feedback",
            rater_id="pacs-rater",
            image=_pacs("orthanc", **cell[2]),
            condition=common_pb2.Condition(class_name=CLASS),
            plausible=True,
        )
    )
    _refused(
        lambda: reward.SubmitFeedback(request, timeout=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "feedback.image.pacs: PACS references are accepted by Score",
    )
    enqueue = reward_pb2.EnqueueReviewRequest(
        images=[reward_pb2.NamedImage(name="x", image=_pacs("orthanc", **cell[2]))],
        condition=common_pb2.Condition(class_name=CLASS),
    )
    _refused(
        lambda: reward.EnqueueReview(enqueue, timeout=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "images[0].image.pacs",
    )


def test_fetch_is_bounded_in_size_by_either_route(orthanc, cell):
    from clinisynth_server.errors import InvalidArgument
    from clinisynth_server.pacs.config import parse_destination
    from clinisynth_server.pacs.fetch import PacsRef, c_get, wado_rs

    ref = PacsRef("o", **cell[2])
    routes = [
        (wado_rs, parse_destination("o", {"dicomweb_url": orthanc.dicomweb_url})),
        (c_get, parse_destination("o", {"host": "127.0.0.1", "port": orthanc.dicom_port,
                                        "called_ae": "ORTHANC"})),
    ]  # fmt: skip
    for get, dest in routes:
        assert get(dest, ref, field="x", max_bytes=len(cell[0]) + 1024)  # fits
        with pytest.raises(InvalidArgument, match="over the limit of 1000 bytes"):
            get(dest, ref, field="x", max_bytes=1000)


def test_pacs_stopped_is_unavailable(services, orthanc, cell, blob):
    """Last in the module: Orthanc is stopped, then started again on the same ports."""
    reward, cf = services
    orthanc.stop()
    try:
        for name in ("orthanc", "orthanc-dimse"):
            _refused(
                lambda: reward.Score(_score(_pacs(name, **cell[2])), timeout=60),  # noqa: B023
                grpc.StatusCode.UNAVAILABLE,
                "images[0].pacs",
            )
        _refused(
            lambda: cf.CreateCounterfactual(_cf(_pacs("orthanc-dimse", **blob[2])), timeout=60),
            grpc.StatusCode.UNAVAILABLE,
            "image.pacs",
        )
    finally:
        orthanc.start()
    back = reward.Score(_score(_pacs("orthanc", **cell[2])), timeout=60)
    assert 0.0 <= back.scores[0].p_aligned <= 1.0


def test_sdk_and_cli_take_pacs_references(servers, cell, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """``clinisynth.PacsRef`` / ``pacs://NAME/study/series/sop`` through the SDK and the CLI;
    the item name sent is empty, never a UID."""
    import clinisynth
    from clinisynth.cli import main as cli_main

    _, _, uids = cell
    endpoints = {k: v.address for k, v in servers.items()}
    ref = clinisynth.PacsRef("orthanc", uids["study_uid"], uids["series_uid"], uids["sop_uid"])
    url = f"pacs://orthanc/{uids['study_uid']}/{uids['series_uid']}/{uids['sop_uid']}"
    with clinisynth.Client(endpoints=endpoints, timeout=60) as client:
        by_ref = client.score([ref], class_name=CLASS, resize=True)
        by_url = client.score(url, class_name=CLASS, resize=True)
    assert by_ref[0].p_aligned == pytest.approx(by_url[0].p_aligned, abs=1e-6)
    assert by_ref[0].name == ""  # never the SOP UID
    out = tmp_path / "scores.csv"
    monkeypatch.setenv("CLINISYNTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLINISYNTH_REWARD_ADDRESS", endpoints["reward"])
    argv = ["score", url, "--class", CLASS, "--resize", "--out", str(out), "--quiet"]
    assert cli_main(argv) == 0
    rows = out.read_text().splitlines()
    assert rows[1].startswith(url + ",")
    assert float(rows[1].split(",")[2]) == pytest.approx(by_ref[0].p_aligned, abs=1e-6)
