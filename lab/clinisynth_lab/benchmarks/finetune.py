"""Finetune benchmark: a clinisynth training job vs a plain training loop, side by side.

Same model (a class-conditional ``UNet2DModel``), batch, optimiser (AdamW), loss and data:

1. training steps/s of a ``diffusion_pretrain`` job run by the finetune service (worker process,
   accelerate, progress events, heartbeats, checkpoints every ``--checkpoint-every`` steps) ÷ the
   same steps in a plain in-process loop (goal ≥ 0.95). Medians of windows of ``--log-every``
   steps; the job's first window (warm-up) is dropped, the plain loop warms up first too. The
   plain loop runs before and after the job and its windows are pooled.
2. checkpoint write time (model folder + resume state → store, median) and resume time after
   ``kill -9`` of the worker (download + load of the state; and kill → training again, which
   includes the new process's start-up).

    python -m clinisynth_lab.benchmarks.finetune [--steps 120] [--batch 16] [--size 32]

``--scale`` runs the archive-scale benchmark instead (:mod:`.finetune_scale`).
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import signal
import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clinisynth_server.runtime.server import RunningServer

CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]


def plain_loop(
    images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace, steps: int
) -> list[float]:
    """Steps/s of windows of ``log_every`` steps of the plain loop."""
    from diffusers import DDPMScheduler, UNet2DModel

    from clinisynth_server.methods.losses import diffusion_loss
    from clinisynth_server.methods.sampling import Cond, unet_eps_fn

    torch.manual_seed(0)
    levels = [int(c) for c in args.channels.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = (
        UNet2DModel(
            sample_size=args.size,
            in_channels=1,
            out_channels=1,
            block_out_channels=tuple(levels),
            layers_per_block=1,
            down_block_types=("DownBlock2D",) * len(levels),
            up_block_types=("UpBlock2D",) * len(levels),
            num_class_embeds=len(CLASSES),
            norm_num_groups=8,
        )
        .to(device)
        .train()
    )
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.0)
    eps = unet_eps_fn(unet)
    gen = torch.Generator().manual_seed(1)
    x_all, y_all = images.to(device), labels.to(device)
    rates, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_all), (args.batch,), generator=gen)
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
        loss = diffusion_loss(eps, x0, Cond(class_labels=y_all[idx]), t, noise, sched)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the job reads the loss every step too
        if step % args.log_every == 0:
            now = time.perf_counter()
            rates.append(args.log_every / (now - t0))
            t0 = now
    return rates[1:]  # the first window warms up


def start_finetune(store_url: str, workdir: pathlib.Path, threads: int) -> RunningServer:
    """A finetune service in this process over ``store_url`` (no Triton, no metrics port)."""
    from clinisynth_server.finetune import app
    from clinisynth_server.runtime.config import load_config
    from clinisynth_server.runtime.server import start_server

    env = {
        "CLINISYNTH_STORE_URL": store_url,
        "CLINISYNTH_TRITON_URL": "127.0.0.1:1",
        "CLINISYNTH_FINETUNE_WORKDIR": str(workdir),
        "CLINISYNTH_FINETUNE_POLL_S": "0.2",
        "CLINISYNTH_FINETUNE_HEARTBEAT_S": "2",
        "CLINISYNTH_FINETUNE_TORCH_THREADS": str(threads),
    }
    config = load_config("finetune", env=env, port=0, metrics_port=0)
    return start_server(config, app.create(config), serve_metrics=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--scale" in argv:  # the archive-scale benchmark (finetune_scale.py)
        from clinisynth_lab.benchmarks import finetune_scale

        return finetune_scale.main([a for a in argv if a != "--scale"])
    parser = argparse.ArgumentParser(prog="clinisynth benchmark finetune", description=__doc__)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", default="16,32,32", help="UNet block_out_channels")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of both arms (0 = torch's default)",
    )
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):  # not when a harness replaced it
        sys.stdout.reconfigure(line_buffering=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    from clinisynth_lab.phantoms import cells
    from clinisynth_lab.phantoms.datasets import write_image_folder_to_store
    from clinisynth_server.finetune.records import JobStore
    from clinisynth_server.store import open_store

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-ftbench-"))
    store_url = str(tmp / "store")
    store = open_store(store_url)
    imgs, labels = cells.generate(args.images, seed=0, size=args.size)
    write_image_folder_to_store(store, "bench/cells", imgs, labels, CLASSES)
    x = torch.from_numpy(imgs).float()[:, None] / 127.5 - 1
    y = torch.from_numpy(labels)
    print(
        f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads "
        f"{torch.get_num_threads()}, UNet {args.channels} at {args.size}px, batch {args.batch}"
    )

    # 1. Plain loop (before the job).
    plain = plain_loop(x, y, args, args.steps // 2)

    # 2. The same training as a clinisynth job.
    running = start_finetune(store_url, tmp / "work", args.threads)
    import clinisynth

    params = {
        "max_steps": args.steps,
        "batch_size": args.batch,
        "learning_rate": 1e-4,
        "block_out_channels": args.channels,
        "size": args.size,
        "channels": 1,
        "conditioning": "class",
        "log_every": args.log_every,
        "checkpoint_every": args.checkpoint_every,
        "lr_schedule": "constant",
    }
    try:
        with clinisynth.Client(endpoints={"finetune": running.address}, timeout=3600) as client:
            job = client.finetune.wait(
                client.finetune.create("diffusion_pretrain", "bench/cells", params=params).id
            )
            assert job.state == "succeeded", job.failure_reason
            events = list(client.finetune.watch(job.id))
            rates = [e.metrics["steps_per_s"] for e in events if e.type == "progress"][1:]
            writes = [e.metrics["write_s"] for e in events if e.type == "checkpoint"]

            # 3. Resume after kill -9 of the worker.
            resume_job = client.finetune.create(
                "diffusion_pretrain",
                "bench/cells",
                params={**params, "max_steps": args.steps, "checkpoint_every": args.log_every},
            )
            jobs = JobStore(store)

            def progressed() -> bool:
                return (
                    bool(jobs.checkpoints(resume_job.id))
                    and int(jobs.progress(resume_job.id).get("step", 0)) > args.log_every
                )

            while not progressed():
                time.sleep(0.05)
            os.kill(int(jobs.get(resume_job.id).worker["pid"]), signal.SIGKILL)
            killed_at = time.time()
            back = None
            while back is None:
                time.sleep(0.1)
                for e in jobs.events(resume_job.id):
                    if e.message.startswith("resumed from checkpoint"):
                        back = e
            first_step_after = None
            while first_step_after is None:
                time.sleep(0.1)
                for e in jobs.events(resume_job.id, since=back.sequence):
                    if e.type == "progress":
                        first_step_after = e
                        break
            client.finetune.cancel(resume_job.id)
    finally:
        running.stop(0)

    # 4. Plain loop again (after), pooled with the first.
    plain += plain_loop(x, y, args, args.steps // 2)
    job_rate, plain_rate = statistics.median(rates), statistics.median(plain)
    ratio = job_rate / plain_rate
    print(
        f"training steps/s: job {job_rate:.2f} (median of {len(rates)} windows, checkpoints "
        f"every {args.checkpoint_every} steps included) vs plain loop {plain_rate:.2f} "
        f"({len(plain)} windows)"
    )
    print(f"ratio job / plain: {ratio:.3f}  (goal >= 0.95: {'met' if ratio >= 0.95 else 'MISSED'})")
    print(
        f"checkpoint write (model folder + resume state -> store): median "
        f"{statistics.median(writes) * 1000:.0f} ms over {len(writes)}"
    )
    print(
        f"resume after kill -9: state download + load {back.metrics['resume_s'] * 1000:.0f} ms;"
        f" new worker setup incl. imports and data {back.metrics['setup_s']:.1f} s; "
        f"kill -> resumed {back.time - killed_at:.1f} s; kill -> next progress event "
        f"{first_step_after.time - killed_at:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
