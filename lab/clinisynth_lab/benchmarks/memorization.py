"""The memorization gate against a generator that memorized its training set, and the shipped ones.

    clinisynth benchmark memorization            # 3 seeds, 8 training images, 2000 steps each
    clinisynth benchmark memorization --quick    # one seed, 16 images generated

Per seed: a small pixel DDPM (diffusers ``UNet2DModel`` 32/64 channels, the product's ε-MSE loss
and DDIM sampler) is trained on ``--train`` cell phantoms (16 px) for ``--steps`` steps, each
image with ``--repeat`` fresh noise draws per step — deliberately over-fitted — then
``--generate`` images are sampled (25 DDIM steps) and each is compared with the index of its
training images (the extractor and calibrated threshold the gate uses; the Triton ``similarity``
backend runs the same code). The independent near-copy criterion: the full-resolution pixel MSE
to the nearest training image is below ``--copy-factor`` (0.1) × the training images' own median
nearest-other MSE, i.e. the image is more than 3× closer (RMS) to one training image than
training images are to each other. Goal: ≥ 95 % of the near-copies flagged.

Then the shipped pixel generators (deploy/models with a similarity/ index; the text-to-image
chest model is not sampled here): ``--generate`` images each, DDIM 25 steps, against their
shipped index. Goal: ≤ 5 % flagged. In process on CPU; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import numpy as np
import torch

from clinisynth_server.methods.losses import diffusion_loss
from clinisynth_server.methods.sampling import Cond, sample, unet_eps_fn
from clinisynth_server.methods.schedulers import DDPM_SCHEDULE, make_scheduler
from clinisynth_server.similarity.index import (
    DEFAULT_MEMORIZATION_RATIO,
    INDEX_DIR,
    SimilarityIndex,
    build_index,
)

ROOT = pathlib.Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "deploy" / "models"


def _overfit(train: np.ndarray, steps: int, seed: int, repeat: int = 4) -> Any:
    """A tiny UNet trained on ``train`` ([N, 1, S, S] in [0, 1]) far past generalising."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    size = train.shape[-1]
    unet = UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    sched = DDPMScheduler.from_config(DDPM_SCHEDULE)
    x0 = (torch.from_numpy(train) * 2 - 1).repeat(repeat, 1, 1, 1)  # each image, fresh noise
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    eps = unet_eps_fn(unet)
    T = int(sched.config.num_train_timesteps)
    unet.train()
    for _ in range(steps):
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (len(x0),), generator=gen)
        loss = diffusion_loss(eps, x0, Cond(), t, noise, sched)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    return unet, dict(DDPM_SCHEDULE)


def _sample(
    unet: Any, scheduler_config: dict[str, Any], n: int, seed: int, steps: int, **cond: Any
) -> np.ndarray:
    """``n`` images [n, H, W, C] in [0, 1], DDIM as served."""
    size, ch = int(unet.config.sample_size), int(unet.config.in_channels)
    out = []
    with torch.inference_mode():
        for start in range(0, n, 16):
            seeds = list(range(seed + start, seed + min(n, start + 16)))
            c = Cond(**{k: v[: len(seeds)] for k, v in cond.items()}) if cond else Cond()
            res = sample(
                unet_eps_fn(unet),
                make_scheduler("ddim", scheduler_config),
                seeds,
                (ch, size, size),
                num_inference_steps=steps,
                cond=c,
            )
            out.append(res.images.permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def _nearest_mse(
    generated: np.ndarray, train: np.ndarray, *, leave_one_out: bool = False
) -> np.ndarray:
    """Full-resolution pixel MSE of each generated image to its nearest training image."""
    g = generated.reshape(len(generated), -1).astype(np.float64)
    t = train.reshape(len(train), -1).astype(np.float64)
    d2 = (g**2).sum(1)[:, None] - 2 * g @ t.T + (t**2).sum(1)[None, :]
    if leave_one_out:
        np.fill_diagonal(d2, np.inf)
    return np.maximum(d2.min(1), 0.0) / g.shape[1]


def run_seed(seed: int, ns: argparse.Namespace) -> dict[str, Any]:
    from clinisynth_lab.phantoms import cells

    imgs, _ = cells.generate(ns.train, seed=1000 + seed, size=32)
    train = (imgs.astype(np.float32) / 255.0)[:, None]
    if train.shape[-1] != ns.size:  # box-filter the 32 px phantoms down (they start at 24 px)
        f = train.shape[-1] // ns.size
        train = train.reshape(len(train), 1, ns.size, f, ns.size, f).mean(axis=(3, 5))
    t0 = time.monotonic()
    unet, sched = _overfit(train, ns.steps, seed, ns.repeat)
    train_s = time.monotonic() - t0
    gen = _sample(unet, sched, ns.generate, 10_000 * (seed + 1), ns.sample_steps)
    index = build_index([train[:, 0]], memorization_ratio=ns.ratio)
    found = index.nearest(gen)
    flagged = index.memorized(found)
    # Independent criterion: full-resolution MSE to the nearest training image, relative to how
    # far apart the training images themselves are (their median nearest-other MSE).
    spacing = float(np.median(_nearest_mse(train[:, 0], train[:, 0], leave_one_out=True)))
    copies = _nearest_mse(gen[..., 0], train[:, 0]) < ns.copy_factor * spacing
    caught = float(flagged[copies].mean()) if copies.any() else float("nan")
    return {
        "seed": seed,
        "train_s": train_s,
        "generated": len(gen),
        "near_copies": float(copies.mean()),
        "flagged": float(flagged.mean()),
        "copies_flagged": caught,
        "non_copies_flagged": float(flagged[~copies].mean()) if (~copies).any() else float("nan"),
        "threshold": index.thresholds.memorization,
        "median_distance": float(np.median(found.pixel_distance)),
        "copy_distances": np.sort(found.pixel_distance[copies]).round(4).tolist(),
        "other_distances": np.sort(found.pixel_distance[~copies]).round(4).tolist(),
        "q05": index.calibration.pixel_q05,
        "copy_mse": ns.copy_factor * spacing,
    }


def _load_pixel_model(folder: pathlib.Path) -> tuple[Any, dict[str, Any], list[str]]:
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    meta = json.loads((folder / "clinisynth.json").read_text())
    return (
        unet,
        {k: v for k, v in sched.items() if not k.startswith("_")},
        list(meta.get("classes") or []),
    )


def shipped(ns: argparse.Namespace, ratio: float | None) -> list[dict[str, Any]]:
    """Flag rates of the shipped pixel generators against their own shipped index."""
    rows = []
    for folder in sorted(p for p in SHIPPED.iterdir() if (p / INDEX_DIR).is_dir()):
        if not (folder / "unet").is_dir() or (folder / "text_encoder").is_dir():
            continue  # text-to-image: see docs (sampled through the stack, not in process)
        index = SimilarityIndex.load(folder / INDEX_DIR)
        if ratio is not None:
            index = index.with_thresholds(memorization_ratio=ratio)
        unet, sched, classes = _load_pixel_model(folder)
        cond = {}
        if classes:
            labels = torch.arange(ns.generate) % len(classes)
            cond = {"class_labels": labels}
        flagged_all = []
        for start in range(0, ns.generate, 16):
            n = min(16, ns.generate - start)
            c = {k: v[start : start + n] for k, v in cond.items()}
            imgs = _sample(unet, sched, n, 500_000 + start, ns.sample_steps, **c)
            flagged_all.append(index.memorized(index.nearest(imgs)))
        flagged = np.concatenate(flagged_all)
        rows.append(
            {
                "model": folder.name,
                "index_images": index.count,
                "generated": len(flagged),
                "flagged": float(flagged.mean()),
                "threshold": index.thresholds.memorization,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinisynth benchmark memorization", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer images")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1")
    parser.add_argument("--train", type=int, default=8, help="training images (8-16)")
    parser.add_argument("--size", type=int, default=16, help="training side (16 or 32 px)")
    parser.add_argument("--verbose", action="store_true", help="print the distances")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument(
        "--generate", type=int, default=0, help="images per model (0: 24, quick 16)"
    )
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument(
        "--copy-factor",
        type=float,
        default=0.1,
        help="near-copy: nearest-training MSE below this x the training set's own median "
        "nearest-other MSE",
    )
    parser.add_argument("--repeat", type=int, default=4, help="noise draws per image per step")
    parser.add_argument("--ratio", type=float, default=DEFAULT_MEMORIZATION_RATIO)
    parser.add_argument("--no-shipped", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args(argv)
    ns.generate = ns.generate or (16 if ns.quick else 24)
    if ns.quick:
        ns.seeds = 1
    torch.set_num_threads(ns.threads)
    print(
        f"memorization gate: ratio {ns.ratio} x q05; over-fitted UNet on {ns.train} cell phantoms "
        f"{ns.size}px, {ns.steps} steps; {ns.generate} images per seed; near-copy = nearest "
        f"training MSE < {ns.copy_factor} x the training images' median nearest-other MSE"
    )
    print(
        f"{'seed':>4} {'train s':>8} {'copies':>7} {'flagged':>8} {'copies flagged':>15} "
        f"{'others flagged':>15} {'threshold':>10} {'median d':>9}"
    )
    results = []
    for seed in range(ns.first_seed, ns.first_seed + ns.seeds):
        r = run_seed(seed, ns)
        results.append(r)
        print(
            f"{r['seed']:>4} {r['train_s']:>8.0f} {r['near_copies']:>7.0%} {r['flagged']:>8.0%} "
            f"{r['copies_flagged']:>15.0%} {r['non_copies_flagged']:>15.0%} "
            f"{r['threshold']:>10.4f} {r['median_distance']:>9.4f}",
            flush=True,
        )
        if ns.verbose:
            print(f"     q05 {r['q05']:.4f} copies {r['copy_distances']}")
            print(f"     others {r['other_distances']}")
    caught = [r["copies_flagged"] for r in results if r["copies_flagged"] == r["copies_flagged"]]
    ok_over = bool(caught) and min(caught) >= 0.95
    worst = min(caught) if caught else float("nan")
    verdict = "PASS" if ok_over else "FAIL"
    print(f"over-fitted: near-copies flagged min {worst:.0%} (goal >= 95%): {verdict}")
    ok_shipped = True
    if not ns.no_shipped:
        rows = shipped(ns, ns.ratio)
        print(
            f"{'shipped model':>14} {'index':>6} {'generated':>10} {'flagged':>8} {'threshold':>10}"
        )
        for row in rows:
            print(
                f"{row['model']:>14} {row['index_images']:>6} {row['generated']:>10} "
                f"{row['flagged']:>8.1%} {row['threshold']:>10.4f}"
            )
        ok_shipped = all(row["flagged"] <= 0.05 for row in rows)
        if not rows:
            print("no shipped model has a similarity/ index (scripts/index_shipped_models.py)")
        print(f"shipped: flagged <= 5%: {'PASS' if ok_shipped and rows else 'FAIL'}")
    return 0 if ok_over and ok_shipped else 1


if __name__ == "__main__":
    raise SystemExit(main())
