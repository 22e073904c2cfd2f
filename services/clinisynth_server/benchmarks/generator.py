"""Generator benchmark: clinisynth through gRPC + Triton vs the in-process diffusers pipeline.

Side by side in one run, same model, steps, size and seeds:
  1. single request: end-to-end gRPC latency ÷ in-process ``DDIMPipeline`` latency (goal ≤ 1.2);
  2. 8 concurrent clients: clinisynth throughput ÷ the in-process pipeline run sequentially
     (goal ≥ 1.5 — Triton's dynamic batcher merges the 8 requests' denoiser calls);
  3. peak RSS of the generator process, which holds no weights (goal ≤ 400 MB).

    clinisynth benchmark generator [--steps 20] [--size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types

import torch


def build_model(folder: pathlib.Path, size: int) -> int:
    """An unconditional UNet2DModel of ≥ 10 M parameters (diffusers format)."""
    from clinisynth_server import builders

    builders.build_pixel_unet(
        folder, size=size, channels=1, block_out_channels=(64, 128, 256, 256), layers_per_block=2
    )
    from diffusers import UNet2DModel

    return sum(p.numel() for p in UNet2DModel.from_pretrained(folder / "unet").parameters())


def in_process_latency(folder: pathlib.Path, steps: int, size: int, seed: int) -> float:
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    pipe(
        batch_size=1,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return time.perf_counter() - start


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinisynth benchmark generator", description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    ns = parser.parse_args(argv)

    import clinisynth
    from clinisynth_server import registry
    from clinisynth_server.catalog import Catalog
    from clinisynth_server.stack import wait_serving
    from clinisynth_server.store import open_store
    from clinisynth_server.triton.client import TritonClient
    from clinisynth_server.triton.launcher import TritonServer

    work = pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-bench-"))
    params = build_model(work / "model", ns.size)
    repo = work / "triton-models"
    repo.mkdir()
    store = open_store(str(work / "store"))
    catalog = Catalog(store)
    print(
        f"model: UNet2DModel {params / 1e6:.1f} M parameters, {ns.size}x{ns.size}, "
        f"DDIM {ns.steps} steps; machine: {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    with TritonServer(repo, log_path=work / "triton.log", strict=False) as triton:
        with TritonClient(triton.grpc_url, timeout_s=300) as client:
            registry.register_folder(
                work / "model",
                "bench",
                catalog=catalog,
                store=store,
                model_repository=repo,
                triton=client,
            )
        env = {
            **os.environ,
            "CLINISYNTH_TRITON_URL": triton.grpc_url,
            "CLINISYNTH_STORE_URL": str(work / "store"),
            "CLINISYNTH_HOME": str(work),
        }
        log = open(work / "generator.log", "wb")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clinisynth_server.serve",
                "generator",
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
            port = _wait_port(work / "generator.log", proc)
            address = f"127.0.0.1:{port}"
            assert wait_serving(address, 60)
            results = _measure(clinisynth, address, work, ns)
            results["rss_mb"] = peak_rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    _report(results, ns)
    return 0


def _wait_port(log_path: pathlib.Path, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("READY generator "):
                return int(line.split("grpc=")[1].split()[0])
        if proc.poll() is not None:
            raise RuntimeError(log_path.read_text())
        time.sleep(0.2)
    raise RuntimeError("generator did not start")


def _measure(
    clinisynth: types.ModuleType, address: str, work: pathlib.Path, ns: argparse.Namespace
) -> dict[str, float]:
    client = clinisynth.Client(endpoints={"generator": address}, timeout=600)
    opts = {"steps": ns.steps, "sampler": "ddim", "format": "raw"}
    client.generate("bench", seed=0, **opts)  # warm-up: Triton, tokenizer-free path, caches
    in_process_latency(work / "model", ns.steps, ns.size, 0)
    service, local = [], []
    for r in range(ns.repeats):  # interleaved, so drift in machine load hits both alike
        start = time.perf_counter()
        client.generate("bench", seed=r, **opts)
        service.append(time.perf_counter() - start)
        local.append(in_process_latency(work / "model", ns.steps, ns.size, r))
    # Throughput: 8 concurrent clients vs the in-process pipeline run 8 times in a row.
    conc, seq = [], []
    for _ in range(max(1, ns.repeats // 2)):
        threads = [
            threading.Thread(
                target=client.generate, args=("bench",), kwargs={"seed": 100 + i, **opts}
            )
            for i in range(ns.clients)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conc.append(ns.clients / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(ns.clients):
            in_process_latency(work / "model", ns.steps, ns.size, 100 + i)
        seq.append(ns.clients / (time.perf_counter() - start))
    client.close()
    return {
        "service_latency": statistics.median(service),
        "local_latency": statistics.median(local),
        "service_throughput": statistics.median(conc),
        "local_throughput": statistics.median(seq),
    }


def _report(r: dict[str, float], ns: argparse.Namespace) -> None:
    lat = r["service_latency"] / r["local_latency"]
    thr = r["service_throughput"] / r["local_throughput"]
    print()
    print("| measure | clinisynth | in-process diffusers | ratio | goal |")
    print("|---|---|---|---|---|")
    print(
        f"| single request latency (median of {ns.repeats}) | {r['service_latency']:.2f} s "
        f"| {r['local_latency']:.2f} s | {lat:.2f} | ≤ 1.2 |"
    )
    print(
        f"| {ns.clients} concurrent clients, images/s | {r['service_throughput']:.2f} | "
        f"{r['local_throughput']:.2f} (sequential) | {thr:.2f} | ≥ 1.5 |"
    )
    print(f"| generator peak RSS | {r['rss_mb']:.0f} MB | — | — | ≤ 400 MB |")


if __name__ == "__main__":
    sys.exit(main())
