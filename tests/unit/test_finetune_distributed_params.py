"""The distributed-training parameters: validated (every bad value is ``params[name]``), the
U-Net kinds' gradient accumulation / checkpointing / EMA, the global batch's split checks, and
what accumulation and checkpointing must not change: the numbers a step computes."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from clinisynth_server.finetune.kinds import NAMES, load
from clinisynth_server.finetune.params import (
    parse_params,
    split_real_synthetic,
    world_size_violations,
)

UNET_KINDS = ("diffusion_pretrain", "text_to_image_adaptation", "reward_finetune")


def violations(kind: str, **given: str) -> dict[str, str]:
    return {v.field: v.description for v in parse_params(load(kind).params, given).violations}


@pytest.mark.parametrize("kind", NAMES)
def test_every_kind_takes_the_placement_parameters(kind: str) -> None:
    parsed = parse_params(load(kind).params, {})
    assert not parsed.violations
    assert parsed.values["nnodes"] == 1 and parsed.values["rdzv_backend"] == "static"
    assert parsed.values["device"] == "auto" and parsed.values["rdzv_timeout_s"] == 900
    bad = violations(
        kind, nnodes="0", rdzv_backend="etcd", rdzv_timeout_s="1", device="tpu", nproc_per_node="-1"
    )
    assert set(bad) == {
        "params[nnodes]",
        "params[rdzv_backend]",
        "params[rdzv_timeout_s]",
        "params[device]",
        "params[nproc_per_node]",
    }
    assert "static, c10d" in bad["params[rdzv_backend]"]
    assert "auto, gpu, cpu" in bad["params[device]"]


def test_the_unet_kinds_take_accumulation_checkpointing_and_ema() -> None:
    for kind in NAMES:
        names = {p.name for p in load(kind).params}
        unet = {"gradient_accumulation_steps", "gradient_checkpointing", "ema", "ema_decay"}
        if kind in UNET_KINDS:
            assert unet <= names, kind
        else:
            assert not unet & names, kind
    bad = violations("diffusion_pretrain", gradient_accumulation_steps="0")
    assert "must be >= 1" in bad["params[gradient_accumulation_steps]"]
    bad = violations("reward_finetune", gradient_checkpointing="sometimes")
    assert "true or false" in bad["params[gradient_checkpointing]"]
    assert set(violations("text_to_image_adaptation", ema_decay="1.5")) == {"params[ema_decay]"}


def test_the_global_batch_splits_among_processes_and_micro_batches() -> None:
    ok = {"batch_size": 16, "nproc_per_node": 2, "nnodes": 2, "gradient_accumulation_steps": 4}
    assert world_size_violations(ok, 1) == []
    (bad,) = world_size_violations({**ok, "gradient_accumulation_steps": 3}, 1)
    assert bad.field == "params[batch_size]"
    assert "4 processes" in bad.description and "3 gradient_accumulation_steps" in bad.description
    assert "multiple of 12" in bad.description
    (bad,) = world_size_violations({"batch_size": 6, "nproc_per_node": 2, "nnodes": 2}, 1)
    assert "multiple of 4" in bad.description  # nnodes counts


def test_reward_finetune_halves_split_too() -> None:
    assert split_real_synthetic(16, 3.0) == (12, 4)
    assert split_real_synthetic(8, 1.0) == (4, 4)
    base = {"batch_size": 16, "nproc_per_node": 2, "real_to_synthetic": 3.0}
    assert world_size_violations(base, 1) == []  # 12 + 4, each even
    (bad,) = world_size_violations({**base, "gradient_accumulation_steps": 4}, 1)
    assert bad.field == "params[real_to_synthetic]" and "12 real + 4 synthetic" in bad.description
    assert world_size_violations({**base, "nproc_per_node": 1}, 1) == []  # one process: any


def test_text_to_image_ema_and_checkpointing_need_the_unet() -> None:
    from clinisynth_server.finetune.datasets import DatasetReport
    from clinisynth_server.finetune.kinds.base import CheckContext

    spec = load("text_to_image_adaptation")
    values = parse_params(
        spec.params,
        {
            "base_model": "",
            "train_unet": "false",
            "train_text_encoder": "true",
            "ema": "true",
            "gradient_checkpointing": "true",
        },
    ).values
    fields = {
        v.field
        for v in spec.check(
            values, DatasetReport("d", "image_text_manifest"), CheckContext(None, None, "")
        )
    }
    assert {"params[ema]", "params[gradient_checkpointing]"} <= fields


# ---------------------------------------------------------------------------------------------
# accumulation and checkpointing change memory, not the numbers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    from clinisynth_lab.phantoms import cells, datasets
    from clinisynth_server.store import open_store

    store = open_store(str(tmp_path_factory.mktemp("store")))
    imgs, labels = cells.generate(16, seed=3, size=24)
    classes = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]
    datasets.write_image_folder_to_store(store, "cells", imgs, labels, classes)
    return store, "cells"


def train(cells: tuple[Any, str], workdir: pathlib.Path, **given: str) -> tuple[list[float], Any]:
    """Four steps of a tiny diffusion_pretrain: the losses, and what the EMA model predicts."""
    from clinisynth_server.finetune import datasets
    from clinisynth_server.finetune.kinds.base import TrainContext, seed_everything

    store, prefix = cells
    spec = load("diffusion_pretrain")
    parsed = parse_params(
        spec.params,
        {
            "batch_size": "8",
            "learning_rate": "1e-3",
            "block_out_channels": "8,16",
            "seed": "2",
            "ema": "true",
            "ema_decay": "0.5",
            **given,
        },
    )
    assert not parsed.violations
    source = datasets.StoreSource(store, prefix)
    report = datasets.validate(source, prefix, spec.dataset_layout)
    seed_everything(2)
    none: Any = None
    ctx = TrainContext(
        job_id="j",
        params=parsed.values,
        source=source,
        report=report,
        workdir=workdir,
        store=store,
        catalog=none,
        model_repository="",
        accelerator=None,
        log=lambda message: None,
        save_artifact=lambda name, path: None,
        load_artifact=lambda name, path: False,
    )
    trainer = spec.trainer(ctx)
    losses = [trainer.step(step)["loss"] for step in range(1, 5)]
    # The EMA model's prediction on a fixed input: what it learned. (Not its weights: the
    # biases in front of a GroupNorm have a true gradient of 0, so Adam turns their rounding
    # noise into steps of about the learning rate; they cannot change any output.)
    import torch

    shadow: Any = trainer.ema.shadow  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4, 1, 16, 16), generator=g)
    with torch.no_grad():
        out = shadow(x, torch.tensor([10, 200, 500, 900]), class_labels=torch.arange(4)).sample
    return losses, out


def test_accumulation_and_checkpointing_train_the_same_model(
    cells: tuple[Any, str], tmp_path: pathlib.Path
) -> None:
    """Four micro-batches of two (gradients summed, each loss scaled by its share) and
    recomputed activations give the one-batch step's losses and EMA model: fp32 sums in
    another order, a few ulps (measured: losses within 1e-7 relative)."""
    plain, plain_out = train(cells, tmp_path / "a")
    assert plain[0] != plain[3]  # it trains
    for given in ({"gradient_accumulation_steps": "4"}, {"gradient_checkpointing": "true"}):
        losses, out = train(cells, tmp_path / "-".join(given), **given)
        assert losses == pytest.approx(plain, rel=1e-6), given
        worst = float((out - plain_out).abs().max() / plain_out.abs().max())
        assert worst < 1e-5, (given, worst)


def test_accumulated_gradients_are_the_whole_batch_mean_loss_gradients() -> None:
    """What the optimiser sees after ``TrainContext.accumulate``: exactly the gradient of the
    whole batch's mean loss (Adam would hide a wrong scale; this captures the gradient)."""
    import torch

    from clinisynth_server.finetune.kinds.base import TrainContext

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    model = torch.nn.Linear(3, 1)
    captured: list[torch.Tensor] = []

    class Capture:
        def step(self) -> None:
            captured.append(model.weight.grad.detach().clone())  # type: ignore[union-attr]

        def zero_grad(self, set_to_none: bool = True) -> None:
            model.zero_grad(set_to_none=set_to_none)

    class NoLr:
        def step(self) -> None:
            pass

    def micro(sl: slice) -> tuple[torch.Tensor, dict[str, float]]:
        return torch.nn.functional.mse_loss(model(x[sl]), y[sl]), {"rows": float(sl.stop)}

    none: Any = None
    for steps in (1, 4):
        ctx = TrainContext(
            job_id="j",
            params={"gradient_accumulation_steps": steps},
            source=none,
            report=none,
            workdir=pathlib.Path("."),
            store=none,
            catalog=none,
            model_repository="",
            accelerator=None,
            log=print,
            save_artifact=lambda name, path: None,
            load_artifact=lambda name, path: False,
        )
        loss, metrics = ctx.accumulate([model], micro, 8, model.parameters(), Capture(), NoLr(), 0)
        whole = float(torch.nn.functional.mse_loss(model(x), y).detach())
        assert loss == pytest.approx(whole, rel=1e-6)
        assert metrics["rows"] == pytest.approx(
            sum(8 / steps * (k + 1) for k in range(steps)) / steps
        )
    torch.testing.assert_close(captured[1], captured[0], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="micro-batches"):
        ctx.accumulate([model], micro, 6, model.parameters(), Capture(), NoLr(), 0)
