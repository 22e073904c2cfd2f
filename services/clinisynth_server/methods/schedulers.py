"""Sampler names → diffusers schedulers.

The sampling loop relies only on the small scheduler contract diffusers offers
(``set_timesteps``, ``timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``step``), so any
name here runs through the same loop. ``config`` is a scheduler config as stored next to a model
(``scheduler/scheduler_config.json`` in a diffusers folder, or ``scheduler.config``): it carries
the training noise schedule and the sampling conventions (``num_train_timesteps``,
``beta_schedule``, ``prediction_type``, ``timestep_spacing``, ``steps_offset`` …), which every
sampler keeps: a named sampler is that class ``from_config`` of the model's own config, exactly as
diffusers users swap schedulers (``pipe.scheduler = EulerDiscreteScheduler.from_config(...)``).

diffusers is imported only when a scheduler is built, so the catalog and option validation can
import the names without loading torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from clinisynth_server.errors import InvalidArgument

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# Sampler name → diffusers scheduler class, in the order shown to users. PNDM first: it is what
# Stable Diffusion 1.x folders ship.
_CLASSES: Final[dict[str, str]] = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}

# LMS integrates its coefficients with scipy; without scipy diffusers cannot build it.
_NEEDS_SCIPY: Final[frozenset[str]] = frozenset({"lms"})
_HAVE_SCIPY: Final[bool] = importlib.util.find_spec("scipy") is not None

SAMPLERS: Final[tuple[str, ...]] = tuple(
    name for name in _CLASSES if _HAVE_SCIPY or name not in _NEEDS_SCIPY
)
"""Valid sampler names on this installation, in the order shown to users."""

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

STOCHASTIC_SAMPLERS: Final[frozenset[str]] = frozenset({"ddpm", "euler_ancestral"})
"""Samplers that draw fresh noise every step (DDIM does too when ``eta > 0``); the loop hands
them the per-image generators, so each image's noise depends on its own seed only."""

# Keys that describe a *pipeline* or another scheduler class, not the noise schedule; dropped so
# that e.g. a PNDM config from a Stable Diffusion folder builds a clean DDIM scheduler.
_FOREIGN_KEYS: Final[frozenset[str]] = frozenset({"_class_name", "_diffusers_version"})


def _unknown(name: str) -> InvalidArgument:
    missing = "" if _HAVE_SCIPY else " (lms needs scipy, which is not installed)"
    return InvalidArgument.for_field(
        "sampler", f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}{missing}"
    )


def check_sampler(name: str) -> str:
    """The canonical (lower-case) sampler name; ``InvalidArgument`` on ``sampler`` otherwise."""
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise _unknown(name)
    return key


def sampler_of_config(config: Mapping[str, Any]) -> str | None:
    """The sampler name of a folder's own scheduler (its ``_class_name``), ``None`` if not ours.

    Used at registration so a folder's default sampler is the one diffusers' pipeline would run.
    A DPM-Solver config only maps to ``dpmsolver++`` when that is its algorithm (the default).
    """
    cls = config.get("_class_name")
    for name in SAMPLERS:
        if _CLASSES[name] == cls:
            if name == "dpmsolver++" and config.get("algorithm_type", name) != name:
                return None
            return name
    return None


def make_scheduler(name: str, config: Mapping[str, Any] | None = None) -> SchedulerMixin:
    """Build a fresh scheduler for one request (multistep schedulers keep per-run state).

    ``config`` may be empty, in which case diffusers' defaults (1000 steps, linear β) are used.
    Raises ``InvalidArgument`` naming the field ``sampler`` when the name is unknown.
    """
    key = check_sampler(name)
    cfg = {k: v for k, v in dict(config or {}).items() if k not in _FOREIGN_KEYS}
    cls = getattr(importlib.import_module("diffusers"), _CLASSES[key])
    if key == "dpmsolver++":
        scheduler: SchedulerMixin = cls.from_config(cfg, algorithm_type="dpmsolver++")
    else:
        scheduler = cls.from_config(cfg)
    return scheduler
