"""``clinisynth generate`` (and the listing behind ``clinisynth models``)."""

from __future__ import annotations

import argparse
import pathlib

from clinisynth.cli._common import client_from, print_json


def cmd_models(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        models = client.list_models(ns.kind, all_versions=ns.all_versions)
    if ns.json:
        print_json(
            [
                {
                    "name": m.name,
                    "version": m.version,
                    "kind": m.kind,
                    "classes": m.classes,
                    "width": m.width,
                    "height": m.height,
                    "channels": m.channels,
                    "digest": m.digest,
                    "latest": m.latest,
                    "labels": m.labels,
                }
                for m in models
            ]
        )
        return 0
    for m in models:
        cond = (
            f"classes={','.join(m.classes)}"
            if m.classes
            else ("prompt" if m.kind == "text_to_image" else "")
        )
        print(f"{m.name}@{m.version:<4} {m.kind:18s} {m.width}x{m.height}x{m.channels}  {cond}")
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    out = pathlib.Path(ns.out)
    with client_from(ns) as client:
        result = client.generate(
            ns.model,
            prompt=ns.prompt,
            negative_prompt=ns.negative_prompt,
            class_name=ns.class_name,
            n=ns.n,
            seed=ns.seed,
            steps=ns.steps,
            sampler=ns.sampler,
            guidance_scale=ns.guidance_scale,
            width=ns.width,
            height=ns.height,
            format=ns.format,
            modality=ns.modality,
            store=ns.store,
            min_reward=ns.min_reward,
            best_of_n=ns.best_of_n,
            reward_model=ns.reward_model,
            to_pacs=ns.to_pacs,
            memorization=ns.memorization,
            progress=not ns.quiet,
            timeout=ns.timeout,
        )
    paths = result.save(out)
    for path, image in zip(paths, result.images, strict=True):
        reward = f"  reward={image.reward:.3f}" if image.reward is not None else ""
        gate = f"  memorization={image.memorization}" if image.memorization else ""
        if image.memorization_distance is not None:
            gate += f" ({image.memorization_distance:.4f} vs {image.memorization_threshold:.4f})"
        print(f"{path}  seed={image.seed}{reward}{gate}")
    print(f"{out / 'provenance.json'}")
    for item in result.pacs:
        print(f"pacs {item.destination}: {item.sop_instance_uid} {item.status}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    # `clinisynth models` (listing included) is registered by cli/models.py.
    p = sub.add_parser("generate", help="generate synthetic images")
    p.add_argument("--model", "-m", required=True, help="NAME, NAME@VERSION or NAME@ALIAS")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--prompt", "-p", help="text prompt (text-to-image models)")
    cond.add_argument("--class", dest="class_name", help="class name (class-conditional models)")
    p.add_argument("--negative-prompt")
    p.add_argument("-n", type=int, default=1, help="number of images")
    p.add_argument("--seed", type=int, help="seed of the first image (image i: seed + i)")
    p.add_argument("--steps", type=int)
    p.add_argument(
        "--sampler",
        help="pndm, ddim, ddpm, euler, euler_ancestral, dpmsolver++ or lms (as the model lists);"
        " default: the model's own scheduler",
    )
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--format", choices=["png", "png16", "dicom", "raw"], default="png")
    p.add_argument("--modality", help="DICOM modality (OT, DX, CR, XC, SM, ...)")
    p.add_argument("--store", action="store_true", help="also keep outputs in the artifact store")
    p.add_argument("--min-reward", type=float)
    p.add_argument("--best-of-n", type=int)
    p.add_argument("--reward-model")
    p.add_argument(
        "--to-pacs",
        metavar="NAME",
        help="also send the images as one DICOM series to this configured PACS destination "
        "(queued durably; see `clinisynth pacs outbox`)",
    )
    p.add_argument(
        "--memorization",
        choices=["off", "flag", "regenerate", "refuse"],
        help="near-copies of training images: off, flag (keep, report), regenerate (resample "
        "with the next seed, then refuse; the server's default) or refuse",
    )
    p.add_argument("--out", "-o", default="out", help="output folder")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)
