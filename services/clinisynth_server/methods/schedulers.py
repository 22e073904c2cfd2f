"""Sampler names → diffusers schedulers.

The sampling loop relies only on the small scheduler contract diffusers offers
(``set_timesteps``, ``timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``step``), so any
name here runs through the same loop. ``config`` is a scheduler config as stored next to a model
(``scheduler/scheduler_config.json`` in a diffusers folder, or ``scheduler.config``): it carries
the training noise schedule (``num_train_timesteps``, ``beta_schedule``, ``prediction_type`` …),
which every sampler must share with the model it drives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from clinisynth_server.errors import InvalidArgument

SAMPLERS: Final[tuple[str, ...]] = ("ddim", "ddpm", "dpmsolver++", "euler")
"""Valid sampler names, in the order shown to users."""

DDPM_SCHEDULE: Final[dict[str, Any]] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
}
"""The training noise schedule of models built or trained here, and of folders that ship none."""

STOCHASTIC_SAMPLERS: Final[frozenset[str]] = frozenset({"ddpm"})
"""Samplers that draw fresh noise every step (DDIM does too when ``eta > 0``)."""

# Keys that describe a *pipeline* or another scheduler class, not the noise schedule; dropped so
# that e.g. a PNDM config from a Stable Diffusion folder builds a clean DDIM scheduler.
_FOREIGN_KEYS: Final[frozenset[str]] = frozenset({"_class_name", "_diffusers_version"})


def make_scheduler(name: str, config: Mapping[str, Any] | None = None) -> SchedulerMixin:
    """Build a fresh scheduler for one request (multistep schedulers keep per-run state).

    ``config`` may be empty, in which case diffusers' defaults (1000 steps, linear β) are used.
    Raises ``InvalidArgument`` naming the field ``sampler`` when the name is unknown.
    """
    cfg = {k: v for k, v in dict(config or {}).items() if k not in _FOREIGN_KEYS}
    key = name.strip().lower()
    if key == "ddim":
        return DDIMScheduler.from_config(cfg)
    if key == "ddpm":
        return DDPMScheduler.from_config(cfg)
    if key == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++")
    if key == "euler":
        return EulerDiscreteScheduler.from_config(cfg)
    raise InvalidArgument.for_field(
        "sampler", f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}"
    )
