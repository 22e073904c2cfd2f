"""Training objectives of the methods, over the same ``EpsFn`` contract as the sampler.

Legend
    x₀, ε, t     clean sample (pixels or latents), its noise, per-sample timestep
    x_t          √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (``scheduler.add_noise``)
    L_t(x, y)    ‖target − ε_θ(x_t, t, y)‖² averaged over pixels; target = ε (or v for
                 v-prediction schedulers)
    r(x, y)      reward-model score P(aligned) ∈ (0, 1)
    β            weight of the real-data (pre-training) term, 0.3 in the feedback paper
    λ_prior      DreamBooth prior-preservation weight
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.methods.sampling import Cond, EpsFn


def _target(scheduler: Any, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise InvalidArgument.for_field("prediction_type", f"unsupported prediction type {kind!r}")


def per_sample_losses(
    model_fn: EpsFn, x0: Tensor, cond: Cond, t: Tensor, noise: Tensor, scheduler: Any
) -> Tensor:
    """L_t for every sample, shape ``(B,)``."""
    x_t = scheduler.add_noise(x0, noise, t)
    pred = model_fn(x_t, t, cond)
    target = _target(scheduler, x0, noise, t)
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_loss(
    model_fn: EpsFn, x0: Tensor, cond: Cond, t: Tensor, noise: Tensor, scheduler: Any
) -> Tensor:
    """The standard ε-prediction MSE E‖ε − ε_θ(x_t, t, c)‖² (a scalar)."""
    return per_sample_losses(model_fn, x0, cond, t, noise, scheduler).mean()


@dataclass(frozen=True)
class RewardWeightedLoss:
    total: Tensor  # β·mean L_t(x_real, y) + mean r·L_t(x_syn, y); back-propagate this
    real: Tensor  # mean L_t(x_real, y) (detached, for logging)
    synthetic: Tensor  # mean r·L_t(x_syn, y) (detached)


def reward_weighted_loss(
    model_fn: EpsFn,
    x_real: Tensor,
    cond_real: Cond,
    x_syn: Tensor,
    cond_syn: Cond,
    rewards: Tensor,
    t: Tensor,
    noise_real: Tensor,
    noise_syn: Tensor,
    scheduler: Any,
    *,
    beta: float = 0.3,
) -> RewardWeightedLoss:
    """L(θ) = β·L_t(x_real, y) + r(x_syn, y)·L_t(x_syn, y), the SAME t for both terms.

    Real and synthetic batches are paired row by row (equal sizes): row i of both uses t[i].
    ``rewards`` ``(B,)`` are per-sample weights, treated as constants. One forward pass for both.
    """
    b = x_real.shape[0]
    if x_syn.shape[0] != b or t.shape[0] != b or rewards.shape[0] != b:
        raise InvalidArgument.for_field(
            "batch",
            f"real, synthetic, t and rewards need equal batch sizes, got "
            f"{b}, {x_syn.shape[0]}, {t.shape[0]}, {rewards.shape[0]}",
        )
    losses = per_sample_losses(
        model_fn,
        torch.cat([x_real, x_syn]),
        Cond.cat(cond_real, cond_syn),
        torch.cat([t, t]),
        torch.cat([noise_real, noise_syn]),
        scheduler,
    )
    l_real, l_syn = losses[:b], losses[b:]
    real_term = l_real.mean()
    syn_term = (rewards.detach().to(l_syn.dtype) * l_syn).mean()
    return RewardWeightedLoss(beta * real_term + syn_term, real_term.detach(), syn_term.detach())


@dataclass(frozen=True)
class PriorPreservationLoss:
    total: Tensor  # instance + λ_prior·prior
    instance: Tensor  # detached
    prior: Tensor  # detached


def prior_preservation_loss(
    model_fn: EpsFn,
    x0: Tensor,
    cond: Cond,
    noise: Tensor,
    t: Tensor,
    x0_prior: Tensor,
    cond_prior: Cond,
    noise_prior: Tensor,
    t_prior: Tensor,
    scheduler: Any,
    *,
    lambda_prior: float = 1.0,
) -> PriorPreservationLoss:
    """DreamBooth: E‖ε − ε_θ(z_t, t, c)‖² + λ_prior·E‖ε′ − ε_θ(z′_t, t′, c_class)‖².

    ``x0_prior`` are images the frozen model generated for the class prompt ``cond_prior``;
    they keep the fine-tuned model from forgetting the class. One forward pass for both halves.
    """
    b = x0.shape[0]
    losses = per_sample_losses(
        model_fn,
        torch.cat([x0, x0_prior]),
        Cond.cat(cond, cond_prior),
        torch.cat([t, t_prior]),
        torch.cat([noise, noise_prior]),
        scheduler,
    )
    inst, prior = losses[:b].mean(), losses[b:].mean()
    return PriorPreservationLoss(inst + lambda_prior * prior, inst.detach(), prior.detach())
