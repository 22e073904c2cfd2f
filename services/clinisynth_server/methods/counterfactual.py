"""Diffusion visual counterfactuals (DVCE-style guidance), docs/METHODS.md §4.

A real image x₀ is noised to the middle of a (respaced) diffusion chain and denoised again while
each reverse step's mean is pushed towards the target class y* and kept close to x₀.

Legend
    x₀       the input image (model space, [-1, 1]);   y*  the target class
    x_t      the current noisy sample;   ε̂ = ε_θ(x_t, t);   ᾱ_t  cumulative signal level
    x̂₀       predicted clean image (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t — gradients flow through ε_θ
    g_r      ∇_{x_t} log p_robust(y* | x̂₀)     (adversarially trained classifier)
    g_p      ∇_{x_t} log p_plain(y* | x̂₀)      (plain classifier)
    g_c      cone projection of g_r around g_p with half-angle α (see :func:`cone_project`)
    g_d      ∇_{x_t} d(x̂₀, x₀), d = L2 (fundus, λ_d = 0.5) or L1 (OCT, λ_d = 0.15)
    μ, Σ     mean and variance of p(x_{t−1} | x_t) (DDPM posterior given x̂₀)
    g        λ_c·‖μ‖·unit(g_c) − λ_d·‖μ‖·unit(g_d);   x_{t−1} ~ N(μ + Σ⊙g, Σ)

Structure: the gradients need autograd through denoiser and classifiers, which cannot cross an
RPC, so :func:`guidance_gradients` does all the model work of one step (a Triton model wraps it)
and :func:`run_counterfactual` is the loop around a ``GuideFn`` callable — in process here, or
Triton-backed in the counterfactual service.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from clinisynth_server.errors import Cancelled, InvalidArgument
from clinisynth_server.methods.sampling import Cond, EpsFn, make_generators, predict_x0

MODES: Final[tuple[str, ...]] = ("cone", "robust_only", "plain_only")
DISTANCES: Final[tuple[str, ...]] = ("l2", "l1")

ClassifierFn = Callable[[Tensor], Tensor]
"""Images in [0, 1] → logits (temperature-scaled). Put BatchNorm models in eval mode."""


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _unit(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-sample unit vector (zero stays zero)."""
    norm = _flat(x).norm(dim=1).clamp_min(eps)
    return x / norm.view(-1, *([1] * (x.ndim - 1)))


def cone_project(g_r: Tensor, g_p: Tensor, alpha_deg: float) -> Tensor:
    """g_c per sample: u = g_p/‖g_p‖; u if ∠(g_r, g_p) ≤ α, else u + tan(α)·v.

    v = unit(g_r − ⟨g_r, u⟩u) is the part of the robust gradient orthogonal to the plain one, so
    outside the cone g_c lies on the cone's boundary (∠(g_c, g_p) = α) in the plane of g_r and
    g_p; inside it the plain direction is kept (as in the DVCE code). ‖g_c‖ = 1 inside and 1/cos α
    outside; callers use unit(g_c).
    """
    if not 0.0 <= alpha_deg < 90.0:
        raise InvalidArgument.for_field("alpha_deg", f"must be in [0, 90), got {alpha_deg}")
    r, p = _flat(g_r).float(), _flat(g_p).float()
    u = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (r * u).sum(1) / r.norm(dim=1).clamp_min(1e-12)
    angle = torch.acos(cos.clamp(-1.0, 1.0))
    alpha = math.radians(alpha_deg)
    v = r - (r * u).sum(1, keepdim=True) * u
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    outside = (angle > alpha).unsqueeze(1)
    g_c = torch.where(outside, u + math.tan(alpha) * v, u)
    return g_c.reshape(g_r.shape).to(g_r.dtype)


def angle_deg(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample angle between two batches of vectors, in degrees."""
    a, b = _flat(a).double(), _flat(b).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def distance(x0_hat: Tensor, x0: Tensor, kind: str = "l2") -> Tensor:
    """Per-sample d(x̂₀, x₀): ‖·‖₂ or ‖·‖₁ of the difference, shape ``(B,)``."""
    diff = _flat(x0_hat - x0)
    if kind == "l2":
        return diff.norm(dim=1)
    if kind == "l1":
        return diff.abs().sum(dim=1)
    raise InvalidArgument.for_field("distance", f"{kind!r} is not one of {', '.join(DISTANCES)}")


def guided_mean(
    mu: Tensor, sigma: Tensor, g_c: Tensor, g_d: Tensor, lambda_c: float, lambda_d: float
) -> Tensor:
    """μ + Σ⊙g with g = λ_c·‖μ‖·unit(g_c) − λ_d·‖μ‖·unit(g_d) (norms per sample).

    ``sigma`` is the variance Σ, per element or broadcastable (``(B, 1, 1, 1)``, scalar).
    """
    mu_norm = _flat(mu).norm(dim=1).view(-1, *([1] * (mu.ndim - 1)))
    g = lambda_c * mu_norm * _unit(g_c) - lambda_d * mu_norm * _unit(g_d)
    return mu + sigma * g


# ---------------------------------------------------------------------------------------------
# one step's model work (what a Triton model wraps)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuidanceGradients:
    """Everything the loop needs from the models at one step; gradients are w.r.t. x_t."""

    eps: Tensor  # ε̂(x_t, t)
    x0_hat: Tensor  # predicted clean image (unclipped)
    logits_robust: Tensor | None
    logits_plain: Tensor | None
    g_r: Tensor | None  # None when the mode does not use it
    g_p: Tensor | None
    g_d: Tensor


def guidance_gradients(
    denoiser: EpsFn,
    robust_clf: ClassifierFn | None,
    plain_clf: ClassifierFn | None,
    x_t: Tensor,
    t: Tensor,
    x0_input: Tensor,
    target: Tensor,
    *,
    alpha_bar_t: Tensor | float,
    distance_kind: str = "l2",
    mode: str = "cone",
    cond: Cond | None = None,
) -> GuidanceGradients:
    """Back-propagate log p(y* | x̂₀) (both classifiers) and d(x̂₀, x₀) through ε_θ to x_t.

    ``x_t``, ``x0_input``: ``(B, C, H, W)`` in model space [-1, 1]; classifiers see (x̂₀ + 1)/2,
    unclipped so saturated pixels still pass gradient. ``t``: ``(B,)`` model timesteps;
    ``alpha_bar_t``: ᾱ_t, float or ``(B,)``; ``target``: ``(B,)`` class ids y*.
    Classifiers present but unused by ``mode`` still report logits (for probability traces).
    """
    _check_mode(mode, robust_clf, plain_clf)
    if distance_kind not in DISTANCES:
        raise InvalidArgument.for_field(
            "distance", f"{distance_kind!r} is not one of {', '.join(DISTANCES)}"
        )
    need_r = mode in ("cone", "robust_only")
    need_p = mode in ("cone", "plain_only")
    target = target.long().to(x_t.device)
    rows = torch.arange(x_t.shape[0], device=x_t.device)

    with torch.enable_grad():
        # 1. x̂₀(x_t) through the denoiser, keeping the graph.
        x = x_t.detach().clone().requires_grad_(True)
        eps = denoiser(x, t, cond or Cond())
        x0_hat = predict_x0(x, eps, alpha_bar_t)
        x_clf = (x0_hat + 1) / 2

        # 2. Classifier log-probabilities of y* and the distance to the input.
        logits_r = robust_clf(x_clf) if robust_clf is not None else None
        logits_p = plain_clf(x_clf) if plain_clf is not None else None
        d = distance(x0_hat, x0_input.to(x0_hat.dtype), distance_kind).sum()

        # 3. Gradients w.r.t. x_t (per-sample terms summed: samples are independent).
        objectives: list[Tensor] = []
        if need_r and logits_r is not None:
            objectives.append(F.log_softmax(logits_r, dim=1)[rows, target].sum())
        if need_p and logits_p is not None:
            objectives.append(F.log_softmax(logits_p, dim=1)[rows, target].sum())
        objectives.append(d)
        last = len(objectives) - 1
        grads = [
            torch.autograd.grad(o, x, retain_graph=i < last)[0] for i, o in enumerate(objectives)
        ]

    g_d = grads.pop()
    g_r = grads.pop(0) if need_r else None
    g_p = grads.pop(0) if need_p else None
    return GuidanceGradients(
        eps=eps.detach(),
        x0_hat=x0_hat.detach(),
        logits_robust=None if logits_r is None else logits_r.detach(),
        logits_plain=None if logits_p is None else logits_p.detach(),
        g_r=g_r,
        g_p=g_p,
        g_d=g_d,
    )


def _check_mode(mode: str, robust: object | None, plain: object | None) -> None:
    if mode not in MODES:
        raise InvalidArgument.for_field("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    if mode in ("cone", "robust_only") and robust is None:
        raise InvalidArgument.for_field("mode", f"{mode!r} needs the robust classifier")
    if mode in ("cone", "plain_only") and plain is None:
        raise InvalidArgument.for_field("mode", f"{mode!r} needs the plain classifier")


class GuideFn(Protocol):
    """One step's model work: ``(x_t, t, ᾱ_t, x₀, y*) → GuidanceGradients``."""

    def __call__(
        self, x_t: Tensor, t: Tensor, alpha_bar_t: Tensor, x0_input: Tensor, target: Tensor
    ) -> GuidanceGradients: ...


def make_guide_fn(
    denoiser: EpsFn,
    robust_clf: ClassifierFn | None,
    plain_clf: ClassifierFn | None,
    *,
    distance_kind: str = "l2",
    mode: str = "cone",
) -> GuideFn:
    """Bind in-process models into a :class:`GuideFn` (the service binds Triton calls instead)."""
    _check_mode(mode, robust_clf, plain_clf)

    def guide(
        x_t: Tensor, t: Tensor, alpha_bar_t: Tensor, x0_input: Tensor, target: Tensor
    ) -> GuidanceGradients:
        return guidance_gradients(
            denoiser,
            robust_clf,
            plain_clf,
            x_t,
            t,
            x0_input,
            target,
            alpha_bar_t=alpha_bar_t,
            distance_kind=distance_kind,
            mode=mode,
        )

    return guide


# ---------------------------------------------------------------------------------------------
# the reference loop
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CounterfactualConfig:
    """Knobs with the published defaults (fundus: L2, λ_d = 0.5; OCT: L1, λ_d = 0.15)."""

    steps: int = 200  # respaced chain length (ADM: 1000 training steps → 200)
    depth: float = 0.5  # fraction of the chain re-run: 0.5 = noise x₀ to the middle
    lambda_c: float = 0.1
    alpha_deg: float = 30.0
    distance: str = "l2"
    lambda_d: float = 0.5
    mode: str = "cone"
    variance: str = "small"  # Σ: "small" = posterior β̃_t, "large" = β_t (ADM fixed variances)
    clip_x0: bool = True  # clip x̂₀ to [-1, 1] for the posterior mean (ADM clip_denoised)

    @classmethod
    def fundus(cls, **overrides: Any) -> CounterfactualConfig:
        return cls(**{"distance": "l2", "lambda_d": 0.5, **overrides})

    @classmethod
    def oct(cls, **overrides: Any) -> CounterfactualConfig:
        return cls(**{"distance": "l1", "lambda_d": 0.15, **overrides})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InvalidArgument.for_field("steps", f"must be ≥ 1, got {self.steps}")
        if not 0.0 < self.depth <= 1.0:
            raise InvalidArgument.for_field("depth", f"must be in (0, 1], got {self.depth}")
        if self.distance not in DISTANCES:
            raise InvalidArgument.for_field(
                "distance", f"{self.distance!r} is not one of {', '.join(DISTANCES)}"
            )
        if self.mode not in MODES:
            raise InvalidArgument.for_field(
                "mode", f"{self.mode!r} is not one of {', '.join(MODES)}"
            )
        if self.variance not in ("small", "large"):
            raise InvalidArgument.for_field("variance", f"{self.variance!r} is not small or large")
        if not 0.0 <= self.alpha_deg < 90.0:
            raise InvalidArgument.for_field(
                "alpha_deg", f"must be in [0, 90), got {self.alpha_deg}"
            )
        for name in ("lambda_c", "lambda_d"):
            if getattr(self, name) < 0:
                raise InvalidArgument.for_field(name, f"must be ≥ 0, got {getattr(self, name)}")

    @property
    def reverse_steps(self) -> int:
        return max(1, round(self.steps * self.depth))


@dataclass(frozen=True)
class RespacedSchedule:
    """A chain of ``steps`` model timesteps out of the training schedule (ADM respacing)."""

    timesteps: Tensor  # (S,) int64, ascending model timesteps
    alpha_bar: Tensor  # (S,) ᾱ at those timesteps
    alpha_bar_prev: Tensor  # (S,) ᾱ of the previous kept timestep (1 before the first)
    beta: Tensor  # (S,) 1 − ᾱ/ᾱ_prev
    posterior_variance: Tensor  # (S,) β̃ = β·(1 − ᾱ_prev)/(1 − ᾱ), first entry clipped to β̃₁


def respace(alphas_cumprod: Tensor, steps: int) -> RespacedSchedule:
    """Evenly spaced timesteps 0 … T−1 (improved-diffusion's ``space_timesteps(T, str(steps))``)."""
    n = alphas_cumprod.shape[0]
    if not 1 <= steps <= n:
        raise InvalidArgument.for_field("steps", f"must be in [1, {n}], got {steps}")
    ts = torch.linspace(0, n - 1, steps).round().long() if steps > 1 else torch.tensor([n - 1])
    ab = alphas_cumprod.double()[ts]
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    beta = 1 - ab / ab_prev
    post = beta * (1 - ab_prev) / (1 - ab)
    if steps > 1:
        post[0] = post[1]
    return RespacedSchedule(ts, ab, ab_prev, beta, post)


@dataclass(frozen=True)
class CounterfactualStep:
    index: int  # 0-based step of the reverse run
    total: int
    timestep: int
    x0_pred: Tensor  # x̂₀ of this step (model space)
    prob_robust: Tensor  # (B,) p_robust(y* | x̂₀), NaN without that classifier
    prob_plain: Tensor


@dataclass(frozen=True)
class CounterfactualResult:
    image: Tensor  # x̂₀ at the last step, clipped to [-1, 1]
    final_sample: Tensor  # x after the last guided update
    difference: Tensor  # image − x₀ (signed, model space)
    prob_robust: Tensor  # (steps, B) target probability at each step's x̂₀ (NaN if absent)
    prob_plain: Tensor
    timesteps: tuple[int, ...]  # model timesteps visited, first to last


FLIP_THRESHOLD: Final = 0.5
"""The robust classifier "shows" the target class when P(target) exceeds this."""


@dataclass(frozen=True)
class FlipVerdict:
    """What a counterfactual achieved, judged by the robust classifier.

    Why separate ``already_target``: an input the classifier already assigns to the target
    cannot be *flipped* to it; calling it flipped would inflate flip rates. Such an edit still
    runs (it strengthens or reshapes the target's evidence); ``delta`` says by how much.
    """

    already_target: bool  # P(target | input) > threshold
    flipped: bool  # not already the target, and P(target | counterfactual) > threshold
    delta: float  # P(target | counterfactual) − P(target | input)


def flip_verdict(p_before: float, p_after: float, threshold: float = FLIP_THRESHOLD) -> FlipVerdict:
    """Judge one counterfactual from the robust classifier's P(target) before and after.

    A NaN probability never counts as showing the target (comparisons with NaN are false).
    """
    already = p_before > threshold
    return FlipVerdict(
        already_target=already,
        flipped=not already and p_after > threshold,
        delta=p_after - p_before,
    )


def _target_prob(logits: Tensor | None, target: Tensor) -> Tensor:
    if logits is None:
        return torch.full((target.shape[0],), math.nan)
    return logits.float().softmax(1)[torch.arange(target.shape[0]), target.to(logits.device)].cpu()


def run_counterfactual(
    guide_fn: GuideFn,
    x0: Tensor,
    target: Tensor,
    alphas_cumprod: Tensor,
    *,
    config: CounterfactualConfig = CounterfactualConfig(),
    seeds: Sequence[int] = (0,),
    on_step: Callable[[CounterfactualStep], bool | None] | None = None,
) -> CounterfactualResult:
    """Edit ``x0`` ((B, C, H, W), [-1, 1]) towards classes ``target`` ((B,)); one seed per image.

    ``alphas_cumprod``: the denoiser's training ᾱ (``scheduler.alphas_cumprod``). ``on_step``
    returning ``False`` (or raising) stops the loop with :class:`Cancelled`.
    """
    # 1. Settings and the respaced chain.
    if len(seeds) != x0.shape[0] or target.shape[0] != x0.shape[0]:
        raise InvalidArgument.for_field(
            "seeds", f"need one seed and one target per image ({x0.shape[0]} images)"
        )
    device, dtype = x0.device, x0.dtype
    sched = respace(alphas_cumprod.cpu(), config.steps)
    k = min(config.reverse_steps, config.steps)
    variances = (
        sched.posterior_variance
        if config.variance == "small"
        else torch.cat([sched.posterior_variance[:1], sched.beta[1:]])
    )
    generators = make_generators(seeds)
    batch = x0.shape[0]
    shape = (1, *x0.shape[1:])

    def noise() -> Tensor:
        return torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)

    # 2. Start: x_t ~ q(x_t | x₀) at the middle of the chain (skip the first steps − k steps).
    ab_start = float(sched.alpha_bar[k - 1])
    x = math.sqrt(ab_start) * x0 + math.sqrt(1 - ab_start) * noise()

    # 3. The reverse steps i = k−1 … 0 with guided means.
    probs_r: list[Tensor] = []
    probs_p: list[Tensor] = []
    visited: list[int] = []
    x0_hat = x0
    for n_done, i in enumerate(range(k - 1, -1, -1)):
        t_model = int(sched.timesteps[i])
        ab, ab_prev, beta = (
            float(v[i]) for v in (sched.alpha_bar, sched.alpha_bar_prev, sched.beta)
        )
        t_batch = torch.full((batch,), t_model, dtype=torch.long, device=device)
        ab_batch = torch.full((batch,), ab, dtype=dtype, device=device)

        # 3a. Model work: ε̂, x̂₀, logits, g_r, g_p, g_d (autograd through ε_θ).
        grads = guide_fn(x, t_batch, ab_batch, x0, target)
        x0_hat = grads.x0_hat.clamp(-1, 1) if config.clip_x0 else grads.x0_hat

        # 3b. DDPM posterior q(x_{t−1} | x_t, x̂₀): mean μ, variance Σ.
        coef_x0 = beta * math.sqrt(ab_prev) / (1 - ab)
        coef_xt = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
        mu = coef_x0 * x0_hat + coef_xt * x
        sigma = float(variances[i])

        # 3c. g_c by mode, then μ + Σ⊙g.
        if config.mode == "cone":
            assert grads.g_r is not None and grads.g_p is not None
            g_c = cone_project(grads.g_r, grads.g_p, config.alpha_deg)
        elif config.mode == "robust_only":
            assert grads.g_r is not None
            g_c = grads.g_r
        else:
            assert grads.g_p is not None
            g_c = grads.g_p
        mean = guided_mean(
            mu,
            torch.tensor(sigma, dtype=dtype, device=device),
            g_c,
            grads.g_d,
            config.lambda_c,
            config.lambda_d,
        )

        # 3d. x_{t−1} ~ N(μ + Σ⊙g, Σ); no noise on the last step.
        x = mean + math.sqrt(sigma) * noise() if i > 0 else mean

        # 3e. Traces, progress, cancellation.
        probs_r.append(_target_prob(grads.logits_robust, target))
        probs_p.append(_target_prob(grads.logits_plain, target))
        visited.append(t_model)
        if on_step is not None:
            info = CounterfactualStep(n_done, k, t_model, x0_hat, probs_r[-1], probs_p[-1])
            if on_step(info) is False:
                raise Cancelled(
                    f"counterfactual stopped by the caller after step {n_done + 1} of {k}",
                    metadata={"step": str(n_done + 1), "total": str(k)},
                )

    # 4. Output: x̂₀ of the last step and its difference to the input.
    image = x0_hat.clamp(-1, 1).detach()
    return CounterfactualResult(
        image=image,
        final_sample=x.detach(),
        difference=(image - x0).detach(),
        prob_robust=torch.stack(probs_r),
        prob_plain=torch.stack(probs_p),
        timesteps=tuple(visited),
    )
