"""``clinisynth counterfactual IMAGE_OR_DIR --target T --out DIR`` and ``counterfactual-batch``."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from clinisynth._images import is_pacs_url
from clinisynth.cli._common import client_from, print_json

INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def _inputs(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in INPUT_SUFFIXES)
        if not files:
            raise SystemExit(f"no PNG / JPEG / DICOM files in {path}")
        return files
    if not path.is_file():
        raise SystemExit(f"{path} is neither a file nor a folder")
    return [path]


def _knobs(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "diffusion_model": ns.diffusion_model,
        "robust_classifier": ns.robust_classifier,
        "plain_classifier": ns.plain_classifier,
        "start_depth": ns.start_depth,
        "steps": ns.steps,
        "lambda_c": ns.lambda_c,
        "cone_angle_deg": ns.cone_angle,
        "distance": ns.distance,
        "lambda_d": ns.lambda_d,
        "seed": ns.seed,
        "mode": ns.mode,
        "resize": ns.resize,
        "domain_guard": ns.domain_guard,
    }


def cmd_counterfactual(ns: argparse.Namespace) -> int:
    out = pathlib.Path(ns.out)
    # A pacs://NAME/<study>/<series>/<sop> input is fetched by the service; its files are named
    # "pacs" (never by UID) and the caller sees the lineage hash the service keeps instead.
    inputs: list[Any] = [ns.input] if is_pacs_url(ns.input) else _inputs(pathlib.Path(ns.input))
    with client_from(ns) as client:
        for path in inputs:
            pacs = isinstance(path, str)
            result = client.counterfactual(
                path,
                target=ns.target,
                to_pacs=ns.to_pacs,
                progress=not ns.quiet,
                timeout=ns.timeout,
                **_knobs(ns),
            )
            written = result.save(out, stem="pacs" if pacs else path.stem)
            extra = result.provenance.get("extra", {})
            label = f"PACS input {extra.get('input_lineage', '')}" if pacs else path.name
            print(
                f"{label}: p({ns.target}) {result.p_target_before:.3f} → "
                f"{result.p_target_after:.3f} (plain {result.p_target_before_plain:.3f} → "
                f"{result.p_target_after_plain:.3f}), distance {result.distance:.4f}  "
                f"{written['counterfactual']}"
            )
            if result.domain == "out of domain":
                print(
                    f"warning: {label} is out of domain (score {result.domain_score:.2f} > "
                    f"{result.domain_threshold:.2f})",
                    file=sys.stderr,
                )
            for item in result.pacs:
                print(f"pacs {item.destination}: {item.sop_instance_uid} {item.status}")
    return 0


def cmd_batch(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        result = client.counterfactual_batch(
            ns.prefix,
            target=ns.target,
            output_prefix=ns.output_prefix,
            limit=ns.limit,
            progress=not ns.quiet,
            timeout=ns.timeout,
            **_knobs(ns),
        )
    print_json(
        {
            "images": result.images,
            "failed": result.failed,
            "flip_rate": result.flip_rate,
            "mean_distance": result.mean_distance,
            "summary": result.summary,
            "errors": {i.input_key: i.error for i in result.items if i.error},
        }
    )
    return 0 if result.failed == 0 else 1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", "-t", required=True, help="class the counterfactual should show")
    p.add_argument("--diffusion-model", help="NAME[@VERSION] (default: of the classifiers' domain)")
    p.add_argument("--robust-classifier", help="NAME[@VERSION]")
    p.add_argument("--plain-classifier", help="NAME[@VERSION]")
    p.add_argument("--start-depth", type=float, help="fraction of the chain skipped (0.5)")
    p.add_argument("--steps", type=int, help="respaced chain length (200)")
    p.add_argument("--lambda-c", type=float, help="classifier guidance scale (0.1)")
    p.add_argument("--cone-angle", type=float, help="cone angle in degrees (30)")
    p.add_argument("--distance", choices=["l2", "l1"], help="l2 (fundus-like) or l1 (OCT-like)")
    p.add_argument("--lambda-d", type=float, help="distance weight (0.5 for l2, 0.15 for l1)")
    p.add_argument("--mode", choices=["cone", "robust_only", "plain_only"])
    p.add_argument("--seed", type=int)
    p.add_argument("--resize", action="store_true", help="resize inputs to the model's size")
    p.add_argument(
        "--domain-guard",
        choices=["refuse", "warn"],
        help="an input far outside the diffusion model's training images: refuse (default) or "
        "warn (edit it and say so)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "counterfactual",
        help="how would this image look as another class? (image, difference map, figure)",
    )
    p.add_argument("input", metavar="IMAGE_OR_DIR", help="PNG / JPEG / DICOM file or a folder")
    p.add_argument("--out", "-o", default="out", help="output folder")
    p.add_argument(
        "--to-pacs", metavar="NAME", help="also send each result as DICOM to this PACS destination"
    )
    _common(p)
    p.set_defaults(func=cmd_counterfactual)

    p = sub.add_parser(
        "counterfactual-batch", help="counterfactuals of every image under a store prefix"
    )
    p.add_argument("prefix", help="store prefix holding the input images")
    p.add_argument("--output-prefix", help="store prefix for results")
    p.add_argument("--limit", type=int, default=0, help="at most this many images")
    _common(p)
    p.set_defaults(func=cmd_batch)
