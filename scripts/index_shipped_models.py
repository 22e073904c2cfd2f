"""Give the shipped generators (deploy/models) the similarity index of their training images.

    python scripts/index_shipped_models.py [--only cells,fundus,chest] [--models DIR]

The demo models were trained by scripts/train_demo_models.py on phantom sets it writes with fixed
seeds (``write_phantom_dataset(kind, n, seed=0, size=32)``: cells 3000, fundus 2000, chest 1500
images). Phantoms are a function of (seed, index), so the very training images are regenerated
here and indexed exactly as a finetune job indexes its data set (``similarity/`` in the model
folder, which the registry serves as the model's ``similarity`` component). A model trained from
now on gets its index from its job; this script is for the folders trained before the gate.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32  # train_demo_models.SIZE
#: model folder → (phantom kind, images, seed) as train_demo_models.py wrote its training set.
TRAINING_SETS = {
    "cells": ("cells", 3000, 0),
    "fundus": ("fundus", 2000, 0),
    "chest": ("chest", 1500, 0),
}


def training_images(kind: str, n: int, seed: int) -> np.ndarray:
    """The phantom training set as the trainer decoded it: [N, C, S, S] float32 in [0, 1]."""
    from clinisynth_lab.phantoms import datasets
    from clinisynth_server.finetune.shards_loader import to_sample
    from clinisynth_server.imaging.decode import decode_image

    channels = 3 if kind == "fundus" else 1
    rows = []
    for path, data in datasets.phantom_entries(kind, n, seed=seed, size=SIZE):
        if path.endswith(".png"):  # the training decode: product decoder, then to_sample
            rows.append(to_sample(decode_image(data, field=path), SIZE, channels))
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(TRAINING_SETS))
    parser.add_argument("--models", default=str(ROOT / "deploy" / "models"))
    ns = parser.parse_args(argv)
    from clinisynth_server.finetune import memorization

    for name in [n for n in ns.only.split(",") if n]:
        kind, n, seed = TRAINING_SETS[name]
        folder = pathlib.Path(ns.models) / name
        images = training_images(kind, n, seed)
        index = memorization.from_array(
            images,
            seed=seed,
            source=f"{kind} phantoms n={n} seed={seed} size={SIZE}: the regenerated training set "
            "of scripts/train_demo_models.py",
        )
        memorization.write(index, folder)
        assert index is not None
        print(
            f"{name}: {index.count} images, threshold {index.thresholds.memorization:.4f} "
            f"(q05 {index.calibration.pixel_q05:.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
