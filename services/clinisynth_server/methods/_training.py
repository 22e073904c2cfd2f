"""Small pieces shared by the reward-model and classifier training loops."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from clinisynth_server.errors import Cancelled, InvalidArgument


@dataclass(frozen=True)
class TrainProgress:
    """What ``on_step`` sees after every optimiser step."""

    epoch: int
    step: int  # global step, 1-based
    total_steps: int
    loss: float


ProgressCallback = Callable[[TrainProgress], bool | None]
"""Return ``False`` (or raise) to stop training; the loop raises ``Cancelled``."""


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random train / validation split; at least one training example."""
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidArgument.for_field("val_fraction", f"must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(round(n * val_fraction), n - 1)
    return perm[n_val:], perm[:n_val]


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled index batches; a trailing batch of one is dropped (BatchNorm cannot train on it)."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if len(idx) > 1 or n == 1:
            yield idx


def steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or (n == 1) else 0)


def cosine_lr(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base LR to 0 over ``total_steps`` optimiser steps."""
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    )


def report(on_step: ProgressCallback | None, progress: TrainProgress) -> None:
    if on_step is not None and on_step(progress) is False:
        raise Cancelled(
            f"training stopped by the caller at step {progress.step} of {progress.total_steps}",
            metadata={"step": str(progress.step), "total": str(progress.total_steps)},
        )


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise InvalidArgument.for_field(name, f"must be > 0, got {value}")
