"""Counterfactual service through the real stack: SDK → gRPC → service → Triton (toy models).

The toy problem (``counterfactual.toy``): 16² grayscale images, class ``lesion`` = a bright blob.
A tiny unconditional denoiser and a plain + a PGD-robust classifier are trained in the fixture
(seconds), registered in the catalog, served by the session's Triton.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import clinisynth

pytestmark = pytest.mark.stack

TARGET = "lesion"
# Published knobs except λ_c: the toy chain is short (60 steps, 30 guided), so it needs a
# stronger push than the paper's 100 steps at 256 px (measured: 0.7 flips the robust classifier).
STRONG = {"steps": 60, "start_depth": 0.5, "lambda_c": 0.7}
QUICK = {"steps": 20, "start_depth": 0.5}


# cf_models (the toy denoiser + classifiers, registered and loaded) is session-scoped in
# tests/conftest.py: this module, de-identification, fuzzing and read namespaces share it.


@pytest.fixture(scope="module")
def cf_server(triton_server, store_url, session_dir, model_repository, cf_models):
    from tests.conftest import start_service

    running = start_service(
        "counterfactual",
        triton_server.grpc_url,
        store_url,
        session_dir,
        model_repository=str(model_repository),
    )
    yield running
    running.stop(0)


@pytest.fixture()
def client(cf_server):
    with clinisynth.Client(endpoints={"counterfactual": cf_server.address}, timeout=300) as c:
        yield c


def _healthy(index: int = 0) -> np.ndarray:
    from clinisynth_lab.toy import blob_images

    images, labels = blob_images(16, 16, seed=99)
    return images[labels == 0][index]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


MODELS = {
    "diffusion_model": "blob-denoiser",
    "robust_classifier": "blob-robust",
    "plain_classifier": "blob-plain",
}


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------


def test_guidance_raises_robust_probability_with_bounded_distance(client):
    image = _healthy()
    guided = client.counterfactual(image, target=TARGET, seed=0, format="raw", **MODELS, **STRONG)
    free = client.counterfactual(
        image, target=TARGET, seed=0, format="raw", **MODELS, **{**STRONG, "lambda_c": 0.0}
    )
    assert guided.p_target_before < 0.1  # a healthy image
    assert guided.p_target_after > guided.p_target_before + 0.25, guided.summary()
    assert guided.p_target_after > free.p_target_after + 0.25
    assert free.p_target_after < 0.1  # without guidance the chain just reconstructs
    assert guided.distance < 0.3 and free.distance < 0.1  # RMS per pixel, [0, 1] units
    assert float(guided.difference.mean()) > 0  # a lesion is bright: the edit adds light
    # signed difference = counterfactual − input, as raw float32
    assert guided.difference.dtype == np.float32 and guided.difference.shape == (16, 16)
    np.testing.assert_allclose(guided.to_numpy() - guided.difference, image, atol=1e-5)
    # trajectory: one point per guided step from both classifiers, ending near the result
    assert [p.step for p in guided.trajectory] == list(range(1, 31))
    assert all(0 <= p.p_robust <= 1 and 0 <= p.p_plain <= 1 for p in guided.trajectory)
    assert all(0 <= p.gradient_angle_deg <= 180 for p in guided.trajectory)
    assert guided.trajectory[-1].p_robust == pytest.approx(guided.p_target_after, abs=0.05)
    assert guided.p_target_after_plain > 0.5  # the plain classifier flips as well
    overlay = Image.open(io.BytesIO(guided.overlay_png))
    assert overlay.mode == "RGB" and overlay.size == (16, 16)


def test_provenance_names_models_versions_seed_and_knobs(client, cf_models):
    res = client.counterfactual(_png(_healthy(1)), target=TARGET, seed=5, **MODELS, **QUICK)
    prov = res.provenance
    assert prov["model"] == {"name": "blob-denoiser", "version": str(cf_models["denoiser"].version)}
    assert prov["model_digest"] == cf_models["denoiser"].digest
    assert int(prov["seed"]) == 5 and prov["class_name"] == TARGET
    extra = prov["extra"]
    assert extra["robust_classifier"] == cf_models["robust"].ref
    assert extra["plain_classifier"] == cf_models["plain"].ref
    assert extra["guidance_model"] == cf_models["guidance"]
    assert (extra["start_depth"], extra["steps"], extra["reverse_steps"]) == ("0.5", "20", "10")
    assert (extra["lambda_c"], extra["cone_angle_deg"]) == ("0.1", "30.0")  # defaults
    assert (extra["distance"], extra["lambda_d"], extra["mode"]) == ("l2", "0.5", "cone")
    png = Image.open(io.BytesIO(res.data))
    embedded = json.loads(png.info["clinisynth:provenance"])
    assert embedded["extra"]["robust_classifier"] == cf_models["robust"].ref


@pytest.mark.parametrize(("mode", "distance"), [("cone", "l2"), ("plain_only", "l1")])
def test_service_equals_the_algorithm_run_in_process(
    client, cf_models, model_repository, mode, distance
):
    """Same models, steps and seed in-process: the cone projection and update in the service
    are exactly methods.counterfactual's."""
    from clinisynth_server.methods import counterfactual as cf
    from clinisynth_server.triton.backends.cf_guidance import Backend

    image = _healthy(2)
    res = client.counterfactual(
        image,
        target=TARGET,
        seed=3,
        format="raw",
        mode=mode,
        distance=distance,
        lambda_c=0.3,
        **MODELS,
        **QUICK,
    )
    backend = Backend(model_repository / cf_models["guidance"] / "1" / "weights", {})
    guide = cf.make_guide_fn(
        backend.eps_fn, backend.robust, backend.plain, distance_kind=distance, mode=mode
    )
    from diffusers import DDPMScheduler

    ab = DDPMScheduler.from_config(cf_models["denoiser"].scheduler).alphas_cumprod
    lambda_d = 0.5 if distance == "l2" else 0.15
    config = cf.CounterfactualConfig(
        steps=20, depth=0.5, lambda_c=0.3, mode=mode, distance=distance, lambda_d=lambda_d
    )
    ref = cf.run_counterfactual(
        guide,
        torch.from_numpy(image)[None, None] * 2 - 1,
        torch.tensor([1]),
        ab,
        config=config,
        seeds=[3],
    )
    expected = ((ref.image[0, 0] + 1) / 2).numpy()
    np.testing.assert_allclose(res.to_numpy(), expected, atol=2e-3)
    np.testing.assert_allclose(
        [p.p_robust for p in res.trajectory], ref.prob_robust[:, 0].numpy(), atol=2e-3
    )


# ---------------------------------------------------------------------------------------------
# streaming and cancellation
# ---------------------------------------------------------------------------------------------


def _guidance_count(triton_client, name: str) -> int:
    return sum(s.inference_count for s in triton_client.statistics(name))


def _in_flight(cf_server) -> float:
    value = cf_server.metrics.registry.get_sample_value(
        "clinisynth_grpc_in_flight_requests",
        {"service": "counterfactual", "method": "CounterfactualStream"},
    )
    return value or 0.0


def test_stream_sends_points_as_it_goes_and_cancel_stops_triton_calls(
    client, cf_server, cf_models, triton_client
):
    import time

    name = cf_models["guidance"]
    points = []
    res = client.counterfactual(
        _healthy(), target=TARGET, seed=1, on_step=points.append, **MODELS, **QUICK
    )
    assert [p.step for p in points] == list(range(1, 11))
    assert [p.p_robust for p in points] == [p.p_robust for p in res.trajectory]

    before = _guidance_count(triton_client, name)
    stream = client.counterfactual_stream(
        _healthy(), target=TARGET, seed=2, steps=1000, start_depth=0.5, **MODELS
    )  # 500 guided steps
    seen = 0
    for event in stream:
        seen += event.WhichOneof("event") == "point"
        if seen == 3:
            break
    stream.close()  # cancels the call
    deadline = time.monotonic() + 60
    while _in_flight(cf_server) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll: the handler ends once its worker has stopped
    assert _in_flight(cf_server) == 0
    stopped_at = _guidance_count(triton_client, name) - before
    assert 3 <= stopped_at < 20  # far from the 500 steps the request asked for
    assert _guidance_count(triton_client, name) - before == stopped_at  # and no more since


# ---------------------------------------------------------------------------------------------
# inputs: DICOM, resize, bad input
# ---------------------------------------------------------------------------------------------


def _dicom(pixels: np.ndarray | None, *, name: str = "Doe^Jane") -> bytes:
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = name, "MRN-0042", "OT"
    if pixels is not None:
        stored = np.round(pixels * 1000).astype(np.uint16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.WindowCenter, ds.WindowWidth = 500, 1001
        ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_input_is_windowed_and_never_logged(client, caplog):
    caplog.set_level(logging.DEBUG)
    image = _healthy(3)
    res = client.counterfactual(
        _dicom(image), target=TARGET, seed=0, format="raw", **MODELS, **QUICK
    )
    # window 500/1001 over values ×1000 maps back to the image (within quantisation)
    np.testing.assert_allclose(res.input_array(), image, atol=2e-3)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Doe" not in logged and "MRN-0042" not in logged
    assert "DICOM(" in logged  # described by safe_log_repr
    dicom = client.counterfactual(
        _dicom(image), target=TARGET, seed=0, format="dicom", **MODELS, **QUICK
    )
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom.data))
    assert "Doe" not in str(ds.PatientName) and ds.PatientID != "MRN-0042"
    assert "DERIVED" in list(ds.ImageType)


def test_resize_only_when_asked(client):
    big = np.kron(_healthy(), np.ones((2, 2), np.float32))  # 32x32
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.counterfactual(big, target=TARGET, **MODELS, **QUICK)
    assert "image" in info.value.fields
    res = client.counterfactual(big, target=TARGET, resize=True, seed=0, **MODELS, **QUICK)
    assert res.to_numpy().shape == (16, 16)
    assert res.provenance["extra"]["resized"] == "true"


def _nan_image() -> np.ndarray:
    arr = _healthy().copy()
    arr[3, 4] = np.nan
    return arr


@pytest.mark.parametrize(
    ("image", "knobs", "field"),
    [
        (None, {"target": "tumour"}, "target_class"),
        (np.ones((16, 16, 3), np.float32) * 0.5, {}, "image"),  # RGB into a grayscale model
        (np.ones((24, 24), np.float32) * 0.5, {}, "image"),  # a size the model cannot take
        ("nodicompixels", {}, "image.dicom"),
        ("nan", {}, "image.raw"),
        (None, {"start_depth": 1.5}, "start_depth"),
        (None, {"cone_angle_deg": 95.0}, "cone_angle_deg"),
        (None, {"lambda_c": -1.0}, "lambda_c"),
        (None, {"lambda_d": float("nan")}, "lambda_d"),
        (None, {"steps": 5000}, "steps"),
        (None, {"diffusion_model": "nope"}, "diffusion_model.name"),
        (None, {"robust_classifier": "blob-plain"}, "robust_classifier.name"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(client, image, knobs, field):
    if image is None:
        image = _healthy()
    elif isinstance(image, str) and image == "nodicompixels":
        image = _dicom(None)
    elif isinstance(image, str):
        image = _nan_image()
    args = {**MODELS, "target": TARGET, **QUICK, **knobs}
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.counterfactual(image, **args)
    assert field in info.value.fields, info.value


def test_several_bad_fields_reported_at_once(client):
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.counterfactual(
            _healthy(), target="tumour", lambda_c=-1, cone_angle_deg=0.0, **MODELS
        )
    assert {"target_class", "lambda_c", "cone_angle_deg"} <= set(info.value.fields)


# ---------------------------------------------------------------------------------------------
# models, batch, SDK, CLI, metrics
# ---------------------------------------------------------------------------------------------


def test_models_default_to_the_denoisers_domain(client, cf_models):
    res = client.counterfactual(
        _healthy(), target=TARGET, seed=0, diffusion_model="blob-denoiser", **QUICK
    )
    assert res.provenance["extra"]["robust_classifier"] == cf_models["robust"].ref
    assert res.provenance["extra"]["plain_classifier"] == cf_models["plain"].ref
    listed = {m.name: m for m in client.counterfactual_models()}
    assert listed["blob-robust"].kind == "classifier" and listed["blob-robust"].classes == [
        "healthy",
        "lesion",
    ]
    assert listed["blob-denoiser"].kind == "unconditional"
    assert all(m.kind in ("unconditional", "classifier") for m in listed.values())


def test_batch_over_a_store_prefix(client, store):
    from clinisynth_lab.toy import blob_images

    images, labels = blob_images(16, 16, seed=7)
    healthy = images[labels == 0][:3]
    for i, arr in enumerate(healthy):
        store.put_bytes(f"cf-batch/in/img{i}.png", _png(arr))
    store.put_bytes("cf-batch/in/colour.png", _png(np.stack([healthy[0]] * 3, axis=2)))
    items = []
    result = client.counterfactual_batch(
        "cf-batch/in/",
        target=TARGET,
        output_prefix="cf-batch/out/",
        seed=0,
        on_item=items.append,
        **MODELS,
        **STRONG,
    )
    assert (result.images, result.failed) == (3, 1)
    errors = {i.input_key: i.error for i in items if i.error}
    assert (
        list(errors) == ["cf-batch/in/colour.png"] and "channel" in errors["cf-batch/in/colour.png"]
    )
    good = [i for i in items if not i.error]
    assert result.flip_rate == pytest.approx(sum(i.p_target_after > 0.5 for i in good) / 3)
    assert result.flip_rate > 0  # the strong knobs flip the robust classifier on most images
    assert result.mean_distance == pytest.approx(np.mean([i.distance for i in good]), rel=1e-5)
    assert all(i.p_target_after > i.p_target_before for i in good)
    keys = {info.key for info in store.list("cf-batch/out/")}
    for i in range(3):
        for what in ("counterfactual.png", "difference.npy", "overlay.png", "result.json"):
            assert f"cf-batch/out/img{i}.{what}" in keys
    summary = json.loads(store.get_bytes("cf-batch/out/summary.json"))
    assert summary["images"] == 3 and summary["flip_rate"] == pytest.approx(result.flip_rate)
    assert result.summary["key"] == "cf-batch/out/summary.json"


def test_result_saves_image_difference_and_figure(client, tmp_path):
    res = client.counterfactual(_healthy(), target=TARGET, seed=0, **MODELS, **QUICK)
    paths = res.save(tmp_path, stem="eye")
    assert sorted(p.name for p in paths.values()) == [
        "eye.counterfactual.png",
        "eye.diff.png",
        "eye.json",
        "eye.side_by_side.png",
    ]
    fig = Image.open(paths["side_by_side"])
    assert fig.width > 3 * fig.height // 2
    assert res.save_difference(tmp_path / "raw.npy").suffix == ".npy"
    np.testing.assert_array_equal(np.load(tmp_path / "raw.npy"), res.difference)
    data = json.loads(paths["json"].read_text())
    assert data["p_target_before"]["robust"] == pytest.approx(res.p_target_before)


def test_async_client(cf_server):
    async def run() -> tuple[object, object]:
        async with clinisynth.AsyncClient(
            endpoints={"counterfactual": cf_server.address}, timeout=300
        ) as c:
            points: list = []
            streamed = await c.counterfactual(
                _healthy(), target=TARGET, seed=4, on_step=points.append, **MODELS, **QUICK
            )
            unary = await c.counterfactual(_healthy(), target=TARGET, seed=4, **MODELS, **QUICK)
            return streamed, unary, points

    streamed, unary, points = asyncio.run(run())
    assert len(points) == 10
    np.testing.assert_array_equal(streamed.to_numpy(), unary.to_numpy())  # deterministic/seed


def test_cli_writes_four_files_per_input(cf_server, tmp_path, monkeypatch):
    from clinisynth.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(_png(_healthy(0)))
    (inputs / "b.png").write_bytes(_png(np.kron(_healthy(1), np.ones((2, 2)))))  # 32x32
    monkeypatch.setenv("CLINISYNTH_COUNTERFACTUAL_ADDRESS", cf_server.address)
    out = tmp_path / "out"
    code = main(
        [
            "counterfactual",
            str(inputs),
            "--target",
            TARGET,
            "--out",
            str(out),
            "--resize",
            "--steps",
            "20",
            "--seed",
            "1",
            "--quiet",
            "--diffusion-model",
            "blob-denoiser",
            "--robust-classifier",
            "blob-robust",
            "--plain-classifier",
            "blob-plain",
        ]
    )
    assert code == 0
    for stem in ("a", "b"):
        for suffix in (".counterfactual.png", ".diff.png", ".side_by_side.png", ".json"):
            assert (out / f"{stem}{suffix}").is_file()
        data = json.loads((out / f"{stem}.json").read_text())
        assert {"p_target_before", "p_target_after", "distance", "provenance"} <= set(data)
    assert (
        main(
            [
                "counterfactual",
                str(inputs / "a.png"),
                "--target",
                "nope",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )


def test_metrics_count_flips_and_distances(cf_server, client):
    reg = cf_server.metrics.registry

    def value(name: str, labels: dict | None = None) -> float:
        return reg.get_sample_value(name, labels or {}) or 0.0

    flips = value("clinisynth_counterfactual_flips_total", {"target": TARGET})
    runs = value("clinisynth_counterfactual_duration_seconds_count")
    res = client.counterfactual(_healthy(), target=TARGET, seed=0, lambda_c=0.7, **MODELS, **QUICK)
    assert value("clinisynth_counterfactual_duration_seconds_count") == runs + 1
    assert value("clinisynth_counterfactual_distance_count") >= runs + 1
    assert value("clinisynth_counterfactual_flips_total", {"target": TARGET}) == flips + (
        1 if res.flipped else 0
    )


def test_raw_stub_from_protos_alone(cf_server):
    import grpc

    from clinisynth.v1 import common_pb2, counterfactual_pb2, counterfactual_pb2_grpc

    with grpc.insecure_channel(cf_server.address) as channel:
        stub = counterfactual_pb2_grpc.CounterfactualServiceStub(channel)
        req = counterfactual_pb2.CounterfactualRequest(
            image=common_pb2.Image(encoded=_png(_healthy())),
            target_class=TARGET,
            steps=20,
            seed=0,
            diffusion_model=common_pb2.ModelRef(name="blob-denoiser"),
        )
        resp = stub.CreateCounterfactual(req, timeout=300)
        assert resp.difference.raw.dtype == "float32" and list(resp.difference.raw.shape) == [
            16,
            16,
        ]
        assert len(resp.trajectory) == 10
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateCounterfactual(
                counterfactual_pb2.CounterfactualRequest(
                    image=req.image,
                    target_class=TARGET,
                    diffusion_model=req.diffusion_model,
                    mode=7,
                ),
                timeout=30,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_input_already_the_target_is_not_reported_as_flipped(
    cf_server, cf_models, triton_client, store
):
    """A lesion image asked to show a lesion: already_target, never flipped (single and batch)."""
    import grpc

    from clinisynth.v1 import common_pb2, counterfactual_pb2, counterfactual_pb2_grpc
    from clinisynth_lab.toy import blob_images

    images, labels = blob_images(16, 16, seed=99)
    healthy = images[labels == 0][0]
    # The lesion image the served robust classifier is surest of (as PNG, as the service sees it).
    lesions = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(_png(a))), np.float32) / 255
            for a in images[labels == 1][:16]
        ]
    )
    robust = cf_models["robust"]
    logits = triton_client.infer(
        robust.components["classifier"],
        {"images": lesions[:, None]},
        ["logits"],
        version=str(robust.component_versions["classifier"]),
    )["logits"]
    p_lesion = torch.from_numpy(logits.copy()).softmax(1)[:, robust.classes.index(TARGET)]
    lesion = lesions[int(p_lesion.argmax())]
    assert float(p_lesion.max()) > 0.5, p_lesion  # the toy robust classifier sees some lesions
    models = {
        "diffusion_model": common_pb2.ModelRef(name="blob-denoiser"),
        "robust_classifier": common_pb2.ModelRef(name="blob-robust"),
        "plain_classifier": common_pb2.ModelRef(name="blob-plain"),
    }
    with grpc.insecure_channel(cf_server.address) as channel:
        stub = counterfactual_pb2_grpc.CounterfactualServiceStub(channel)
        resp = stub.CreateCounterfactual(
            counterfactual_pb2.CounterfactualRequest(
                image=common_pb2.Image(encoded=_png(lesion)),
                target_class=TARGET,
                steps=QUICK["steps"],
                start_depth=QUICK["start_depth"],
                seed=0,
                **models,
            ),
            timeout=300,
        )
        assert resp.p_target_before_robust > 0.5  # the robust classifier sees the lesion
        assert resp.already_target and not resp.flipped
        assert len(resp.trajectory) == 10  # the edit still ran, and says what it changed
        assert resp.difference.raw.dtype == "float32"

        store.put_bytes("cf-already/in/lesion.png", _png(lesion))
        store.put_bytes("cf-already/in/healthy.png", _png(healthy))
        events = list(
            stub.CounterfactualBatch(
                counterfactual_pb2.CounterfactualBatchRequest(
                    input_prefix="cf-already/in/",
                    output_prefix="cf-already/out/",
                    options=counterfactual_pb2.CounterfactualRequest(
                        target_class=TARGET,
                        seed=0,
                        steps=QUICK["steps"],
                        start_depth=QUICK["start_depth"],
                        lambda_c=STRONG["lambda_c"],
                        **models,
                    ),
                ),
                timeout=300,
            )
        )
    items = {e.item.input_key: e.item for e in events if e.WhichOneof("event") == "item"}
    done = events[-1].done
    assert items["cf-already/in/lesion.png"].already_target
    assert not items["cf-already/in/lesion.png"].flipped
    assert not items["cf-already/in/healthy.png"].already_target
    assert (done.images, done.already_target) == (2, 1)
    # the flip rate counts only the image that could flip
    assert done.flip_rate == float(items["cf-already/in/healthy.png"].flipped)
    summary = json.loads(store.get_bytes("cf-already/out/summary.json"))
    assert summary["already_target"] == 1
    result = json.loads(store.get_bytes("cf-already/out/lesion.result.json"))
    assert result["already_target"] and not result["flipped"]
    assert result["p_target_change"]["robust"] == pytest.approx(
        result["p_target_after"]["robust"] - result["p_target_before"]["robust"]
    )
