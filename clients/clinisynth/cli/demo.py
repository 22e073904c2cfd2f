"""``clinisynth demo``: the main job on embedded defaults.

Starts the stack (unless one is running), then through the public SDK: synthetic cells by class,
chest X-rays by prompt, reward scores for the cells, and a counterfactual of a fundus image;
writes everything to an output folder with a contact sheet (PNG) and a summary.json, and stops
the stack it started.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from clinisynth import Client
from clinisynth._discovery import discover
from clinisynth.cli._common import lab_module, print_json

CHEST_PROMPTS = (
    "No acute cardiopulmonary finding.",
    "Small left pleural effusion.",
    "Large right pleural effusion.",
    "Cardiomegaly.",
    "Right apical pneumothorax.",
)
TILE = 96


def _tile(image: Image.Image, caption: str) -> Image.Image:
    canvas = Image.new("RGB", (TILE, TILE + 14), "white")
    canvas.paste(image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), (0, 0))
    ImageDraw.Draw(canvas).text((2, TILE + 1), caption[:18], fill="black")
    return canvas


def contact_sheet(
    rows: list[tuple[str, list[tuple[Image.Image, str]]]], path: pathlib.Path
) -> None:
    """One labelled row per section; tiles upscaled to TILE px with a caption under each."""
    width = 130 + TILE * max(len(tiles) for _, tiles in rows)
    sheet = Image.new("RGB", (width, (TILE + 18) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, tiles) in enumerate(rows):
        y = r * (TILE + 18)
        draw.text((4, y + TILE // 2), title[:20], fill="black")
        for c, (image, caption) in enumerate(tiles):
            sheet.paste(_tile(image, caption), (130 + c * TILE, y))
    sheet.save(path)


def _pick(models: list[Any], kind: str, domain: str, summary: dict[str, Any]) -> Any:
    """The latest model of ``kind`` for ``domain``, or None (noted in the summary)."""
    found = [m for m in models if m.kind == kind and m.labels.get("domain") == domain]
    if not found:
        note = (
            f"skipped: no {kind} model for the {domain} domain is registered (demo models "
            "ship in deploy/models; scripts/train_demo_models.py trains them)"
        )
        print(note, flush=True)
        summary.setdefault("skipped", []).append(note)
        return None
    return found[-1]


def run_demo(client: Client, out: pathlib.Path, seed: int) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    models = client.list_models()
    summary: dict[str, Any] = {"models": [f"{m.name}@{m.version} ({m.kind})" for m in models]}
    rows: list[tuple[str, list[tuple[Image.Image, str]]]] = []

    # 1. Cells by class, scored by the reward model.
    cells = _pick(models, "class_conditional", "cells", summary)
    reward = _pick(models, "reward", "cells", summary)
    cell_rows = []
    for i, cls in enumerate(cells.classes if cells else []):
        res = client.generate(cells.name, class_name=cls, n=4, seed=seed + 100 * i)
        res.save(out / "cells" / cls)
        if reward is None:
            cell_rows += [(img.to_pil(), cls[:12]) for img in res.images]
            continue
        scores = client.score(
            [img.to_numpy() for img in res.images], class_name=cls, model=reward.name
        )
        for img, score in zip(res.images, scores, strict=True):
            cell_rows.append((img.to_pil(), f"{cls[:10]} r={score.reward:.2f}"))
        summary.setdefault("cells", {})[cls] = [round(s.reward, 3) for s in scores]
    if cell_rows:
        rows.append(("cells + reward", cell_rows[:8]))
        rows.append(("cells (cont.)", cell_rows[8:16]))

    # 2. Chest X-rays by prompt.
    chest = _pick(models, "text_to_image", "chest", summary)
    chest_tiles = []
    for i, prompt in enumerate(CHEST_PROMPTS if chest else ()):
        res = client.generate(
            chest.name, prompt=prompt, n=1, seed=seed + i, format="dicom", modality="DX"
        )
        res.save(out / "chest", stem=f"prompt{i}")
        png = client.generate(chest.name, prompt=prompt, n=1, seed=seed + i)
        chest_tiles.append((png.images[0].to_pil(), prompt.split(".")[0][:18]))
    if chest_tiles:
        rows.append(("chest by prompt", chest_tiles))
        summary["chest"] = {"prompts": list(CHEST_PROMPTS), "format": "DICOM (DX) + PNG"}

    # 3. A counterfactual: a healthy fundus phantom → "lesion".
    fundus_model = _pick(models, "unconditional", "fundus", summary)
    classifiers = [
        m for m in models if m.kind == "classifier" and m.labels.get("domain") == "fundus"
    ]
    if fundus_model is None or len(classifiers) < 2:
        if fundus_model is not None:
            _pick([], "classifier", "fundus", summary)
        return _finish(rows, summary, out)
    fundus = lab_module("phantoms.fundus", "demo")

    healthy, _lesioned, _mask = fundus.render_pair(7, size=fundus_model.width, lesion_seed=1)
    # λ_c = 0.5: at the service default (0.1, the paper's 256 px setting) the 32 px demo models
    # barely move (p 0.13 → 0.2–0.3); the methods benchmark's sweep flips most eyes at 0.5.
    cf = client.counterfactual(
        healthy.astype(np.float32) / 255.0, target="lesion", seed=seed, lambda_c=0.5
    )
    cf.save(out / "counterfactual", "fundus_healthy")
    rows.append(
        (
            "counterfactual",
            [
                (Image.fromarray(healthy), "input"),
                (cf.to_pil(), f"p {cf.p_target_before:.2f}->{cf.p_target_after:.2f}"),
                (cf.difference_image(), "difference"),
            ],
        )
    )
    summary["counterfactual"] = {
        "target": "lesion",
        "p_before": cf.p_target_before,
        "p_after": cf.p_target_after,
        "distance": cf.distance,
    }
    return _finish(rows, summary, out)


def _finish(rows: list[Any], summary: dict[str, Any], out: pathlib.Path) -> dict[str, Any]:
    if not rows:
        raise SystemExit("no demo model is registered: run scripts/train_demo_models.py")
    contact_sheet(rows, out / "contact_sheet.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def cmd_demo(ns: argparse.Namespace) -> int:
    started = False
    if discover() is None:
        from clinisynth.cli.stack import _server_stack

        print("starting the stack (first start registers the shipped demo models) …", flush=True)
        t0 = time.monotonic()
        _server_stack().start_detached(timeout_s=900)
        started = True
        print(f"stack ready in {time.monotonic() - t0:.0f}s", flush=True)
    try:
        with Client(timeout=900) as client:
            summary = run_demo(client, pathlib.Path(ns.out), ns.seed)
        print_json(summary)
        print(f"wrote {ns.out}/ (contact sheet: {ns.out}/contact_sheet.png)")
    finally:
        if started and not ns.keep:
            from clinisynth.cli.stack import _server_stack

            _server_stack().stop_detached()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start the stack and run the demo (writes --out)")
    p.add_argument("--out", default="out")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    p.set_defaults(func=cmd_demo)
