"""The memorization gate through the real generator service and Triton (``similarity`` component).

A tiny generator is registered three times: without an index, and with indexes built from images
it produced itself with known seeds, so a near-copy is guaranteed: ``flag`` returns them flagged,
``refuse`` fails with FAILED_PRECONDITION naming distance and threshold, ``regenerate`` resamples
with the next seeds (and refuses when those are copies too). Then a real finetune job writes an
index into its checkpoint, the manifest covers it (a modified index file refuses promotion), and
the promoted model is gated.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest

import clinisynth

pytestmark = pytest.mark.stack

STEPS = 3


@pytest.fixture(scope="module")
def gated(
    session_dir: pathlib.Path,
    catalog: Any,
    store: Any,
    model_repository: pathlib.Path,
    triton_client: Any,
) -> dict[str, Any]:
    """memo-none (no index), memo-copy (index: seeds 0, 1, 100, 101), memo-all (seeds 0..5)."""
    from clinisynth_lab import builders
    from clinisynth_server import registry
    from clinisynth_server.generator.options import GenerateOptions
    from clinisynth_server.generator.service import Generator
    from clinisynth_server.similarity.index import INDEX_DIR, build_index, save_component

    base = builders.build_pixel_unet(session_dir / "memo" / "base", size=16, seed=3)

    def register(name: str, folder: pathlib.Path) -> Any:
        return registry.register_folder(
            folder,
            name,
            catalog=catalog,
            store=store,
            model_repository=model_repository,
            triton=triton_client,
        )

    register("memo-none", base)
    gen = Generator(catalog, triton_client, store, cache_dir=session_dir / "memo" / "cache")

    def images(seeds: list[int]) -> np.ndarray:
        out = []
        for seed in seeds:
            opts = GenerateOptions(
                model="memo-none", seed=seed, steps=STEPS, format="raw", memorization="off"
            )
            out.append(gen.generate(opts).images[0].pixels)
        return np.stack(out)

    models = {}
    for name, seeds in (("memo-copy", [0, 1, 100, 101]), ("memo-all", list(range(6)))):
        folder = session_dir / "memo" / name
        shutil.copytree(base, folder)
        save_component(build_index([images(seeds)]), folder / INDEX_DIR)
        models[name] = register(name, folder)
    return {"reference": {s: images([s])[0] for s in (2, 3)}, **models}


def test_flag_returns_the_copies_flagged_with_provenance(gated: Any, sdk_client: Any) -> None:
    res = sdk_client.generate("memo-copy", seed=0, n=2, steps=STEPS, memorization="flag")
    record = gated["memo-copy"]
    digest = record.extra["similarity"]["digest"]
    for image in res.images:
        assert image.memorization == "flagged"
        assert image.memorization_distance is not None
        assert image.memorization_distance < image.memorization_threshold
        assert image.memorization_threshold == pytest.approx(
            record.extra["similarity"]["memorization_threshold"], rel=1e-6
        )
        extra = image.provenance["extra"]
        assert extra["memorization"] == "flagged"
        assert extra["memorization_index"] == digest
        assert extra["memorization_extractor"] == "clinisynth-features-v1"
        assert float(extra["memorization_distance"]) < float(extra["memorization_threshold"])
    # The PNG's own provenance chunk says the same (what leaves the service with the image).
    from clinisynth_server.imaging.encode import decode_provenance_from_png

    embedded = decode_provenance_from_png(res.images[0].data)
    assert embedded is not None and embedded.extra["memorization"] == "flagged"


def test_refuse_fails_with_failed_precondition_naming_distance_and_threshold(
    gated: Any, sdk_client: Any
) -> None:
    with pytest.raises(clinisynth.FailedPreconditionError) as err:
        sdk_client.generate("memo-copy", seed=1, steps=STEPS, memorization="refuse")
    text = str(err.value)
    assert "near-copy" in text and "distance" in text and "threshold" in text
    assert err.value.code == "FAILED_PRECONDITION"


def test_regenerate_resamples_with_the_next_seeds(gated: Any, sdk_client: Any) -> None:
    """Seeds 0 and 1 are copies: they are replaced by seeds 2 and 3, which are not."""
    res = sdk_client.generate("memo-copy", seed=0, n=2, steps=STEPS, format="raw")  # the default
    assert [i.memorization for i in res.images] == ["regenerated", "regenerated"]
    assert [i.seed for i in res.images] == [2, 3]
    for image in res.images:
        assert image.memorization_distance >= image.memorization_threshold
        assert image.provenance["extra"]["memorization_tries"] == "2"
        np.testing.assert_array_equal(image.to_numpy(), gated["reference"][image.seed])


def test_regenerate_refuses_after_its_tries(gated: Any, sdk_client: Any) -> None:
    """Seeds 0, 1, 2 are all copies (memo-all): three samples, then FAILED_PRECONDITION."""
    with pytest.raises(clinisynth.FailedPreconditionError) as err:
        sdk_client.generate("memo-all", seed=0, steps=STEPS, memorization="regenerate")
    assert "after 3 samples" in str(err.value) and "threshold" in str(err.value)


def test_a_model_without_index_says_so(gated: Any, sdk_client: Any) -> None:
    res = sdk_client.generate("memo-none", seed=0, steps=STEPS)
    image = res.images[0]
    assert image.memorization == "no index" and image.memorization_distance is None
    assert image.provenance["extra"]["memorization"] == "no index"
    off = sdk_client.generate("memo-copy", seed=0, steps=STEPS, memorization="off").images[0]
    assert off.memorization == "off" and off.provenance["extra"]["memorization"] == "off"


def _gate_count(generator_server: Any, model: str, decision: str) -> float:
    url = f"http://127.0.0.1:{generator_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    labels = rf'(?=[^}}]*decision="{re.escape(decision)}")(?=[^}}]*model="{re.escape(model)}")'
    pattern = r"^clinisynth_generator_memorization_total\{" + labels + r"[^}]*\} ([0-9.e+]+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_gate_outcomes_are_counted_per_image(
    gated: Any, sdk_client: Any, generator_server: Any
) -> None:
    before = {
        (m, d): _gate_count(generator_server, m, d)
        for m, d in (("memo-copy", "flagged"), ("memo-all", "refused"), ("memo-none", "no_index"))
    }
    sdk_client.generate("memo-copy", seed=0, n=2, steps=STEPS, memorization="flag")
    with pytest.raises(clinisynth.FailedPreconditionError):
        sdk_client.generate("memo-all", seed=0, steps=STEPS, memorization="refuse")
    sdk_client.generate("memo-none", seed=0, steps=STEPS)
    assert (
        _gate_count(generator_server, "memo-copy", "flagged") - before["memo-copy", "flagged"] == 2
    )
    assert _gate_count(generator_server, "memo-all", "refused") - before["memo-all", "refused"] == 1
    assert (
        _gate_count(generator_server, "memo-none", "no_index") - before["memo-none", "no_index"]
        == 1
    )


def test_unknown_policy_is_invalid_argument(gated: Any, generator_server: Any) -> None:
    from clinisynth.v1 import generator_pb2, generator_pb2_grpc

    with grpc.insecure_channel(generator_server.address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        req = generator_pb2.GenerateRequest(memorization="sometimes", steps=STEPS)
        req.model.name = "memo-copy"
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "memorization" in (err.value.details() or "")


def test_finetune_job_indexes_its_data_and_the_promoted_model_is_gated(
    triton_server: Any,
    store_url: str,
    store: Any,
    model_repository: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    from conftest import start_service

    from clinisynth_lab.phantoms import cells, datasets
    from clinisynth_server.finetune.records import JobStore

    imgs, _ = cells.generate(12, seed=31, size=24)
    datasets.write_image_folder_to_store(store, "memo/cells", imgs, np.zeros(12, int), ["cell"])
    params = {
        "max_steps": 20,
        "checkpoint_every": 10,
        "batch_size": 4,
        "seed": 2,
        "block_out_channels": "16,32",
        "conditioning": "none",
        "keep_checkpoints": 5,
    }
    service = start_service(
        "finetune",
        triton_server.grpc_url,
        store_url,
        tmp_path / "svc",
        workdir=str(tmp_path / "work"),
        model_repository=str(model_repository),
        torch_threads="1",
    )
    index_file = "model/similarity/similarity.safetensors"
    try:
        with clinisynth.Client(endpoints={"finetune": service.address}, timeout=60) as client:
            job = client.finetune.create(
                "diffusion_pretrain", "memo/cells", params=params, model_name="memo-job"
            )
            done = client.finetune.wait(job.id, timeout=400)
            assert done.state == "succeeded", done.failure_reason
            js = JobStore(store)
            prefix = js.checkpoint_prefix(job.id, "000000020")
            manifest = store.get_json(prefix + "checkpoint.json")
            assert index_file in manifest["files"]
            assert "model/similarity/similarity.json" in manifest["files"]
            # A modified index file refuses promotion, naming it; nothing is registered.
            data = bytearray(store.get_bytes(prefix + index_file))
            data[-1] ^= 0x01
            store.put_bytes(prefix + index_file, bytes(data))
            with pytest.raises(clinisynth.FailedPreconditionError) as err:
                client.finetune.promote(job.id, "000000020")
            assert index_file in str(err.value)
            promoted = client.finetune.promote(job.id, "000000010")
            assert promoted.model.name == "memo-job"
    finally:
        service.stop(0)
    generator = start_service("generator", triton_server.grpc_url, store_url, tmp_path / "gen")
    try:
        with clinisynth.Client(endpoints={"generator": generator.address}, timeout=120) as gen:
            image = gen.generate("memo-job", seed=1, steps=3, memorization="flag").images[0]
        assert image.memorization in ("passed", "flagged")
        assert image.memorization_distance is not None and image.memorization_distance >= 0
        assert image.provenance["extra"]["memorization_index"]
    finally:
        generator.stop(0)
