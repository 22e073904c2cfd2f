"""DVCE guidance: cone geometry (property-based), guided mean, gradients, the reference loop."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from clinisynth_server.errors import Cancelled, InvalidArgument
from clinisynth_server.methods.classifier import Classifier, ClassifierConfig
from clinisynth_server.methods.counterfactual import (
    CounterfactualConfig,
    angle_deg,
    cone_project,
    flip_verdict,
    guidance_gradients,
    guided_mean,
    make_guide_fn,
    respace,
    run_counterfactual,
)
from clinisynth_server.methods.sampling import Cond, predict_x0, unet_eps_fn


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on 2 shared cores: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# cone projection geometry
# ---------------------------------------------------------------------------------------------

_vectors = st.integers(min_value=2, max_value=12).flatmap(
    lambda d: st.tuples(
        st.lists(st.floats(-10, 10, allow_nan=False), min_size=d, max_size=d),
        st.lists(st.floats(-10, 10, allow_nan=False), min_size=d, max_size=d),
    )
)


@settings(max_examples=300, deadline=None)
@given(vecs=_vectors, alpha=st.floats(min_value=1.0, max_value=80.0))
def test_cone_projection_geometry(vecs: tuple[list[float], list[float]], alpha: float) -> None:
    g_r = torch.tensor([vecs[0]], dtype=torch.float64)
    g_p = torch.tensor([vecs[1]], dtype=torch.float64)
    if g_r.norm() < 1e-3 or g_p.norm() < 1e-3:
        return
    before = float(angle_deg(g_r, g_p))
    g_c = cone_project(g_r, g_p, alpha)
    u = g_p / g_p.norm()
    after = float(angle_deg(g_c, g_p))
    assert after <= alpha + 1e-4  # always inside the cone around the plain gradient
    if before <= alpha - 1e-6:
        assert torch.allclose(g_c, u, atol=1e-9)  # inside: the plain direction, unit norm
        assert float(g_c.norm()) == pytest.approx(1.0)
    elif before > alpha + 1e-6:
        r_perp = g_r - (g_r * u).sum() * u
        if float(r_perp.norm()) < 1e-6 * float(g_r.norm()):
            return  # g_r anti-parallel to g_p: v is undefined, nothing more to check
        assert after == pytest.approx(alpha, abs=1e-4)  # on the boundary
        assert float(g_c.norm()) == pytest.approx(1 / math.cos(math.radians(alpha)), rel=1e-6)
        # in the plane of g_r and g_p, turned from g_p towards g_r
        assert float(angle_deg(g_c, g_r)) == pytest.approx(before - alpha, abs=1e-3)


def test_cone_projection_is_per_sample_and_shape_preserving() -> None:
    g_p = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 1, 1, 2)
    g_r = torch.tensor([[1.0, 0.1], [0.0, 1.0]]).view(2, 1, 1, 2)  # inside / outside at 30°
    g_c = cone_project(g_r, g_p, 30.0)
    assert g_c.shape == (2, 1, 1, 2)
    assert torch.allclose(g_c[0].flatten(), torch.tensor([1.0, 0.0]))
    assert torch.allclose(g_c[1].flatten(), torch.tensor([1.0, math.tan(math.radians(30))]))
    with pytest.raises(InvalidArgument):
        cone_project(g_r, g_p, 90.0)


def test_guided_mean_formula() -> None:
    torch.manual_seed(0)
    mu, g_c, g_d = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    sigma = torch.rand(2, 1, 3, 3)
    out = guided_mean(mu, sigma, g_c, g_d, 0.1, 0.5)
    for i in range(2):
        n = mu[i].norm()
        g = 0.1 * n * g_c[i] / g_c[i].norm() - 0.5 * n * g_d[i] / g_d[i].norm()
        assert torch.allclose(out[i], mu[i] + sigma[i] * g, atol=1e-6)


def test_respace_matches_improved_diffusion() -> None:
    ab = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    sched = respace(ab, 200)
    assert sched.timesteps[0] == 0 and sched.timesteps[-1] == 999 and len(sched.timesteps) == 200
    # the respaced chain has the same marginals ᾱ at the kept steps
    assert torch.allclose(torch.cumprod(1 - sched.beta, 0), sched.alpha_bar, rtol=1e-9)
    assert float(sched.posterior_variance[0]) == float(sched.posterior_variance[1])


# ---------------------------------------------------------------------------------------------
# a toy problem with an exact denoiser
# ---------------------------------------------------------------------------------------------


class GaussianDenoiser(nn.Module):
    """The optimal ε-predictor for data x₀ ~ N(m, s²·I): E[ε | x_t] in closed form."""

    def __init__(self, alphas_cumprod: Tensor, m: float = 0.0, s: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("ab", alphas_cumprod.float())
        self.m, self.s = m, s

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() / (ab * self.s**2 + 1 - ab) * (x_t - ab.sqrt() * self.m)


class BrightnessClassifier(nn.Module):
    """Class 1 = bright: logits ±w·(mean over a pixel mask − 0.5). Images in [0, 1]."""

    def __init__(self, mask: Tensor, w: float = 8.0) -> None:
        super().__init__()
        self.register_buffer("mask", mask / mask.sum())
        self.w = w

    def forward(self, x: Tensor) -> Tensor:
        z = self.w * ((x * self.mask).flatten(1).sum(1) - 0.5)
        return torch.stack([-z, z], dim=1)


@pytest.fixture(scope="module")
def toy() -> dict:
    ab = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    everywhere = torch.ones(1, 8, 8)
    left = torch.zeros(1, 8, 8)
    left[..., :4] = 1.0  # the "plain" classifier looks at the left half only (45° from robust)
    g = torch.Generator().manual_seed(0)
    x0 = (-0.5 + 0.1 * torch.randn(2, 1, 8, 8, generator=g)).clamp(-1, 1)  # dark images
    return {
        "ab": ab,
        "denoiser": GaussianDenoiser(ab),
        "robust": BrightnessClassifier(everywhere),
        "plain": BrightnessClassifier(left),
        "x0": x0,
        "target": torch.tensor([1, 1]),
    }


def test_guidance_gradients_match_autograd_by_hand(toy: dict) -> None:
    x_t = torch.randn(2, 1, 8, 8)
    t = torch.tensor([300, 300])
    ab = toy["ab"][t]
    out = guidance_gradients(
        toy["denoiser"],
        toy["robust"],
        toy["plain"],
        x_t,
        t,
        toy["x0"],
        toy["target"],
        alpha_bar_t=ab,
        distance_kind="l1",
    )
    x = x_t.clone().requires_grad_(True)
    x0_hat = predict_x0(x, toy["denoiser"](x, t, Cond()), ab)
    lp = torch.log_softmax(toy["robust"]((x0_hat + 1) / 2), 1)[:, 1].sum()
    (g_r,) = torch.autograd.grad(lp, x)
    x = x_t.clone().requires_grad_(True)
    x0_hat = predict_x0(x, toy["denoiser"](x, t, Cond()), ab)
    (g_d,) = torch.autograd.grad((x0_hat - toy["x0"]).abs().sum(), x)
    assert out.g_r is not None and torch.allclose(out.g_r, g_r, atol=1e-6)
    assert torch.allclose(out.g_d, g_d, atol=1e-6)
    assert out.g_p is not None and out.logits_plain is not None
    assert out.logits_robust is not None and out.logits_robust.shape == (2, 2)
    assert out.eps.shape == x_t.shape and not out.eps.requires_grad

    only_r = guidance_gradients(
        toy["denoiser"],
        toy["robust"],
        None,
        x_t,
        t,
        toy["x0"],
        toy["target"],
        alpha_bar_t=ab,
        mode="robust_only",
    )
    assert only_r.g_p is None and only_r.logits_plain is None
    with pytest.raises(InvalidArgument) as err:
        guidance_gradients(
            toy["denoiser"],
            toy["robust"],
            None,
            x_t,
            t,
            toy["x0"],
            toy["target"],
            alpha_bar_t=ab,
            mode="cone",
        )
    assert err.value.violations[0].field == "mode"


def _p_target(clf: nn.Module, image: Tensor) -> Tensor:
    with torch.no_grad():
        return clf((image + 1) / 2).softmax(1)[:, 1]


def _run(toy: dict, **knobs: object) -> Tensor:
    mode = str(knobs.get("mode", "cone"))
    guide = make_guide_fn(toy["denoiser"], toy["robust"], toy["plain"], mode=mode)
    config = CounterfactualConfig(steps=40, depth=0.5, **knobs)  # type: ignore[arg-type]
    return run_counterfactual(
        guide, toy["x0"], toy["target"], toy["ab"], config=config, seeds=[1, 2]
    )


@pytest.mark.parametrize("mode", ["cone", "robust_only", "plain_only"])
def test_counterfactual_loop_raises_target_probability(toy: dict, mode: str) -> None:
    result = _run(toy, mode=mode)  # published knobs: λ_c 0.1, α 30°, L2 / λ_d 0.5
    unguided = _run(toy, mode=mode, lambda_c=0.0)
    strong = _run(toy, mode=mode, lambda_c=0.5)
    judge = toy["plain"] if mode == "plain_only" else toy["robust"]  # the guiding classifier
    p_in = _p_target(judge, toy["x0"])
    p_free = _p_target(judge, unguided.image)
    p_out = _p_target(judge, result.image)
    p_strong = _p_target(judge, strong.image)
    assert bool((p_out > p_in + 0.2).all()), (p_in, p_out)
    assert bool((p_out > p_free + 0.03).all()), (p_free, p_out)
    assert bool((p_strong > p_free + 0.2).all()), (p_free, p_strong)
    assert result.prob_robust.shape == (20, 2) and result.prob_plain.shape == (20, 2)
    assert bool(((result.prob_plain >= 0) & (result.prob_plain <= 1)).all())
    trace = result.prob_plain if mode == "plain_only" else result.prob_robust
    assert torch.allclose(trace[-1], p_out, atol=1e-3)  # the trace ends at the output
    assert torch.allclose(result.difference, result.image - toy["x0"])
    assert list(result.timesteps) == sorted(result.timesteps, reverse=True)


def test_distance_term_keeps_the_edit_close(toy: dict) -> None:
    def dist(r: object) -> Tensor:
        return (r.image - toy["x0"]).flatten(1).norm(dim=1)  # type: ignore[attr-defined]

    loose = _run(toy, lambda_c=0.3, lambda_d=0.0)
    tight = _run(toy, lambda_c=0.3, lambda_d=1.0)
    assert bool((dist(tight) < dist(loose)).all())


def test_counterfactual_is_deterministic_per_seed_and_cancellable(toy: dict) -> None:
    config = CounterfactualConfig.oct(steps=20)
    assert (config.distance, config.lambda_d) == ("l1", 0.15)
    guide = make_guide_fn(toy["denoiser"], toy["robust"], toy["plain"], distance_kind="l1")
    a = run_counterfactual(guide, toy["x0"], toy["target"], toy["ab"], config=config, seeds=[3, 4])
    b = run_counterfactual(
        guide, toy["x0"][1:], toy["target"][1:], toy["ab"], config=config, seeds=[4]
    )
    assert (a.image[1:] - b.image).abs().max() < 1e-5

    calls = 0

    def counting(*args: Tensor) -> object:
        nonlocal calls
        calls += 1
        return guide(*args)

    with pytest.raises(Cancelled):
        run_counterfactual(
            counting,
            toy["x0"],
            toy["target"],
            toy["ab"],
            config=config,
            seeds=[3, 4],
            on_step=lambda s: s.index < 1,
        )
    assert calls == 2


def test_guidance_through_a_real_unet_and_classifiers() -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    robust = Classifier(ClassifierConfig(num_classes=2, in_channels=1, backbone_width=4)).eval()
    plain = Classifier(ClassifierConfig(num_classes=2, in_channels=1, backbone_width=4)).eval()
    x0 = torch.rand(2, 1, 16, 16) * 2 - 1
    ab = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    guide = make_guide_fn(unet_eps_fn(unet), robust, plain)
    result = run_counterfactual(
        guide,
        x0,
        torch.tensor([0, 1]),
        ab,
        config=CounterfactualConfig(steps=10, depth=0.3),
        seeds=[0, 1],
    )
    assert result.image.shape == (2, 1, 16, 16)
    assert torch.isfinite(result.image).all() and torch.isfinite(result.prob_robust).all()
    assert result.prob_robust.shape == (3, 2)


# ---------------------------------------------------------------------------------------------
# flip verdict
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "already", "flipped"),
    [
        (0.1, 0.9, False, True),  # healthy → target: a flip
        (0.1, 0.4, False, False),  # pushed, not across
        (0.8, 0.95, True, False),  # already the target: nothing to flip, even though after > 0.5
        (0.8, 0.3, True, False),  # already the target and pushed away
        (0.5, 0.51, False, True),  # 0.5 itself does not show the target
        (math.nan, 0.9, False, True),  # no probability of the input: judged by the result
    ],
)
def test_flip_verdict_never_flips_an_input_already_the_target(
    before: float, after: float, already: bool, flipped: bool
) -> None:
    verdict = flip_verdict(before, after)
    assert (verdict.already_target, verdict.flipped) == (already, flipped)
    if not math.isnan(before):
        assert verdict.delta == pytest.approx(after - before)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1))
def test_flip_verdict_flipped_and_already_target_exclude_each_other(
    before: float, after: float
) -> None:
    verdict = flip_verdict(before, after)
    assert not (verdict.flipped and verdict.already_target)
    assert verdict.flipped == (before <= 0.5 < after)
