"""The replay contract through the running stack: a request's pixels are bit-identical whether
it runs alone or inside a crowd of concurrent other requests that Triton batches with it.

SDK → gRPC → generator → real Triton (tiny class-conditional and text-to-image models). Each
target request runs alone, then again at the same moment as other, different requests (other
seeds, classes, prompts, image counts) from threads; Triton's dynamic batcher merges their
denoiser steps (asserted from its statistics, so the crowd really shared executions). The raw
float32 arrays must be equal bit for bit, and so must the encoded pixels: the PNG's IHDR + IDAT
chunks and the DICOM PixelData (the rest of those files embeds provenance with a creation time
and request id, which legitimately differ). Exact equality, no tolerance: that is the contract.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pydicom
import pytest

from clinisynth_server.imaging.decode import _png_pixel_chunks
from clinisynth_server.imaging.encode import (
    decode_provenance_from_dicom,
    decode_provenance_from_png,
)
from clinisynth_server.imaging.provenance import REPLAY_EXACT_CPU

pytestmark = pytest.mark.stack

STEPS = 4
# The requests under test: one per model kind, each in every output format.
TARGETS: dict[str, dict[str, Any]] = {
    "cells": {"model": "cells-tiny", "class_name": "neutrophil", "n": 2, "seed": 7},
    "chest": {"model": "chest-tiny", "prompt": "small left pleural effusion", "n": 1, "seed": 3},
}
FORMATS = ("raw", "png", "dicom")
# The crowd: different requests of the same shapes, so Triton can merge them with the targets.
OTHERS: list[dict[str, Any]] = [
    {"model": "cells-tiny", "class_name": "lymphocyte", "n": 1, "seed": 11},
    {"model": "cells-tiny", "class_name": "monocyte", "n": 3, "seed": 12},
    {"model": "cells-tiny", "class_name": "neutrophil", "n": 1, "seed": 13},
    {"model": "chest-tiny", "prompt": "normal chest x-ray", "n": 2, "seed": 14},
    {"model": "chest-tiny", "prompt": "cardiomegaly", "n": 1, "seed": 15},
    {"model": "chest-tiny", "prompt": "large right pneumothorax", "n": 1, "seed": 16},
    {"model": "fundus-tiny", "n": 2, "seed": 17},
]


def _pixels(image: Any) -> bytes:
    """The encoded pixel bytes of one image of the given format."""
    if image.format == "raw":
        array = np.ascontiguousarray(image.array)
        assert array.dtype == np.float32
        return array.tobytes()
    if image.format == "dicom":
        return bytes(pydicom.dcmread(io.BytesIO(image.data)).PixelData)
    return _png_pixel_chunks(image.data)  # IHDR, IDAT, IEND …: no text chunks


def _decoded(image: Any) -> np.ndarray:
    """The decoded pixel array (float32 for raw, the stored integers for PNG / DICOM)."""
    if image.format == "dicom":
        return np.asarray(pydicom.dcmread(io.BytesIO(image.data)).pixel_array)
    return np.asarray(image.to_numpy())


def _call(client: Any, request: dict[str, Any], fmt: str = "png") -> Any:
    options = {k: v for k, v in request.items() if k != "model"}
    return client.generate(request["model"], steps=STEPS, format=fmt, **options)


def _merged(triton_client: Any, records: dict[str, Any]) -> Callable[[], dict[str, int]]:
    """A snapshot of (requests − executions) per denoiser: > 0 once Triton merged requests."""

    def snapshot() -> dict[str, int]:
        out = {}
        for name in ("cells-tiny", "chest-tiny"):
            record = records[name]
            model = record.components["denoiser"]
            version = str(record.component_versions["denoiser"])
            (stats,) = triton_client.statistics(model, version)
            out[name] = stats.success_count - stats.execution_count
        return out

    return snapshot


@pytest.fixture(scope="module")
def client(generator_server):
    import clinisynth

    with clinisynth.Client(endpoints={"generator": generator_server.address}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def runs(client, triton_client, registered_models):
    """Every target alone (sequentially), then every target again inside the crowd."""
    alone = {(t, f): _call(client, TARGETS[t], f) for t in TARGETS for f in FORMATS}
    jobs = [(("target", t, f), TARGETS[t], f) for t in TARGETS for f in FORMATS]
    jobs += [(("other", str(i), "png"), r, "png") for i, r in enumerate(OTHERS)]
    merged = _merged(triton_client, registered_models)
    before = merged()
    start = threading.Barrier(len(jobs))

    def run(job: tuple[tuple[str, str, str], dict[str, Any], str]) -> Any:
        start.wait()
        return _call(client, job[1], job[2])

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = dict(zip([j[0] for j in jobs], pool.map(run, jobs), strict=True))
    after = merged()
    crowd = {(t, f): results[("target", t, f)] for t in TARGETS for f in FORMATS}
    others = [results[("other", str(i), "png")] for i in range(len(OTHERS))]
    return alone, crowd, others, {k: after[k] - before[k] for k in after}


def test_triton_batched_the_crowd(runs) -> None:
    """Guards the test itself: the crowd did share denoiser executions with batch-mates."""
    *_, merged = runs
    assert sum(merged.values()) > 0, merged


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_pixels_alone_equal_pixels_in_a_crowd(runs, target: str, fmt: str) -> None:
    alone, crowd, others, _ = runs
    a, c = alone[(target, fmt)], crowd[(target, fmt)]
    assert len(a.images) == len(c.images) == TARGETS[target]["n"]
    for x, y in zip(a.images, c.images, strict=True):
        assert x.seed == y.seed
        np.testing.assert_array_equal(_decoded(x), _decoded(y))
        assert _pixels(x) == _pixels(y)
        assert x.provenance["replay"] == y.provenance["replay"] == REPLAY_EXACT_CPU
    # The crowd was made of other images, not copies of the target.
    first = _pixels(a.images[0]) if fmt == "png" else None
    if first is not None:
        assert all(_pixels(o.images[0]) != first for o in others)


def test_embedded_provenance_states_the_replay_guarantee(runs) -> None:
    """The provenance inside the files (PNG text chunk, DICOM private block) says it too."""
    alone, *_ = runs
    png = decode_provenance_from_png(alone[("chest", "png")].images[0].data)
    dicom = decode_provenance_from_dicom(alone[("cells", "dicom")].images[0].data)
    assert png is not None and dicom is not None
    assert png.replay == dicom.replay == REPLAY_EXACT_CPU
