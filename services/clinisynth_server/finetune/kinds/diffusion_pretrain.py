"""``diffusion_pretrain``: a pixel ``UNet2DModel`` trained with the ε-MSE loss from an image set.

Class-conditional from a labelled ImageFolder (the "pretrained on real images" generator the
feedback method starts from) or unconditional (the denoiser the counterfactual method needs).
Optionally continues from a served pixel model (``base_model``) and keeps EMA weights, which are
what the promoted folder holds when ``ema`` is on.
"""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

import torch

from clinisynth_server.errors import FieldViolation
from clinisynth_server.finetune import memorization, models
from clinisynth_server.finetune.datasets import DatasetReport, check_classes, load_images
from clinisynth_server.finetune.kinds.base import (
    EMA,
    STREAM_PARAMS,
    CheckContext,
    EpochSampler,
    KindSpec,
    TrainContext,
    make_optimizer,
    stream_batches,
)
from clinisynth_server.finetune.params import Param, common_params, unet_params
from clinisynth_server.methods.losses import diffusion_loss
from clinisynth_server.methods.sampling import Cond, unet_eps_fn
from clinisynth_server.methods.schedulers import DDPM_SCHEDULE

if TYPE_CHECKING:
    from diffusers import ModelMixin

NAME = "diffusion_pretrain"
PIXEL_KINDS = ("class_conditional", "unconditional")

PARAMS = (
    *common_params(max_steps=1000, batch_size=16, learning_rate=1e-4, checkpoint_every=100),
    Param(
        "conditioning",
        "choice",
        "auto",
        "class-conditional (class), unconditional (none), "
        "or class when the set has several classes (auto)",
        choices=("auto", "class", "none"),
    ),
    Param(
        "size",
        "int",
        "0",
        "image side in pixels (0 = the data's, rounded to the UNet's multiple)",
        minimum=0,
        maximum=1024,
    ),
    Param(
        "channels",
        "int",
        "0",
        "1 (grayscale) or 3 (colour); 0 = from the data",
        minimum=0,
        maximum=3,
    ),
    Param("block_out_channels", "str", "32,64,64", "UNet channels per resolution level"),
    Param("layers_per_block", "int", "1", "ResNet blocks per level", minimum=1, maximum=8),
    Param("attention", "bool", "false", "self-attention at the lowest resolution"),
    Param("num_train_timesteps", "int", "1000", "diffusion steps T", minimum=10, maximum=10000),
    Param(
        "beta_schedule",
        "choice",
        "linear",
        "noise schedule",
        choices=("linear", "scaled_linear", "squaredcos_cap_v2"),
    ),
    Param(
        "prediction_type",
        "choice",
        "epsilon",
        "what the UNet predicts: ε, or v (stable at high noise levels: small models trained on "
        "ε leave noise behind in deterministic samplers such as DDIM)",
        choices=("epsilon", "v_prediction"),
    ),
    Param("ema", "bool", "false", "keep EMA weights (promoted folders hold them)"),
    Param("ema_decay", "float", "0.999", "EMA decay per step", minimum=0.0, maximum=1.0),
    Param("base_model", "str", "", "continue from a pixel model (catalog name or store prefix)"),
    *unet_params(),
    *STREAM_PARAMS,
)


def parse_channels(text: str) -> list[int]:
    values = [int(v) for v in text.replace(" ", "").split(",") if v]
    if not values or any(v < 8 or v % 8 for v in values):
        raise ValueError("comma-separated multiples of 8 (GroupNorm), e.g. 32,64,64")
    return values


def check(params: dict[str, Any], report: DatasetReport, ctx: CheckContext) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    try:
        levels = parse_channels(params["block_out_channels"])
    except ValueError as exc:
        out.append(FieldViolation("params[block_out_channels]", str(exc)))
        levels = [32]
    multiple = 2 ** (len(levels) - 1)
    size = params["size"] or report.size
    if size and size % multiple:
        out.append(
            FieldViolation(
                "params[size]", f"{size} is not a multiple of {multiple} ({len(levels)} levels)"
            )
        )
    if params["conditioning"] == "class" and len(report.classes) < 1:
        out.append(FieldViolation("dataset", "class conditioning needs class folders"))
    if params["base_model"]:
        try:
            base = models.resolve(
                params["base_model"], ctx.catalog, ctx.store, field_name="params[base_model]"
            )
        except Exception as exc:
            out.append(FieldViolation("params[base_model]", str(exc)))
        else:
            if base.kind not in PIXEL_KINDS:
                out.append(
                    FieldViolation(
                        "params[base_model]", f"{base.ref} is a {base.kind} model, not a pixel UNet"
                    )
                )
            elif base.kind == "class_conditional":
                out += [
                    FieldViolation("dataset", p)
                    for p in check_classes(report, base.classes, base.ref)
                ]
    return out


def pixel_folder(
    folder: pathlib.Path,
    unet: ModelMixin,
    scheduler_config: dict[str, Any],
    classes: list[str],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a DDPM-pipeline folder (unet/ + scheduler/) the registry imports unchanged."""
    from diffusers import DDPMScheduler

    unet.save_pretrained(folder / "unet")
    DDPMScheduler.from_config(scheduler_config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    # The scheduler/ folder is the training schedule (DDPM); served at 25 steps, DDIM samples.
    info: dict[str, Any] = {"default_sampler": "ddim", **dict(meta or {})}
    if classes:
        info["classes"] = list(classes)
    (folder / "clinisynth.json").write_text(json.dumps(info, indent=2))


class DiffusionTrainer:
    best_metric = ""
    best_mode = "min"

    def __init__(self, ctx: TrainContext) -> None:
        from diffusers import DDPMScheduler, UNet2DModel

        p = self.p = ctx.params
        self.ctx = ctx
        report = ctx.report
        base_dir = None
        if p["base_model"]:
            base, base_dir = ctx.fetch_model(
                p["base_model"], "base", field_name="params[base_model]"
            )
            self.unet = UNet2DModel.from_pretrained(base_dir / "unet")
            self.classes = base.classes or report.classes
            sched_cfg = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
            self.conditional = self.unet.config.num_class_embeds is not None
            size = int(self.unet.config.sample_size)
            channels = int(self.unet.config.in_channels)
        else:
            self.classes = report.classes
            self.conditional = p["conditioning"] == "class" or (
                p["conditioning"] == "auto" and len(self.classes) > 1
            )
            levels = parse_channels(p["block_out_channels"])
            channels = p["channels"] or report.channels
            multiple = 2 ** (len(levels) - 1)
            size = p["size"] or max(multiple, report.size // multiple * multiple)
            down = ["DownBlock2D"] * len(levels)
            up = ["UpBlock2D"] * len(levels)
            if p["attention"]:
                down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
            self.unet = UNet2DModel(
                sample_size=size,
                in_channels=channels,
                out_channels=channels,
                block_out_channels=tuple(levels),
                layers_per_block=p["layers_per_block"],
                down_block_types=tuple(down),
                up_block_types=tuple(up),
                num_class_embeds=len(self.classes) if self.conditional else None,
                norm_num_groups=8,
            )
            sched_cfg = {
                **DDPM_SCHEDULE,
                "num_train_timesteps": p["num_train_timesteps"],
                "beta_schedule": p["beta_schedule"],
                "prediction_type": p["prediction_type"],
            }
        self.scheduler_config = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.size, self.channels = size, channels

        # Data: a sharded set streams; otherwise the whole (small) set in memory, in [-1, 1].
        entries = report.entries
        index = {c: i for i, c in enumerate(self.classes)}
        labels = {e.path: index.get(e.class_name, 0) for e in entries}
        self.stream = stream_batches(ctx, size=size, channels=channels, labels=labels)
        if self.stream is None:
            paths = [e.path for e in entries]
            images = load_images(ctx.source, paths, size=size, channels=channels)
            self.x = torch.from_numpy(images) * 2 - 1
            self.y = torch.tensor([labels[path] for path in paths], dtype=torch.long)
            self.sampler = EpochSampler(
                len(entries), p["batch_size"], p["seed"], rank=ctx.rank, world=ctx.world_size
            )
        # The memorization gate's index of the training images (rank 0 writes checkpoints).
        self.index = None
        if ctx.rank == 0 and self.stream is None:
            self.index = memorization.from_array(images, seed=p["seed"], source=f"job {ctx.job_id}")
        self.gen = torch.Generator().manual_seed(p["seed"] + 1)

        self.ema = EMA(self.unet, p["ema_decay"]) if p["ema"] else None
        if p["gradient_checkpointing"]:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.optimizer, self.lr = make_optimizer(self.unet.parameters(), p)
        self.model, self.optimizer = ctx.prepare(self.unet, self.optimizer)
        self.eps = unet_eps_fn(self.model)
        self.T = int(self.noise_scheduler.config.num_train_timesteps)

    def step(self, step: int) -> dict[str, float]:
        if self.stream is not None:
            images, y = self.stream.next()
            x0 = (images * 2 - 1).to(self.ctx.device)
        else:
            idx = self.sampler.next()
            x0, y = self.x[idx].to(self.ctx.device), self.y[idx]
        y = y.to(self.ctx.device)
        # Drawn for the global batch, then sharded: the same numbers on 1 or W processes.
        rows = self.p["batch_size"]
        noise = self.ctx.shard(torch.randn((rows, *x0.shape[1:]), generator=self.gen))
        t = self.ctx.shard(torch.randint(0, self.T, (rows,), generator=self.gen))
        noise, t = noise.to(x0.device), t.to(x0.device)

        def micro(sl: slice) -> tuple[torch.Tensor, dict[str, float]]:
            cond = Cond(class_labels=y[sl]) if self.conditional else Cond()
            return diffusion_loss(
                self.eps, x0[sl], cond, t[sl], noise[sl], self.noise_scheduler
            ), {}

        loss, _ = self.ctx.accumulate(
            [self.model],
            micro,
            len(x0),
            self.model.parameters(),
            self.optimizer,
            self.lr,
            self.p["max_grad_norm"],
        )
        if self.ema is not None:
            self.ema.update(self.ctx.unwrap(self.model))
        out = {"loss": loss, "lr": float(self.lr.get_last_lr()[0])}
        if self.stream is not None:  # the share of a step spent waiting for data
            out["data_wait_s"] = self.stream.last_wait_s
        return out

    def evaluate(self) -> dict[str, float]:
        return {}

    def state(self) -> dict[str, Any]:
        return {
            "model": self.ctx.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.lr.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "sampler": (self.stream or self.sampler).state(),
            "gen": self.gen.get_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.ctx.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        (self.stream or self.sampler).load_state(state["sampler"])
        self.gen.set_state(state["gen"])

    def save_model(self, folder: pathlib.Path) -> None:
        unet = self.ema.shadow if self.ema is not None else self.ctx.unwrap(self.model)
        pixel_folder(
            folder,
            unet,
            self.scheduler_config,
            self.classes if self.conditional else [],
            {
                "description": f"{NAME} job {self.ctx.job_id}",
                "labels": {"finetune_job": self.ctx.job_id},
            },
        )
        if self.index is None and self.stream is not None:  # one pass, at the first checkpoint
            self.index = memorization.from_stream(self.ctx, size=self.size, channels=self.channels)
        memorization.write(self.index, folder)


SPEC = KindSpec(
    name=NAME,
    description="Train a pixel diffusion UNet (class-conditional or unconditional) from images.",
    dataset_layout="image_folder",
    params=PARAMS,
    trainer=DiffusionTrainer,
    check=check,
)
