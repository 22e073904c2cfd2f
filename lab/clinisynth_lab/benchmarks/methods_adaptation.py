"""Study 2 — adapting a text-to-image model to chest reports (RoentGen / SD adaptation, chest).

A tiny ``StableDiffusionPipeline`` folder (``builders.build_text_to_image``) is pretrained on the
OTHER phantom domain — abdominal CT slices with captions — by ``text_to_image_adaptation`` jobs
(first the VAE alone, its latent scale then set to 1/std as Stable Diffusion did, then U-Net +
text encoder), and adapted to chest radiographs with their reports by the same job kind:
U-Net only vs U-Net + text encoder, each on the abdomen VAE (frozen, as the adaptation paper
found enough for Stable Diffusion's) and on a VAE first tuned on chest (``arms`` picks which).
``--quick`` also measures the shipped ``deploy/models/chest`` when present (trained longer by
``scripts/train_demo_models.py``); the base and the ablation arms are trained here.

Per finding (single-finding report prompts, several phrasings, 4 images each): the share of
images in which a classifier trained on real chest phantoms detects the prompted finding (the
adaptation paper's 95 % check); fidelity (FID / KID on that classifier's features) and intra-
prompt MS-SSIM (4 images → 6 pairs; lower = more diverse). A "real phantoms" row gives the
ceiling of each number.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clinisynth_lab.benchmarks.methods_common import (
    JobRunner,
    cached,
    classifier_features,
    fidelity,
    fit_size,
    fmt,
    from_uint8,
    markdown_table,
    predict,
    say,
    shipped,
)
from clinisynth_lab.phantoms.datasets import write_image_folder, write_manifest

if TYPE_CHECKING:
    from clinisynth_server.methods.classifier import Classifier

FINDINGS = (
    "no_finding",
    "pleural_effusion_left",
    "pleural_effusion_right",
    "cardiomegaly",
    "pneumothorax",
)
ARMS = ("real", "base", "unet", "unet_text", "unet_vae", "unet_text_vae")
# (arm, train the text encoder too, start from the chest-tuned VAE)
ADAPTED = {
    "unet": (False, False),
    "unet_text": (True, False),
    "unet_vae": (False, True),
    "unet_text_vae": (True, True),
}
ARM_LABELS = {
    "real": "real chest phantoms (ceiling)",
    "base": "abdomen-pretrained, not adapted",
    "unet": "adapted: U-Net only",
    "unet_text": "adapted: U-Net + text encoder",
    "unet_vae": "adapted: VAE, then U-Net only",
    "unet_text_vae": "adapted: VAE, then U-Net + text encoder",
    "shipped": "shipped deploy/models/chest",
}


@dataclass(frozen=True)
class AdaptationConfig:
    size: int = 32
    n_abdomen: int = 2000
    n_chest: int = 2000
    n_test: int = 600
    data_seed: int = 777
    unet_channels: tuple[int, int] = (32, 64)
    text_dim: int = 32
    vae_steps: int = 300
    vae_lr: float = 1e-3
    pretrain_steps: int = 1000
    adapt_steps: int = 800
    batch: int = 16
    lr: float = 3e-4
    clf_steps: int = 300
    prompts_per_finding: int = 3
    images_per_prompt: int = 4
    sample_steps: int = 25
    guidance: float = 3.0
    arms: tuple[str, ...] = ARMS  # "real" and "base" are always measured

    @classmethod
    def quick(cls) -> AdaptationConfig:
        return cls()

    @classmethod
    def full(cls) -> AdaptationConfig:
        return cls(
            size=64,
            n_abdomen=4000,
            n_chest=4000,
            vae_steps=1000,
            pretrain_steps=3000,
            adapt_steps=2000,
            clf_steps=600,
            prompts_per_finding=8,
        )

    @classmethod
    def tiny(cls) -> AdaptationConfig:
        return cls(
            n_abdomen=32,
            n_chest=48,
            n_test=40,
            unet_channels=(16, 32),
            text_dim=16,
            vae_steps=2,
            pretrain_steps=2,
            adapt_steps=2,
            batch=4,
            clf_steps=4,
            prompts_per_finding=1,
            images_per_prompt=2,
            sample_steps=2,
        )

    def key(self, *names: str) -> dict[str, Any]:
        return {n: getattr(self, n) for n in ("size", "data_seed", *names)}


def _single_finding(batch: Any) -> np.ndarray:
    return np.array([len(f) == 1 for f in batch.findings])


def prepare(
    cfg: AdaptationConfig,
    runner: JobRunner,
    work: pathlib.Path,
    *,
    quick: bool,
    refresh: bool,
    cache: pathlib.Path | None,
) -> dict[str, Any]:
    """Data sets, the chest classifier, the abdomen-pretrained base and the adapted arms."""
    from clinisynth_lab import builders
    from clinisynth_lab.phantoms import abdomen, chest

    say("chest/abdomen: phantoms")
    ab = abdomen.generate(cfg.n_abdomen, seed=cfg.data_seed, size=cfg.size)
    abd_dir = write_manifest(work / "abdomen", ab.images, ab.captions)
    ch = chest.generate(cfg.n_chest, seed=cfg.data_seed + 1, size=cfg.size)
    chest_dir = write_manifest(work / "chest", ch.images, ch.reports)
    one = _single_finding(ch)
    clf_dir_data = write_image_folder(
        work / "chest-classes",
        ch.images[one],
        [FINDINGS.index(f[0]) for f, o in zip(ch.findings, one, strict=True) if o],
        FINDINGS,
    )

    def build_classifier(out: pathlib.Path) -> None:
        runner.run(
            "classifier",
            {
                "max_steps": cfg.clf_steps,
                "batch_size": 64,
                "learning_rate": 1e-3,
                "checkpoint_every": max(1, cfg.clf_steps // 5),
                "backbone": "small_cnn",
                "backbone_width": 16,
                "val_fraction": 0.1,
                "seed": 0,
            },
            clf_dir_data,
            out,
            data_shape=(cfg.size, 1),
        )

    clf_dir = cached(
        "chest-classifier",
        cfg.key("n_chest", "clf_steps"),
        build_classifier,
        refresh=refresh,
        root=cache,
    )

    def build_base(out: pathlib.Path) -> None:
        init = work / "t2i-init"
        builders.build_text_to_image(
            init,
            size=cfg.size,
            image_channels=1,
            unet_channels=cfg.unet_channels,
            text_dim=cfg.text_dim,
            description="benchmark text-to-image (random init)",
        )
        ref = runner.publish(init, "t2i-init")
        vae_dir = work / "t2i-vae"
        runner.run(
            "text_to_image_adaptation",
            {
                "max_steps": cfg.vae_steps,
                "batch_size": 32,
                "learning_rate": cfg.vae_lr,
                "lr_warmup_steps": min(20, cfg.vae_steps),
                "checkpoint_every": cfg.vae_steps,
                "base_model": ref,
                "train_unet": False,
                "train_text_encoder": False,
                "train_vae": True,
                "weight_decay": 0.0,
                "seed": 0,
            },
            abd_dir,
            vae_dir,
            data_shape=(cfg.size, 1),
        )
        _set_latent_scale(vae_dir, ab.images)
        ref = runner.publish(vae_dir, "t2i-vae")
        runner.run(
            "text_to_image_adaptation",
            {
                "max_steps": cfg.pretrain_steps,
                "batch_size": cfg.batch,
                "learning_rate": cfg.lr,
                "lr_warmup_steps": min(50, cfg.pretrain_steps),
                "checkpoint_every": cfg.pretrain_steps,
                "base_model": ref,
                "train_unet": True,
                "train_text_encoder": True,
                "prompt_dropout": 0.1,
                "seed": 0,
            },
            abd_dir,
            out,
            data_shape=(cfg.size, 1),
        )

    base_dir = cached(
        "t2i-abdomen",
        cfg.key(
            "n_abdomen",
            "unet_channels",
            "text_dim",
            "vae_steps",
            "vae_lr",
            "pretrain_steps",
            "batch",
            "lr",
        ),
        build_base,
        refresh=refresh,
        root=cache,
    )
    base_ref = runner.publish(base_dir, "t2i-abdomen")
    arms: dict[str, pathlib.Path] = {"base": base_dir}
    times: dict[str, float] = {}
    # The VAE arms first fine-tune the VAE on chest radiographs (the abdomen-only VAE is no
    # Stable Diffusion VAE: it reconstructs the other domain poorly), reset the latent scale,
    # then adapt the U-Net (+ text encoder) on top of it.
    vae_job = runner.run(
        "text_to_image_adaptation",
        {
            "max_steps": cfg.vae_steps,
            "batch_size": 32,
            "learning_rate": cfg.vae_lr,
            "lr_warmup_steps": min(20, cfg.vae_steps),
            "checkpoint_every": cfg.vae_steps,
            "base_model": base_ref,
            "train_unet": False,
            "train_text_encoder": False,
            "train_vae": True,
            "weight_decay": 0.0,
            "seed": 0,
        },
        chest_dir,
        work / "t2i-chest-vae",
        data_shape=(cfg.size, 1),
    )
    _set_latent_scale(vae_job.folder, ch.images)
    chest_vae_ref = runner.publish(vae_job.folder, "t2i-chest-vae")
    for arm, (text, vae) in ADAPTED.items():
        if arm not in cfg.arms:
            continue
        job = runner.run(
            "text_to_image_adaptation",
            {
                "max_steps": cfg.adapt_steps,
                "batch_size": cfg.batch,
                "learning_rate": cfg.lr,
                "lr_warmup_steps": min(50, cfg.adapt_steps),
                "checkpoint_every": cfg.adapt_steps,
                "base_model": chest_vae_ref if vae else base_ref,
                "train_unet": True,
                "train_text_encoder": text,
                "prompt_dropout": 0.1,
                "seed": 0,
            },
            chest_dir,
            work / f"t2i-{arm}",
            data_shape=(cfg.size, 1),
        )
        arms[arm] = job.folder
        times[arm] = job.seconds + (vae_job.seconds if vae else 0.0)
    ship = shipped("chest") if quick else None
    if ship is not None:
        arms["shipped"] = ship
    x_te = chest.generate(cfg.n_test, seed=cfg.data_seed + 2, size=cfg.size)
    return {
        "arms": arms,
        "classifier": clf_dir,
        "test": x_te,
        "train_seconds": times,
        "vae_recon_mse_chest": _recon_mse(base_dir, x_te.images[:64]),
        "vae_recon_mse_chest_adapted": _recon_mse(vae_job.folder, x_te.images[:64]),
    }


def _set_latent_scale(folder: pathlib.Path, images: np.ndarray) -> None:
    """scaling_factor = 1 / std of the latents (how Stable Diffusion chose its 0.18215)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    with torch.no_grad():
        z = vae.encode(from_uint8(images[:256]) * 2 - 1).latent_dist.mean
    cfg_path = folder / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["scaling_factor"] = float(1.0 / z.std().clamp_min(1e-3))
    cfg_path.write_text(json.dumps(cfg, indent=2))


@torch.no_grad()
def _recon_mse(folder: pathlib.Path, images: np.ndarray) -> float:
    """How well the (frozen, abdomen-trained) VAE reconstructs chest phantoms."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    x = from_uint8(images) * 2 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return float(((rec.clamp(-1, 1) - x) / 2).pow(2).mean())


class T2I:
    """A loaded text-to-image folder: prompts → images in [0, 1] with the methods sampler."""

    def __init__(self, folder: pathlib.Path) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        self.text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.sched_cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}

    @torch.no_grad()
    def states(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tok(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.tok.model_max_length,
            return_tensors="pt",
        ).input_ids
        return self.text(ids)[0]

    @torch.no_grad()
    def generate(
        self, prompts: list[str], seeds: list[int], steps: int, guidance: float
    ) -> torch.Tensor:
        from clinisynth_server.methods.sampling import Cond, sample, unet_eps_fn, vae_decode_fn
        from clinisynth_server.methods.schedulers import make_scheduler

        cond = self.states(prompts)
        uncond = self.states([""]).expand(len(prompts), -1, -1)
        c = int(self.unet.config.in_channels)
        s = int(self.unet.config.sample_size)
        res = sample(
            unet_eps_fn(self.unet),
            make_scheduler("ddim", self.sched_cfg),
            seeds,
            (c, s, s),
            num_inference_steps=steps,
            cond=Cond(encoder_hidden_states=cond),
            uncond=Cond(encoder_hidden_states=uncond),
            guidance_scale=guidance,
            decode_fn=vae_decode_fn(self.vae),
        )
        images = res.images
        return images.mean(1, keepdim=True) if images.shape[1] != 1 else images


def prompts_for(finding: str, n: int, seed: int) -> list[str]:
    from clinisynth_lab.phantoms import chest

    return [
        chest.report([finding], np.random.default_rng([seed, FINDINGS.index(finding), i]))
        for i in range(n)
    ]


def run_seed(
    cfg: AdaptationConfig,
    seed: int,
    prep: dict[str, Any],
    clf: Classifier,
    clf_classes: list[str],
    real_feats: torch.Tensor,
) -> dict[str, Any]:
    from clinisynth_server.methods.evaluation import features, intra_set_ms_ssim

    out: dict[str, Any] = {"seed": seed, "arms": {}}
    k = cfg.images_per_prompt
    for arm, folder in prep["arms"].items():
        model = T2I(folder)
        per_finding: dict[str, dict[str, float]] = {}
        all_images = []
        for finding in FINDINGS:
            detected, ssims, imgs_f = [], [], []
            for j, prompt in enumerate(prompts_for(finding, cfg.prompts_per_finding, seed)):
                seeds = [
                    seed * 1_000_000 + FINDINGS.index(finding) * 10_000 + j * 100 + i
                    for i in range(k)
                ]
                imgs = fit_size(
                    model.generate([prompt] * k, seeds, cfg.sample_steps, cfg.guidance), cfg.size
                )
                pred = predict(clf, imgs)
                detected += [clf_classes[int(p)] == finding for p in pred]
                if k >= 2:
                    ssims.append(intra_set_ms_ssim(imgs))
                imgs_f.append(imgs)
            per_finding[finding] = {
                "detected": float(np.mean(detected)),
                "ms_ssim": float(np.mean(ssims)) if ssims else float("nan"),
            }
            all_images.append(torch.cat(imgs_f))
        x = torch.cat(all_images)
        ev: dict[str, Any] = {
            "per_finding": per_finding,
            "detected_mean": float(np.mean([v["detected"] for v in per_finding.values()])),
            "ms_ssim_mean": float(np.nanmean([v["ms_ssim"] for v in per_finding.values()])),
        }
        ev.update(fidelity(real_feats, features(classifier_features(clf), x), seed=seed))
        if seed == 0 or "examples" not in out:
            out.setdefault("examples", {})[arm] = torch.stack([a[0] for a in all_images])
        out["arms"][arm] = ev
        say(
            f"adaptation seed {seed} {arm}: detected {ev['detected_mean']:.2f}, FID "
            f"{ev['fid']:.2f}, MS-SSIM {ev['ms_ssim_mean']:.2f}"
        )
    return out


def real_reference(
    cfg: AdaptationConfig,
    prep: dict[str, Any],
    clf: Classifier,
    clf_classes: list[str],
    seed: int,
) -> dict[str, Any]:
    """The same numbers for real held-out phantoms: detection ceiling, real-vs-real fidelity."""
    from clinisynth_lab.phantoms import chest
    from clinisynth_server.methods.evaluation import features, intra_set_ms_ssim

    test = prep["test"]
    one = _single_finding(test)
    x = from_uint8(test.images[one])
    names = [f[0] for f, o in zip(test.findings, one, strict=True) if o]
    pred = predict(clf, x)
    per_finding = {}
    rng = np.random.default_rng(seed)
    for finding in FINDINGS:
        idx = [i for i, n in enumerate(names) if n == finding]
        det = float(np.mean([clf_classes[int(pred[i])] == finding for i in idx])) if idx else 0.0
        groups = (
            [
                rng.choice(idx, cfg.images_per_prompt, replace=False)
                for _ in range(cfg.prompts_per_finding)
            ]
            if len(idx) >= cfg.images_per_prompt and cfg.images_per_prompt >= 2
            else []
        )
        ssim = float(np.mean([intra_set_ms_ssim(x[g]) for g in groups])) if groups else float("nan")
        per_finding[finding] = {"detected": det, "ms_ssim": ssim}
    other = chest.generate(len(x), seed=cfg.data_seed + 3 + seed, size=cfg.size)
    feats_a = features(classifier_features(clf), x)
    feats_b = features(classifier_features(clf), from_uint8(other.images))
    ev: dict[str, Any] = {
        "per_finding": per_finding,
        "detected_mean": float(np.mean([v["detected"] for v in per_finding.values()])),
        "ms_ssim_mean": float(np.nanmean([v["ms_ssim"] for v in per_finding.values()])),
    }
    ev.update(fidelity(feats_a, feats_b, seed=seed))
    return ev


def run(
    cfg: AdaptationConfig,
    seeds: list[int],
    work: pathlib.Path,
    *,
    quick: bool,
    refresh: bool = False,
    cache: pathlib.Path | None = None,
) -> dict[str, Any]:
    from clinisynth_server.methods.classifier import Classifier
    from clinisynth_server.methods.evaluation import features

    runner = JobRunner(work / "runner-chest")
    prep = prepare(cfg, runner, work, quick=quick, refresh=refresh, cache=cache)
    clf = Classifier.load(prep["classifier"])
    clf_classes = json.loads((prep["classifier"] / "clinisynth.json").read_text())["classes"]
    test = prep["test"]
    real_feats = features(classifier_features(clf), from_uint8(test.images))
    per_seed = []
    for s in seeds:
        r = run_seed(cfg, s, prep, clf, clf_classes, real_feats)
        r["arms"]["real"] = real_reference(cfg, prep, clf, clf_classes, s)
        per_seed.append(r)
    return {
        "config": asdict(cfg),
        "seeds": seeds,
        "train_seconds": prep["train_seconds"],
        "vae_recon_mse_chest": prep["vae_recon_mse_chest"],
        "vae_recon_mse_chest_adapted": prep["vae_recon_mse_chest_adapted"],
        "per_seed": per_seed,
    }


# (U-Net only, U-Net + text encoder) on the same VAE: the adaptation paper's comparison.
PAIRS = (("unet", "unet_text"), ("unet_vae", "unet_text_vae"))
MIN_GAIN_PTS = 5.0  # a "clear" gain in mean detection; the per-seed sign must agree too


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Does training the text encoder too raise detection of the prompted finding?

    Per pair on the same VAE: per-seed difference of mean detection in points. Seeds vary
    prompts and noise, not training (the models are trained once), so the spread is the
    measurement's, not the training's.
    """
    seeds = result["per_seed"]
    out: dict[str, Any] = {"pairs": {}}
    for unet, text in PAIRS:
        if not all(unet in s["arms"] and text in s["arms"] for s in seeds):
            continue
        deltas = [
            100 * (s["arms"][text]["detected_mean"] - s["arms"][unet]["detected_mean"])
            for s in seeds
        ]
        out["pairs"][f"{text} - {unet}"] = {
            "delta_detected_pts": deltas,
            "holds": bool(all(d > 0 for d in deltas) and np.mean(deltas) >= MIN_GAIN_PTS),
        }
    best = max(
        (
            (np.mean([s["arms"][a]["detected_mean"] for s in seeds]), a)
            for a in seeds[0]["arms"]
            if a not in ("real", "base")
        ),
        default=(np.nan, ""),
    )
    out["best_arm"], out["best_detected_pct"] = best[1], float(100 * best[0])
    out["holds"] = bool(out["pairs"]) and all(v["holds"] for v in out["pairs"].values())
    return out


def table(result: dict[str, Any]) -> str:
    seeds = result["per_seed"]
    arms = [a for a in (*ARMS, "shipped") if all(a in s["arms"] for s in seeds)]
    rows = []
    for arm in arms:
        vals = [s["arms"][arm] for s in seeds]
        row = [ARM_LABELS[arm]]
        row += [fmt([v["per_finding"][f]["detected"] for v in vals], 100, 0) for f in FINDINGS]
        row += [
            fmt([v["detected_mean"] for v in vals], 100, 1),
            fmt([v["fid"] for v in vals], 1, 2),
            fmt([v["kid_x1000"] for v in vals], 1, 2),
            fmt([v["ms_ssim_mean"] for v in vals], 1, 3),
        ]
        rows.append(row)
    short = {
        "no_finding": "no finding",
        "pleural_effusion_left": "effusion L",
        "pleural_effusion_right": "effusion R",
        "cardiomegaly": "cardiomegaly",
        "pneumothorax": "pneumothorax",
    }
    return markdown_table(
        [
            "model",
            *(f"detected: {short[f]} %" for f in FINDINGS),
            "mean detected %",
            "FID",
            "KID×10³",
            "intra-prompt MS-SSIM",
        ],
        rows,
    )
