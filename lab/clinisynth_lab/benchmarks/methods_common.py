"""Shared pieces of the methods benchmark: an in-process finetune-job runner, caching, stats.

Why an in-process runner: the benchmark must exercise the same training code as the finetune
service's jobs (``reward_finetune``, ``diffusion_pretrain``, ``reward_model``, ``classifier``,
``text_to_image_adaptation``) without a gRPC server, a job store and a worker subprocess per arm.
:func:`JobRunner.run` does what ``finetune/worker.py`` does around a kind's trainer — parse and
check the parameters, validate the data set, build the trainer from a ``TrainContext``, step it,
evaluate at every checkpoint interval and keep the best evaluation (the service promotes the best
checkpoint), then ``save_model`` — minus durability (no resume, no events).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from diffusers import UNet2DModel

    from clinisynth_server.methods.classifier import Classifier

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
SHIPPED_MODELS = REPO_ROOT / "deploy" / "models"

_T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress line on stderr with the elapsed wall time (stdout carries the tables)."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# machine, caching, shipped models
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on (printed under every table)."""
    cpu = platform.processor() or ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_avg_1m_at_start": round(load, 2),
        "python": platform.python_version(),
    }


def machine_line(m: Mapping[str, Any]) -> str:
    return (
        f"{m['cpu']} ({m['cores']} cores, torch {m['torch']} with {m['torch_threads']} "
        f"thread(s), {m['device']}; 1-min load {m['load_avg_1m_at_start']} at start)"
    )


def cache_root() -> pathlib.Path:
    from clinisynth_server.runtime.config import default_home

    return default_home() / "cache" / "benchmark-methods"


def config_key(config: Mapping[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached(
    name: str,
    config: Mapping[str, Any],
    build: Callable[[pathlib.Path], None],
    *,
    refresh: bool = False,
    root: pathlib.Path | None = None,
) -> pathlib.Path:
    """``<cache>/<name>-<hash of config>/``, built once by ``build(tmp_folder)``.

    The folder is renamed into place only when ``build`` returned, so an interrupted run never
    leaves a half-trained model that a later run would trust.
    """
    base = root or cache_root()
    folder = base / f"{name}-{config_key(config)}"
    if folder.is_dir() and not refresh:
        say(f"cache hit: {folder}")
        return folder
    tmp = base / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / "benchmark-config.json").write_text(json.dumps(config, indent=2, default=str))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def shipped(name: str, root: pathlib.Path | None = None) -> pathlib.Path | None:
    """``deploy/models/<name>`` when the repo ships that demo model."""
    folder = (root or SHIPPED_MODELS) / name
    return folder if (folder / "clinisynth.json").is_file() else None


def shipped_size(name: str, vae_factor: bool = False) -> int | None:
    """Image side of a shipped diffusers folder (the studies then work at that size)."""
    folder = shipped(name)
    if folder is None or not (folder / "unet" / "config.json").is_file():
        return None
    size = int(json.loads((folder / "unet" / "config.json").read_text())["sample_size"])
    if vae_factor and (folder / "vae" / "config.json").is_file():
        vae = json.loads((folder / "vae" / "config.json").read_text())
        size *= 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return size


def fit_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, C, H, W) to size × size (area when shrinking) for a fixed-size evaluator."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    mode = "area" if images.shape[-1] > size else "bilinear"
    return torch.nn.functional.interpolate(images, size=(size, size), mode=mode).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# data sets in the layouts the finetune service reads (local folders, as the worker sees them)
# ---------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [0, 1] → uint8 (B, H, W) or (B, H, W, 3)."""
    arr = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, 3) → float (B, C, H, W) in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
    return t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# the in-process job runner
# ---------------------------------------------------------------------------------------------


@dataclass
class JobResult:
    kind: str
    folder: pathlib.Path
    seconds: float
    steps: int
    last_loss: float
    evaluation: dict[str, float] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)


class JobRunner:
    """Runs finetune job kinds in this process against a local artifact store.

    Base models are referenced as store prefixes (``publish`` uploads a folder), exactly as a user
    would pass ``params[base_model]=prefix/`` to the service.
    """

    def __init__(self, workdir: pathlib.Path) -> None:
        from clinisynth_server.store.local import LocalStore

        self.workdir = workdir
        self.store = LocalStore(workdir / "store")
        self._n = 0

    def publish(self, folder: pathlib.Path, name: str) -> str:
        """Upload a model folder under ``models/<name>/`` and return the reference to it."""
        prefix = f"models/{name}/"
        self.store.delete_prefix(prefix)
        self.store.upload_dir(folder, prefix)
        return prefix

    def run(
        self,
        kind: str,
        params: Mapping[str, Any],
        data: pathlib.Path,
        out: pathlib.Path,
        *,
        data_shape: tuple[int, int] | None = None,
        hook: Callable[[Any], None] | None = None,
        preset: Callable[[str, pathlib.Path], bool] | None = None,
        on_artifact: Callable[[str, pathlib.Path], None] | None = None,
    ) -> JobResult:
        """Train ``kind`` on the data set folder ``data`` and write the promoted model to ``out``.

        ``data_shape`` = (size, channels) skips decoding every image during validation (the
        worker also trusts the sizes measured at job creation). ``hook(trainer)`` runs after the
        trainer is built (the benchmark swaps the reward scorer for the oracle / control arms).
        ``preset(name, path)`` may supply a job artifact (a shared synthetic pool) before the
        trainer generates it; ``on_artifact`` sees every artifact the trainer saves.
        """
        from clinisynth_server.errors import InvalidArgument
        from clinisynth_server.finetune import datasets, kinds
        from clinisynth_server.finetune.kinds.base import (
            CheckContext,
            TrainContext,
            seed_everything,
        )
        from clinisynth_server.finetune.params import parse_params

        t0 = time.monotonic()
        self._n += 1
        job_id = f"bench-{kind}-{self._n:03d}"
        spec = kinds.load(kind)
        parsed = parse_params(spec.params, {k: _param_str(v) for k, v in params.items()})
        if parsed.violations:
            raise InvalidArgument(
                f"{kind}: {parsed.violations[0].field}: {parsed.violations[0].description}",
                violations=parsed.violations,
            )
        p = parsed.values
        source = datasets.FolderSource(data)
        report = datasets.validate(
            source, str(data), spec.dataset_layout, decode_images=data_shape is None
        )
        if data_shape is not None:
            size, channels = data_shape
            report.shapes = {(size, size, channels): report.images}
        datasets.raise_if_bad(report)
        problems = spec.check(
            p, report, CheckContext(catalog=None, store=self.store, model_repository="")
        )
        if problems:
            raise InvalidArgument(
                f"{kind}: {problems[0].field}: {problems[0].description}", violations=problems
            )
        workdir = self.workdir / "jobs" / job_id
        workdir.mkdir(parents=True, exist_ok=True)
        artifacts: dict[str, pathlib.Path] = {}
        lines: list[str] = []

        def save_artifact(name: str, path: pathlib.Path) -> None:
            keep = workdir / "artifacts" / name
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, keep)
            artifacts[name] = keep
            if on_artifact is not None:
                on_artifact(name, keep)

        def load_artifact(name: str, path: pathlib.Path) -> bool:
            if name in artifacts:
                shutil.copyfile(artifacts[name], path)
                return True
            return bool(preset is not None and preset(name, path))

        seed_everything(p["seed"])
        ctx = TrainContext(
            job_id=job_id,
            params=p,
            source=source,
            report=report,
            workdir=workdir,
            store=self.store,
            catalog=None,
            model_repository="",
            accelerator=None,
            log=lines.append,
            save_artifact=save_artifact,
            load_artifact=load_artifact,
        )
        trainer = spec.trainer(ctx)
        if hook is not None:
            hook(trainer)
        best_value, best_state, best_eval = -math.inf, None, {}
        sign = 1.0 if trainer.best_mode == "max" else -1.0
        last: dict[str, float] = {}
        evaluation: dict[str, float] = {}
        every = max(1, p["max_steps"] // 5)
        t_loop = time.monotonic()
        for step in range(1, p["max_steps"] + 1):
            last = trainer.step(step)
            if step % every == 0 and step < p["max_steps"]:
                rate = step / max(time.monotonic() - t_loop, 1e-9)
                say(
                    f"  {kind} step {step}/{p['max_steps']}: loss {last.get('loss', 0):.4f} "
                    f"({rate:.2f} steps/s)"
                )
            if step % p["checkpoint_every"] == 0 or step == p["max_steps"]:
                evaluation = trainer.evaluate()
                metric = trainer.best_metric
                if metric and metric in evaluation and sign * evaluation[metric] >= best_value:
                    best_value = sign * evaluation[metric]
                    best_state, best_eval = copy.deepcopy(trainer.state()), dict(evaluation)
        if best_state is not None:
            trainer.load_state(best_state)
            evaluation = best_eval
        out.mkdir(parents=True, exist_ok=True)
        trainer.save_model(out)
        seconds = time.monotonic() - t0
        say(
            f"{kind}: {p['max_steps']} steps in {seconds:.0f}s, loss {last.get('loss', 0):.4f}"
            + (
                f", {trainer.best_metric} {evaluation.get(trainer.best_metric, math.nan):.3f}"
                if trainer.best_metric
                else ""
            )
        )
        shutil.rmtree(workdir / "base", ignore_errors=True)
        return JobResult(
            kind, out, seconds, p["max_steps"], float(last.get("loss", math.nan)), evaluation, lines
        )


def _param_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# evaluation helpers
# ---------------------------------------------------------------------------------------------


def classifier_features(clf: Classifier) -> Callable[[torch.Tensor], torch.Tensor]:
    """Penultimate features (pooled backbone) of a ``methods.classifier.Classifier``."""

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        clf.eval()
        return clf.backbone(images * 2 - 1)

    return extract


def fidelity(real_feats: torch.Tensor, fake_feats: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """FID, KID (×10³) and precision / recall / density / coverage on classifier features.

    KID's cubic kernel (x·y/d + 1)³ assumes Inception-scale features; a small CNN's can be far
    larger and the kernel then explodes (KID×10³ in the hundred thousands). Both sets are
    divided by one scalar, the real features' root mean square, before KID only.
    """
    from clinisynth_server.methods import evaluation as ev

    scale = float(real_feats.float().pow(2).mean().sqrt().clamp_min(1e-12))
    kid_mean, _ = ev.kid(
        real_feats / scale,
        fake_feats / scale,
        subsets=10,
        subset_size=min(200, len(real_feats), len(fake_feats)),
        seed=seed,
    )
    out = {"fid": ev.fid(real_feats, fake_feats), "kid_x1000": 1000 * kid_mean}
    out.update(ev.prdc(real_feats, fake_feats, k=5))
    return out


@torch.no_grad()
def predict(clf: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    clf.eval()
    return torch.cat([clf(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± sd`` over seeds (``±`` omitted for one seed)."""
    m, s = mean_sd([v * scale for v in values])
    if math.isnan(m):
        return "–"
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def override(cfg: Any, overrides: Mapping[str, str]) -> Any:
    """A frozen config dataclass with ``key=value`` strings applied, typed by each default."""
    import dataclasses

    typed: dict[str, Any] = {}
    for key, raw in overrides.items():
        if not hasattr(cfg, key):
            raise SystemExit(f"unknown setting {key!r} of {type(cfg).__name__}")
        current = getattr(cfg, key)
        if isinstance(current, bool):
            typed[key] = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, tuple):
            items = [x for x in raw.split(",") if x]
            typed[key] = tuple(type(current[0])(x) if current else x for x in items)
        else:
            typed[key] = type(current)(raw)
    return dataclasses.replace(cfg, **typed)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_pixel_unet(folder: pathlib.Path) -> tuple[UNet2DModel, dict[str, Any], list[str]]:
    """(UNet2DModel, scheduler config, classes) of a pixel diffusers folder."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    meta_path = folder / "clinisynth.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return (
        unet,
        {k: v for k, v in cfg.items() if not k.startswith("_")},
        list(meta.get("classes", [])),
    )
