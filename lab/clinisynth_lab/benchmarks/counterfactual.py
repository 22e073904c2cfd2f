"""Counterfactual benchmark: one counterfactual through gRPC + Triton vs the same loop in-process.

Side by side in one run, same models (toy blob denoiser + plain / robust classifiers, random
weights: speed does not depend on training), same steps, knobs and seeds:

  service:    SDK → counterfactual service (own process) → Triton ``cf_guidance`` per step
  in-process: ``methods.counterfactual.run_counterfactual`` with ``make_guide_fn`` over the very
              modules the Triton backend loads, with the Triton instance's torch thread count
              (``--threads``)

Prints the median latency of each and their ratio (goal ≤ 1.3), plus the per-step overhead.

    python -m clinisynth_lab.benchmarks.counterfactual [--size 32] [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from clinisynth_server.triton.backends.cf_guidance import Backend


def _wait_port(log_path: pathlib.Path, proc: subprocess.Popen, service: str) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith(f"READY {service} "):
                return int(line.split("grpc=")[1].split()[0])
        if proc.poll() is not None:
            raise RuntimeError(log_path.read_text())
        time.sleep(0.2)
    raise RuntimeError(f"{service} did not start")


def in_process(
    weights: pathlib.Path,
    image: np.ndarray,
    ns: argparse.Namespace,
    seed: int,
    ab: torch.Tensor,
    backend: Backend,
) -> float:
    from clinisynth_server.methods import counterfactual as cf

    guide = cf.make_guide_fn(backend.eps_fn, backend.robust, backend.plain)
    config = cf.CounterfactualConfig(steps=ns.steps, depth=1 - ns.start_depth)
    x0 = torch.from_numpy(image)[None, None] * 2 - 1
    start = time.perf_counter()
    with torch.no_grad():  # what a caller would do; guidance enables grad where it needs it
        cf.run_counterfactual(guide, x0, torch.tensor([1]), ab, config=config, seeds=[seed])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clinisynth benchmark counterfactual",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="respaced chain length")
    parser.add_argument("--start-depth", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unet-channels", default="32,64,64")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, in-process and in the Triton instance alike",
    )
    ns = parser.parse_args(argv)

    import clinisynth
    from clinisynth_lab.toy import blob_images, build_toy_models
    from clinisynth_server import registry
    from clinisynth_server.catalog import Catalog
    from clinisynth_server.counterfactual import guidance
    from clinisynth_server.stack import wait_serving
    from clinisynth_server.store import open_store
    from clinisynth_server.triton.backends.cf_guidance import Backend
    from clinisynth_server.triton.client import TritonClient
    from clinisynth_server.triton.launcher import TritonServer

    work = pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-bench-cf-"))
    channels = tuple(int(c) for c in ns.unet_channels.split(","))
    folders = build_toy_models(
        work / "models", size=ns.size, train=False, unet_channels=channels, classifier_width=16
    )
    repo = work / "triton-models"
    repo.mkdir()
    store = open_store(str(work / "store"))
    catalog = Catalog(store)
    threads = ns.threads
    torch.set_num_threads(threads)
    reverse = round(ns.steps * (1 - ns.start_depth))
    print(
        f"models: UNet2DModel {channels} at {ns.size}x{ns.size} + 2 small_cnn classifiers; "
        f"{ns.steps} respaced steps, start depth {ns.start_depth} → {reverse} guided steps; "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} threads",
        flush=True,
    )
    image = blob_images(2, ns.size, seed=3)[0][0]
    with TritonServer(repo, log_path=work / "triton.log", strict=False) as triton:
        with TritonClient(triton.grpc_url, timeout_s=600) as client:
            recs = [
                registry.register_folder(
                    getattr(folders, k),
                    f"bench-{k}",
                    catalog=catalog,
                    store=store,
                    model_repository=repo,
                    triton=client if k != "denoiser" else None,
                )
                for k in ("denoiser", "robust", "plain")
            ]
            name = guidance.ensure_guidance_model(
                *recs,
                model_repository=repo,
                triton=client,
                store=store,
                parameters={"torch_threads": str(threads)},
            )
        backend = Backend(repo / name / "1" / "weights", {})
        from diffusers import DDPMScheduler

        ab = DDPMScheduler.from_config(recs[0].scheduler).alphas_cumprod
        env = {
            **os.environ,
            "CLINISYNTH_TRITON_URL": triton.grpc_url,
            "CLINISYNTH_STORE_URL": str(work / "store"),
            "CLINISYNTH_HOME": str(work),
        }
        log = open(work / "counterfactual.log", "wb")  # noqa: SIM115 - lives with the child
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clinisynth_server.serve",
                "counterfactual",
                "--port",
                "0",
                "--metrics-port",
                "0",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            address = f"127.0.0.1:{_wait_port(work / 'counterfactual.log', proc, 'counterfactual')}"
            assert wait_serving(address, 60)
            sdk = clinisynth.Client(endpoints={"counterfactual": address}, timeout=3600)
            knobs = {
                "target": "lesion",
                "steps": ns.steps,
                "start_depth": ns.start_depth,
                "diffusion_model": "bench-denoiser",
                "robust_classifier": "bench-robust",
                "plain_classifier": "bench-plain",
                "format": "raw",
            }
            sdk.counterfactual(image, seed=0, **knobs)  # warm-up
            in_process(folders.denoiser, image, ns, 0, ab, backend)
            service, local = [], []
            for r in range(ns.repeats):  # interleaved: load drift hits both alike
                start = time.perf_counter()
                sdk.counterfactual(image, seed=r, **knobs)
                service.append(time.perf_counter() - start)
                local.append(in_process(folders.denoiser, image, ns, r, ab, backend))
            sdk.close()
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    s, loc = statistics.median(service), statistics.median(local)
    print()
    print("| measure | clinisynth (gRPC + Triton) | in-process | ratio | goal |")
    print("|---|---|---|---|---|")
    print(
        f"| one counterfactual, median of {ns.repeats} | {s:.2f} s | {loc:.2f} s | "
        f"{s / loc:.2f} | ≤ 1.3 |"
    )
    print(
        f"| per guided step | {1000 * s / reverse:.1f} ms | {1000 * loc / reverse:.1f} ms | "
        f"+{1000 * (s - loc) / reverse:.1f} ms | |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
