"""Typed job parameters: defaults, parsing, every problem reported, the sampler's resume."""

from __future__ import annotations

import torch

from clinisynth_server.finetune.kinds import NAMES, load
from clinisynth_server.finetune.kinds.base import EpochSampler, lr_lambda
from clinisynth_server.finetune.params import Param, parse_params, typed


def test_defaults_and_typed_values() -> None:
    spec = load("diffusion_pretrain")
    parsed = parse_params(spec.params, {"max_steps": " 50 ", "ema": "Yes"})
    assert not parsed.violations
    assert parsed.values["max_steps"] == 50 and parsed.values["ema"] is True
    assert parsed.strings["max_steps"] == "50"
    assert typed(spec.params, parsed.strings)["learning_rate"] == 1e-4


def test_every_problem_is_reported_with_its_field() -> None:
    spec = load("classifier")
    parsed = parse_params(
        spec.params,
        {
            "max_steps": "0",
            "batch_size": "x",
            "adversarial": "fgsm",
            "learning_rat": "1",
            "eps": "nan",
        },
    )
    by_field = {v.field: v.description for v in parsed.violations}
    assert set(by_field) == {
        "params[max_steps]",
        "params[batch_size]",
        "params[adversarial]",
        "params[learning_rat]",
        "params[eps]",
    }
    assert "must be >= 1" in by_field["params[max_steps]"]
    assert "did you mean learning_rate" in by_field["params[learning_rat]"]
    assert "none, pgd, trades" in by_field["params[adversarial]"]


def test_every_kind_takes_the_common_parameters() -> None:
    for name in NAMES:
        names = {p.name for p in load(name).params}
        assert {"max_steps", "batch_size", "learning_rate", "seed", "checkpoint_every"} <= names
        assert len(names) == len(load(name).params)


def test_bool_and_choice_parsing() -> None:
    flag = Param("x", "bool", "false", "")
    assert flag.parse("off") is False and flag.parse("1") is True
    choice = Param("c", "choice", "a", "", choices=("a", "b"))
    assert choice.parse("b") == "b"


def test_epoch_sampler_resumes_the_same_batches() -> None:
    a = EpochSampler(10, 4, seed=3)
    first = [a.next() for _ in range(3)]
    state = a.state()
    rest = [a.next() for _ in range(4)]
    b = EpochSampler(10, 4, seed=3)
    b.load_state(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, [b.next() for _ in range(4)], strict=True))
    seen = torch.cat(first)[:10]  # an epoch covers every item once
    assert sorted(seen.tolist()) == list(range(10))
    ranks = [EpochSampler(10, 4, seed=3, rank=r, world=2).next() for r in (0, 1)]
    assert sorted(torch.cat(ranks).tolist()) == sorted(first[0].tolist())


def test_lr_schedules() -> None:
    warm = lr_lambda("cosine", 10, 110)
    assert warm(0) == 0.1 and warm(9) == 1.0
    assert abs(warm(60) - 0.5) < 1e-9 and warm(110) == 0.0
    assert lr_lambda("constant", 0, 5)(4) == 1.0
