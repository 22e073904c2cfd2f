"""Reward benchmark: scoring through the SDK vs in-process, and a burst of expert submissions.

Side by side in one run (same reward model weights, same images, batch 64):
  1. scoring throughput via the SDK (SDK → gRPC → reward service → Triton reward_scorer) ÷ the
     same RewardModel called in-process on the same images (goal ≥ 0.8); rounds alternate and
     medians are compared;
  2. 100 concurrent raters submit 1,000 judgements in total (10 each) through the SDK: p50 / p99
     latency, then every acknowledged judgement is read back through ListFeedback.

    python -m clinisynth_lab.benchmarks.reward [--backbone resnet18] [--size 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinisynth benchmark reward", description=__doc__)
    parser.add_argument(
        "--backbone", default="resnet18", help="small_cnn | resnet18 | resnet50 | resnext50"
    )
    parser.add_argument("--size", type=int, default=64, help="image side, pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--raters", type=int, default=100)
    parser.add_argument("--judgements", type=int, default=1000)
    ns = parser.parse_args(argv)

    import torch

    import clinisynth
    from clinisynth_server import registry
    from clinisynth_server.catalog import Catalog
    from clinisynth_server.methods.reward_model import RewardModel, RewardModelConfig
    from clinisynth_server.reward import app
    from clinisynth_server.reward.scoring import write_reward_folder
    from clinisynth_server.runtime.config import load_config
    from clinisynth_server.runtime.server import start_server
    from clinisynth_server.store import open_store
    from clinisynth_server.triton.client import TritonClient
    from clinisynth_server.triton.launcher import TritonServer

    classes = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]
    work = pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-bench-reward-"))
    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig(num_classes=4, in_channels=1, backbone=ns.backbone))
    folder = write_reward_folder(model, work / "reward", classes=classes, width=ns.size)
    model = RewardModel.load(folder)
    params = sum(p.numel() for p in model.parameters())
    (work / "repo").mkdir()
    store = open_store(str(work / "store"))
    catalog = Catalog(store, ttl_s=0)
    with TritonServer(work / "repo", strict=False) as triton:
        tclient = TritonClient(triton.grpc_url, timeout_s=300)
        record = registry.register_folder(
            folder,
            "bench-reward",
            catalog=catalog,
            store=store,
            model_repository=work / "repo",
            triton=tclient,
            max_batch_size=ns.batch,
        )
        env = {
            "CLINISYNTH_TRITON_URL": triton.grpc_url,
            "CLINISYNTH_STORE_URL": str(work / "store"),
            "CLINISYNTH_REWARD_HTTP_PORT": "0",
        }
        config = load_config("reward", env=env, port=0, metrics_port=0, workers=32)
        running = start_server(config, app.create(config), serve_metrics=False)
        rng = np.random.default_rng(0)
        images = rng.random((ns.batch, ns.size, ns.size), dtype=np.float32)
        labels = torch.full((ns.batch,), 1, dtype=torch.long)
        x = torch.from_numpy(images)[:, None]
        try:
            with clinisynth.Client(endpoints={"reward": running.address}, timeout=300) as c:
                # 1. scoring throughput, alternating rounds (warm-up first).
                c.score(images, "neutrophil", model=record.name)
                with torch.inference_mode():
                    model.reward(x, labels)
                sdk, local = [], []
                for _ in range(ns.rounds):
                    t0 = time.perf_counter()
                    got = c.score(images, "neutrophil", model=record.name)
                    sdk.append(ns.batch / (time.perf_counter() - t0))
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        ref = model.reward(x, labels).numpy()
                    local.append(ns.batch / (time.perf_counter() - t0))
                served = np.array([s.p_aligned for s in got])
                max_diff = float(np.abs(served - ref).max())
                s_med, l_med = statistics.median(sdk), statistics.median(local)
                print(
                    f"reward model: {ns.backbone}, {params / 1e6:.2f} M parameters, "
                    f"{ns.size}x{ns.size}, batch {ns.batch}; |served - in-process| ≤ "
                    f"{max_diff:.1e}"
                )
                print(
                    f"scoring: SDK {s_med:.1f} img/s, in-process {l_med:.1f} img/s, "
                    f"ratio {s_med / l_med:.2f} (goal ≥ 0.8)"
                )

                # 2. a burst of expert submissions.
                per = ns.judgements // ns.raters
                small = rng.random((ns.judgements, 16, 16), dtype=np.float32)
                lat: list[float] = []
                acked: dict[str, str] = {}
                lock = threading.Lock()

                def rater(r: int) -> None:
                    for j in range(per):
                        i = r * per + j
                        t0 = time.perf_counter()
                        fb = c.feedback.submit(
                            small[i],
                            rater_id=f"bench_{r}",
                            plausible=bool(i % 2),
                            class_name="neutrophil",
                            client_request_id=f"bench-{i}",
                        )
                        with lock:
                            lat.append(time.perf_counter() - t0)
                            acked[fb.id] = fb.client_request_id

                t0 = time.perf_counter()
                with ThreadPoolExecutor(ns.raters) as pool:
                    list(pool.map(rater, range(ns.raters)))
                wall = time.perf_counter() - t0
                readable = {f.id for f in c.feedback.list(class_name="neutrophil")}
                q = np.quantile(np.array(lat), [0.5, 0.99])
                print(
                    f"feedback: {len(acked)} judgements from {ns.raters} concurrent raters in "
                    f"{wall:.1f} s ({len(acked) / wall:.0f}/s); latency p50 "
                    f"{q[0] * 1e3:.0f} ms, p99 {q[1] * 1e3:.0f} ms; "
                    f"acknowledged and readable: {len(readable & set(acked))}/{len(acked)}"
                )
        finally:
            running.stop(0)
            tclient.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
