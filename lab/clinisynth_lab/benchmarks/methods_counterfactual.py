"""Study 3 — counterfactuals with a robust + a plain classifier and a diffusion model (fundus).

Models (finetune job kinds in process, or the shipped ``deploy/models/fundus*`` in quick mode):
an unconditional ``diffusion_pretrain`` denoiser, a plain and an adversarially trained (PGD, L2)
``classifier``, and an independently trained held-out classifier (other phantoms, other width,
other seed) that no guidance ever saw. ``methods.counterfactual.run_counterfactual`` edits real
phantoms healthy → lesion and lesion → healthy with cone / robust-only / plain-only guidance, and
a no-guidance control (λ_c = 0: noise-and-denoise with the distance term only), which tells how
much of a "flip" regeneration alone causes. Each guided mode runs at every guidance scale in
``lambda_c`` (a sweep, not a tuned value: the scale that makes the edit flip depends on the
denoiser and the image size, and the claim is about what each mode does at equal strength).

Where the change lies: the phantoms know where lesions are. Lesion → healthy: the image's own
lesion mask (dilated by one pixel: every pixel the lesions touch). Healthy → lesion: where this
patient's lesions can go — the union of the masks ``render_patient`` draws for many lesion seeds.
Each share is printed next to the mask's share of the image (what a spatially uniform change
would score). Lesion → healthy also reports how far the edit moved towards the patient's true
healthy twin (``render_pair``): ‖cf − twin‖ ÷ ‖input − twin‖ (< 1 = closer).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from clinisynth_lab.benchmarks.methods_common import (
    JobRunner,
    cached,
    fmt,
    from_uint8,
    load_pixel_unet,
    markdown_table,
    predict,
    say,
    shipped,
    shipped_size,
)
from clinisynth_lab.phantoms.datasets import write_image_folder

MODES = ("cone", "robust_only", "plain_only", "none")
MODE_LABELS = {
    "cone": "cone (robust ∠ plain, α = 30°)",
    "robust_only": "robust only",
    "plain_only": "plain only",
    "none": "no guidance (λ_c = 0)",
}
DIRECTIONS = ("healthy→lesion", "lesion→healthy")


@dataclass(frozen=True)
class CounterfactualStudyConfig:
    size: int = 48
    n_train: int = 1500
    data_seed: int = 4321
    denoiser_channels: str = "16,32,64"
    denoiser_steps: int = 800
    denoiser_batch: int = 16
    denoiser_lr: float = 2e-4
    clf_steps: int = 300
    clf_width: int = 16
    heldout_width: int = 24
    robust: str = "pgd"
    eps: float = 0.5
    attack_steps: int = 3
    n_images: int = 12  # per direction and seed
    cf_steps: int = 50  # respaced chain
    depth: float = 0.3  # share of the chain re-run (the paper: 0.5)
    lambda_c: tuple[float, ...] = (0.1, 0.5, 2.0)  # swept; one row per value
    lambda_d: float = 0.5
    alpha_deg: float = 30.0
    union_seeds: int = 16
    modes: tuple[str, ...] = MODES

    @classmethod
    def quick(cls) -> CounterfactualStudyConfig:
        return cls()

    @classmethod
    def full(cls) -> CounterfactualStudyConfig:
        return cls(
            size=64,
            n_train=3000,
            denoiser_channels="32,64,64",
            denoiser_steps=3000,
            denoiser_batch=32,
            clf_steps=600,
            attack_steps=7,
            n_images=32,
            cf_steps=200,
            depth=0.5,
        )

    @classmethod
    def tiny(cls) -> CounterfactualStudyConfig:
        return cls(
            size=32,
            n_train=48,
            denoiser_channels="8,16",
            denoiser_steps=3,
            denoiser_batch=8,
            clf_steps=4,
            attack_steps=1,
            n_images=2,
            cf_steps=6,
            union_seeds=2,
        )

    def key(self, *names: str) -> dict[str, Any]:
        return {n: getattr(self, n) for n in ("size", "n_train", "data_seed", *names)}


@dataclass
class FundusModels:
    denoiser_dir: pathlib.Path
    plain_dir: pathlib.Path
    robust_dir: pathlib.Path
    heldout_dir: pathlib.Path
    sources: dict[str, str]


def prepare_models(
    cfg: CounterfactualStudyConfig,
    runner: JobRunner,
    work: pathlib.Path,
    *,
    quick: bool,
    refresh: bool,
    cache: pathlib.Path | None,
) -> FundusModels:
    from clinisynth_lab.phantoms import fundus

    data: dict[int, pathlib.Path] = {}

    def data_dir(seed: int) -> pathlib.Path:
        if seed not in data:
            imgs, labs, _ = fundus.generate(cfg.n_train, seed=seed, size=cfg.size)
            data[seed] = write_image_folder(work / f"fundus-{seed}", imgs, labs, fundus.LABELS)
        return data[seed]

    def classifier(
        adversarial: str, width: int, seed: int, data_seed: int
    ) -> Callable[[pathlib.Path], None]:
        def build(out: pathlib.Path) -> None:
            runner.run(
                "classifier",
                {
                    "max_steps": cfg.clf_steps,
                    "batch_size": 64,
                    "learning_rate": 1e-3,
                    "checkpoint_every": max(1, cfg.clf_steps // 5),
                    "adversarial": adversarial,
                    "eps": cfg.eps,
                    "attack_steps": cfg.attack_steps,
                    "backbone": "small_cnn",
                    "backbone_width": width,
                    "val_fraction": 0.1,
                    "seed": seed,
                },
                data_dir(data_seed),
                out,
                data_shape=(cfg.size, 3),
            )

        return build

    def denoiser(out: pathlib.Path) -> None:
        runner.run(
            "diffusion_pretrain",
            {
                "max_steps": cfg.denoiser_steps,
                "batch_size": cfg.denoiser_batch,
                "learning_rate": cfg.denoiser_lr,
                "lr_warmup_steps": min(100, cfg.denoiser_steps),
                "checkpoint_every": cfg.denoiser_steps,
                "conditioning": "none",
                "block_out_channels": cfg.denoiser_channels,
                "ema": True,
                "ema_decay": 0.995,
                "seed": 0,
            },
            data_dir(cfg.data_seed),
            out,
            data_shape=(cfg.size, 3),
        )

    sources: dict[str, str] = {}

    def get(
        name: str, shipped_name: str, key: dict[str, Any], build: Callable[[pathlib.Path], None]
    ) -> pathlib.Path:
        ship = shipped(shipped_name) if quick and shipped_name else None
        if ship is not None:
            sources[name] = f"shipped deploy/models/{shipped_name}"
            return ship
        sources[name] = "trained by the benchmark (cached)"
        return cached(f"fundus-{name}", key, build, refresh=refresh, root=cache)

    return FundusModels(
        denoiser_dir=get(
            "denoiser",
            "fundus",
            cfg.key("denoiser_channels", "denoiser_steps", "denoiser_batch", "denoiser_lr"),
            denoiser,
        ),
        plain_dir=get(
            "plain",
            "fundus-classifier-plain",
            cfg.key("clf_steps", "clf_width"),
            classifier("none", cfg.clf_width, 0, cfg.data_seed),
        ),
        robust_dir=get(
            "robust",
            "fundus-classifier-robust",
            cfg.key("clf_steps", "clf_width", "robust", "eps", "attack_steps"),
            classifier(cfg.robust, cfg.clf_width, 0, cfg.data_seed),
        ),
        heldout_dir=get(
            "heldout",
            "",
            cfg.key("clf_steps", "heldout_width"),
            classifier("none", cfg.heldout_width, 1, cfg.data_seed + 1),
        ),
        sources=sources,
    )


def arms(cfg: CounterfactualStudyConfig) -> list[tuple[str, float]]:
    """(mode, λ_c) pairs: every guided mode at every scale, the no-guidance control once."""
    return [
        (mode, 0.0) if mode == "none" else (mode, lam)
        for mode in cfg.modes
        for lam in ((0.0,) if mode == "none" else cfg.lambda_c)
    ]


def example_arm(cfg: CounterfactualStudyConfig) -> tuple[str, float]:
    """The arm the contact sheet shows: the first mode at the middle of the sweep."""
    guided = [a for a in arms(cfg) if a[0] != "none"] or arms(cfg)
    same_mode = [a for a in guided if a[0] == guided[0][0]]
    return same_mode[len(same_mode) // 2]


def arm_key(direction: str, mode: str, lam: float) -> str:
    return f"{direction}|{mode}" if mode == "none" else f"{direction}|{mode}|{lam:g}"


def _dilate(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=1)


def run_seed(
    cfg: CounterfactualStudyConfig, seed: int, models: FundusModels, nets: dict[str, Any]
) -> dict[str, Any]:
    from clinisynth_lab.phantoms import fundus
    from clinisynth_server.methods.counterfactual import (
        CounterfactualConfig,
        make_guide_fn,
        run_counterfactual,
    )
    from clinisynth_server.methods.sampling import unet_eps_fn

    unet, sched_cfg, size = nets["unet"], nets["sched"], nets["size"]
    from clinisynth_server.methods.schedulers import make_scheduler

    alphas = make_scheduler("ddpm", sched_cfg).alphas_cumprod
    # Test eyes: other patients than any training set.
    pool = 4 * cfg.n_images + 8
    imgs, labs, masks = fundus.generate(pool, seed=10_000 + seed, size=size)
    ids = fundus.patient_ids(pool, 10_000 + seed)
    out: dict[str, Any] = {"seed": seed, "results": {}}
    for direction in DIRECTIONS:
        src = 0 if direction == "healthy→lesion" else 1
        pick = np.flatnonzero(labs == src)[: cfg.n_images]
        x01 = from_uint8(imgs[pick])
        target = torch.full((len(pick),), 1 - src, dtype=torch.long)
        if src == 0:  # where this patient's lesions can go
            region = np.zeros((len(pick), size, size), dtype=bool)
            for j, i in enumerate(pick):
                for k in range(cfg.union_seeds):
                    region[j] |= fundus.render_patient(
                        int(ids[i]), size=size, lesions=True, lesion_seed=k
                    )[1]
            twins = None
        else:
            region = masks[pick]
            twins = from_uint8(
                np.stack(
                    [fundus.render_patient(int(ids[i]), size=size, lesions=False)[0] for i in pick]
                )
            )
        region = np.stack([_dilate(m) for m in region])
        for mode, lam in arms(cfg):
            ccfg = CounterfactualConfig.fundus(
                steps=cfg.cf_steps,
                depth=cfg.depth,
                alpha_deg=cfg.alpha_deg,
                lambda_c=lam,
                lambda_d=cfg.lambda_d,
                mode="cone" if mode == "none" else mode,
            )
            guide = make_guide_fn(unet_eps_fn(unet), nets["robust"], nets["plain"], mode=ccfg.mode)
            res = run_counterfactual(
                guide,
                x01 * 2 - 1,
                target,
                alphas,
                config=ccfg,
                seeds=[1000 * seed + j for j in range(len(pick))],
            )
            cf = (res.image + 1) / 2
            change = (cf - x01).abs().sum(1).numpy()  # (B, H, W)
            inside = (change * region).reshape(len(pick), -1).sum(1) / np.maximum(
                change.reshape(len(pick), -1).sum(1), 1e-12
            )
            r: dict[str, Any] = {
                "flip_robust": float((predict(nets["robust"], cf) == target).float().mean()),
                "flip_plain": float((predict(nets["plain"], cf) == target).float().mean()),
                "flip_heldout": float((predict(nets["heldout"], cf) == target).float().mean()),
                "l2": float((cf - x01).flatten(1).norm(dim=1).mean()),
                "mean_abs": float((cf - x01).abs().mean()),
                "share_in_mask": float(inside.mean()),
                "mask_area": float(region.mean()),
            }
            if twins is not None:
                before = (x01 - twins).flatten(1).norm(dim=1)
                after = (cf - twins).flatten(1).norm(dim=1)
                r["to_twin_ratio"] = float((after / before.clamp_min(1e-6)).mean())
            out["results"][arm_key(direction, mode, lam)] = r
            say(
                f"counterfactual seed {seed} {direction} {mode} λ_c={lam}: flip robust "
                f"{r['flip_robust']:.2f} held-out {r['flip_heldout']:.2f}, in-mask "
                f"{r['share_in_mask']:.2f} (area {r['mask_area']:.2f})"
            )
            if seed == nets["first_seed"] and (mode, lam) == example_arm(cfg):
                out.setdefault("examples", {})[direction] = torch.cat([x01[:4], cf[:4]])
        # Accuracy of the classifiers on the inputs themselves (before any edit).
        out.setdefault("input_accuracy", {})[direction] = {
            name: float((predict(nets[name], x01) == src).float().mean())
            for name in ("robust", "plain", "heldout")
        }
    return out


def run(
    cfg: CounterfactualStudyConfig,
    seeds: list[int],
    work: pathlib.Path,
    *,
    quick: bool,
    refresh: bool = False,
    cache: pathlib.Path | None = None,
) -> dict[str, Any]:
    from clinisynth_lab.phantoms import fundus
    from clinisynth_server.methods.classifier import Classifier

    runner = JobRunner(work / "runner-fundus")
    size = shipped_size("fundus") if quick else None
    if size and size != cfg.size:
        cfg = replace(cfg, size=size)  # phantoms and held-out classifier at the shipped size
    models = prepare_models(cfg, runner, work, quick=quick, refresh=refresh, cache=cache)
    unet, sched, _ = load_pixel_unet(models.denoiser_dir)
    unet.requires_grad_(False)
    nets: dict[str, Any] = {
        "unet": unet,
        "sched": sched,
        "size": int(unet.config.sample_size),
        "robust": Classifier.load(models.robust_dir).requires_grad_(False),
        "plain": Classifier.load(models.plain_dir).requires_grad_(False),
        "heldout": Classifier.load(models.heldout_dir).requires_grad_(False),
        "first_seed": seeds[0],
    }
    # Clean accuracy of each classifier on fresh phantoms (context for the flip rates).
    xt, yt, _ = fundus.generate(200, seed=99_999, size=nets["size"])
    x_t = from_uint8(xt)
    acc = {
        name: float((predict(nets[name], x_t) == torch.from_numpy(yt)).float().mean())
        for name in ("robust", "plain", "heldout")
    }
    per_seed = [run_seed(cfg, s, models, nets) for s in seeds]
    ex_mode, ex_lam = example_arm(cfg)
    return {
        "config": asdict(cfg),
        "seeds": seeds,
        "sources": models.sources,
        "example_arm": f"{MODE_LABELS[ex_mode]} at λ_c = {ex_lam:g}, first seed",
        "classifier_test_accuracy": acc,
        "per_seed": per_seed,
    }


def table(result: dict[str, Any]) -> str:
    rows = []
    seeds = result["per_seed"]
    cfg = CounterfactualStudyConfig(
        **{
            **result["config"],
            "modes": tuple(result["config"]["modes"]),
            "lambda_c": tuple(result["config"]["lambda_c"]),
        }
    )
    for direction in DIRECTIONS:
        for mode, lam in arms(cfg):
            vals = [s["results"][arm_key(direction, mode, lam)] for s in seeds]

            def col(
                key: str, scale: float = 1.0, digits: int = 1, vals: list[dict[str, Any]] = vals
            ) -> str:
                if not all(key in v for v in vals):
                    return "–"
                return fmt([v[key] for v in vals], scale, digits)

            rows.append(
                [
                    direction,
                    MODE_LABELS[mode],
                    "0" if mode == "none" else f"{lam:g}",
                    col("flip_robust", 100),
                    col("flip_plain", 100),
                    col("flip_heldout", 100),
                    col("l2", 1, 2),
                    col("mean_abs", 1000, 1),
                    col("share_in_mask", 100),
                    col("mask_area", 100),
                    col("to_twin_ratio", 1, 2),
                ]
            )
    return markdown_table(
        [
            "direction",
            "guidance",
            "λ_c",
            "flip robust %",
            "flip plain %",
            "flip held-out %",
            "L2 to input",
            "mean |Δ| ×10³",
            "change in lesion region %",
            "region area %",
            "‖cf−twin‖ ÷ ‖x−twin‖",
        ],
        rows,
    )
