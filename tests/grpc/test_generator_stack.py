"""Generator behaviours that need the stack around it: DICOM validity, store outputs,
cancellation and deadlines stopping Triton work, new versions, shared batches, metrics, and
dependencies that are down."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pydicom
import pytest

import clinisynth
from clinisynth.v1 import common_pb2, generator_pb2, generator_pb2_grpc

pytestmark = pytest.mark.stack


def _denoiser_count(triton_client, name: str) -> int:
    return sum(s.inference_count for s in triton_client.statistics(name))


def test_dicom_output_is_valid_and_marked_synthetic(sdk_client, tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy missing: install Debian's dicom3tools (make system-deps)")
    res = sdk_client.generate(
        "chest-tiny",
        prompt="left pleural effusion",
        n=2,
        seed=11,
        steps=2,
        format="dicom",
        modality="DX",
    )
    for i, image in enumerate(res.images):
        path = tmp_path / f"img{i}.dcm"
        path.write_bytes(image.data)
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if "Error" in ln]
        assert not errors, "\n".join(errors)
        ds = pydicom.dcmread(path)
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.ConversionType == "SYN" and ds.Modality == "DX"
        assert "synthetic" in ds.DerivationDescription.lower()
        assert ds.Rows == 32 and ds.BitsAllocated == 16
    a, b = (pydicom.dcmread(tmp_path / f"img{i}.dcm") for i in range(2))
    assert a.SeriesInstanceUID == b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID


def test_store_outputs_returns_references_with_digests(sdk_client, store):
    res = sdk_client.generate(
        "cells-tiny", class_name="lymphocyte", n=2, seed=4, steps=2, store=True
    )
    assert res.provenance_ref is not None
    for image in res.images:
        assert image.ref is not None and image.ref["key"].endswith(".png")
        info = store.stat(image.ref["key"])
        assert info.sha256 == image.ref["sha256"] and info.size == image.ref["size_bytes"]
    records = store.get_json(res.provenance_ref["key"])
    assert [r["seed"] for r in records] == [4, 5]


def test_cancelling_the_stream_stops_denoiser_calls(
    generator_server, triton_client, registered_models
):
    name = registered_models["chest-tiny"].components["denoiser"]
    with grpc.insecure_channel(generator_server.address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        call = stub.GenerateStream(
            generator_pb2.GenerateRequest(
                model=common_pb2.ModelRef(name="chest-tiny"),
                prompt="cardiomegaly",
                steps=200,
                seed=1,
            ),
            timeout=300,
        )
        seen = 0
        for event in call:
            if event.WhichOneof("event") == "progress":
                seen += 1
                if seen == 3:
                    call.cancel()
                    break
    time.sleep(1.0)  # let an in-flight step finish
    before = _denoiser_count(triton_client, name)
    time.sleep(2.0)
    after = _denoiser_count(triton_client, name)
    assert after == before, "the denoiser kept being called after the client cancelled"
    assert before < 2 * 200  # nowhere near the whole request (2 = CFG halves)


def test_deadline_exceeded_stops_work(sdk_client, triton_client, registered_models):
    name = registered_models["chest-tiny"].components["denoiser"]
    start = _denoiser_count(triton_client, name)
    with pytest.raises(clinisynth.DeadlineExceededError):
        sdk_client.generate("chest-tiny", prompt="pneumothorax", steps=400, seed=2, timeout=1.5)
    time.sleep(1.5)
    settled = _denoiser_count(triton_client, name)
    time.sleep(1.5)
    assert _denoiser_count(triton_client, name) == settled
    assert settled - start < 2 * 400


def test_concurrent_requests_share_denoiser_batches(sdk_client, triton_client, registered_models):
    name = registered_models["cells-tiny"].components["denoiser"]
    stats = triton_client.statistics(name)
    inf0 = sum(s.inference_count for s in stats)
    exe0 = sum(s.execution_count for s in stats)
    errors: list[BaseException] = []

    def one(seed: int, delay: float) -> None:
        time.sleep(delay)
        try:
            sdk_client.generate("cells-tiny", class_name="monocyte", seed=seed, steps=30)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(s, 0.05 * s)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = triton_client.statistics(name)
    inferences = sum(s.inference_count for s in stats) - inf0
    executions = sum(s.execution_count for s in stats) - exe0
    assert inferences == 6 * 30
    assert executions < inferences, "Triton never merged requests into one batch"


def test_new_version_is_picked_up_without_restart(
    sdk_client, session_dir, catalog, store, model_repository, triton_client
):
    from clinisynth_lab import builders
    from clinisynth_server import registry

    for seed in (1, 2):
        folder = builders.build_pixel_unet(
            session_dir / f"versioned{seed}", size=16, classes=["a", "b"], seed=seed
        )
        registry.register_folder(
            folder,
            "cells-versioned",
            catalog=catalog,
            store=store,
            model_repository=model_repository,
            triton=triton_client,
        )
    versions = {
        m.version: m for m in sdk_client.list_models(name="cells-versioned", all_versions=True)
    }
    assert set(versions) == {"1", "2"} and versions["2"].latest and not versions["1"].latest
    latest = sdk_client.generate("cells-versioned", class_name="a", seed=3, steps=3)
    v1 = sdk_client.generate("cells-versioned@1", class_name="a", seed=3, steps=3)
    v2 = sdk_client.generate("cells-versioned@2", class_name="a", seed=3, steps=3)
    assert latest.images[0].provenance["model"]["version"] == "2"
    np.testing.assert_array_equal(latest.images[0].to_numpy(), v2.images[0].to_numpy())
    assert not np.array_equal(v1.images[0].to_numpy(), v2.images[0].to_numpy())
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        sdk_client.generate("cells-versioned@9", class_name="a")
    assert info.value.fields == ["model.version"]


def test_metrics_endpoint_exports_generator_families(sdk_client, generator_server):
    sdk_client.generate("cells-tiny", class_name="eosinophil", seed=1, steps=2)
    with pytest.raises(clinisynth.InvalidArgumentError):
        sdk_client.generate("cells-tiny", class_name="nope")
    url = f"http://127.0.0.1:{generator_server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'clinisynth_generator_images_total{model="cells-tiny",version="1"}' in text
    assert (
        'clinisynth_grpc_requests_total{code="INVALID_ARGUMENT",method="Generate",'
        'service="generator"}'
    ) in text
    assert "clinisynth_generator_step_duration_seconds_bucket" in text
    assert 'clinisynth_generator_batch_size_count{model="cells-tiny"}' in text
    assert 'clinisynth_dependency_up{dependency="triton",service="generator"} 1.0' in text


def test_triton_down_is_unavailable(store_url, session_dir):
    from tests.conftest import start_service

    running = start_service("generator", "127.0.0.1:1", store_url, session_dir)
    try:
        with (
            clinisynth.Client(
                endpoints={"generator": running.address}, retries=0, timeout=60
            ) as client,
            pytest.raises(clinisynth.UnavailableError),
        ):
            client.generate("cells-tiny", class_name="monocyte", seed=1, steps=2)
    finally:
        running.stop(0)


def test_store_down_is_unavailable(session_dir):
    from tests.conftest import start_service

    running = start_service(
        "generator", "127.0.0.1:1", "s3://clinisynth", session_dir, store_endpoint="127.0.0.1:9"
    )
    try:
        with (
            clinisynth.Client(
                endpoints={"generator": running.address}, retries=0, timeout=60
            ) as client,
            pytest.raises(clinisynth.UnavailableError),
        ):
            client.list_models()
    finally:
        running.stop(0)


def test_registration_skips_versions_left_by_an_interrupted_one(
    session_dir, catalog, store, model_repository
):
    from clinisynth_lab import builders
    from clinisynth_server import registry
    from clinisynth_server.triton import repository

    folder = builders.build_pixel_unet(session_dir / "leftover", size=16, classes=["a", "b"])
    # An earlier registration wrote the Triton component, then died before the catalog record.
    repository.write_model(
        model_repository, "leftover.denoiser", "denoiser", folder / "unet", version=1
    )
    record = registry.register_folder(
        folder, "leftover", catalog=catalog, store=store, model_repository=model_repository
    )
    assert record.version == 2 and record.component_versions == {"denoiser": 2}
    assert repository.list_versions(model_repository, "leftover.denoiser") == [1, 2]
