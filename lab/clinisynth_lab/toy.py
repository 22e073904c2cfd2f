"""A toy counterfactual problem with known ground truth: a bright blob ("lesion") present or not.

Used by the tests, the benchmark and as a smoke demo: it builds, in seconds on a CPU, the three
catalog folders the counterfactual service needs — an unconditional ``UNet2DModel`` denoiser
(briefly trained on the toy images) and a plain + an adversarially robust classifier (trained with
:mod:`clinisynth_server.methods.classifier`) — each in the format :func:`registry.register_folder`
imports unchanged.

Images are grayscale, ``size``² pixels in [0, 1]: a dark textured background, and for class
``lesion`` one Gaussian blob of random position and radius.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from clinisynth_server.methods.classifier import Classifier

CLASSES = ("healthy", "lesion")


def blob_images(n: int, size: int = 16, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, size, size] float32 in [0, 1], labels [n] int64)``, half of each class."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, size, size), np.float32)
    for i in range(n):
        base = 0.15 + 0.05 * rng.standard_normal((size, size)).astype(np.float32)
        if labels[i] == 1:
            cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
            radius = rng.uniform(size * 0.12, size * 0.2)
            base += 0.7 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        images[i] = np.clip(base, 0.0, 1.0)
    return images, labels


@dataclass(frozen=True)
class ToyFolders:
    denoiser: pathlib.Path
    robust: pathlib.Path
    plain: pathlib.Path


def write_classifier_folder(
    folder: pathlib.Path,
    model: Classifier,
    *,
    classes: tuple[str, ...] | list[str],
    size: int,
    channels: int,
    robust: bool,
    domain: str,
) -> pathlib.Path:
    """A classifier checkpoint + the ``clinisynth.json`` the registry reads."""
    model.save(folder)
    meta = {
        "kind": "classifier",
        "triton_role": "classifier",
        "component": "classifier",
        "classes": list(classes),
        "width": size,
        "height": size,
        "channels": channels,
        "labels": {"robust": "true" if robust else "false", "domain": domain},
        "description": f"{'robust' if robust else 'plain'} {domain} classifier",
    }
    (folder / "clinisynth.json").write_text(json.dumps(meta, indent=2))
    return folder


def build_toy_models(
    root: str | pathlib.Path,
    *,
    size: int = 16,
    n_images: int = 256,
    denoiser_steps: int = 200,
    max_train_t: int = 600,
    batch_size: int = 16,
    classifier_epochs: int = 4,
    train: bool = True,
    seed: int = 0,
    domain: str = "toy-blob",
    unet_channels: tuple[int, ...] = (8, 16),
    classifier_width: int = 8,
) -> ToyFolders:
    """Write ``denoiser/``, ``robust/`` and ``plain/`` under ``root`` (``train=False``: random).

    The denoiser only learns timesteps below ``max_train_t``: counterfactuals start half-way down
    the chain, so that is all they visit (with the default start depth 0.5 of 1000 steps).
    """
    from diffusers import DDPMScheduler

    from clinisynth_lab import builders
    from clinisynth_server.methods.classifier import (
        Classifier,
        ClassifierConfig,
        train_classifier,
    )

    root = pathlib.Path(root)
    torch.manual_seed(seed)
    images, labels = blob_images(n_images, size, seed=seed)
    x = torch.from_numpy(images)[:, None]  # [N, 1, H, W] in [0, 1]
    y = torch.from_numpy(labels)

    # 1. Denoiser: a tiny unconditional UNet, ε-MSE on the toy images (model space [-1, 1]).
    den = builders.build_pixel_unet(
        root / "denoiser",
        size=size,
        channels=1,
        block_out_channels=unet_channels,
        seed=seed,
        labels={"domain": domain},
        description="toy blob denoiser",
    )
    if train:
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(str(den / "unet"))
        sched = DDPMScheduler.from_pretrained(str(den / "scheduler"))
        opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        unet.train()
        for _ in range(denoiser_steps):
            idx = torch.randint(0, len(x), (batch_size,), generator=gen)
            x0 = x[idx] * 2 - 1
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, max_train_t, (len(idx),), generator=gen)
            pred = unet(sched.add_noise(x0, noise, t), t).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        unet.eval()
        unet.save_pretrained(str(den / "unet"))

    # 2. Classifiers: plain (cross-entropy) and robust (PGD in an L2 ball), temperature-scaled.
    folders = {}
    for name, adversarial in (("plain", "none"), ("robust", "pgd")):
        clf = Classifier(
            ClassifierConfig(num_classes=2, in_channels=1, backbone_width=classifier_width)
        )
        if train:
            train_classifier(
                clf,
                x,
                y,
                epochs=classifier_epochs,
                batch_size=32,
                seed=seed,
                lr=3e-3,
                adversarial=adversarial,
                eps=0.5,
                attack_steps=3,
            )
        clf.eval()
        folders[name] = write_classifier_folder(
            root / name,
            clf,
            classes=CLASSES,
            size=size,
            channels=1,
            robust=name == "robust",
            domain=domain,
        )
    return ToyFolders(den, folders["robust"], folders["plain"])
