"""The denoising loop, written out top to bottom.

The denoiser is a plain callable ``eps_fn(x_t, t, cond) -> ε̂`` so the same loop runs with an
in-process torch module (tests, training-time previews, benchmarks) or with a remote Triton-backed
callable (the generator service): progress, previews and cancellation live here, between calls.

Legend (DDPM / DDIM notation)
    x_t      noisy sample at timestep t (latent z_t for latent models)
    ε̂        the model output (ε-prediction; v-prediction is handled by the scheduler)
    ᾱ_t      cumulative product of (1 − β), ``scheduler.alphas_cumprod[t]``
    x̂₀       predicted clean sample: (x_t − √(1 − ᾱ_t)·ε̂) / √ᾱ_t
    c, ∅     conditioning (class label or text hidden states) and the unconditional one
    s        classifier-free guidance scale: ε̂ = ε̂(x_t, ∅) + s·(ε̂(x_t, c) − ε̂(x_t, ∅))
    η        DDIM stochasticity (0 = deterministic, 1 = DDPM-like)

Determinism (the replay contract, README "Replay contract"): every image owns a CPU
``torch.Generator`` seeded with its own seed; its initial noise and any per-step noise (DDPM,
Euler ancestral, DDIM with η > 0) come from that generator alone. Every image also owns its
scheduler, and the guidance combination and scheduler update run on that image's rows alone, so
each of those ops sees shape ``(1, C, H, W)`` whatever the batch: SIMD body / scalar tail splits
and any reduction order are those of the image alone. With ``per_image=True`` the denoiser is
called once per image on that image's rows (its guided pair: the shapes diffusers' pipeline uses
for one image), and with a row-local decoder (:func:`per_row_decode` in process; the Triton
backends' ``batch_invariant`` mode, where a denoiser request is one forward and never merged) an
image's pixels are then bit-identical alone or in a crowd, not merely close.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clinisynth_server.errors import Cancelled, InvalidArgument

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


@dataclass(frozen=True)
class Cond:
    """Per-image conditioning as the denoiser sees it; all-``None`` means unconditional.

    ``class_labels``: ``(B,)`` int64. ``encoder_hidden_states``: ``(B, L, D)`` text states.
    """

    class_labels: Tensor | None = None
    encoder_hidden_states: Tensor | None = None

    @staticmethod
    def cat(first: Cond, second: Cond) -> Cond:
        """Stack two conditionings along the batch (cond first, uncond second for CFG)."""

        def _cat(a: Tensor | None, b: Tensor | None, name: str) -> Tensor | None:
            if a is None and b is None:
                return None
            if a is None or b is None:
                raise InvalidArgument.for_field(name, "given for one half of the batch only")
            return torch.cat([a, b.to(a.device, a.dtype)], dim=0)

        return Cond(
            _cat(first.class_labels, second.class_labels, "class_labels"),
            _cat(
                first.encoder_hidden_states, second.encoder_hidden_states, "encoder_hidden_states"
            ),
        )

    def to(self, device: torch.device | str) -> Cond:
        return Cond(
            None if self.class_labels is None else self.class_labels.to(device),
            None if self.encoder_hidden_states is None else self.encoder_hidden_states.to(device),
        )

    def select(self, index: Tensor | slice) -> Cond:
        """Rows of the batch (for chunking a request into denoiser batches)."""
        return Cond(
            None if self.class_labels is None else self.class_labels[index],
            None if self.encoder_hidden_states is None else self.encoder_hidden_states[index],
        )


class EpsFn(Protocol):
    """A denoiser: noisy batch, per-sample timesteps ``(B,)``, conditioning → model output."""

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...


DecodeFn = Callable[[Tensor], Tensor]
"""Latent → pixels in [-1, 1] (the VAE decoder for latent models)."""


@dataclass(frozen=True)
class StepInfo:
    """What the per-step callback sees: enough for progress bars and low-res previews."""

    index: int  # 0-based step index
    total: int  # number of denoiser calls: the steps asked for, more for PNDM (its warm-up)
    timestep: int  # the model timestep t of this step
    x_t: Tensor  # the sample after this step (x_{t-1})
    x0_pred: Tensor  # x̂₀ predicted at this step (latent for latent models)


StepCallback = Callable[[StepInfo], bool | None]
"""Return ``False`` (or raise) to stop sampling; the loop then calls the denoiser no more."""


@dataclass(frozen=True)
class SampleResult:
    images: Tensor  # (B, C, H, W) float in [0, 1]
    final: Tensor  # the last x before decoding (latents for latent models), model space
    seeds: tuple[int, ...]
    timesteps: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def predict_x0(x_t: Tensor, eps: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """x̂₀ = (x_t − √(1 − ᾱ_t)·ε̂) / √ᾱ_t; ``alpha_bar_t`` a float, ``(B,)`` or broadcastable."""
    ab = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device)
    if ab.ndim == 1:
        ab = ab.view(-1, *([1] * (x_t.ndim - 1)))
    return (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: the root of per-image determinism."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def initial_noise(
    generators: Sequence[torch.Generator],
    shape: tuple[int, int, int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """x_T ~ N(0, I), drawn image by image on CPU in float32 (identical on every device)."""
    noise = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(noise, dim=0).to(device=device, dtype=dtype)


def preview(x0: Tensor, size: int = 32) -> Tensor:
    """Low-resolution preview in [0, 1] of a pixel-space x̂₀ (``(B, C, size, size)``)."""
    small = F.interpolate(x0.float(), size=(size, size), mode="area")
    return (small / 2 + 0.5).clamp(0, 1)


def unet_eps_fn(unet: nn.Module, *, learned_variance: bool = False) -> EpsFn:
    """Adapt a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` to the ``EpsFn`` contract.

    ``learned_variance``: the model predicts [ε, variance] along channels (improved-diffusion);
    only ε is returned.
    """

    def eps_fn(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        kwargs: dict[str, Any] = {}
        if cond.class_labels is not None:
            kwargs["class_labels"] = cond.class_labels
        if cond.encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = cond.encoder_hidden_states
        out = unet(x_t, t, **kwargs).sample
        return out[:, : x_t.shape[1]] if learned_variance else out

    return eps_fn


def vae_decode_fn(vae: AutoencoderKL) -> DecodeFn:
    """Adapt a diffusers ``AutoencoderKL``: undo the latent scaling, decode to [-1, 1]."""
    scaling = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def decode(z: Tensor) -> Tensor:
        return vae.decode(z / scaling + shift).sample

    return decode


def per_row_decode(decode_fn: DecodeFn) -> DecodeFn:
    """``decode_fn`` one latent at a time: each latent sees the kernels and shapes of a batch of
    one, so its pixels cannot depend on its batch-mates (batched GEMM / conv blockings round
    differently per batch size). For in-process decoding that must replay bit for bit."""

    def decode(z: Tensor) -> Tensor:
        return torch.cat([decode_fn(z[i : i + 1].clone()) for i in range(z.shape[0])])

    return decode


def _x0_from_output(scheduler: Any, model_input: Tensor, out: Tensor, t: Tensor) -> Tensor:
    """x̂₀ for previews when the scheduler's step does not report one (DPM-Solver)."""
    ab = scheduler.alphas_cumprod.to(model_input.device)[int(t)].to(model_input.dtype)
    if scheduler.config.prediction_type == "v_prediction":
        return ab.sqrt() * model_input - (1 - ab).sqrt() * out
    if scheduler.config.prediction_type == "sample":
        return out
    return predict_x0(model_input, out, ab)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def _eps_per_image(
    eps_fn: EpsFn, x_in: Tensor, t: Tensor, cond: Cond, batch: int, do_cfg: bool
) -> Tensor:
    """``eps_fn`` once per image on its rows (``k`` and, guided, ``batch + k``), reassembled in
    the batch's row order. Rows are copied so each call sees fresh, contiguous tensors."""
    out: list[Tensor | None] = [None] * x_in.shape[0]
    for k in range(batch):
        rows = torch.tensor([k, batch + k] if do_cfg else [k])
        eps = eps_fn(x_in[rows].clone(), t[rows].clone(), cond.select(rows))
        for j, row in enumerate(rows.tolist()):
            out[row] = eps[j : j + 1]
    return torch.cat([o for o in out if o is not None])


@torch.no_grad()
def sample(
    eps_fn: EpsFn,
    scheduler: Any,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    *,
    num_inference_steps: int = 50,
    cond: Cond | None = None,
    uncond: Cond | None = None,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    decode_fn: DecodeFn | None = None,
    on_step: StepCallback | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    per_image: bool = False,
) -> SampleResult:
    """Generate ``len(seeds)`` images of ``shape`` = (C, H, W) in model space (latent or pixel).

    ``scheduler``: a fresh scheduler from :func:`make_scheduler` (multistep ones keep state).
    ``cond`` / ``uncond``: conditioning and, for classifier-free guidance (``guidance_scale`` ≠ 1),
    the unconditional one (empty prompt states, or the null class). ``decode_fn``: VAE decoder for
    latent models; ``None`` for pixel models. ``on_step`` may return ``False`` or raise to stop:
    the loop raises :class:`~clinisynth_server.errors.Cancelled` and calls the denoiser no more.
    ``per_image``: one denoiser call per image (its guided pair) instead of one for the batch,
    so an image's ε̂ cannot depend on the other images of the request (the replay contract).
    """
    # 1. Validate the settings that the scheduler would otherwise reject deep inside the loop.
    if not seeds:
        raise InvalidArgument.for_field("seeds", "at least one seed is required")
    if num_inference_steps < 1:
        raise InvalidArgument.for_field(
            "num_inference_steps", f"must be ≥ 1, got {num_inference_steps}"
        )
    if eta < 0:
        raise InvalidArgument.for_field("eta", f"must be ≥ 0, got {eta}")
    cond = (cond or Cond()).to(device)
    do_cfg = guidance_scale != 1.0
    if do_cfg and uncond is None:
        raise InvalidArgument.for_field(
            "guidance_scale",
            f"{guidance_scale} needs an unconditional input (empty prompt or null class); "
            "use 1.0 to disable classifier-free guidance",
        )
    model_cond = Cond.cat(cond, uncond.to(device)) if do_cfg and uncond is not None else cond

    # 2. Timesteps t_N > … > t_1 for this many steps.
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    total = len(timesteps)

    # 3. One scheduler per image (multistep ones keep per-run state), x_T from the image's own
    #    generator scaled by σ_max. From here on every update is computed per image, on tensors
    #    of the image's own shape, so the batch cannot change an image's rounding.
    generators = make_generators(seeds)
    batch = len(generators)
    schedulers = [scheduler, *(copy.deepcopy(scheduler) for _ in range(batch - 1))]
    xs = [
        initial_noise([g], shape, device=device, dtype=dtype) * s.init_noise_sigma
        for g, s in zip(generators, schedulers, strict=True)
    ]

    step_params = inspect.signature(scheduler.step).parameters
    takes_eta = "eta" in step_params
    takes_generator = "generator" in step_params

    # 4. The reverse chain.
    for i, t in enumerate(timesteps):
        # 4a. Model input (Euler rescales x_t by 1/√(σ²+1); identity for DDIM/DDPM/DPM).
        x_ins = [s.scale_model_input(x, t) for s, x in zip(schedulers, xs, strict=True)]
        x_in = torch.cat(x_ins + x_ins if do_cfg else x_ins)
        t_batch = t.reshape(1).expand(x_in.shape[0]).to(device)

        # 4b. ε̂ = ε_θ(x_t, t, c): one denoiser call for the batch, or one per image.
        if per_image:
            out = _eps_per_image(eps_fn, x_in, t_batch, model_cond, batch, do_cfg).to(dtype)
        else:
            out = eps_fn(x_in, t_batch, model_cond).to(dtype)

        # 4c. Per image: guidance ε̂ = ε̂_∅ + s·(ε̂_c − ε̂_∅), x_{t-1} from the scheduler's update
        #     rule (per-step noise from the image's own generator), x̂₀ for previews.
        x0_preds = []
        for k, sched in enumerate(schedulers):
            eps = out[k : k + 1].clone()
            if do_cfg:
                eps_u = out[batch + k : batch + k + 1].clone()
                eps = eps_u + guidance_scale * (eps - eps_u)
            step_kwargs: dict[str, Any] = {}
            if takes_eta:
                step_kwargs["eta"] = eta
            if takes_generator:
                step_kwargs["generator"] = generators[k]
            step = sched.step(eps, t, xs[k], **step_kwargs)
            x0_pred = getattr(step, "pred_original_sample", None)
            if x0_pred is None:
                x0_pred = _x0_from_output(sched, x_ins[k], eps, t)
            x0_preds.append(x0_pred)
            xs[k] = step.prev_sample

        # 4d. Progress / previews / cancellation.
        if on_step is not None:
            info = StepInfo(i, total, int(t), torch.cat(xs), torch.cat(x0_preds))
            keep_going = on_step(info)
            if keep_going is False:
                raise Cancelled(
                    f"sampling stopped by the caller after step {i + 1} of {total}",
                    metadata={"step": str(i + 1), "total": str(total)},
                )

    # 5. Decode (latent models) and map [-1, 1] → [0, 1] (elementwise, correctly rounded ops).
    x = torch.cat(xs)
    pixels = decode_fn(x) if decode_fn is not None else x
    images = (pixels.float() / 2 + 0.5).clamp(0, 1)
    return SampleResult(
        images=images,
        final=x,
        seeds=tuple(int(s) for s in seeds),
        timesteps=tuple(int(t) for t in timesteps),
    )
