"""Typed parameter specs of the job kinds, and their validation (every problem at once).

Parameters travel as strings (``map<string, string>`` in the proto, ``--set key=value`` in the
CLI); each kind declares :class:`Param` specs with a type, default, range and description, so
``ListJobKinds`` can show them and ``CreateJob`` can reject a bad value before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clinisynth_server.errors import FieldViolation

TYPES = ("int", "float", "bool", "str", "choice")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Param:
    """One parameter of a job kind. ``default`` is a string as a user would type it."""

    name: str
    type: str
    default: str
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, raw: str) -> Any:
        """The typed value of ``raw``; ``ValueError`` with a teaching message when bad."""
        text = raw.strip()
        if self.type == "int":
            try:
                value: Any = int(text)
            except ValueError:
                raise ValueError(f"expects an integer, got {raw!r}") from None
        elif self.type == "float":
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"expects a number, got {raw!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"expects a finite number, got {raw!r}")
        elif self.type == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(f"expects true or false, got {raw!r}")
        elif self.type == "choice":
            if text not in self.choices:
                raise ValueError(f"expects one of {', '.join(self.choices)}, got {raw!r}")
            return text
        else:
            return text
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be >= {_fmt(self.minimum)}, got {raw!r}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be <= {_fmt(self.maximum)}, got {raw!r}")
        return value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def common_params(
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    checkpoint_every: int,
    lr_schedule: str = "constant",
    weight_decay: float = 0.0,
) -> tuple[Param, ...]:
    """The parameters every kind accepts, with kind-specific defaults."""
    return (
        Param(
            "max_steps",
            "int",
            str(max_steps),
            "optimiser steps in total",
            minimum=1,
            maximum=10_000_000,
        ),
        Param(
            "batch_size",
            "int",
            str(batch_size),
            "examples per optimiser step (all ranks)",
            minimum=1,
            maximum=65_536,
        ),
        Param(
            "learning_rate",
            "float",
            repr(learning_rate),
            "peak learning rate (AdamW)",
            minimum=1e-12,
            maximum=10.0,
        ),
        Param(
            "seed",
            "int",
            "0",
            "seed of weights init, data order and noise: equal seeds, equal runs",
            minimum=0,
            maximum=2**31 - 1,
        ),
        Param(
            "checkpoint_every",
            "int",
            str(checkpoint_every),
            "steps between checkpoints (a crash loses at most this many)",
            minimum=1,
        ),
        Param("log_every", "int", "10", "steps between progress events", minimum=1),
        Param(
            "keep_checkpoints",
            "int",
            "3",
            "newest checkpoints kept (the best one is always kept too)",
            minimum=1,
        ),
        Param("lr_warmup_steps", "int", "0", "linear warm-up steps", minimum=0),
        Param(
            "lr_schedule",
            "choice",
            lr_schedule,
            "learning-rate schedule after warm-up",
            choices=("constant", "cosine", "linear"),
        ),
        Param("weight_decay", "float", repr(weight_decay), "decoupled weight decay", minimum=0),
        Param("max_grad_norm", "float", "1.0", "gradient clipping norm (0 = off)", minimum=0),
        Param(
            "mixed_precision",
            "choice",
            "no",
            "autocast on GPUs (accelerate)",
            choices=("no", "fp16", "bf16"),
        ),
        Param(
            "nproc_per_node",
            "int",
            "0",
            "worker processes (GPUs) per node; 0 = the service default",
            minimum=0,
            maximum=64,
        ),
        *DISTRIBUTED_PARAMS,
    )


#: Where and how the processes of one job run (torchrun's settings), for every kind.
DISTRIBUTED_PARAMS = (
    Param(
        "nnodes",
        "int",
        "1",
        "machines (Kubernetes pods) the job spans, nproc_per_node processes each; more than "
        "one needs the kubernetes launcher",
        minimum=1,
        maximum=1024,
    ),
    Param(
        "rdzv_backend",
        "choice",
        "static",
        "how the nodes find each other: static (node rank = the pod's index, rank 0's pod is "
        "the master) or c10d (torchrun's elastic rendezvous at the first pod, ranks by arrival)",
        choices=("static", "c10d"),
    ),
    Param(
        "rdzv_timeout_s",
        "int",
        "900",
        "seconds the nodes wait for each other at start before the attempt fails",
        minimum=10,
        maximum=86_400,
    ),
    Param(
        "device",
        "choice",
        "auto",
        "auto: a GPU per process when the worker has them; gpu: require them (the kubernetes "
        "launcher requests nproc_per_node nvidia.com/gpu per pod); cpu: never use GPUs",
        choices=("auto", "gpu", "cpu"),
    ),
)


def unet_params() -> tuple[Param, ...]:
    """Memory / batch parameters of the kinds that train a U-Net."""
    return (
        Param(
            "gradient_accumulation_steps",
            "int",
            "1",
            "micro-batches per optimiser step: each process runs batch_size / (world × this) "
            "examples at a time and the gradients add up (same numbers, less memory)",
            minimum=1,
            maximum=1024,
        ),
        Param(
            "gradient_checkpointing",
            "bool",
            "false",
            "recompute the U-Net's activations in the backward pass (less memory, slower)",
        ),
    )


@dataclass(frozen=True)
class ParsedParams:
    """Validated parameters: typed values, the canonical strings, and what was wrong."""

    values: dict[str, Any] = field(default_factory=dict)
    strings: dict[str, str] = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)


def parse_params(specs: Sequence[Param], given: Mapping[str, str]) -> ParsedParams:
    """Defaults filled in; unknown names and bad values become ``params[name]`` violations."""
    by_name = {p.name: p for p in specs}
    out = ParsedParams()
    for name in sorted(set(given) - set(by_name)):
        close = [n for n in by_name if n.startswith(name[:4])] if len(name) >= 4 else []
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        out.violations.append(
            FieldViolation(
                f"params[{name}]", f"unknown parameter{hint}; known: {', '.join(sorted(by_name))}"
            )
        )
    for spec in specs:
        raw = given.get(spec.name, spec.default)
        try:
            value = spec.parse(raw)
        except ValueError as exc:
            out.violations.append(FieldViolation(f"params[{spec.name}]", str(exc)))
            continue
        out.values[spec.name] = value
        out.strings[spec.name] = raw.strip()
    return out


def split_real_synthetic(batch_size: int, real_to_synthetic: float) -> tuple[int, int]:
    """(real, synthetic) examples of a reward_finetune batch of ``batch_size``."""
    synthetic = round(batch_size / (1 + real_to_synthetic))
    return batch_size - synthetic, synthetic


def world_size_violations(values: Mapping[str, Any], default_nproc: int) -> list[FieldViolation]:
    """The global batch must split evenly: each of the processes takes batch_size / world
    (and each micro-batch of gradient accumulation batch_size / (world × steps))."""
    nproc = int(values.get("nproc_per_node", 0) or 0) or max(1, default_nproc)
    nnodes = max(1, int(values.get("nnodes", 1) or 1))
    accum = max(1, int(values.get("gradient_accumulation_steps", 1) or 1))
    world, batch = nproc * nnodes, values.get("batch_size")
    if not isinstance(batch, int):
        return []
    parts, splits = world * accum, f"{world} processes (nproc_per_node × nnodes)"
    if accum > 1:
        splits += f" × {accum} gradient_accumulation_steps"
    if batch % parts:
        return [
            FieldViolation(
                "params[batch_size]",
                f"{batch} does not divide among {splits}; each process takes batch_size / "
                f"{world}{f' in {accum} micro-batches' if accum > 1 else ''}: use a multiple of "
                f"{parts}",
            )
        ]
    ratio = values.get("real_to_synthetic")
    if isinstance(ratio, float) and parts > 1:
        real, synthetic = split_real_synthetic(batch, ratio)
        if real % parts or synthetic % parts:
            return [
                FieldViolation(
                    "params[real_to_synthetic]",
                    f"splits batch_size {batch} into {real} real + {synthetic} synthetic "
                    f"examples; each part must divide among {splits} (multiples of {parts})",
                )
            ]
    return []


def typed(specs: Sequence[Param], strings: Mapping[str, str]) -> dict[str, Any]:
    """Re-parse stored canonical strings (the worker's view of a validated job)."""
    parsed = parse_params(specs, {k: v for k, v in strings.items() if k in {s.name for s in specs}})
    if parsed.violations:
        first = parsed.violations[0]
        raise ValueError(f"{first.field}: {first.description}")
    return parsed.values
