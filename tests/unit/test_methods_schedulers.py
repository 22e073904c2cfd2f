"""Sampler names → schedulers, and the error that teaches the valid names."""

from __future__ import annotations

import pytest
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.methods.schedulers import SAMPLERS, make_scheduler


def test_sampler_names() -> None:
    assert SAMPLERS == ("pndm", "ddim", "ddpm", "euler", "euler_ancestral", "dpmsolver++", "lms")


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("ddim", DDIMScheduler),
        ("ddpm", DDPMScheduler),
        ("dpmsolver++", DPMSolverMultistepScheduler),
        ("euler", EulerDiscreteScheduler),
        ("DDIM", DDIMScheduler),
    ],
)
def test_make_scheduler_builds_each(name: str, cls: type) -> None:
    sched = make_scheduler(name, {"num_train_timesteps": 500, "beta_schedule": "linear"})
    assert isinstance(sched, cls)
    assert sched.config.num_train_timesteps == 500


def test_dpmsolver_uses_dpmsolver_plus_plus() -> None:
    assert make_scheduler("dpmsolver++", {}).config.algorithm_type == "dpmsolver++"


def test_config_from_another_scheduler_class_keeps_the_noise_schedule() -> None:
    # A Stable Diffusion folder ships a PNDM config; its schedule must carry over.
    pndm = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = make_scheduler("euler", dict(pndm.config))
    assert sched.config.beta_schedule == "scaled_linear"
    assert sched.config.beta_end == pytest.approx(0.012)


def test_unknown_sampler_lists_valid_names() -> None:
    with pytest.raises(InvalidArgument) as err:
        make_scheduler("heun++", {})
    violation = err.value.violations[0]
    assert violation.field == "sampler"
    assert "heun++" in violation.description
    for name in SAMPLERS:
        assert name in violation.description
    assert err.value.code == "INVALID_ARGUMENT"
