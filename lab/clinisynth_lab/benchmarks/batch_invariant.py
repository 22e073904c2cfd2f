"""What the replay contract costs: a denoiser step for a crowd of 8 requests, merged vs each alone.

    clinisynth benchmark batch_invariant                 # tiny test models + the 24 M UNet
    clinisynth benchmark batch_invariant --threads 1 --only tiny

Runs the real Triton backend (``denoiser.Backend``) in process through ``run_grouped``, the glue
Triton calls with one dynamic batch, with ``batch_invariant`` false and true; prints the median of
``--repeats`` runs, the ratio, and whether the target request's output equals its output alone.
Models are built from configs with seeded random weights (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from clinisynth_lab import builders
from clinisynth_server.triton.backends import denoiser
from clinisynth_server.triton.backends._entry import run_grouped

CROWD = 8

Requests = list[dict[str, np.ndarray]]


def _pixel(
    folder: pathlib.Path, size: int, blocks: tuple[int, ...] = (16, 32), layers: int = 1
) -> tuple[pathlib.Path, Requests]:
    unet_dir = builders.build_pixel_unet(
        folder, size=size, channels=1, block_out_channels=blocks, layers_per_block=layers
    )
    rng = np.random.default_rng(0)
    requests = [
        {
            "sample": rng.standard_normal((1, 1, size, size), dtype=np.float32),
            "timestep": np.full(1, 500.0, np.float32),
        }
        for _ in range(CROWD)
    ]
    return unet_dir / "unet", requests


def _text(folder: pathlib.Path) -> tuple[pathlib.Path, Requests]:
    unet_dir = builders.build_text_to_image(folder, size=32, image_channels=1) / "unet"
    rng = np.random.default_rng(0)
    requests = [  # a guided pair per request, as the sampler sends it
        {
            "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
            "timestep": np.full(2, 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
        }
        for _ in range(CROWD)
    ]
    return unet_dir, requests


Build = Callable[[pathlib.Path], tuple[pathlib.Path, Requests]]
CASES: dict[str, tuple[str, Build]] = {
    "tiny-pixel": ("tiny", lambda d: _pixel(d, 16)),
    "tiny-text": ("tiny", _text),
    "unet-24m-64px": ("24m", lambda d: _pixel(d, 64, (64, 128, 256, 256), 2)),
}


def _median_s(backend: denoiser.Backend, requests: Requests, repeats: int) -> float:
    run_grouped(backend, requests)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_grouped(backend, requests)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clinisynth benchmark batch_invariant", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("tiny", "24m"), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (group, build) in CASES.items():
            if args.only and group != args.only:
                continue
            unet_dir, requests = build(pathlib.Path(tmp) / name)
            medians = {}
            for exact in (False, True):
                backend = denoiser.Backend(unet_dir, {"batch_invariant": str(exact).lower()})
                medians[exact] = _median_s(backend, requests, args.repeats)
                crowd = run_grouped(backend, requests)[3]
                alone = run_grouped(backend, [requests[3]])[0]
                assert isinstance(crowd, dict) and isinstance(alone, dict)
                same = np.array_equal(crowd["noise_pred"], alone["noise_pred"])
                print(
                    f"{name:14s} batch_invariant={str(exact).lower():5s} "
                    f"{medians[exact] * 1e3:8.1f} ms  target bit-identical to alone: {same}"
                )
            print(f"{name:14s} cost of each request alone ×{medians[True] / medians[False]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
