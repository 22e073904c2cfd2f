"""``reward_model``: r(x, y) from an expert-feedback export (docs/METHODS.md §1).

The architecture and objective of :mod:`methods.reward_model` (backbone → 1000 → 100 ⊕ one-hot
class → 100 → 32 → 2; MSE to [1, 0] aligned / [0, 1] not aligned; Adam, weight decay 5e-4,
cosine LR), with a seeded validation split and the best validation accuracy kept. The loop is
written out here rather than calling ``methods.reward_model.train_reward_model`` because a
durable job must checkpoint and resume mid-training (optimiser, LR schedule, data position),
which that one-shot function does not expose; each step is the same computation.

Options from the method: weak feedback (real = aligned images shown with a wrong class are
negatives), initialising the image branch from a trained classifier (the first probe found this
decisive, FINDINGS.md) and freezing it. Prompt-conditioned feedback is not supported yet.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import torch
import torch.nn.functional as F

from clinisynth_server.errors import FieldViolation
from clinisynth_server.finetune import models
from clinisynth_server.finetune.datasets import DatasetReport, load_images
from clinisynth_server.finetune.kinds.base import (
    CheckContext,
    EpochSampler,
    KindSpec,
    TrainContext,
    lr_lambda,
    sync_batchnorm,
)
from clinisynth_server.finetune.kinds.classifier import scorer_meta
from clinisynth_server.finetune.params import Param, common_params
from clinisynth_server.methods._training import split_indices
from clinisynth_server.methods.backbones import BACKBONES
from clinisynth_server.methods.reward_model import (
    RewardModel,
    RewardModelConfig,
    init_image_branch_from_classifier,
)

NAME = "reward_model"
#: Triton role serving reward folders (the reward contributor's backend).
TRITON_ROLE = "reward_scorer"

PARAMS = (
    *common_params(
        max_steps=300,
        batch_size=64,
        learning_rate=1e-4,
        checkpoint_every=50,
        lr_schedule="cosine",
        weight_decay=5e-4,
    ),
    Param(
        "val_fraction", "float", "0.2", "held-out share of the judgements", minimum=0.0, maximum=0.9
    ),
    Param("backbone", "choice", "small_cnn", "image backbone", choices=BACKBONES),
    Param("backbone_width", "int", "16", "small_cnn width", minimum=4, maximum=256),
    Param(
        "classes",
        "str",
        "",
        "class names in label order, comma-separated (default: the "
        "generator's or the export's, sorted)",
    ),
    Param("weak_feedback", "bool", "false", "add aligned images with a wrong class as negatives"),
    Param(
        "init_classifier",
        "str",
        "",
        "classifier (catalog name or store prefix) whose backbone initialises the image branch",
    ),
    Param("freeze_backbone", "bool", "false", "train only the heads"),
    Param("size", "int", "0", "image side (0 = the data's)", minimum=0, maximum=1024),
    Param("channels", "int", "0", "1 or 3 (0 = from the data)", minimum=0, maximum=3),
)


def class_list(params: dict[str, Any], report: DatasetReport) -> list[str]:
    given = [c.strip() for c in params["classes"].split(",") if c.strip()]
    return given or report.classes


def check(params: dict[str, Any], report: DatasetReport, ctx: CheckContext) -> list[FieldViolation]:
    out = []
    if any(e.text and not e.class_name for e in report.entries):
        out.append(
            FieldViolation(
                "dataset",
                "prompt-conditioned feedback is not supported by "
                "this kind yet: every judgement needs condition.class_name",
            )
        )
    verdicts = {e.plausible for e in report.entries}
    if verdicts != {True, False}:
        out.append(
            FieldViolation(
                "dataset",
                "judgements must include both plausible and "
                "implausible images (found only "
                f"{'plausible' if True in verdicts else 'implausible'})",
            )
        )
    classes = class_list(params, report)
    unknown = sorted(set(report.classes) - set(classes))
    if unknown:
        out.append(
            FieldViolation("dataset", f"unknown classes {unknown}: params[classes] is {classes}")
        )
    if len(classes) < 2:
        out.append(
            FieldViolation(
                "params[classes]",
                "the reward model needs ≥ 2 classes; name them with classes=a,b,...",
            )
        )
    if params["init_classifier"]:
        try:
            base = models.resolve(
                params["init_classifier"],
                ctx.catalog,
                ctx.store,
                field_name="params[init_classifier]",
            )
            if base.kind != "classifier":
                out.append(
                    FieldViolation("params[init_classifier]", f"{base.ref} is a {base.kind} model")
                )
        except Exception as exc:
            out.append(FieldViolation("params[init_classifier]", str(exc)))
    return out


class RewardTrainer:
    best_metric = "val_accuracy"
    best_mode = "max"

    def __init__(self, ctx: TrainContext) -> None:
        p = self.p = ctx.params
        self.ctx = ctx
        report = ctx.report
        self.classes = class_list(p, report)
        self.size = p["size"] or report.size
        self.channels = p["channels"] or report.channels
        entries = report.entries
        x = torch.from_numpy(
            load_images(
                ctx.source, [e.path for e in entries], size=self.size, channels=self.channels
            )
        )
        y = torch.tensor([self.classes.index(e.class_name) for e in entries])
        a = torch.tensor([bool(e.plausible) for e in entries])
        train_idx, val_idx = split_indices(len(x), p["val_fraction"], p["seed"])
        self.x_tr, self.y_tr, self.a_tr = x[train_idx], y[train_idx], a[train_idx]
        self.x_val, self.y_val, self.a_val = x[val_idx], y[val_idx], a[val_idx]
        gen = torch.Generator().manual_seed(p["seed"])
        if p["weak_feedback"]:  # (aligned image, wrong class) → not aligned
            xw, yw = self.x_tr[self.a_tr], self.y_tr[self.a_tr]
            k = len(self.classes)
            wrong = (yw + torch.randint(1, k, (len(yw),), generator=gen)) % k
            self.x_tr = torch.cat([self.x_tr, xw])
            self.y_tr = torch.cat([self.y_tr, wrong])
            self.a_tr = torch.cat([self.a_tr, torch.zeros(len(yw), dtype=torch.bool)])
        self.net = RewardModel(
            RewardModelConfig(
                conditioning="class",
                num_classes=len(self.classes),
                in_channels=self.channels,
                backbone=p["backbone"],
                backbone_width=p["backbone_width"],
            )
        )
        if p["init_classifier"]:
            base, folder = ctx.fetch_model(
                p["init_classifier"], "init_classifier", field_name="params[init_classifier]"
            )
            n = init_image_branch_from_classifier(self.net, folder)
            ctx.log(f"image branch initialised from {base.ref} ({n} tensors)")
        self.net = sync_batchnorm(self.net, ctx)  # global-batch statistics on several ranks
        for param in self.net.backbone.parameters():
            param.requires_grad_(not p["freeze_backbone"])
        params = [q for q in self.net.parameters() if q.requires_grad]
        # The method's optimiser: Adam with L2 weight decay, cosine LR.
        self.optimizer = torch.optim.Adam(
            params, lr=p["learning_rate"], weight_decay=p["weight_decay"]
        )
        self.lr = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(p["lr_schedule"], p["lr_warmup_steps"], p["max_steps"])
        )
        self.model, self.optimizer = ctx.prepare(self.net, self.optimizer)
        self.sampler = EpochSampler(
            len(self.x_tr), p["batch_size"], p["seed"], rank=ctx.rank, world=ctx.world_size
        )

    def step(self, step: int) -> dict[str, float]:
        self.model.train()
        if self.p["freeze_backbone"]:
            self.ctx.unwrap(self.model, RewardModel).backbone.eval()
        idx = self.sampler.next()
        dev = self.ctx.device
        logits = self.model(self.x_tr[idx].to(dev), self.y_tr[idx].to(dev))
        target = F.one_hot((~self.a_tr[idx]).long(), 2).float().to(dev)
        loss = F.mse_loss(logits, target)
        self.ctx.update(
            loss, self.model.parameters(), self.optimizer, self.lr, self.p["max_grad_norm"]
        )
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not len(self.x_val):
            return {}
        net = self.ctx.unwrap(self.model).eval()
        dev = self.ctx.device
        logits = net(self.x_val.to(dev), self.y_val.to(dev))
        target = F.one_hot((~self.a_val).long(), 2).float().to(dev)
        pred_aligned = (logits.argmax(1) == 0).cpu()
        share = float(self.a_val.float().mean())
        reward = logits.softmax(1)[:, 0].cpu()
        out = {
            "val_loss": float(F.mse_loss(logits, target)),
            "val_accuracy": float((pred_aligned == self.a_val).float().mean()),
            "val_majority_baseline": max(share, 1 - share),
        }
        if self.a_val.any() and (~self.a_val).any():
            out["val_reward_plausible"] = float(reward[self.a_val].mean())
            out["val_reward_implausible"] = float(reward[~self.a_val].mean())
        net.train()
        return out

    def state(self) -> dict[str, Any]:
        return {
            "model": self.ctx.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.lr.state_dict(),
            "sampler": self.sampler.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.ctx.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr"])
        self.sampler.load_state(state["sampler"])

    def save_model(self, folder: pathlib.Path) -> None:
        net = self.ctx.unwrap(self.model, RewardModel)
        net.save(folder)
        meta = scorer_meta(
            "reward",
            TRITON_ROLE,
            self.classes,
            self.size,
            self.channels,
            conditioning="class",
            labels={"finetune_job": self.ctx.job_id},
        )
        (folder / "clinisynth.json").write_text(json.dumps(meta, indent=2))
        net.train()


SPEC = KindSpec(
    name=NAME,
    description="Train the reward model r(x, y) on exported expert feedback (validation split, "
    "best checkpoint kept).",
    dataset_layout="feedback_export",
    params=PARAMS,
    trainer=RewardTrainer,
    check=check,
)
