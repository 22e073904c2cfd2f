"""``classifier``: the plain and the adversarially robust classifiers of the counterfactual method.

Cross-entropy (``adversarial=none``), PGD (Madry: CE on the worst x + δ in the L2 ball of radius
ε) or TRADES (CE(x) + β·KL(p(x) ‖ p(x + δ))), with :func:`methods.classifier.l2_attack`. Each
checkpoint is temperature-scaled on the validation split (a calibrated copy is saved; training
continues on raw logits); the best checkpoint is the one with the highest validation accuracy.
Promoted folders carry ``clinisynth.json`` for the registry (kind ``classifier``).
"""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import torch
import torch.nn.functional as F

from clinisynth_server.errors import FieldViolation, InvalidArgument
from clinisynth_server.finetune.datasets import DatasetReport, load_images
from clinisynth_server.finetune.kinds.base import (
    STREAM_PARAMS,
    CheckContext,
    EpochSampler,
    KindSpec,
    TrainContext,
    make_optimizer,
    stream_batches,
    sync_batchnorm,
)
from clinisynth_server.finetune.params import Param, common_params
from clinisynth_server.finetune.shards_loader import holdout
from clinisynth_server.methods._training import split_indices
from clinisynth_server.methods.backbones import BACKBONES
from clinisynth_server.methods.classifier import (
    ADVERSARIAL,
    Classifier,
    ClassifierConfig,
    fit_temperature,
    l2_attack,
)

NAME = "classifier"
#: Triton role serving classifier folders (the counterfactual contributor's backend).
TRITON_ROLE = "classifier"

PARAMS = (
    *common_params(
        max_steps=500,
        batch_size=64,
        learning_rate=1e-3,
        checkpoint_every=100,
        lr_schedule="cosine",
        weight_decay=5e-4,
    ),
    Param(
        "adversarial",
        "choice",
        "none",
        "none (plain), pgd or trades (robust, L2 ball)",
        choices=ADVERSARIAL,
    ),
    Param("eps", "float", "0.5", "radius ε of the L2 threat ball", minimum=1e-6, maximum=100.0),
    Param("attack_steps", "int", "7", "PGD steps of the inner attack", minimum=1, maximum=100),
    Param("attack_step_size", "float", "0", "step of the attack (0 = 2.5·ε / steps)", minimum=0),
    Param("trades_beta", "float", "6.0", "TRADES trade-off β", minimum=0),
    Param("backbone", "choice", "small_cnn", "image backbone", choices=BACKBONES),
    Param("backbone_width", "int", "16", "small_cnn width", minimum=4, maximum=256),
    Param(
        "val_fraction",
        "float",
        "0.1",
        "validation split (temperature scaling, best checkpoint)",
        minimum=0.0,
        maximum=0.9,
    ),
    Param("calibrate", "bool", "true", "fit the temperature T on the validation split"),
    Param("size", "int", "0", "image side (0 = the data's)", minimum=0, maximum=1024),
    Param("channels", "int", "0", "1 or 3 (0 = from the data)", minimum=0, maximum=3),
    *STREAM_PARAMS,
)

#: Validation images a streamed set holds in memory (a hash split of the set, capped).
STREAM_VAL_LIMIT = 1024


def check(params: dict[str, Any], report: DatasetReport, ctx: CheckContext) -> list[FieldViolation]:
    out = []
    if len(report.classes) < 2:
        out.append(
            FieldViolation(
                "dataset",
                f"a classifier needs ≥ 2 class folders, found "
                f"{len(report.classes)} ({', '.join(report.classes)})",
            )
        )
    if report.images < 4:
        out.append(FieldViolation("dataset", f"only {report.images} images"))
    return out


def scorer_meta(
    kind: str, role: str, classes: list[str], size: int, channels: int, **extra: Any
) -> dict[str, Any]:
    return {
        "kind": kind,
        "triton_role": role,
        "component": kind if kind != "reward" else "scorer",
        "classes": classes,
        "width": size,
        "height": size,
        "channels": channels,
        **extra,
    }


class RawLogits(torch.nn.Module):
    """The trained forward (uncalibrated logits) as a module's ``forward``.

    DDP all-reduces gradients only for a forward that went through its own ``forward``: calling
    ``raw_logits`` on the unwrapped classifier would train each rank alone.
    """

    def __init__(self, net: Classifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.raw_logits(images)


class ClassifierTrainer:
    best_metric = "val_accuracy"
    best_mode = "max"

    def __init__(self, ctx: TrainContext) -> None:
        p = self.p = ctx.params
        self.ctx = ctx
        report = ctx.report
        self.classes = report.classes
        self.size = p["size"] or report.size
        self.channels = p["channels"] or report.channels
        label_of = {e.path: self.classes.index(e.class_name) for e in report.entries}
        # A sharded set streams its training split; its validation split (a stable hash split,
        # at most STREAM_VAL_LIMIT images) is held in memory for evaluation and calibration.
        val_paths = holdout(list(label_of), p["val_fraction"], p["seed"], STREAM_VAL_LIMIT)
        self.stream = stream_batches(
            ctx,
            size=self.size,
            channels=self.channels,
            labels=label_of,
            exclude=frozenset(val_paths),
        )
        if self.stream is not None:
            val_paths = self._readable(val_paths)
            self.x_val = torch.from_numpy(self._load(val_paths))
            self.y_val = torch.tensor([label_of[v] for v in val_paths], dtype=torch.long)
        else:
            paths = [e.path for e in report.entries]
            x = torch.from_numpy(self._load(paths))
            labels = torch.tensor([label_of[path] for path in paths])
            train_idx, val_idx = split_indices(len(x), p["val_fraction"], p["seed"])
            self.x_tr, self.y_tr = x[train_idx], labels[train_idx]
            self.x_val, self.y_val = x[val_idx], labels[val_idx]
            self.sampler = EpochSampler(
                len(self.x_tr), p["batch_size"], p["seed"], rank=ctx.rank, world=ctx.world_size
            )
        self.net = Classifier(
            ClassifierConfig(
                num_classes=len(self.classes),
                in_channels=self.channels,
                backbone=p["backbone"],
                backbone_width=p["backbone_width"],
            )
        )
        # Global-batch BatchNorm statistics when several ranks share the batch.
        self.net = sync_batchnorm(self.net, ctx)
        self.optimizer, self.lr = make_optimizer(self.net.parameters(), p)
        self.model, self.optimizer = ctx.prepare(RawLogits(self.net), self.optimizer)
        self.gen = torch.Generator().manual_seed(p["seed"] + 2)
        self.step_size = p["attack_step_size"] or 2.5 * p["eps"] / p["attack_steps"]

    def _readable(self, paths: list[str]) -> list[str]:
        """The validation paths that decode; the others fail the job or are skipped and named."""
        from clinisynth_server.errors import ClinisynthError
        from clinisynth_server.finetune.datasets import decode

        bad = []
        for path in paths:
            try:
                decode(self.ctx.source.read(path), path)
            except ClinisynthError as exc:
                if self.p["on_bad_image"] != "skip":
                    raise InvalidArgument.for_field(
                        "dataset", f"{path}: unreadable image ({exc.message})"
                    ) from None
                bad.append(path)
        if bad:
            self.ctx.log(
                f"on_bad_image=skip: skipped {len(bad)} unreadable validation image(s): "
                + ", ".join(bad)
            )
        return [p for p in paths if p not in bad]

    def _load(self, paths: list[str]) -> Any:
        if not paths:
            return torch.zeros((0, self.channels, self.size, self.size)).numpy()
        return load_images(self.ctx.source, paths, size=self.size, channels=self.channels)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p, model = self.p, self.model
        # The attack differentiates w.r.t. the input only (no DDP); the loss goes through DDP.
        attack = self._net().raw_logits
        raw = model
        if p["adversarial"] == "none":
            model.train()
            return F.cross_entropy(raw(x), y)
        model.eval()  # attack against fixed BatchNorm statistics
        if p["adversarial"] == "pgd":
            x_adv = l2_attack(
                attack,
                x,
                lambda lg: F.cross_entropy(lg, y, reduction="sum"),
                eps=p["eps"],
                steps=p["attack_steps"],
                step_size=self.step_size,
                generator=self.gen,
            )
            model.train()
            return F.cross_entropy(raw(x_adv), y)
        with torch.no_grad():
            p_clean = F.softmax(attack(x), dim=1)
        x_adv = l2_attack(
            attack,
            x,
            lambda lg: F.kl_div(F.log_softmax(lg, 1), p_clean, reduction="sum"),
            eps=p["eps"],
            steps=p["attack_steps"],
            step_size=self.step_size,
            generator=self.gen,
        )
        model.train()
        clean, adv = raw(torch.cat([x, x_adv])).chunk(2)
        kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
        return F.cross_entropy(clean, y) + p["trades_beta"] * kl

    def _net(self) -> Classifier:
        """The classifier inside the (DDP / accelerate) wrappers."""
        net = self.ctx.unwrap(self.model, RawLogits).net
        assert isinstance(net, Classifier)
        return net

    def step(self, step: int) -> dict[str, float]:
        if self.stream is not None:
            images, labels = self.stream.next()
            x, y = images.to(self.ctx.device), labels.to(self.ctx.device)
        else:
            idx = self.sampler.next()
            x, y = self.x_tr[idx].to(self.ctx.device), self.y_tr[idx].to(self.ctx.device)
        loss = self._loss(x, y)
        self.ctx.update(
            loss, self.model.parameters(), self.optimizer, self.lr, self.p["max_grad_norm"]
        )
        out = {"loss": float(loss.detach())}
        if self.stream is not None:  # the share of a step spent waiting for data
            out["data_wait_s"] = self.stream.last_wait_s
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not len(self.x_val):
            return {}
        net = self._net()
        net.eval()
        logits = net.raw_logits(self.x_val.to(self.ctx.device))
        y = self.y_val.to(logits.device)
        out = {
            "val_accuracy": float((logits.argmax(1) == y).float().mean()),
            "val_loss": float(F.cross_entropy(logits, y)),
        }
        if self.p["adversarial"] != "none":
            with torch.enable_grad():
                x_adv = l2_attack(
                    net.raw_logits,
                    self.x_val.to(self.ctx.device),
                    lambda lg: F.cross_entropy(lg, y, reduction="sum"),
                    eps=self.p["eps"],
                    steps=self.p["attack_steps"],
                    step_size=self.step_size,
                    generator=torch.Generator().manual_seed(0),
                )
            out["val_robust_accuracy"] = float(
                (net.raw_logits(x_adv).argmax(1) == y).float().mean()
            )
        net.train()
        return out

    def state(self) -> dict[str, Any]:
        return {
            "model": self._net().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.lr.state_dict(),
            "sampler": (self.stream or self.sampler).state(),
            "gen": self.gen.get_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self._net().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr"])
        (self.stream or self.sampler).load_state(state["sampler"])
        self.gen.set_state(state["gen"])

    def save_model(self, folder: pathlib.Path) -> None:
        net = copy.deepcopy(self._net()).cpu().eval()
        if self.p["calibrate"] and len(self.x_val):
            fit_temperature(net, self.x_val, self.y_val)
        net.save(folder)
        meta = scorer_meta(
            "classifier",
            TRITON_ROLE,
            self.classes,
            self.size,
            self.channels,
            adversarial=self.p["adversarial"],
            eps=self.p["eps"],
            temperature=float(net.temperature),
            labels={
                "finetune_job": self.ctx.job_id,
                "robust": str(self.p["adversarial"] != "none").lower(),
            },
        )
        (folder / "clinisynth.json").write_text(json.dumps(meta, indent=2))


SPEC = KindSpec(
    name=NAME,
    description="Train a plain or adversarially robust (PGD / TRADES, L2) image classifier "
    "with temperature scaling (the counterfactual method's classifiers).",
    dataset_layout="image_folder",
    params=PARAMS,
    trainer=ClassifierTrainer,
    check=check,
)
