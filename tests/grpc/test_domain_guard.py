"""The out-of-domain guard both ways (issue #19 item 5), through the running counterfactual and
reward services (raw gRPC stubs, real Triton: the distances come from each model's ``similarity``
component, real store).

- A fundus counterfactual model (a 32 px RGB UNet + two classifiers, untrained: the guard runs
  before any of them) whose folder carries an index of 64 fundus phantoms. CT slices and
  ultrasound frames (``clinisynth_lab.phantoms.ct`` / ``.ultrasound``, sent as RGB PNGs — the
  model takes RGB, and a grey image in three channels is how a screenshot or a viewer export of
  one arrives) are refused; fundus photographs of other patients (phantoms not in the index) are
  edited; ``domain_guard = "warn"`` edits the CT slice and flags it.
- A cytology reward model with an index of 128 cell phantoms: the same, for Score and
  ScoreStream.
- Models without an index (the session's toy counterfactual models and cell reward model) are
  not guarded and say so in every response.

Margins (measured with these seeds and sizes, ``similarity.index`` defaults, threshold 2.0):
held-out fundus photographs score 0.5-1.1, CT slices 4.4-5.1, ultrasound frames 4.0-4.6; held-out
cells 0.5-0.9, CT / ultrasound against the cell index 4.1-4.5 — the assertions hold with a factor
of about two to spare on either side.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status
from PIL import Image

from clinisynth.v1 import (
    common_pb2,
    counterfactual_pb2,
    counterfactual_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

pytestmark = pytest.mark.stack

SIZE = 32
FUNDUS = {
    "diffusion_model": "fundus-guard-denoiser",
    "robust_classifier": "fundus-guard-robust",
    "plain_classifier": "fundus-guard-plain",
}
REWARD = "cells-guard-reward"
REWARD_CLASSES = ["guard-benign", "guard-atypical"]  # its own: never another test's default
THRESHOLD = 2.0


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def fundus_models(session_dir, catalog, store, model_repository, triton_client):  # type: ignore[no-untyped-def]
    """The fundus counterfactual trio; the denoiser's folder has ``similarity/`` built from
    fundus phantoms, which the registry serves as its Triton ``similarity`` component."""
    import torch

    from clinisynth_lab import builders
    from clinisynth_lab.phantoms import fundus
    from clinisynth_lab.toy import write_classifier_folder
    from clinisynth_server import registry
    from clinisynth_server.methods.classifier import Classifier, ClassifierConfig
    from clinisynth_server.similarity.index import INDEX_DIR, build_index, save_component

    root = session_dir / "domain-guard" / "fundus"
    den = builders.build_pixel_unet(
        root / "denoiser",
        size=SIZE,
        channels=3,
        block_out_channels=(8, 16),
        labels={"domain": "fundus-photo"},
    )
    train, _, _ = fundus.generate(64, seed=11, size=SIZE)
    save_component(
        build_index([train.astype(np.float32) / 255.0], meta={"source": "fundus phantoms"}),
        den / INDEX_DIR,
    )
    folders = {}
    for kind in ("robust", "plain"):
        torch.manual_seed(0)
        clf = Classifier(ClassifierConfig(num_classes=2, in_channels=3, backbone_width=8))
        folders[kind] = write_classifier_folder(
            root / kind,
            clf.eval(),
            classes=("healthy", "lesion"),
            size=SIZE,
            channels=3,
            robust=kind == "robust",
            domain="fundus-photo",
        )
    common = {"catalog": catalog, "store": store, "model_repository": model_repository}
    records = {
        "denoiser": registry.register_folder(den, FUNDUS["diffusion_model"], **common),
        "robust": registry.register_folder(
            folders["robust"], FUNDUS["robust_classifier"], triton=triton_client, **common
        ),
        "plain": registry.register_folder(
            folders["plain"], FUNDUS["plain_classifier"], triton=triton_client, **common
        ),
    }
    # the denoiser runs inside the guidance model; only its index needs loading on its own
    triton_client.load_model(records["denoiser"].components["similarity"])
    return records


@pytest.fixture(scope="module")
def reward_guarded(session_dir, catalog, store, model_repository, triton_client):  # type: ignore[no-untyped-def]
    """An (untrained) cell reward model whose folder has an index of cell phantoms."""
    import torch

    from clinisynth_lab.phantoms import cells
    from clinisynth_server import registry
    from clinisynth_server.methods.reward_model import RewardModel, RewardModelConfig
    from clinisynth_server.reward.scoring import write_reward_folder
    from clinisynth_server.similarity.index import INDEX_DIR, build_index, save_component

    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig(num_classes=2, in_channels=1, backbone_width=8))
    folder = write_reward_folder(
        model,
        session_dir / "domain-guard" / "reward",
        classes=REWARD_CLASSES,
        width=SIZE,
        labels={"domain": "cells"},
    )
    train, _ = cells.generate(128, seed=21)
    save_component(build_index([train.astype(np.float32) / 255.0]), folder / INDEX_DIR)
    return registry.register_folder(
        folder,
        REWARD,
        catalog=catalog,
        store=store,
        model_repository=model_repository,
        triton=triton_client,
        max_batch_size=16,
    )


@pytest.fixture(scope="module")
def servers(  # type: ignore[no-untyped-def]
    triton_server, store_url, session_dir, model_repository, fundus_models, reward_guarded
) -> Iterator[dict[str, Any]]:
    from tests.conftest import start_service

    home = session_dir / "domain-guard" / "services"
    reward = start_service("reward", triton_server.grpc_url, store_url, home / "reward")
    cf = start_service(
        "counterfactual",
        triton_server.grpc_url,
        store_url,
        home / "cf",
        model_repository=str(model_repository),
    )
    yield {"reward": reward, "counterfactual": cf}
    reward.stop(0)
    cf.stop(0)


@pytest.fixture(scope="module")
def stubs(servers: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    channels = [grpc.insecure_channel(servers[s].address) for s in ("counterfactual", "reward")]
    yield (
        counterfactual_pb2_grpc.CounterfactualServiceStub(channels[0]),
        reward_pb2_grpc.RewardServiceStub(channels[1]),
    )
    for channel in channels:
        channel.close()


@pytest.fixture(scope="module")
def inputs() -> dict[str, list[bytes]]:
    from clinisynth_lab.phantoms import cells, ct, fundus, ultrasound

    eyes, _, _ = fundus.generate(3, seed=99, size=SIZE)  # other patients than the index's
    slices, frames = ct.generate(2, seed=5, size=SIZE), ultrasound.generate(2, seed=5, size=SIZE)
    held_out, _ = cells.generate(2, seed=77)
    return {
        "fundus": [_png(e) for e in eyes],
        "ct_rgb": [_png(_rgb(s)) for s in slices],
        "us_rgb": [_png(_rgb(f)) for f in frames],
        "ct": [_png(s) for s in slices],
        "us": [_png(f) for f in frames],
        "cells": [_png(c) for c in held_out],
    }


def _cf(png: bytes, models: dict[str, str] = FUNDUS, **extra: Any) -> Any:
    return counterfactual_pb2.CounterfactualRequest(
        image=common_pb2.Image(encoded=png),
        target_class="lesion",
        diffusion_model=common_pb2.ModelRef(name=models["diffusion_model"]),
        robust_classifier=common_pb2.ModelRef(name=models["robust_classifier"]),
        plain_classifier=common_pb2.ModelRef(name=models["plain_classifier"]),
        steps=4,
        start_depth=0.3,
        seed=0,
        **extra,
    )


def _score(pngs: list[bytes], model: str = REWARD, **extra: Any) -> Any:
    return reward_pb2.ScoreRequest(
        model=common_pb2.ModelRef(name=model),
        images=[common_pb2.Image(encoded=p) for p in pngs],
        condition=common_pb2.Condition(class_name=REWARD_CLASSES[0]),
        resize=True,
        **extra,
    )


def _refused(call: Any) -> tuple[grpc.RpcError, dict[str, str], str]:
    """The error, its ErrorInfo metadata and reason; a FAILED_PRECONDITION also carries a
    PreconditionFailure naming the field, whose description is the message."""
    from google.rpc import error_details_pb2

    with pytest.raises(grpc.RpcError) as info:
        call()
    status = rpc_status.from_call(info.value)
    assert status is not None, info.value.details()
    found: dict[str, Any] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.PreconditionFailure):
            if detail.Is(kind.DESCRIPTOR):
                found[kind.__name__] = kind()
                detail.Unpack(found[kind.__name__])
    error = found["ErrorInfo"]
    if info.value.code() == grpc.StatusCode.FAILED_PRECONDITION:
        (violation,) = found["PreconditionFailure"].violations
        assert (violation.type, violation.subject) == (error.reason, error.metadata["field"])
        assert violation.description == info.value.details()
    return info.value, dict(error.metadata), error.reason


def _is_refusal(err: grpc.RpcError, meta: dict[str, str], reason: str, field: str) -> float:
    """Checks an out-of-domain refusal naming ``field``; its domain score."""
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert reason == "OUT_OF_DOMAIN_INPUT"
    assert err.details().startswith(f"{field}: out of domain")
    assert "domain score" in err.details() and f"threshold {THRESHOLD:.3f}" in err.details()
    assert meta["field"] == field and float(meta["threshold"]) == THRESHOLD
    score = float(meta["domain_score"])
    assert f"domain score {score:.3f}" in err.details()
    assert score > 2 * THRESHOLD  # a CT slice or an ultrasound frame is nowhere near a fundus
    return score


# --- counterfactual --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ct_rgb", "us_rgb"])
def test_ct_and_ultrasound_are_refused_by_the_fundus_counterfactual(stubs, inputs, kind):
    cf, _ = stubs
    for png in inputs[kind]:
        err, meta, reason = _refused(lambda: cf.CreateCounterfactual(_cf(png), timeout=120))  # noqa: B023
        _is_refusal(err, meta, reason, "image")
        assert meta["model"].startswith(FUNDUS["diffusion_model"] + "@")


def test_fundus_photographs_not_in_the_index_are_accepted(stubs, inputs):
    cf, _ = stubs
    for png in inputs["fundus"]:
        res = cf.CreateCounterfactual(_cf(png), timeout=300)
        assert res.domain.decision == "in domain" and res.domain.policy == "refuse"
        assert res.domain.HasField("score") and 0.0 <= res.domain.score < THRESHOLD / 1.5
        assert res.domain.threshold == THRESHOLD and len(res.domain.index_digest) == 64
        extra = dict(res.provenance.extra)
        assert extra["domain_guard"] == "in domain"
        assert float(extra["domain_score"]) == pytest.approx(res.domain.score, abs=1e-5)


def test_warn_edits_an_out_of_domain_input_and_flags_it(stubs, inputs):
    cf, _ = stubs
    res = cf.CreateCounterfactual(_cf(inputs["ct_rgb"][0], domain_guard="warn"), timeout=300)
    assert res.domain.decision == "out of domain" and res.domain.policy == "warn"
    assert res.domain.score > 2 * THRESHOLD
    assert res.counterfactual.encoded  # the edit ran
    assert dict(res.provenance.extra)["domain_guard"] == "out of domain"


def test_the_stream_refuses_before_any_event(stubs, inputs):
    cf, _ = stubs
    err, meta, reason = _refused(
        lambda: list(cf.CounterfactualStream(_cf(inputs["us_rgb"][0]), timeout=120))
    )
    _is_refusal(err, meta, reason, "image")


def test_a_batch_skips_out_of_domain_images_and_reports_why(stubs, inputs, store):
    cf, _ = stubs
    store.put_bytes("domain-guard/in/eye.png", inputs["fundus"][1])
    store.put_bytes("domain-guard/in/slice.png", inputs["ct_rgb"][1])
    request = counterfactual_pb2.CounterfactualBatchRequest(
        input_prefix="domain-guard/in/",
        output_prefix="domain-guard/out/",
        options=_cf(b""),
    )
    events = list(cf.CounterfactualBatch(request, timeout=300))
    items = {e.item.input_key: e.item for e in events if e.WhichOneof("event") == "item"}
    assert items["domain-guard/in/eye.png"].error == ""
    assert items["domain-guard/in/eye.png"].result.key
    refused = items["domain-guard/in/slice.png"]
    assert refused.error.startswith("domain-guard/in/slice.png: out of domain")
    assert not refused.result.key
    assert (events[-1].done.images, events[-1].done.failed) == (1, 1)  # edited, skipped


def test_a_model_without_an_index_is_not_guarded_and_says_so(stubs, cf_models, inputs):
    from tests.grpc.test_counterfactual import MODELS

    cf, _ = stubs
    blob = np.full((16, 16), 40, np.uint8)
    res = cf.CreateCounterfactual(_cf(_png(blob), MODELS), timeout=300)
    assert res.domain.decision == "no index" and not res.domain.HasField("score")
    assert dict(res.provenance.extra)["domain_guard"] == "no index"


def test_an_unknown_policy_is_invalid_argument(stubs, inputs):
    cf, reward = stubs
    for call, field in (
        (
            lambda: cf.CreateCounterfactual(_cf(inputs["fundus"][0], domain_guard="x")),
            "domain_guard",
        ),
        (lambda: reward.Score(_score(inputs["cells"], domain_guard="x")), "domain_guard"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field)


# --- reward ----------------------------------------------------------------------------------


def test_score_refuses_ct_and_ultrasound_and_names_the_image(stubs, inputs):
    _, reward = stubs
    for kind in ("ct", "us"):
        batch = [inputs["cells"][0], inputs[kind][0]]
        err, meta, reason = _refused(lambda: reward.Score(_score(batch), timeout=60))  # noqa: B023
        _is_refusal(err, meta, reason, "images[1]")


def test_score_accepts_cells_not_in_the_index(stubs, inputs):
    _, reward = stubs
    res = reward.Score(_score(inputs["cells"]), timeout=60)
    assert [s.domain.decision for s in res.scores] == ["in domain"] * 2
    assert all(0.0 <= s.domain.score < THRESHOLD / 1.5 for s in res.scores)


def test_score_warn_scores_everything_and_flags_what_is_foreign(stubs, inputs):
    _, reward = stubs
    batch = [inputs["cells"][0], inputs["ct"][0], inputs["us"][1]]
    res = reward.Score(_score(batch, domain_guard="warn"), timeout=60)
    assert [s.domain.decision for s in res.scores] == [
        "in domain",
        "out of domain",
        "out of domain",
    ]
    assert all(0.0 < s.p_aligned < 1.0 for s in res.scores)
    assert res.scores[0].domain.score < THRESHOLD < 2 * THRESHOLD < res.scores[1].domain.score


def test_score_stream_guards_each_image(stubs, inputs):
    _, reward = stubs

    def stream(policy: str) -> Iterator[reward_pb2.ScoreStreamRequest]:
        yield reward_pb2.ScoreStreamRequest(
            config=reward_pb2.ScoreStreamConfig(
                model=common_pb2.ModelRef(name=REWARD),
                condition=common_pb2.Condition(class_name=REWARD_CLASSES[0]),
                resize=True,
                domain_guard=policy,
            )
        )
        for name, png in (("cell", inputs["cells"][1]), ("ct", inputs["ct"][1])):
            yield reward_pb2.ScoreStreamRequest(
                image=reward_pb2.NamedImage(name=name, image=common_pb2.Image(encoded=png))
            )

    events = list(reward.ScoreStream(stream("warn"), timeout=60))
    scored = {e.score.name: e.score.domain.decision for e in events if e.HasField("score")}
    assert scored == {"cell": "in domain", "ct": "out of domain"}
    err, meta, reason = _refused(lambda: list(reward.ScoreStream(stream(""), timeout=60)))
    _is_refusal(err, meta, reason, "images[1]")


def test_a_reward_model_without_an_index_says_so(stubs, reward_model, inputs):
    _, reward = stubs
    _, record = reward_model
    res = reward.Score(
        reward_pb2.ScoreRequest(
            model=common_pb2.ModelRef(name=record.name),
            images=[common_pb2.Image(encoded=inputs["ct"][0])],
            condition=common_pb2.Condition(class_name="neutrophil"),
            resize=True,
        ),
        timeout=60,
    )
    assert res.scores[0].domain.decision == "no index"  # scored, never silently unguarded


# --- SDK and CLI -----------------------------------------------------------------------------


def test_sdk_and_cli_carry_the_policy_and_the_verdict(servers, inputs, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import clinisynth
    from clinisynth.cli import main as cli_main

    endpoints = {k: v.address for k, v in servers.items()}
    batch = [inputs["cells"][0], inputs["us"][0]]
    with clinisynth.Client(endpoints=endpoints, timeout=120) as client:
        warned = client.score(
            batch, model=REWARD, class_name=REWARD_CLASSES[0], resize=True, domain_guard="warn"
        )
        assert [s.domain for s in warned] == ["in domain", "out of domain"]
        assert warned[1].domain_score is not None and warned[1].domain_threshold == THRESHOLD
        assert warned[1].domain_score > 2 * THRESHOLD
        with pytest.raises(clinisynth.FailedPreconditionError) as refused:
            client.score(batch, model=REWARD, class_name=REWARD_CLASSES[0], resize=True)
        assert refused.value.reason == "OUT_OF_DOMAIN_INPUT"
        assert refused.value.metadata["field"] == "images[1]"
        with pytest.raises(ValueError, match="domain_guard"):
            client.score(batch, model=REWARD, class_name=REWARD_CLASSES[0], domain_guard="x")
        edited = client.counterfactual(
            inputs["ct_rgb"][0],
            target="lesion",
            steps=4,
            start_depth=0.3,
            seed=0,
            domain_guard="warn",
            **FUNDUS,
        )
        assert edited.domain == "out of domain" and edited.domain_score > 2 * THRESHOLD
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "cell.png").write_bytes(inputs["cells"][1])
    (folder / "frame.png").write_bytes(inputs["us"][1])
    monkeypatch.setenv("CLINISYNTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLINISYNTH_REWARD_ADDRESS", endpoints["reward"])
    out = tmp_path / "scores.csv"
    argv = ["score", str(folder), "--model", REWARD, "--class", REWARD_CLASSES[0], "--resize"]
    assert cli_main([*argv, "--domain-guard", "warn", "--out", str(out), "--quiet"]) == 0
    rows = {r.split(",")[0]: r.split(",") for r in out.read_text().splitlines()[1:]}
    assert rows["cell.png"][4] == "in domain" and rows["frame.png"][4] == "out of domain"
    assert float(rows["frame.png"][5]) > 2 * THRESHOLD
    assert cli_main([*argv, "--out", str(out), "--quiet"]) != 0  # refused by default
