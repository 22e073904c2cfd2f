"""Train the demo models the stack ships, through the stack's own finetune service.

    python scripts/train_demo_models.py [--quick | --scale F] [--only cells,...] [--out DIR]

1. writes the phantom data sets (cells, fundus, abdomen, chest) and uploads them
   (`client.finetune.upload_dataset`);
2. runs the jobs: `diffusion_pretrain` (cells generator, fundus denoiser), `classifier` (cells
   classifier, plain + robust fundus classifiers), the feedback loop for the cells reward model
   (samples from the promoted generator → the phantom oracle judges them as the pathologist would
   → `SubmitFeedback` → `ExportFeedback` → `reward_model` job), and two `text_to_image_adaptation`
   stages for the chest model (a tiny Stable Diffusion built from configs, pretrained on abdomen
   phantoms, then adapted to chest reports: U-Net + text encoder);
3. promotes each job's best checkpoint and copies its model folder to ``--out`` (what the stack
   registers on first start), tagged with its domain.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32


def _dataset(client: Any, kind: str, n: int, tmp: pathlib.Path) -> str:
    from clinisynth_lab.phantoms import datasets

    local = tmp / kind
    datasets.write_phantom_dataset(kind, local, n=n, seed=0, size=SIZE)
    prefix = f"datasets/demo/{kind}/"
    client.finetune.upload_dataset(local, prefix)
    return prefix


def _train(client: Any, kind: str, dataset: str, name: str, params: dict[str, Any]) -> Any:
    t0 = time.monotonic()
    job = client.finetune.create(
        kind,
        dataset,
        params={k: str(v) for k, v in params.items()},
        model_name=name,
        request_id=f"demo-{name}-{int(t0)}",
    )
    print(f"[{name}] job {job.id} ({kind})", flush=True)
    job = client.finetune.wait(job.id, progress=True)
    if job.state != "succeeded":
        raise SystemExit(f"[{name}] job {job.id} ended {job.state}: {job.failure_reason}")
    promoted = client.finetune.promote(job.id)
    print(
        f"[{name}] {job.state} in {time.monotonic() - t0:.0f}s, metrics {job.metrics}; "
        f"promoted {promoted.model.name}@{promoted.model.version}",
        flush=True,
    )
    return job


def _export(client: Any, store: Any, job: Any, name: str, domain: str, out: pathlib.Path) -> None:
    """Copy the promoted checkpoint's model folder to ``out/name`` and tag its domain."""
    best = next(c for c in client.finetune.checkpoints(job.id) if c.best)
    dest = out / name
    if dest.exists():
        shutil.rmtree(dest)
    # The checkpoint reference is its registrable model folder ("…/checkpoints/<id>/model/").
    store.download_dir(best.key, dest)
    meta_path = dest / "clinisynth.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.setdefault("labels", {})["domain"] = domain
    meta["description"] = meta.get("description") or f"demo {domain} model trained by {job.kind}"
    meta_path.write_text(json.dumps(meta, indent=2))
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"[{name}] exported to {dest} ({size / 1e6:.1f} MB)", flush=True)


def _feedback_round(client: Any, generator: str, classes: list[str], per_class: int) -> str:
    """Samples of the generator judged by the phantom oracle, stored as expert feedback."""
    from clinisynth_lab.phantoms import cells

    judged = 0
    for label, cls in enumerate(classes):
        res = client.generate(
            generator,
            class_name=cls,
            n=min(per_class, 16),
            seed=1000 * label,
            steps=50,
            format="raw",
        )
        batches = [res]
        while sum(len(b) for b in batches) < per_class:
            batches.append(
                client.generate(
                    generator,
                    class_name=cls,
                    n=16,
                    seed=1000 * label + 16 * len(batches),
                    steps=50,
                    format="raw",
                )
            )
        for batch in batches:
            for img in batch.images:
                pixels = (np.clip(img.to_numpy(), 0, 1) * 255).round().astype(np.uint8)
                verdict = cells.oracle(pixels, label)
                client.feedback.submit(
                    image=img.to_numpy(),
                    class_name=cls,
                    rater_id="oracle",
                    plausible=verdict.plausible,
                    client_request_id=f"demo-{cls}-{img.seed}",
                    generator=f"{generator}",
                    comment=",".join(verdict.failures),
                )
                judged += 1
    # Experts also judge uploaded images: real phantoms and corrupted ones, so the reward model
    # sees both verdicts even when the generator's samples are still mostly implausible.
    images, labels = cells.generate(per_class * len(classes), seed=7, size=SIZE)
    rng = np.random.default_rng(7)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        if i % 2:
            image = cells.corrupt(image, cells.CORRUPTIONS[i // 2 % len(cells.CORRUPTIONS)], rng)
        verdict = cells.oracle(image, int(label))
        client.feedback.submit(
            image=image.astype(np.float32) / 255.0,
            class_name=classes[int(label)],
            rater_id="oracle",
            plausible=verdict.plausible,
            client_request_id=f"demo-upload-{i}",
            comment=",".join(verdict.failures),
        )
        judged += 1
    export = client.feedback.export(prefix="exports/demo-cells/")
    print(f"[feedback] {judged} judgements exported to {export.prefix}", flush=True)
    return export.prefix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "deploy" / "models")
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps (a smoke run)")
    parser.add_argument(
        "--scale",
        type=float,
        default=0.0,
        help="fraction of the full steps (overrides --quick), e.g. 0.3",
    )
    parser.add_argument("--only", default="", help="comma list of models to (re)train")
    parser.add_argument(
        "--keep-base",
        action="store_true",
        help="chest: reuse the stack's abdomen-pretrained model if it has one",
    )
    ns = parser.parse_args(argv)
    import clinisynth
    from clinisynth._discovery import discover
    from clinisynth_lab import builders
    from clinisynth_server import stack
    from clinisynth_server.store import open_store

    scale = ns.scale if ns.scale > 0 else (0.1 if ns.quick else 1.0)
    steps = lambda n: max(20, int(n * scale))  # noqa: E731
    only = set(filter(None, ns.only.split(",")))
    want = lambda name: not only or name in only  # noqa: E731
    started = discover() is None
    info = (
        stack.start_detached(timeout_s=900)
        if started
        else json.loads(stack.state_path(stack.default_home()).read_text())
    )
    store = open_store(info["store"])
    ns.out.mkdir(parents=True, exist_ok=True)
    try:
        with clinisynth.Client(timeout=3600) as client, tempfile.TemporaryDirectory() as tmp:
            tmp_path = pathlib.Path(tmp)
            from clinisynth_lab.phantoms.cells import CELL_TYPES

            if want("cells") or want("cells-reward") or want("cells-classifier"):
                cells_ds = _dataset(client, "cells", 3000, tmp_path)
            if want("cells"):
                job = _train(
                    client,
                    "diffusion_pretrain",
                    cells_ds,
                    "cells",
                    {
                        "max_steps": steps(1500),
                        "batch_size": 64,
                        "learning_rate": 2e-4,
                        "lr_warmup_steps": 100,
                        "block_out_channels": "16,32,32",
                        "prediction_type": "v_prediction",
                        "ema": "true",
                        "ema_decay": 0.995,
                        "seed": 0,
                        "checkpoint_every": steps(250),
                    },
                )
                _export(client, store, job, "cells", "cells", ns.out)
            if want("cells-classifier") or want("cells-reward"):
                job = _train(
                    client,
                    "classifier",
                    cells_ds,
                    "cells-classifier",
                    {"max_steps": steps(400), "batch_size": 64, "learning_rate": 1e-3, "seed": 0},
                )
                _export(client, store, job, "cells-classifier", "cells", ns.out)
            if want("cells-reward"):
                export = _feedback_round(
                    client, "cells", list(CELL_TYPES), per_class=int(150 * max(scale, 0.2))
                )
                job = _train(
                    client,
                    "reward_model",
                    export,
                    "cells-reward",
                    {
                        "max_steps": steps(600),
                        "batch_size": 64,
                        "learning_rate": 1e-4,
                        "init_classifier": "cells-classifier",
                        "seed": 0,
                        "classes": ",".join(CELL_TYPES),
                    },
                )
                _export(client, store, job, "cells-reward", "cells", ns.out)
            if (
                want("fundus")
                or want("fundus-classifier-plain")
                or want("fundus-classifier-robust")
            ):
                fundus_ds = _dataset(client, "fundus", 2000, tmp_path)
            if want("fundus"):
                job = _train(
                    client,
                    "diffusion_pretrain",
                    fundus_ds,
                    "fundus",
                    {
                        "max_steps": steps(1500),
                        "batch_size": 32,
                        "learning_rate": 3e-4,
                        "conditioning": "none",
                        "block_out_channels": "32,64,64",
                        "ema": "true",
                        "ema_decay": 0.995,
                        "seed": 0,
                        "checkpoint_every": steps(250),
                    },
                )
                _export(client, store, job, "fundus", "fundus", ns.out)
            for robust in (False, True):
                name = f"fundus-classifier-{'robust' if robust else 'plain'}"
                if want(name):
                    job = _train(
                        client,
                        "classifier",
                        fundus_ds,
                        name,
                        {
                            "max_steps": steps(500),
                            "batch_size": 64,
                            "learning_rate": 1e-3,
                            # ε = 0.5 (L2) at 32×32 can erase a lesion: that training ends at
                            # chance (loss ln 2); 0.25 keeps 83 % clean accuracy.
                            "adversarial": "pgd" if robust else "none",
                            "eps": 0.25,
                            "seed": 0,
                        },
                    )
                    _export(client, store, job, name, "fundus", ns.out)
            if want("chest"):
                base = builders.build_text_to_image(
                    tmp_path / "sd-base", size=SIZE, image_channels=1
                )
                store.upload_dir(base, "bases/sd-tiny/")
                if not (ns.keep_base and any(m.name == "abdomen" for m in client.list_models())):
                    abdomen = _dataset(client, "abdomen", 1500, tmp_path)
                    _train(
                        client,
                        "text_to_image_adaptation",
                        abdomen,
                        "abdomen",
                        {
                            "base_model": "bases/sd-tiny/",
                            "train_unet": "true",
                            "train_text_encoder": "true",
                            "train_vae": "true",
                            "max_steps": steps(1500),
                            "batch_size": 32,
                            "learning_rate": 3e-4,
                            "seed": 0,
                        },
                    )
                chest_ds = _dataset(client, "chest", 1500, tmp_path)
                # The abdomen-trained VAE reconstructs chest radiographs badly (MSE 0.06 vs
                # 0.001 tuned; the methods benchmark's adaptation study): tune it on chest first.
                _train(
                    client,
                    "text_to_image_adaptation",
                    chest_ds,
                    "chest-vae",
                    {
                        "base_model": "abdomen",
                        "train_unet": "false",
                        "train_text_encoder": "false",
                        "train_vae": "true",
                        "max_steps": steps(300),
                        "batch_size": 32,
                        "learning_rate": 1e-3,
                        "weight_decay": 0.0,
                        "seed": 0,
                    },
                )
                job = _train(
                    client,
                    "text_to_image_adaptation",
                    chest_ds,
                    "chest",
                    {
                        "base_model": "chest-vae",
                        "train_unet": "true",
                        "train_text_encoder": "true",
                        "max_steps": steps(1500),
                        "batch_size": 32,
                        "learning_rate": 2e-4,
                        "seed": 0,
                    },
                )
                _export(client, store, job, "chest", "chest", ns.out)
    finally:
        if started:
            stack.stop_detached()
    return 0


if __name__ == "__main__":
    sys.exit(main())
