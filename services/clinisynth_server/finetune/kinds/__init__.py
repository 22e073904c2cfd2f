"""The job kinds, by name. Each module holds one kind: its parameter specs, check and trainer."""

from __future__ import annotations

from clinisynth_server.finetune.kinds import (
    classifier,
    diffusion_pretrain,
    reward_finetune,
    reward_model,
    text_to_image_adaptation,
)
from clinisynth_server.finetune.kinds.base import KindSpec

KINDS: dict[str, KindSpec] = {
    spec.name: spec
    for spec in (
        diffusion_pretrain.SPEC,
        text_to_image_adaptation.SPEC,
        reward_model.SPEC,
        reward_finetune.SPEC,
        classifier.SPEC,
    )
}

__all__ = ["KINDS", "KindSpec"]
