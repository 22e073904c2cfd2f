"""Each method's claim, reproduced in miniature on phantoms (issue 7): three studies, three tables.

    clinisynth benchmark methods --quick [--seeds 0,1,2] [--out out/benchmark-methods]
    clinisynth benchmark methods --full  [--seeds 0,1,2] [--studies feedback,counterfactual]

1. feedback (cells): pretrained generator → oracle labels → reward model → reward-weighted
   fine-tuning, arms evaluated paired against the real-term-only arm (methods_feedback.py);
2. adaptation (chest): abdomen-pretrained text-to-image model adapted to chest reports, U-Net
   only vs U-Net + text encoder (methods_adaptation.py);
3. counterfactual (fundus): healthy ↔ lesion edits with cone / robust-only / plain-only guidance
   (methods_counterfactual.py).

Every training step runs the finetune service's own job kinds in process. ``--quick`` uses the
shipped demo models in ``deploy/models/`` when present, else trains small ones once and caches
them under ``$CLINISYNTH_HOME/cache/benchmark-methods/``; ``--full`` retrains everything at larger
sizes. Writes ``methods.md`` (the tables), ``methods.json`` (every number, per seed) and one
contact sheet per study to ``--out``. A claim that does not reproduce is reported as such.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

STUDIES = ("feedback", "adaptation", "counterfactual")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clinisynth benchmark methods",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="small sizes, shipped / cached models (default)"
    )
    mode.add_argument("--full", action="store_true", help="larger sizes, retrain everything")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (≥ 3 for a spread)")
    p.add_argument("--out", default="out/benchmark-methods", help="output folder")
    p.add_argument(
        "--studies",
        default=",".join(STUDIES),
        help=f"comma-separated subset of {', '.join(STUDIES)}",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0 = torch's default; 1 is faster on a busy machine)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STUDY.KEY=VALUE",
        help="override a study setting, e.g. feedback.beta=0.3, "
        "counterfactual.lambda_c=0.3 (repeatable)",
    )
    p.add_argument("--refresh", action="store_true", help="retrain cached models")
    p.add_argument(
        "--reuse-cache",
        action="store_true",
        help="--full: reuse models cached by an earlier --full run",
    )
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    p.add_argument(
        "--combine",
        nargs="+",
        default=[],
        metavar="RUN_OUT",
        help="merge the --out folders of runs of other seeds (e.g. one seed per "
        "process, run side by side) into one table per study in --out; trains nothing",
    )
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the unit test
    return p


def _strip(obj: Any, sheets: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able copy; tensors under ``examples`` go to contact sheets instead."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = f"{path}/{k}" if path else str(k)
            if k == "examples":
                _collect(v, sheets, key)
                continue
            out[str(k)] = _strip(v, sheets, key)
        return out
    if isinstance(obj, list | tuple):
        return [_strip(v, sheets, path) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return obj


def _collect(v: Any, sheets: dict[str, torch.Tensor], key: str) -> None:
    if isinstance(v, torch.Tensor):
        sheets[key] = v
    elif isinstance(v, dict):
        for k, x in v.items():
            _collect(x, sheets, f"{key}/{k}")


def contact_sheet(rows: list[torch.Tensor], path: pathlib.Path, scale: int = 3) -> None:
    """One row per tensor (N, C, H, W) in [0, 1]; grayscale is shown as RGB."""
    from PIL import Image

    h = max(r.shape[2] for r in rows)
    w = max(r.shape[3] for r in rows)
    n = max(r.shape[0] for r in rows)
    sheet = np.full((len(rows) * (h + 2), n * (w + 2), 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        arr = (r.detach().clamp(0, 1) * 255).round().to(torch.uint8)
        if arr.shape[1] == 1:
            arr = arr.expand(-1, 3, -1, -1)
        for j, img in enumerate(arr.permute(0, 2, 3, 1).numpy()):
            y, x = i * (h + 2) + 1, j * (w + 2) + 1
            sheet[y : y + img.shape[0], x : x + img.shape[1]] = img
    Image.fromarray(sheet).resize(
        (sheet.shape[1] * scale, sheet.shape[0] * scale), Image.Resampling.NEAREST
    ).save(path)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    if ns.threads > 0:
        torch.set_num_threads(ns.threads)
    from clinisynth_lab.benchmarks import methods_adaptation as ad
    from clinisynth_lab.benchmarks import methods_counterfactual as cf
    from clinisynth_lab.benchmarks import methods_feedback as fb
    from clinisynth_lab.benchmarks.methods_common import machine, machine_line, override, say

    if ns.combine:
        return combine([pathlib.Path(d) for d in ns.combine], pathlib.Path(ns.out))
    full = bool(ns.full)
    mode = "tiny" if ns.tiny else ("full" if full else "quick")
    seeds = [int(s) for s in ns.seeds.split(",") if s.strip()]
    studies = [s.strip() for s in ns.studies.split(",") if s.strip()]
    unknown = sorted(set(studies) - set(STUDIES))
    if unknown or not seeds:
        raise SystemExit(f"unknown studies {unknown}" if unknown else "--seeds: none given")
    out = pathlib.Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    work = (
        pathlib.Path(ns.work)
        if ns.work
        else pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-methods-"))
    )
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache" if ns.tiny else None
    refresh = ns.refresh or (full and not ns.reuse_cache)
    quick = not full
    m = machine()
    command = "clinisynth benchmark methods " + " ".join(argv if argv is not None else sys.argv[1:])
    say(f"{mode} mode, seeds {seeds}, studies {studies}; {machine_line(m)}")

    overrides: dict[str, dict[str, str]] = {s: {} for s in STUDIES}
    for item in ns.set:
        key, sep, value = item.partition("=")
        study, dot, field = key.partition(".")
        if not (sep and dot) or study not in overrides:
            raise SystemExit(f"--set {item!r}: expected STUDY.KEY=VALUE, STUDY in {STUDIES}")
        overrides[study][field] = value
    configs = {
        "feedback": override(getattr(fb.FeedbackConfig, mode)(), overrides["feedback"]),
        "adaptation": override(getattr(ad.AdaptationConfig, mode)(), overrides["adaptation"]),
        "counterfactual": override(
            getattr(cf.CounterfactualStudyConfig, mode)(), overrides["counterfactual"]
        ),
    }
    modules = {"feedback": fb, "adaptation": ad, "counterfactual": cf}
    results: dict[str, Any] = {
        "mode": mode,
        "seeds": seeds,
        "machine": m,
        "command": command,
        "studies": {},
    }
    sections = []
    t_all = time.monotonic()
    for name in studies:
        t0 = time.monotonic()
        res = modules[name].run(
            configs[name], seeds, work / name, quick=quick, refresh=refresh, cache=cache
        )
        res["wall_seconds"] = time.monotonic() - t0
        sheets: dict[str, torch.Tensor] = {}
        clean = _strip(res, sheets)
        if name == "feedback":
            clean["verdict"] = fb.verdict(res)
            clean["verdict_filtered"] = fb.verdict(res, "reward_filtered")
        elif name == "adaptation":
            clean["verdict"] = ad.verdict(res)
        clean.update(command=command, machine=m, mode=mode)
        results["studies"][name] = clean
        if sheets:
            ordered = sorted(sheets.items())[:12]
            contact_sheet(
                [v if v.ndim == 4 else v[None] for _, v in ordered],
                out / f"{name}-contact-sheet.png",
            )
            clean["contact_sheet_rows"] = [k.rsplit("/", 1)[-1] for k, _ in ordered]
        sections.append(_section(name, res, clean, modules[name], seeds, mode))
        section = sections[-1] + f"\n\n`{command}` on {machine_line(m)}."
        print(section, flush=True)
        # One file pair per study, so runs of single studies (--studies) compose in one folder.
        (out / f"{name}.md").write_text(section + "\n")
        (out / f"{name}.json").write_text(json.dumps(clean, indent=2, default=str))
    results["wall_seconds"] = time.monotonic() - t_all
    _merge(out)
    say(f"done in {results['wall_seconds']:.0f}s: {out / 'methods.md'}, {out / 'methods.json'}")
    if not ns.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def combine(runs: list[pathlib.Path], out: pathlib.Path) -> int:
    """One table per study from runs of the same settings that differ only in their seeds."""
    from clinisynth_lab.benchmarks import methods_adaptation as ad
    from clinisynth_lab.benchmarks import methods_counterfactual as cf
    from clinisynth_lab.benchmarks import methods_feedback as fb
    from clinisynth_lab.benchmarks.methods_common import machine_line

    modules = {"feedback": fb, "adaptation": ad, "counterfactual": cf}
    out.mkdir(parents=True, exist_ok=True)
    found = False
    for name in STUDIES:
        parts = [
            json.loads((d / f"{name}.json").read_text())
            for d in runs
            if (d / f"{name}.json").is_file()
        ]
        if not parts:
            continue
        found = True
        configs = {json.dumps(p["config"], sort_keys=True) for p in parts}
        if len(configs) > 1 or len({p["mode"] for p in parts}) > 1:
            raise SystemExit(
                f"--combine: the {name} runs used different settings; "
                "only runs that differ in their seeds can be combined"
            )
        res = dict(parts[0])
        res["per_seed"] = [s for p in parts for s in p["per_seed"]]
        res["seeds"] = [int(s) for p in parts for s in p["seeds"]]
        if len(set(res["seeds"])) != len(res["seeds"]):
            raise SystemExit(f"--combine: the {name} runs share seeds {res['seeds']}")
        res["wall_seconds"] = max(float(p["wall_seconds"]) for p in parts)
        if name == "feedback":
            res["verdict"] = fb.verdict(res)
            res["verdict_filtered"] = fb.verdict(res, "reward_filtered")
        elif name == "adaptation":
            res["verdict"] = ad.verdict(res)
        commands = "; ".join(f"`{p['command']}`" for p in parts)
        section = (
            _section(name, res, res, modules[name], res["seeds"], res["mode"])[:-1]
            + " (the longest of the runs combined, run side by side)."
            + f"\n\nCombined from {commands} on {machine_line(res['machine'])}."
        )
        print(section, flush=True)
        (out / f"{name}.md").write_text(section + "\n")
        (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
        for d in runs:  # the first run's contact sheet shows the study
            sheet = d / f"{name}-contact-sheet.png"
            if sheet.is_file() and d.resolve() != out.resolve():
                shutil.copyfile(sheet, out / sheet.name)
                break
    if not found:
        raise SystemExit(f"--combine: no study results (<study>.json) in {[str(d) for d in runs]}")
    _merge(out)
    return 0


def _merge(out: pathlib.Path) -> None:
    """``methods.md`` / ``methods.json``: every study's latest tables and numbers in ``out``."""
    texts, data = [], {}
    for name in STUDIES:
        if (out / f"{name}.md").is_file():
            texts.append((out / f"{name}.md").read_text().strip())
            data[name] = json.loads((out / f"{name}.json").read_text())
    (out / "methods.md").write_text(
        "# clinisynth benchmark methods\n\n" + "\n\n".join(texts) + "\n"
    )
    (out / "methods.json").write_text(json.dumps({"studies": data}, indent=2, default=str))


def _section(
    name: str, res: dict[str, Any], clean: dict[str, Any], module: Any, seeds: list[int], mode: str
) -> str:
    cfg = res["config"]
    lines = []
    if name == "feedback":
        v = clean["verdict"]
        lines.append(
            f"## 1. Feedback → reward model → reward-weighted fine-tuning (cells, {mode})\n"
        )
        lines.append(module.table(res))
        lines.append(
            f"\nMean ± sd over seeds {seeds}; every arm evaluated paired on the same "
            f"{cfg['n_eval']} seeds ({cfg['eval_sampler']} {cfg['eval_steps']} steps, same "
            f"initial and per-step noise), judged by the oracle. "
            f"Generator: {res['generator']}. Fine-tuning: {cfg['ft_steps']} steps, lr "
            f"{cfg['ft_lr']}, β = {cfg['beta']}, real:synthetic = {cfg['real_to_synthetic']}, "
            f"pool {cfg['pool_size']} ({cfg['pool_sampler']} {cfg['pool_steps']} steps, η = "
            f"{cfg['pool_eta']}), "
            f"{cfg['rounds']} round(s), EMA {cfg['ema']} ({cfg['ema_decay']}), min_reward "
            f"{cfg['min_reward']}. Reward model: {cfg['n_labels']} oracle labels per seed, "
            f"image branch from the real-phantom classifier (test accuracy "
            f"{res['real_classifier_test_accuracy']:.3f}); held-out accuracy "
            + ", ".join(f"{s['reward_model']['val_accuracy']:.2f}" for s in res["per_seed"])
            + " (majority "
            + ", ".join(
                f"{s['reward_model']['val_majority_baseline']:.2f}" for s in res["per_seed"]
            )
            + ")."
        )
        for label, v in (
            ("reward-weighted (the method)", clean["verdict"]),
            ("reward-weighted with r < 0.5 dropped", clean["verdict_filtered"]),
        ):
            if v["holds"] is None:
                continue
            claim = "HOLDS" if v["holds"] else "DOES NOT HOLD"
            lines.append(
                f"\n**Claim for {label} — plausibility up clearly vs the real-term-only arm, "
                f"fidelity and downstream accuracy not worse: {claim}.** Δ plausibility per "
                "seed "
                + ", ".join(f"{d:+.1f}" for d in v["delta_plausibility_pts"])
                + " pts; Δ FID "
                + ", ".join(f"{d:+.2f}" for d in v["delta_fid"])
                + "; Δ downstream "
                + ", ".join(f"{d:+.1f}" for d in v["delta_downstream_pts"])
                + " pts"
                + (
                    (
                        "; vs the r ≡ 1 control "
                        + ", ".join(f"{d:+.1f}" for d in v["delta_vs_control_pts"])
                        + " pts"
                    )
                    if "delta_vs_control_pts" in v
                    else ""
                )
                + "."
            )
    elif name == "adaptation":
        lines.append(f"## 2. Adaptation of a text-to-image model to chest reports ({mode})\n")
        lines.append(module.table(res))
        lines.append(
            f"\nMean ± sd over seeds {seeds} (seeds change prompts and sampling noise; the models "
            f"are trained once). {cfg['prompts_per_finding']} report prompts per finding × "
            f"{cfg['images_per_prompt']} images, DDIM {cfg['sample_steps']}, guidance "
            f"{cfg['guidance']}; {cfg['size']}×{cfg['size']} px. Base: VAE {cfg['vae_steps']} + "
            f"U-Net/text {cfg['pretrain_steps']} steps on abdomen captions; adaptation "
            f"{cfg['adapt_steps']} steps, lr {cfg['lr']} (the VAE arm: VAE {cfg['vae_steps']} "
            f"steps on chest first). VAE reconstruction MSE on chest phantoms: abdomen VAE "
            f"{res['vae_recon_mse_chest']:.4f}, chest-tuned "
            f"{res.get('vae_recon_mse_chest_adapted', float('nan')):.4f}."
        )
        v = clean["verdict"]
        if v["pairs"]:
            lines.append(
                "\n**Claim — adapting the text encoder with the U-Net detects the prompted "
                f"finding more often than the U-Net alone (≥ {module.MIN_GAIN_PTS:g} pts, every "
                f"seed): {'HOLDS' if v['holds'] else 'DOES NOT HOLD'}.** "
                + "; ".join(
                    f"{pair}: " + ", ".join(f"{d:+.1f}" for d in p["delta_detected_pts"]) + " pts"
                    for pair, p in v["pairs"].items()
                )
                + f". Best arm: {module.ARM_LABELS.get(v['best_arm'], v['best_arm'])} at "
                f"{v['best_detected_pct']:.0f} % (the paper: 95 %)."
            )
    else:
        acc = res["classifier_test_accuracy"]
        lines.append(
            f"## 3. Counterfactuals: robust + plain classifier guidance (fundus, {mode})\n"
        )
        lines.append(module.table(res))
        lines.append(
            f"\nMean ± sd over seeds {seeds} (seeds change the eyes and the noise; models "
            f"trained once), {cfg['n_images']} eyes per direction and seed, "
            f"{cfg['size']}×{cfg['size']} px, chain {cfg['cf_steps']} steps × depth "
            f"{cfg['depth']}, λ_c ∈ {{{', '.join(f'{v:g}' for v in cfg['lambda_c'])}}}, λ_d = "
            f"{cfg['lambda_d']}; contact sheet: {res.get('example_arm', '–')}. Clean accuracy "
            f"on fresh phantoms: robust {acc['robust']:.2f}, plain {acc['plain']:.2f}, held-out "
            f"{acc['heldout']:.2f}. Models: "
            + ", ".join(f"{k} {v}" for k, v in res["sources"].items())
            + "."
        )
    if clean.get("contact_sheet_rows"):
        lines.append(
            f"\nContact sheet `{name}-contact-sheet.png`, rows top to bottom: "
            + ", ".join(clean["contact_sheet_rows"])
            + "."
        )
    lines.append(f"\nWall time {res['wall_seconds'] / 60:.1f} min.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
