"""Role ``cf_guidance``: one guided counterfactual step's model work, autograd inside Triton.

The counterfactual method (docs/METHODS.md §4) needs ∇_{x_t} log p(y* | x̂₀(x_t)) for two classifiers
and ∇_{x_t} d(x̂₀, x₀) — gradients through the denoiser *and* the classifiers, which cannot cross
an RPC. So one Triton model holds a denoiser version together with a robust + plain classifier
pair and wraps :func:`clinisynth_server.methods.counterfactual.guidance_gradients`; the service
keeps the loop (cone projection, guided posterior mean, noise, progress, cancellation).

Weights folder (written by :mod:`clinisynth_server.counterfactual.guidance`)::

    config.json   {"kind": "cf_guidance", "format_version": 1, "channels": C, "classes": [...],
                   "learned_variance": false, "sources": {...catalog refs and digests...}}
    denoiser/     an unconditional diffusers ``UNet2DModel`` folder (ε-prediction)
    robust/       a classifier checkpoint (``methods.classifier.Classifier``)
    plain/        a classifier checkpoint

Inputs, batch first: ``x_t`` FP32 [B, C, H, W] (model space), ``timestep`` FP32 [B] (model
timesteps), ``alpha_bar`` FP32 [B] (ᾱ_t), ``x0`` FP32 [B, C, H, W] (the input image, model space
[-1, 1]), ``target`` INT64 [B] (class id y*), ``distance`` INT64 [B] (0 = L2, 1 = L1).
Outputs: ``eps``, ``x0_hat``, ``g_r``, ``g_p``, ``g_d`` FP32 [B, C, H, W]; ``logits_robust``,
``logits_plain`` FP32 [B, K]. Every step returns all three gradients (the cone needs them all; the
ablations ignore one), so one model serves every mode and requests of any mode share a batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clinisynth_server.triton.backends._base import (
    BackendInputError,
    ModelSpec,
    TensorSpec,
    read_json,
    require,
    torch_dtype,
)

KIND = "cf_guidance"
FORMAT_VERSION = 1
DISTANCE_CODES = {0: "l2", 1: "l1"}
IMAGE_OUTPUTS = ("eps", "x0_hat", "g_r", "g_p", "g_d")


def read_config(weights_dir: Path) -> dict[str, Any]:
    meta = read_json(Path(weights_dir) / "config.json")
    if meta.get("kind") != KIND:
        raise ValueError(f"{weights_dir} is a {meta.get('kind')!r} folder, not {KIND!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{weights_dir}: format {meta.get('format_version')} != {FORMAT_VERSION}")
    return meta


def model_spec(weights_dir: Path, parameters: Mapping[str, str]) -> ModelSpec:
    meta = read_config(Path(weights_dir))
    c, k = int(meta["channels"]), len(meta["classes"])
    image = (c, -1, -1)
    return ModelSpec(
        inputs=(
            TensorSpec("x_t", "float32", image),
            TensorSpec("timestep", "float32", ()),
            TensorSpec("alpha_bar", "float32", ()),
            TensorSpec("x0", "float32", image),
            TensorSpec("target", "int64", ()),
            TensorSpec("distance", "int64", ()),
        ),
        outputs=(
            *(TensorSpec(name, "float32", image) for name in IMAGE_OUTPUTS),
            TensorSpec("logits_robust", "float32", (k,)),
            TensorSpec("logits_plain", "float32", (k,)),
        ),
    )


class Backend:
    """Denoiser + both classifiers in eval mode, parameters frozen (gradients w.r.t. x_t only)."""

    def __init__(self, weights_dir: Path, parameters: Mapping[str, str], device: str = "cpu"):
        import diffusers

        from clinisynth_server.methods.classifier import Classifier
        from clinisynth_server.methods.sampling import unet_eps_fn
        from clinisynth_server.triton.backends._loading import load_model

        weights_dir = Path(weights_dir)
        self.meta = read_config(weights_dir)
        self.device = device
        self.dtype = torch_dtype(parameters)
        unet = load_model(diffusers.UNet2DModel, weights_dir / "denoiser", parameters, self.dtype)
        self.unet = unet.to(device)
        self.eps_fn = unet_eps_fn(self.unet, learned_variance=bool(self.meta["learned_variance"]))
        self.robust = Classifier.load(weights_dir / "robust", map_location=device)
        self.plain = Classifier.load(weights_dir / "plain", map_location=device)
        for clf in (self.robust, self.plain):
            clf.to(self.dtype).requires_grad_(False)
        self.channels = int(self.meta["channels"])
        self.num_classes = len(self.meta["classes"])

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from clinisynth_server.errors import ClinisynthError
        from clinisynth_server.methods.counterfactual import guidance_gradients

        x_t = require(inputs, "x_t", 4)
        x0 = require(inputs, "x0", 4)
        b = x_t.shape[0]
        scalars = {
            n: require(inputs, n, 1) for n in ("timestep", "alpha_bar", "target", "distance")
        }
        if x0.shape != x_t.shape or x_t.shape[1] != self.channels:
            raise BackendInputError(
                f"inputs 'x_t' and 'x0' must both be [B, {self.channels}, H, W], got "
                f"{x_t.shape} and {x0.shape}"
            )
        if any(v.shape[0] != b for v in scalars.values()):
            raise BackendInputError("timestep, alpha_bar, target and distance need one per sample")
        target = scalars["target"].astype(np.int64)
        if target.min() < 0 or target.max() >= self.num_classes:
            raise BackendInputError(f"input 'target' must be in [0, {self.num_classes})")
        ab = scalars["alpha_bar"].astype(np.float32)
        if not (np.isfinite(ab).all() and (ab > 0).all() and (ab <= 1).all()):
            raise BackendInputError("input 'alpha_bar' must lie in (0, 1]")
        codes = scalars["distance"].astype(np.int64)
        if not np.isin(codes, list(DISTANCE_CODES)).all():
            raise BackendInputError("input 'distance' must be 0 (L2) or 1 (L1)")

        def tensor(a: np.ndarray, dtype: Any = None) -> Any:
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype or self.dtype)

        out = {name: np.empty(x_t.shape, np.float32) for name in IMAGE_OUTPUTS}
        out["logits_robust"] = np.empty((b, self.num_classes), np.float32)
        out["logits_plain"] = np.empty((b, self.num_classes), np.float32)
        # One guidance_gradients call per distance kind present in the batch.
        for code, kind in DISTANCE_CODES.items():
            rows = np.flatnonzero(codes == code)
            if rows.size == 0:
                continue
            try:
                g = guidance_gradients(
                    self.eps_fn,
                    self.robust,
                    self.plain,
                    tensor(x_t[rows]),
                    tensor(scalars["timestep"][rows]),
                    tensor(x0[rows]),
                    tensor(target[rows], torch.long),
                    alpha_bar_t=tensor(ab[rows]),
                    distance_kind=kind,
                    mode="cone",
                )
            except ClinisynthError as exc:
                raise BackendInputError(str(exc)) from exc
            values = {
                "eps": g.eps,
                "x0_hat": g.x0_hat,
                "g_r": g.g_r,
                "g_p": g.g_p,
                "g_d": g.g_d,
                "logits_robust": g.logits_robust,
                "logits_plain": g.logits_plain,
            }
            for name, value in values.items():
                assert value is not None  # mode "cone" with both classifiers fills every field
                out[name][rows] = value.detach().float().cpu().numpy()
        return out
