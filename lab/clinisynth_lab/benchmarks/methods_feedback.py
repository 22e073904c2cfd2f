"""Study 1 — expert feedback → reward → reward-weighted fine-tuning (cells, docs/METHODS.md §1).

The loop, each step a finetune job kind run in process (:class:`methods_common.JobRunner`):

1. ``classifier`` on real cell phantoms — FID / KID / PRDC features, the reward model's image
   branch initialisation (FINDINGS.md: it decided whether the reward model learned anything);
2. ``diffusion_pretrain`` — the class-conditional generator (EMA weights), or the shipped
   ``deploy/models/cells`` in quick mode;
3. the oracle (``phantoms.cells.oracle``, the pathologist's stand-in) labels a fresh sample set of
   the generator → ``reward_model`` job on that feedback export;
4. ``reward_finetune`` jobs, one per arm, all from the SAME generated, reward-scored round-0 pool
   (the first arm's job generates it; the others get it as the job artifact, re-scored by their
   own scorer), then fresh pools per round when ``rounds`` > 1:
   ``real_only`` (the reward ≡ 0: β·L_t(real) alone — the bar to beat), ``uniform`` (r ≡ 1, the
   control), ``reward`` (the method), ``oracle`` (r = the oracle's 0/1 verdict: an upper bound);
5. paired evaluation: every arm samples the same seeds (same initial noise, deterministic DDIM),
   judged by the oracle; fidelity on classifier features; a classifier trained on each arm's
   samples and tested on real phantoms.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clinisynth_lab.benchmarks.methods_common import (
    JobRunner,
    cached,
    classifier_features,
    fidelity,
    fmt,
    from_uint8,
    load_pixel_unet,
    markdown_table,
    mean_sd,
    override,
    predict,
    say,
    shipped,
    shipped_size,
    to_uint8,
)
from clinisynth_lab.phantoms.datasets import write_feedback, write_image_folder
from clinisynth_server.finetune.kinds.reward_finetune import load_pool, pool_artifact, save_pool

if TYPE_CHECKING:
    from clinisynth_server.methods.classifier import Classifier

ARMS = ("before", "real_only", "uniform", "reward", "reward_filtered", "oracle")
ARM_LABELS = {
    "before": "before (pretrained, EMA)",
    "real_only": "real term only (r ≡ 0) — the bar",
    "uniform": "control r ≡ 1",
    "reward": "reward-weighted (the method)",
    "reward_filtered": "reward-weighted, r < 0.5 dropped",
    "oracle": "oracle 0/1 reward (upper bound)",
}


@dataclass(frozen=True)
class FeedbackConfig:
    """Sizes and knobs; ``quick`` / ``full`` / ``tiny`` presets below."""

    size: int = 32
    n_real: int = 3000  # training phantoms (generator, classifier, real term)
    n_test: int = 1000  # held-out real phantoms (FID reference, downstream test)
    data_seed: int = 1234
    # Share of training phantoms given an implausibility (cells.CORRUPTIONS), as real archives
    # hold artefacts: continued training on real data then keeps them; feedback can remove them.
    real_corrupt_fraction: float = 0.0
    # classifier on real phantoms
    clf_steps: int = 300
    clf_width: int = 16
    # generator pretraining (diffusion_pretrain)
    gen_channels: str = "16,32,32"
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-4
    pretrain_ema_decay: float = 0.995
    # v: an ε-trained generator of this size leaves noise in deterministic (DDIM) samples
    pretrain_prediction_type: str = "v_prediction"
    # feedback + reward model (reward_model)
    n_labels: int = 384
    rm_steps: int = 200
    rm_lr: float = 1e-4
    # reward_finetune knobs (FINDINGS.md)
    ft_steps: int = 100
    ft_batch: int = 64
    ft_lr: float = 1e-4
    ft_warmup: int = 10
    beta: float = 1.0
    real_to_synthetic: float = 1.0
    pool_size: int = 384
    pool_sampler: str = "ddpm"  # stochastic ancestral sampling (FINDINGS: not deterministic)
    pool_steps: int = 50
    pool_eta: float = 1.0
    rounds: int = 1
    ema: bool = True
    ema_decay: float = 0.99
    min_reward: float = 0.0
    filter_threshold: float = 0.5  # min_reward of the reward_filtered arm
    # evaluation
    n_eval: int = 200
    eval_sampler: str = "ddpm"  # paired all the same: per-image seeded noise streams
    eval_steps: int = 50
    downstream_epochs: int = 10
    arms: tuple[str, ...] = ARMS

    @classmethod
    def quick(cls) -> FeedbackConfig:
        return cls()

    @classmethod
    def full(cls) -> FeedbackConfig:
        return cls(
            n_real=4000,
            pretrain_steps=4000,
            n_labels=1000,
            rm_steps=300,
            ft_steps=300,
            pool_size=1200,
            n_eval=600,
            clf_steps=500,
        )

    @classmethod
    def tiny(cls) -> FeedbackConfig:
        """For the unit test: mechanics only, no claim."""
        return cls(
            n_real=96,
            n_test=64,
            clf_steps=6,
            gen_channels="8,16",
            pretrain_steps=4,
            pretrain_batch=16,
            n_labels=24,
            rm_steps=4,
            ft_steps=3,
            ft_batch=8,
            ft_warmup=0,
            pool_size=16,
            pool_steps=2,
            n_eval=16,
            eval_steps=2,
            downstream_epochs=1,
        )

    def generator_key(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "size",
                "n_real",
                "data_seed",
                "gen_channels",
                "pretrain_steps",
                "pretrain_batch",
                "pretrain_lr",
                "pretrain_ema_decay",
                "pretrain_prediction_type",
            )
        } | self._data_key()

    def classifier_key(self) -> dict[str, Any]:
        return {
            k: getattr(self, k) for k in ("size", "n_real", "data_seed", "clf_steps", "clf_width")
        } | self._data_key()

    def _data_key(self) -> dict[str, Any]:
        """Only when set, so caches of clean-data models stay valid."""
        return (
            {"real_corrupt_fraction": self.real_corrupt_fraction}
            if (self.real_corrupt_fraction)
            else {}
        )


# ---------------------------------------------------------------------------------------------
# scorers swapped into the reward_finetune trainer for the control / bound arms
# ---------------------------------------------------------------------------------------------


class OracleScorer:
    """r(x, y) = the oracle's verdict (1 plausible, 0 not): what a perfect reward model gives."""

    def __init__(self, reward_classes: list[str]) -> None:
        from clinisynth_lab.phantoms import cells

        self.config = SimpleNamespace(in_channels=1)
        self.to_type = [cells.CELL_TYPES.index(c) for c in reward_classes]

    def reward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        from clinisynth_lab.phantoms import cells

        labels = [self.to_type[int(i)] for i in ids]
        ok = cells.oracle_batch(to_uint8(images), labels)
        return torch.from_numpy(ok.astype(np.float32)).to(images.device)


class ConstantScorer:
    """r ≡ c (c = 0: the synthetic term vanishes and only β·L_t(real) trains)."""

    def __init__(self, value: float) -> None:
        self.config = SimpleNamespace(in_channels=1)
        self.value = value

    def reward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.full((images.shape[0],), self.value, device=images.device)


# ---------------------------------------------------------------------------------------------
# shared models
# ---------------------------------------------------------------------------------------------


@dataclass
class CellsAssets:
    real_dir: pathlib.Path  # ImageFolder of training phantoms
    x_test: torch.Tensor  # (N, 1, H, W) in [0, 1]
    y_test_type: np.ndarray  # CELL_TYPES index
    classifier_dir: pathlib.Path
    generator_dir: pathlib.Path
    generator_source: str


def prepare_assets(
    cfg: FeedbackConfig,
    runner: JobRunner,
    work: pathlib.Path,
    *,
    quick: bool,
    refresh: bool,
    cache: pathlib.Path | None,
) -> CellsAssets:
    from clinisynth_lab.phantoms import cells

    say("cells: phantoms")
    imgs, labs = cells.generate(cfg.n_real, seed=cfg.data_seed, size=cfg.size)
    if cfg.real_corrupt_fraction > 0:
        rng = np.random.default_rng(cfg.data_seed)
        bad = rng.choice(len(imgs), round(cfg.real_corrupt_fraction * len(imgs)), replace=False)
        for j, i in enumerate(bad):
            imgs[i] = cells.corrupt(imgs[i], cells.CORRUPTIONS[j % len(cells.CORRUPTIONS)], rng)
        say(f"cells: {len(bad)} of {len(imgs)} training phantoms corrupted")
    real_dir = write_image_folder(work / "cells-real", imgs, labs, cells.CELL_TYPES)
    x_te, y_te = cells.generate(cfg.n_test, seed=cfg.data_seed + 1, size=cfg.size)

    def build_classifier(out: pathlib.Path) -> None:
        runner.run(
            "classifier",
            {
                "max_steps": cfg.clf_steps,
                "batch_size": 64,
                "learning_rate": 1e-3,
                "checkpoint_every": max(1, cfg.clf_steps // 5),
                "backbone": "small_cnn",
                "backbone_width": cfg.clf_width,
                "val_fraction": 0.1,
                "seed": 0,
            },
            real_dir,
            out,
            data_shape=(cfg.size, 1),
        )

    clf_dir = cached(
        "cells-classifier", cfg.classifier_key(), build_classifier, refresh=refresh, root=cache
    )

    # The shipped generator learned clean phantoms: a contaminated set needs its own.
    ship = shipped("cells") if quick and cfg.real_corrupt_fraction == 0 else None
    if ship is not None:
        gen_dir, source = ship, "shipped deploy/models/cells"
    else:

        def build_generator(out: pathlib.Path) -> None:
            # Continue from a cached generator of the same set-up trained for fewer steps (the
            # job's base_model), so raising pretrain_steps costs only the extra steps.
            done, base = _shorter_cached_generator(cfg, cache)
            params: dict[str, Any] = {
                "max_steps": cfg.pretrain_steps - done,
                "batch_size": cfg.pretrain_batch,
                "learning_rate": cfg.pretrain_lr,
                "lr_warmup_steps": min(100, cfg.pretrain_steps - done),
                "checkpoint_every": cfg.pretrain_steps - done,
                "conditioning": "class",
                "block_out_channels": cfg.gen_channels,
                "ema": True,
                "ema_decay": cfg.pretrain_ema_decay,
                "seed": done,
                "prediction_type": cfg.pretrain_prediction_type,
            }
            if base is not None:
                say(
                    f"cells generator: continuing {base.name} ({done} steps) to "
                    f"{cfg.pretrain_steps}"
                )
                params["base_model"] = runner.publish(base, "cells-generator-base")
            runner.run("diffusion_pretrain", params, real_dir, out, data_shape=(cfg.size, 1))

        gen_dir = cached(
            "cells-generator", cfg.generator_key(), build_generator, refresh=refresh, root=cache
        )
        source = f"diffusion_pretrain, {cfg.pretrain_steps} steps (cached)"
    return CellsAssets(real_dir, from_uint8(x_te), y_te, clf_dir, gen_dir, source)


def _shorter_cached_generator(
    cfg: FeedbackConfig, cache: pathlib.Path | None
) -> tuple[int, pathlib.Path | None]:
    """(steps, folder) of the longest cached generator with this set-up and fewer steps."""
    from clinisynth_lab.benchmarks.methods_common import cache_root

    want = {k: v for k, v in cfg.generator_key().items() if k != "pretrain_steps"}
    best: tuple[int, pathlib.Path | None] = (0, None)
    for folder in (cache or cache_root()).glob("cells-generator-*"):
        meta = folder / "benchmark-config.json"
        if not meta.is_file():
            continue
        got = json.loads(meta.read_text())
        steps = int(got.get("pretrain_steps", 0))
        if {k: got.get(k) for k in want} == want and best[0] < steps < cfg.pretrain_steps:
            best = (steps, folder)
    return best


# ---------------------------------------------------------------------------------------------
# sampling + judging
# ---------------------------------------------------------------------------------------------


def sample_cells(
    gen_dir: pathlib.Path, n: int, seed_base: int, *, steps: int, eta: float, sampler: str = "ddim"
) -> tuple[torch.Tensor, list[str]]:
    """``n`` class-balanced samples (seeds ``seed_base + i``); returns images and class names."""
    from clinisynth_server.methods.sampling import Cond, sample, unet_eps_fn
    from clinisynth_server.methods.schedulers import make_scheduler

    unet, sched_cfg, classes = load_pixel_unet(gen_dir)
    size, ch = int(unet.config.sample_size), int(unet.config.in_channels)
    labels = torch.arange(n) % len(classes)
    out = []
    for start in range(0, n, 100):
        y = labels[start : start + 100]
        res = sample(
            unet_eps_fn(unet),
            make_scheduler(sampler, sched_cfg),
            [seed_base + i for i in range(start, start + len(y))],
            (ch, size, size),
            num_inference_steps=steps,
            cond=Cond(class_labels=y),
            eta=eta,
        )
        out.append(res.images)
    return torch.cat(out), [classes[int(i)] for i in labels]


def judge(images: torch.Tensor, class_names: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Oracle verdicts and a count of failed criteria (what went wrong)."""
    from clinisynth_lab.phantoms import cells

    arr = to_uint8(images)
    ok: list[bool] = []
    fails: dict[str, int] = {}
    for img, name in zip(arr, class_names, strict=True):
        v = cells.oracle(img, name)
        ok.append(v.plausible)
        for f in v.failures:
            fails[f] = fails.get(f, 0) + 1
    return np.array(ok), dict(sorted(fails.items(), key=lambda kv: -kv[1]))


def evaluate_generator(
    gen_dir: pathlib.Path,
    cfg: FeedbackConfig,
    seed: int,
    assets: CellsAssets,
    clf: Classifier,
    real_feats: torch.Tensor,
) -> dict[str, Any]:
    """Paired evaluation: the same seeds (initial and per-step noise) for every arm."""
    from clinisynth_lab.phantoms import cells
    from clinisynth_server.methods.classifier import Classifier, ClassifierConfig, train_classifier
    from clinisynth_server.methods.evaluation import features

    x, names = sample_cells(
        gen_dir,
        cfg.n_eval,
        10_000_000 * (seed + 1),
        steps=cfg.eval_steps,
        eta=0.0,
        sampler=cfg.eval_sampler,
    )
    ok, fails = judge(x, names)
    out: dict[str, Any] = {"plausibility": float(ok.mean()), "failures": fails}
    out.update(fidelity(real_feats, features(classifier_features(clf), x), seed=seed))
    # Downstream: a classifier trained on the synthetic images only, tested on real phantoms.
    y_syn = torch.tensor([cells.CELL_TYPES.index(n) for n in names])
    torch.manual_seed(seed)
    down = Classifier(
        ClassifierConfig(
            num_classes=len(cells.CELL_TYPES),
            in_channels=1,
            backbone="small_cnn",
            backbone_width=16,
        )
    )
    train_classifier(
        down,
        x,
        y_syn,
        epochs=cfg.downstream_epochs,
        lr=1e-3,
        batch_size=64,
        seed=seed,
        val_fraction=0.0,
        calibrate=False,
    )
    pred = predict(down, assets.x_test).numpy()
    out["downstream_acc"] = float((pred == assets.y_test_type).mean())
    out["examples"] = x[: 4 * len(cells.CELL_TYPES)]
    return out


# ---------------------------------------------------------------------------------------------
# one seed of the loop
# ---------------------------------------------------------------------------------------------


def run_seed(
    cfg: FeedbackConfig,
    seed: int,
    runner: JobRunner,
    assets: CellsAssets,
    work: pathlib.Path,
    clf: Classifier,
    real_feats: torch.Tensor,
    gen_ref: str,
    clf_ref: str,
) -> dict[str, Any]:
    from clinisynth_lab.phantoms import cells

    res: dict[str, Any] = {"seed": seed, "arms": {}}
    sw = work / f"seed{seed}"

    # 1. Feedback: the oracle judges a fresh sample set of the pretrained generator.
    say(f"feedback seed {seed}: {cfg.n_labels} samples for the oracle")
    xf, names = sample_cells(
        assets.generator_dir,
        cfg.n_labels,
        20_000_000 * (seed + 1),
        steps=cfg.pool_steps,
        eta=cfg.pool_eta,
        sampler=cfg.pool_sampler,
    )
    ok, _ = judge(xf, names)
    res["feedback_plausible_share"] = float(ok.mean())
    fb_x, fb_names, fb_ok = to_uint8(xf), list(names), list(ok)
    if ok.all() or not ok.any():
        # One verdict only (a very weak or very strong generator): the reward model cannot learn
        # from that, so real phantoms (plausible) or wrongly-labelled ones (not) are added — the
        # method's "weak feedback". Recorded, never silent.
        k = max(4, len(ok) // 8)
        imgs, labs = cells.generate(k, seed=cfg.data_seed + 7 + seed, size=cfg.size)
        shown = [
            cells.CELL_TYPES[(int(t) + (1 if ok.all() else 0)) % len(cells.CELL_TYPES)]
            for t in labs
        ]
        fb_x = np.concatenate([fb_x, imgs])
        fb_names += shown
        fb_ok += [not ok.all()] * k
        res["feedback_weak_added"] = k
    fb_dir = write_feedback(sw / "feedback", fb_x, fb_names, fb_ok, generator="cells@bench")

    # 2. Reward model on that export, image branch from the real-phantom classifier.
    rm = runner.run(
        "reward_model",
        {
            "max_steps": cfg.rm_steps,
            "batch_size": 64,
            "learning_rate": cfg.rm_lr,
            "checkpoint_every": max(1, cfg.rm_steps // 10),
            "val_fraction": 0.2,
            "classes": ",".join(cells.CELL_TYPES),
            "init_classifier": clf_ref,
            "backbone": "small_cnn",
            "backbone_width": cfg.clf_width,
            "seed": seed,
        },
        fb_dir,
        sw / "reward-model",
        data_shape=(cfg.size, 1),
    )
    res["reward_model"] = {
        k: rm.evaluation.get(k)
        for k in (
            "val_accuracy",
            "val_majority_baseline",
            "val_reward_plausible",
            "val_reward_implausible",
        )
    }
    rm_ref = runner.publish(rm.folder, f"cells-reward-s{seed}")

    # 3. The arms: same generator, same round-0 pool (re-scored per arm), same evaluation seeds.
    shared_pool: dict[str, pathlib.Path] = {}
    res["arms"]["before"] = evaluate_generator(
        assets.generator_dir, cfg, seed, assets, clf, real_feats
    )
    say(f"seed {seed} before: plausibility {res['arms']['before']['plausibility']:.3f}")
    order = [
        a for a in ("reward", "reward_filtered", "uniform", "oracle", "real_only") if a in cfg.arms
    ]
    for arm in order:
        job = _finetune_arm(cfg, arm, seed, runner, assets, sw, gen_ref, rm_ref, shared_pool)
        ev = evaluate_generator(job.folder, cfg, seed, assets, clf, real_feats)
        ev["train_seconds"] = job.seconds
        res["arms"][arm] = ev
        say(
            f"seed {seed} {arm}: plausibility {ev['plausibility']:.3f}, FID {ev['fid']:.2f}, "
            f"downstream {ev['downstream_acc']:.3f}"
        )
    if shared_pool:
        pool = load_pool(shared_pool[pool_artifact(0)])
        ok_pool, _ = judge((pool["x"] + 1) / 2, [_pool_class(assets, int(i)) for i in pool["y"]])
        r = pool["rewards"]
        res["pool"] = {
            "size": len(r),
            "oracle_plausible": float(ok_pool.mean()),
            "mean_reward_plausible": float(r[torch.from_numpy(ok_pool)].mean())
            if ok_pool.any()
            else None,
            "mean_reward_implausible": float(r[torch.from_numpy(~ok_pool)].mean())
            if (~ok_pool).any()
            else None,
        }
    return res


def _finetune_arm(
    cfg: FeedbackConfig,
    arm: str,
    seed: int,
    runner: JobRunner,
    assets: CellsAssets,
    sw: pathlib.Path,
    gen_ref: str,
    rm_ref: str,
    shared_pool: dict[str, pathlib.Path],
) -> Any:
    """One ``reward_finetune`` job; the first arm's round-0 pool is shared with the others."""
    state: dict[str, Any] = {}
    min_reward = cfg.filter_threshold if arm == "reward_filtered" else cfg.min_reward

    def remember(name: str, path: pathlib.Path) -> None:
        if name == pool_artifact(0):
            shared_pool.setdefault(name, path)

    def hook(trainer: Any) -> None:
        if arm == "oracle":
            trainer.reward = OracleScorer(trainer.reward_classes)
        elif arm == "real_only":
            trainer.reward = ConstantScorer(0.0)
        state["trainer"] = trainer

    def preset(name: str, path: pathlib.Path) -> bool:
        if name not in shared_pool or "trainer" not in state:
            return False
        pool = load_pool(shared_pool[name])
        if arm == "uniform":
            r = torch.ones(len(pool["y"]))
        else:  # the trainer's own scoring, with this arm's scorer
            r = state["trainer"]._score((pool["x"] + 1) / 2, pool["y"]).detach().cpu().float()
        save_pool({**pool, "rewards": r, "keep": r >= min_reward}, path)
        return True

    return runner.run(
        "reward_finetune",
        {
            "max_steps": cfg.ft_steps,
            "batch_size": cfg.ft_batch,
            "learning_rate": cfg.ft_lr,
            "lr_warmup_steps": cfg.ft_warmup,
            "checkpoint_every": cfg.ft_steps,
            "base_model": gen_ref,
            "reward_model": rm_ref,
            "beta": cfg.beta,
            "real_to_synthetic": cfg.real_to_synthetic,
            "pool_size": cfg.pool_size,
            "pool_sampler": cfg.pool_sampler,
            "pool_steps": cfg.pool_steps,
            "pool_eta": cfg.pool_eta,
            "pool_batch": 64,
            "rounds": cfg.rounds,
            "weighting": "uniform" if arm == "uniform" else "reward",
            "min_reward": min_reward,
            "ema": cfg.ema,
            "ema_decay": cfg.ema_decay,
            "seed": seed,
        },
        assets.real_dir,
        sw / f"arm-{arm}",
        data_shape=(cfg.size, 1),
        hook=hook,
        preset=preset,
        on_artifact=remember,
    )


def _pool_class(assets: CellsAssets, index: int) -> str:
    return load_pixel_unet_classes(assets.generator_dir)[index]


_CLASSES_CACHE: dict[str, list[str]] = {}


def load_pixel_unet_classes(folder: pathlib.Path) -> list[str]:
    key = str(folder)
    if key not in _CLASSES_CACHE:
        _CLASSES_CACHE[key] = list(json.loads((folder / "clinisynth.json").read_text())["classes"])
    return _CLASSES_CACHE[key]


# ---------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------


def run(
    cfg: FeedbackConfig,
    seeds: list[int],
    work: pathlib.Path,
    *,
    quick: bool,
    refresh: bool = False,
    cache: pathlib.Path | None = None,
    on_seed: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    from clinisynth_server.methods.classifier import Classifier
    from clinisynth_server.methods.evaluation import features

    runner = JobRunner(work / "runner-cells")
    size = shipped_size("cells") if quick else None
    if size and size != cfg.size:
        cfg = replace(cfg, size=size)  # real phantoms at the shipped generator's size
    assets = prepare_assets(cfg, runner, work, quick=quick, refresh=refresh, cache=cache)
    clf = Classifier.load(assets.classifier_dir)
    real_feats = features(classifier_features(clf), assets.x_test)
    clf_acc = float((clf(assets.x_test).argmax(1).numpy() == _type_to_clf(assets, clf)).mean())
    gen_ref = runner.publish(assets.generator_dir, "cells-generator")
    clf_ref = runner.publish(assets.classifier_dir, "cells-classifier")
    per_seed = []
    for seed in seeds:
        per_seed.append(
            run_seed(cfg, seed, runner, assets, work, clf, real_feats, gen_ref, clf_ref)
        )
        if on_seed is not None:
            on_seed(per_seed[-1])
    return {
        "config": asdict(cfg),
        "seeds": seeds,
        "generator": assets.generator_source,
        "real_classifier_test_accuracy": clf_acc,
        "per_seed": per_seed,
    }


def _type_to_clf(assets: CellsAssets, clf: Classifier) -> np.ndarray:
    """Real test labels in the classifier's class order (ImageFolder: sorted names)."""
    from clinisynth_lab.phantoms import cells

    meta = json.loads((assets.classifier_dir / "clinisynth.json").read_text())
    order = meta["classes"]
    return np.array([order.index(cells.CELL_TYPES[int(t)]) for t in assets.y_test_type])


def table(result: dict[str, Any]) -> str:
    seeds = result["per_seed"]
    arms = [a for a in ARMS if all(a in s["arms"] for s in seeds)]
    rows = []
    for arm in arms:
        vals = [s["arms"][arm] for s in seeds]

        def col(
            key: str, scale: float = 1.0, digits: int = 1, vals: list[dict[str, Any]] = vals
        ) -> str:
            return fmt([v[key] for v in vals], scale, digits)

        delta = "–"
        if arm != "real_only" and all("real_only" in s["arms"] for s in seeds):
            delta = fmt(
                [
                    s["arms"][arm]["plausibility"] - s["arms"]["real_only"]["plausibility"]
                    for s in seeds
                ],
                100,
                1,
            )
        rows.append(
            [
                ARM_LABELS[arm],
                col("plausibility", 100),
                delta,
                col("fid", 1, 2),
                col("kid_x1000", 1, 2),
                col("precision", 1, 2),
                col("recall", 1, 2),
                col("density", 1, 2),
                col("coverage", 1, 2),
                col("downstream_acc", 100),
            ]
        )
    return markdown_table(
        [
            "arm",
            "plausible %",
            "Δ vs real-only (pts)",
            "FID",
            "KID×10³",
            "precision",
            "recall",
            "density",
            "coverage",
            "synthetic→real acc %",
        ],
        rows,
    )


def verdict(result: dict[str, Any], arm: str = "reward") -> dict[str, Any]:
    """Does the claim hold against the real-term-only arm? Plausibility up clearly (every seed,
    ≥ 2 points on average), fidelity and downstream accuracy not worse (within the seed spread)."""
    seeds = result["per_seed"]
    if not all({arm, "real_only"} <= set(s["arms"]) for s in seeds):
        return {"holds": None, "reason": f"{arm} or real_only arm missing"}
    d_pl = [s["arms"][arm]["plausibility"] - s["arms"]["real_only"]["plausibility"] for s in seeds]
    d_fid = [s["arms"][arm]["fid"] - s["arms"]["real_only"]["fid"] for s in seeds]
    d_acc = [
        s["arms"][arm]["downstream_acc"] - s["arms"]["real_only"]["downstream_acc"] for s in seeds
    ]
    m_pl, _ = mean_sd(d_pl)
    m_fid, sd_fid = mean_sd(d_fid)
    m_acc, sd_acc = mean_sd(d_acc)
    fid_ref = mean_sd([s["arms"]["real_only"]["fid"] for s in seeds])[0]
    plaus_up = all(d > 0 for d in d_pl) and m_pl >= 0.02
    fid_ok = m_fid <= max(sd_fid, 0.1 * abs(fid_ref))
    acc_ok = m_acc >= -max(sd_acc, 0.02)
    out = {
        "holds": bool(plaus_up and fid_ok and acc_ok),
        "plausibility_up": plaus_up,
        "fidelity_not_worse": fid_ok,
        "downstream_not_worse": acc_ok,
        "delta_plausibility_pts": [100 * d for d in d_pl],
        "delta_fid": d_fid,
        "delta_downstream_pts": [100 * d for d in d_acc],
    }
    if all("uniform" in s["arms"] for s in seeds):
        out["delta_vs_control_pts"] = [
            100 * (s["arms"][arm]["plausibility"] - s["arms"]["uniform"]["plausibility"])
            for s in seeds
        ]
    return out


def with_overrides(cfg: FeedbackConfig, overrides: dict[str, str]) -> FeedbackConfig:
    """``--set feedback.beta=1.0`` style overrides (typed by the field's default)."""
    return override(cfg, overrides)
