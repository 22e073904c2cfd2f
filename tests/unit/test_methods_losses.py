"""Training objectives equal their manual computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.methods.losses import (
    diffusion_loss,
    per_sample_losses,
    prior_preservation_loss,
    reward_weighted_loss,
)
from clinisynth_server.methods.sampling import Cond, unet_eps_fn


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on 2 shared cores: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=3,
    ).eval()


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000)


def _manual(
    unet: UNet2DModel,
    sched: DDPMScheduler,
    x0: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    pred = unet(sched.add_noise(x0, noise, t), t, class_labels=y).sample
    return ((pred - noise) ** 2).mean(dim=(1, 2, 3))


def test_diffusion_loss_is_eps_mse(unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    y, t = torch.tensor([0, 1, 2]), torch.tensor([5, 400, 900])
    with torch.no_grad():
        got = diffusion_loss(unet_eps_fn(unet), x0, Cond(class_labels=y), t, noise, scheduler)
        pred = unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample
    assert float(got) == pytest.approx(float(F.mse_loss(pred, noise)), rel=1e-5)


def test_reward_weighted_loss_equals_manual(unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    g = torch.Generator().manual_seed(1)
    x_real, x_syn = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    n_real, n_syn = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    y_real, y_syn = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 0])
    t = torch.tensor([10, 250, 600, 990])
    rewards = torch.tensor([0.9, 0.1, 0.5, 0.73], requires_grad=True)
    out = reward_weighted_loss(
        unet_eps_fn(unet),
        x_real,
        Cond(class_labels=y_real),
        x_syn,
        Cond(class_labels=y_syn),
        rewards,
        t,
        n_real,
        n_syn,
        scheduler,
        beta=0.3,
    )
    l_real = _manual(unet, scheduler, x_real, y_real, t, n_real)  # the SAME t for both terms
    l_syn = _manual(unet, scheduler, x_syn, y_syn, t, n_syn)
    expected = 0.3 * l_real.mean() + (rewards.detach() * l_syn).mean()
    assert float(out.total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(out.real) == pytest.approx(float(l_real.mean().detach()), rel=1e-5)
    assert float(out.synthetic) == pytest.approx(float((rewards * l_syn).mean().detach()), rel=1e-5)
    out.total.backward()
    assert rewards.grad is None  # rewards are weights, not a training signal
    assert any(p.grad is not None for p in unet.parameters())
    unet.zero_grad(set_to_none=True)

    with pytest.raises(InvalidArgument):
        reward_weighted_loss(
            unet_eps_fn(unet),
            x_real,
            Cond(class_labels=y_real),
            x_syn[:3],
            Cond(class_labels=y_syn[:3]),
            rewards[:3],
            t,
            n_real,
            n_syn[:3],
            scheduler,
        )


def test_prior_preservation_equals_manual() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(2)
    z, z_prior = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    e, e_prior = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c, c_prior = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    t, t_prior = torch.tensor([100, 700]), torch.tensor([300, 50])
    with torch.no_grad():
        out = prior_preservation_loss(
            unet_eps_fn(unet),
            z,
            Cond(encoder_hidden_states=c),
            e,
            t,
            z_prior,
            Cond(encoder_hidden_states=c_prior),
            e_prior,
            t_prior,
            sched,
            lambda_prior=0.7,
        )

        def mse(x: torch.Tensor, n: torch.Tensor, tt: torch.Tensor, h: torch.Tensor) -> float:
            pred = unet(sched.add_noise(x, n, tt), tt, encoder_hidden_states=h).sample
            return float(F.mse_loss(pred, n))

        inst, prior = mse(z, e, t, c), mse(z_prior, e_prior, t_prior, c_prior)
    assert float(out.instance) == pytest.approx(inst, rel=1e-5)
    assert float(out.prior) == pytest.approx(prior, rel=1e-5)
    assert float(out.total) == pytest.approx(inst + 0.7 * prior, rel=1e-5)


def test_v_prediction_target(unet: UNet2DModel) -> None:
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x0, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([100, 800]), torch.tensor([0, 1])
    with torch.no_grad():
        got = per_sample_losses(unet_eps_fn(unet), x0, Cond(class_labels=y), t, noise, sched)
        pred = unet(sched.add_noise(x0, noise, t), t, class_labels=y).sample
        v = sched.get_velocity(x0, noise, t)
    assert torch.allclose(got, ((pred - v) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5)
