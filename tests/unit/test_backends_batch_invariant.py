"""The Triton backends of the generator path compute each request the same alone or batched.

In process, through ``run_grouped`` (the glue Triton's python backend calls with one dynamic
batch): the denoiser, text encoder and VAE decoder of the tiny test models get one request
alone, then the same request merged with 7 others; with ``batch_invariant`` (the default) its
outputs must be equal bit for bit. A batch of 16 rows runs other GEMM / conv blockings than one
of 2 on common x86 CPUs, so when requests share a forward the bits may move (asserted only close:
≤ 1e-4, the float32 rounding of those blockings, far below an 8-bit level of 3.9e-3). In that
mode the denoiser computes each request (one image's guided pair) as one forward of its own;
the text encoder and VAE compute each row alone.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from clinisynth_lab import builders
from clinisynth_server.triton.backends import denoiser, text_encoder, vae_decode
from clinisynth_server.triton.backends._base import batch_invariant
from clinisynth_server.triton.backends._entry import run_grouped

CROWD = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("backends")
    cells = builders.build_pixel_unet(root / "cells", classes=["a", "b", "c"], size=16)
    chest = builders.build_text_to_image(root / "chest", size=32, image_channels=1)
    return {
        "denoiser_cells": cells / "unet",
        "denoiser_chest": chest / "unet",
        "text_encoder": chest / "text_encoder",
        "vae_decode": chest / "vae",
    }


def _config(folder: pathlib.Path) -> dict[str, Any]:
    return dict(json.loads((folder / "config.json").read_text()))


def _cells_requests(folder: pathlib.Path, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    classes = int(_config(folder)["num_class_embeds"])
    return [  # a guided pair per request: (class, null class), as the sampler sends it
        {
            "sample": rng.standard_normal((2, 1, 16, 16), dtype=np.float32),
            "timestep": np.full(2, 10.0 * (i + 1), np.float32),
            "class_labels": np.array([i % (classes - 1), classes - 1], np.int64),
        }
        for i in range(CROWD)
    ]


def _chest_requests(folder: pathlib.Path, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    cfg = _config(folder)
    size, dim = int(cfg["sample_size"]), int(cfg["cross_attention_dim"])
    return [
        {
            "sample": rng.standard_normal((2, int(cfg["in_channels"]), size, size), np.float32),
            "timestep": np.full(2, 10.0 * (i + 1), np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, dim), dtype=np.float32),
        }
        for i in range(CROWD)
    ]


def _text_requests(folder: pathlib.Path, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    vocab = int(_config(folder)["vocab_size"])
    return [{"input_ids": rng.integers(0, vocab, (2, 77), dtype=np.int64)} for _ in range(CROWD)]


def _latent_requests(folder: pathlib.Path, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    channels = int(_config(folder)["latent_channels"])
    return [
        {"latents": rng.standard_normal((1, channels, 8, 8), dtype=np.float32)}
        for _ in range(CROWD)
    ]


CASES: dict[str, tuple[Any, Callable[..., list[dict[str, np.ndarray]]]]] = {
    "denoiser_cells": (denoiser, _cells_requests),
    "denoiser_chest": (denoiser, _chest_requests),
    "text_encoder": (text_encoder, _text_requests),
    "vae_decode": (vae_decode, _latent_requests),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_request_alone_equals_request_in_a_crowd(
    folders: dict[str, pathlib.Path], case: str
) -> None:
    module, make = CASES[case]
    requests = make(folders[case], np.random.default_rng(0))
    target = 3
    exact = module.Backend(folders[case], {})  # batch_invariant defaults to true
    alone = run_grouped(exact, [requests[target]])[0]
    crowd = run_grouped(exact, requests)
    assert isinstance(alone, dict) and all(isinstance(r, dict) for r in crowd)
    mine = crowd[target]
    assert isinstance(mine, dict) and mine.keys() == alone.keys()
    for name in alone:
        assert np.array_equal(mine[name], alone[name]), name
    other = crowd[target + 1]
    assert isinstance(other, dict)
    assert not np.array_equal(other[next(iter(alone))], alone[next(iter(alone))])

    batched = module.Backend(folders[case], {"batch_invariant": "false"})
    loose = run_grouped(batched, requests)[target]
    assert isinstance(loose, dict)
    for name in alone:
        assert np.abs(loose[name] - alone[name]).max() < 1e-4, name


def test_batch_invariant_parameter() -> None:
    assert batch_invariant({}) is True
    assert batch_invariant({"batch_invariant": " False "}) is False
    with pytest.raises(ValueError, match="batch_invariant"):
        batch_invariant({"batch_invariant": "sometimes"})


@pytest.mark.parametrize("exact", [True, False])
def test_denoiser_forwards_per_request_or_per_crowd(
    folders: dict[str, pathlib.Path], exact: bool
) -> None:
    """Exact mode: one forward per request, on its whole guided pair (the shapes diffusers'
    pipeline uses for one image), never merged; batched mode: one forward for the crowd."""
    backend = denoiser.Backend(folders["denoiser_chest"], {"batch_invariant": str(exact).lower()})
    forward = backend._forward
    rows: list[int] = []

    def spy(inputs: Any) -> dict[str, np.ndarray]:
        rows.append(int(inputs["sample"].shape[0]))
        return forward(inputs)

    backend._forward = spy  # type: ignore[method-assign]  # count the real forwards
    results = run_grouped(
        backend, _chest_requests(folders["denoiser_chest"], np.random.default_rng(1))
    )
    assert all(isinstance(r, dict) and r["noise_pred"].shape[0] == 2 for r in results)
    assert rows == ([2] * CROWD if exact else [2 * CROWD])
