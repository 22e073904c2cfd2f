"""``reward_finetune``: reward-weighted fine-tuning of a pixel generator (docs/METHODS.md §1).

Objective, the SAME timestep t for both terms (row i of the real and the synthetic half share
t[i])::

    L(θ) = β · mean L_t(x_real, y) + mean r(x_syn, y) · L_t(x_syn, y)

Each round starts by generating a synthetic pool with the current weights (EMA weights when
``ema`` is on) — class-balanced, ``pool_sampler`` for ``pool_steps`` steps with ``pool_eta``
(η = 1: stochastic, η = 0: deterministic DDIM) — and scoring it with the reward model; the pool
is stored as a job artifact so a resumed job trains on the same pool. ``rounds`` > 1 regenerates
the pool each round (FINDINGS.md: training on its own deterministic samples made the first
probe drift; stochastic pools, β ≥ 1, more real than synthetic, EMA and fresh pools are the
knobs). ``weighting=uniform`` is the r = 1 control arm; ``real_to_synthetic`` sets the batch mix.
Sampling and scoring run in-process (torch) inside the worker: they are part of training.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clinisynth_server.errors import FieldViolation
from clinisynth_server.finetune import memorization, models
from clinisynth_server.finetune.datasets import DatasetReport, check_classes, load_images
from clinisynth_server.finetune.kinds.base import (
    EMA,
    CheckContext,
    EpochSampler,
    KindSpec,
    TrainContext,
    batched,
    make_optimizer,
)
from clinisynth_server.finetune.kinds.diffusion_pretrain import PIXEL_KINDS, pixel_folder
from clinisynth_server.finetune.params import (
    Param,
    common_params,
    split_real_synthetic,
    unet_params,
)
from clinisynth_server.methods.losses import per_sample_losses, reward_weighted_loss
from clinisynth_server.methods.reward_model import RewardModel
from clinisynth_server.methods.sampling import Cond, sample, unet_eps_fn
from clinisynth_server.methods.schedulers import SAMPLERS, make_scheduler

NAME = "reward_finetune"

PARAMS = (
    *common_params(max_steps=300, batch_size=32, learning_rate=1e-4, checkpoint_every=50),
    Param(
        "base_model",
        "str",
        "",
        "the pixel generator to fine-tune (catalog name or store prefix); required",
    ),
    Param(
        "reward_model",
        "str",
        "",
        "the reward model r(x, y) (catalog name of a reward model or a store prefix); required",
    ),
    Param("beta", "float", "0.3", "weight β of the real-data term", minimum=0.0, maximum=100.0),
    Param(
        "real_to_synthetic",
        "float",
        "1.0",
        "real ÷ synthetic examples per batch (1 = half and half)",
        minimum=0.01,
        maximum=100.0,
    ),
    Param(
        "pool_size",
        "int",
        "256",
        "synthetic images generated and scored per round",
        minimum=1,
        maximum=1_000_000,
    ),
    Param("pool_sampler", "choice", "ddim", "sampler of the pool", choices=SAMPLERS),
    Param("pool_steps", "int", "25", "denoising steps per pool image", minimum=1, maximum=1000),
    Param(
        "pool_eta",
        "float",
        "1.0",
        "DDIM η of the pool (1 = stochastic, 0 = deterministic)",
        minimum=0.0,
        maximum=1.0,
    ),
    Param("pool_batch", "int", "64", "images per sampling batch", minimum=1, maximum=4096),
    Param("rounds", "int", "1", "rounds; each starts with a fresh pool", minimum=1, maximum=1000),
    Param(
        "weighting",
        "choice",
        "reward",
        "reward: r(x, y) weights; uniform: r = 1 (control)",
        choices=("reward", "uniform"),
    ),
    Param(
        "min_reward",
        "float",
        "0.0",
        "drop pool images scoring below this",
        minimum=0.0,
        maximum=1.0,
    ),
    Param("ema", "bool", "true", "EMA weights for sampling pools and in promoted folders"),
    Param("ema_decay", "float", "0.999", "EMA decay per step", minimum=0.0, maximum=1.0),
    *unet_params(),
)


def check(params: dict[str, Any], report: DatasetReport, ctx: CheckContext) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    base = reward = None
    for name in ("base_model", "reward_model"):
        if not params[name]:
            out.append(FieldViolation(f"params[{name}]", "required"))
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
                        "params[base_model]",
                        f"{base.ref} is a {base.kind} "
                        "model; reward fine-tuning needs a pixel generator",
                    )
                )
                base = None
            elif base.kind == "class_conditional":
                out += [
                    FieldViolation("dataset", p)
                    for p in check_classes(report, base.classes, base.ref)
                ]
    if params["reward_model"]:
        try:
            reward = models.resolve(
                params["reward_model"], ctx.catalog, ctx.store, field_name="params[reward_model]"
            )
        except Exception as exc:
            out.append(FieldViolation("params[reward_model]", str(exc)))
        else:
            if reward.kind != "reward":
                out.append(
                    FieldViolation(
                        "params[reward_model]",
                        f"{reward.ref} is a {reward.kind} model, not a reward",
                    )
                )
            elif base is not None and base.classes:
                missing = [c for c in base.classes if c not in reward.classes]
                if missing:
                    out.append(
                        FieldViolation(
                            "params[reward_model]",
                            f"{reward.ref} cannot score classes {missing} "
                            f"of {base.ref} (it knows {reward.classes})",
                        )
                    )
    n = params["batch_size"]
    n_real, n_syn = split_real_synthetic(n, params["real_to_synthetic"])
    if n_syn < 1 or n_real < 1:
        out.append(
            FieldViolation(
                "params[real_to_synthetic]",
                f"batch_size {n} leaves no room for one real and one synthetic example",
            )
        )
    return out


POOL_KEYS = ("x", "y", "rewards", "keep")


def pool_artifact(round_: int) -> str:
    """Artifact name of a round's synthetic pool (safetensors: reading it never runs code)."""
    return f"pool/round_{round_:04d}.safetensors"


def save_pool(pool: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    save_file({k: pool[k].detach().cpu().contiguous() for k in POOL_KEYS}, str(path))


def load_pool(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The pool tensors; a file missing one of ``POOL_KEYS`` is refused (``KeyError``)."""
    tensors = load_file(str(path), device="cpu")
    missing = [k for k in POOL_KEYS if k not in tensors]
    if missing:
        raise KeyError(f"pool file {path.name} lacks {', '.join(missing)}")
    return {k: tensors[k] for k in POOL_KEYS}


class RewardFinetuneTrainer:
    best_metric = ""
    best_mode = "max"

    def __init__(self, ctx: TrainContext) -> None:
        from diffusers import DDPMScheduler, UNet2DModel

        p = self.p = ctx.params
        self.ctx = ctx
        base, base_dir = ctx.fetch_model(p["base_model"], "base", field_name="params[base_model]")
        rm, rm_dir = ctx.fetch_model(p["reward_model"], "reward", field_name="params[reward_model]")
        self.reward = RewardModel.load(rm_dir).to(ctx.device).eval()
        self.reward_classes = rm.classes
        self.unet = UNet2DModel.from_pretrained(base_dir / "unet")
        import json

        cfg = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
        self.scheduler_config = {k: v for k, v in cfg.items() if not k.startswith("_")}
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.T = int(self.noise_scheduler.config.num_train_timesteps)
        self.conditional = self.unet.config.num_class_embeds is not None
        self.classes = base.classes if self.conditional else []
        self.size = int(self.unet.config.sample_size)
        self.channels = int(self.unet.config.in_channels)

        entries = ctx.report.entries
        imgs = load_images(
            ctx.source, [e.path for e in entries], size=self.size, channels=self.channels
        )
        self.x_real = torch.from_numpy(imgs) * 2 - 1
        # The memorization gate's index: the real training images (rank 0 writes checkpoints).
        self.index = (
            memorization.from_array(imgs, seed=p["seed"], source=f"job {ctx.job_id}")
            if ctx.rank == 0
            else None
        )
        index = {c: i for i, c in enumerate(self.classes)}
        self.y_real = torch.tensor([index.get(e.class_name, 0) for e in entries])
        self.n_real, self.n_syn = split_real_synthetic(p["batch_size"], p["real_to_synthetic"])
        self.real_sampler = EpochSampler(
            len(entries), self.n_real, p["seed"], rank=ctx.rank, world=ctx.world_size
        )
        self.steps_per_round = -(-p["max_steps"] // p["rounds"])
        self.gen = torch.Generator().manual_seed(p["seed"] + 3)
        self.ema = EMA(self.unet, p["ema_decay"]) if p["ema"] else None
        if p["gradient_checkpointing"]:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.optimizer, self.lr = make_optimizer(self.unet.parameters(), p)
        self.model, self.optimizer = ctx.prepare(self.unet, self.optimizer)
        self.eps = unet_eps_fn(self.model)
        self.round = -1
        self.pool: dict[str, torch.Tensor] = {}
        self.pool_sampler: EpochSampler | None = None

    # -- the synthetic pool ---------------------------------------------------------------
    def _pool_for(self, round_: int) -> None:
        """Load this round's pool artifact, or generate, score and store it."""
        name = pool_artifact(round_)
        local = self.ctx.scratch(name)
        if self.ctx.load_artifact(name, local):
            self.pool = load_pool(local)
        else:
            self.pool = self._generate(round_)
            save_pool(self.pool, local)
            self.ctx.save_artifact(name, local)
            r = self.pool["rewards"]
            self.ctx.log(
                f"round {round_}: pool of {len(r)} scored, mean reward "
                f"{float(r.mean()):.3f}, kept {int(self.pool['keep'].sum())}"
            )
        keep = self.pool["keep"].nonzero().flatten()
        self.pool_index = keep if len(keep) else torch.arange(len(self.pool["rewards"]))
        self.pool_sampler = EpochSampler(
            len(self.pool_index),
            self.n_syn,
            self.p["seed"] + 7919 * (round_ + 1),
            rank=self.ctx.rank,
            world=self.ctx.world_size,
        )
        self.round = round_

    @torch.no_grad()
    def _generate(self, round_: int) -> dict[str, torch.Tensor]:
        p, dev = self.p, self.ctx.device
        unet = (self.ema.shadow if self.ema is not None else self.ctx.unwrap(self.model)).eval()
        eps_fn = unet_eps_fn(unet)
        k = max(1, len(self.classes))
        labels = torch.arange(p["pool_size"]) % k
        xs, rewards = [], []
        base_seed = (p["seed"] * 1_000_003 + round_ * 7_919) % 2**31
        for sl in batched(p["pool_size"], p["pool_batch"]):
            self.ctx.check_cancel()
            y = labels[sl]
            cond = Cond(class_labels=y.to(dev)) if self.conditional else Cond()
            seeds = [base_seed + i for i in range(sl.start, sl.stop)]
            out = sample(
                eps_fn,
                make_scheduler(p["pool_sampler"], self.scheduler_config),
                seeds,
                (self.channels, self.size, self.size),
                num_inference_steps=p["pool_steps"],
                cond=cond,
                eta=p["pool_eta"],
                device=dev,
            )
            images = out.images.to(dev)  # [0, 1]
            if p["weighting"] == "uniform":
                r = torch.ones(len(y))
            else:
                r = self._score(images, y).cpu()
            xs.append(images.cpu() * 2 - 1)
            rewards.append(r)
        self.ctx.unwrap(self.model).train()
        r = torch.cat(rewards)
        return {"x": torch.cat(xs), "y": labels, "rewards": r, "keep": r >= p["min_reward"]}

    def _score(self, images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.reward.config
        if images.shape[1] != cfg.in_channels:
            images = images.mean(1, keepdim=True).expand(-1, cfg.in_channels, -1, -1)
        if self.classes:
            ids = torch.tensor([self.reward_classes.index(self.classes[int(i)]) for i in y])
        else:
            ids = torch.zeros(len(y), dtype=torch.long)
        return self.reward.reward(images, ids.to(images.device))

    # -- one step ---------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        round_ = (step - 1) // self.steps_per_round
        if round_ != self.round:
            self._pool_for(round_)
        assert self.pool_sampler is not None
        dev = self.ctx.device
        ri = self.real_sampler.next()
        si = self.pool_index[self.pool_sampler.next()]
        x_real, y_real = self.x_real[ri].to(dev), self.y_real[ri].to(dev)
        x_syn, y_syn = self.pool["x"][si].to(dev), self.pool["y"][si].to(dev)
        r = self.pool["rewards"][si].detach().to(dev)  # weights, never a path for gradients
        # Drawn for the global batch, then sharded (as the samplers shard their rows): the same
        # numbers on 1 or W processes; local row j of either half is global row rank + j·W,
        # so the two halves still share t row by row.
        shard = self.ctx.shard
        t = shard(torch.randint(0, self.T, (max(self.n_real, self.n_syn),), generator=self.gen))
        t = t.to(dev)
        n_real = shard(torch.randn((self.n_real, *x_real.shape[1:]), generator=self.gen)).to(dev)
        n_syn = shard(torch.randn((self.n_syn, *x_syn.shape[1:]), generator=self.gen)).to(dev)
        beta = self.p["beta"]
        steps = int(self.p["gradient_accumulation_steps"])
        m_real, m_syn = len(ri) // steps, len(si) // steps

        def micro(sl: slice) -> tuple[torch.Tensor, dict[str, float]]:
            k = sl.start  # accumulate() slices range(steps): the micro-batch's number
            rs, ss = slice(k * m_real, (k + 1) * m_real), slice(k * m_syn, (k + 1) * m_syn)
            c_real = Cond(class_labels=y_real[rs]) if self.conditional else Cond()
            c_syn = Cond(class_labels=y_syn[ss]) if self.conditional else Cond()
            # The micro-batch's rows of t: real row i and synthetic row i share t[i].
            t_k = t[k * max(m_real, m_syn) : (k + 1) * max(m_real, m_syn)]
            if m_real == m_syn:  # the method's own function
                out = reward_weighted_loss(
                    self.eps,
                    x_real[rs],
                    c_real,
                    x_syn[ss],
                    c_syn,
                    r[ss],
                    t_k,
                    n_real[rs],
                    n_syn[ss],
                    self.noise_scheduler,
                    beta=beta,
                )
                loss, real_term, syn_term = out.total, out.real, out.synthetic
            else:  # unequal halves: row i of each half still shares t[i]
                losses = per_sample_losses(
                    self.eps,
                    torch.cat([x_real[rs], x_syn[ss]]),
                    Cond.cat(c_real, c_syn),
                    torch.cat([t_k[:m_real], t_k[:m_syn]]),
                    torch.cat([n_real[rs], n_syn[ss]]),
                    self.noise_scheduler,
                )
                real_term = losses[:m_real].mean()
                syn_term = (r[ss].to(losses.dtype) * losses[m_real:]).mean()
                loss = beta * real_term + syn_term
            return loss, {"loss_real": float(real_term), "loss_synthetic": float(syn_term)}

        loss, terms = self.ctx.accumulate(
            [self.model],
            micro,
            steps,
            self.model.parameters(),
            self.optimizer,
            self.lr,
            self.p["max_grad_norm"],
        )
        if self.ema is not None:
            self.ema.update(self.ctx.unwrap(self.model))
        return {
            "loss": loss,
            **terms,
            "pool_reward": float(r.mean()),
            "round": float(round_),
        }

    def evaluate(self) -> dict[str, float]:
        return {}

    def state(self) -> dict[str, Any]:
        return {
            "model": self.ctx.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.lr.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "real_sampler": self.real_sampler.state(),
            "pool_sampler": self.pool_sampler.state() if self.pool_sampler else None,
            "round": self.round,
            "gen": self.gen.get_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.ctx.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.real_sampler.load_state(state["real_sampler"])
        self.gen.set_state(state["gen"])
        if state["round"] >= 0:
            self._pool_for(int(state["round"]))
            if state.get("pool_sampler") and self.pool_sampler is not None:
                self.pool_sampler.load_state(state["pool_sampler"])

    def save_model(self, folder: pathlib.Path) -> None:
        unet = self.ema.shadow if self.ema is not None else self.ctx.unwrap(self.model)
        pixel_folder(
            folder,
            unet,
            self.scheduler_config,
            self.classes,
            {
                "description": f"{NAME} of {self.p['base_model']} with "
                f"{self.p['reward_model']} (job {self.ctx.job_id})",
                "labels": {
                    "finetune_job": self.ctx.job_id,
                    "base_model": self.p["base_model"],
                    "reward_model": self.p["reward_model"],
                },
            },
        )
        memorization.write(self.index, folder)


SPEC = KindSpec(
    name=NAME,
    description="Reward-weighted fine-tuning β·L_t(x_real,y) + r(x_syn,y)·L_t(x_syn,y) on mixed "
    "real and generated, reward-scored batches (the feedback method).",
    dataset_layout="image_folder",
    params=PARAMS,
    trainer=RewardFinetuneTrainer,
    check=check,
)
