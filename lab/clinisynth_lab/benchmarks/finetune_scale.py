"""Finetune at archive scale: the same job on 2k, 10k and 40k images, side by side in one run.

``clinisynth benchmark finetune --scale``. One finetune service (in this process, a local store);
each data set is generated (64-px cell phantoms: a pool of 2,000 drawn images, then shifted copies,
so every file differs), written as an ImageFolder and uploaded with ``upload_dataset(shards=True)``
like ``clinisynth data upload``. Then ``diffusion_pretrain`` jobs, all with the same model, batch
and steps:

- ``stream``: the sharded set read by a DataLoader with worker processes (the default for a
  sharded set), on every size;
- ``in-RAM``: ``streaming=off`` (the whole set decoded into memory first), on the smallest size;
- ``stream x2``: ``nproc_per_node=2`` (torchrun, gloo on CPU), on the smallest size.

Printed per job (medians over ``--repeats`` rounds run one after another, so load on a shared
host hits every arm alike): peak memory of the training process (``VmHWM``) and of the job's
whole process tree (sampled PSS: DataLoader workers share pages with their parent, RSS would
count them twice), training steps/s (median of the job's progress windows, the first dropped),
and the share of step time spent waiting for data (``data_wait_s`` x steps/s). Then the ratios
the issue asks for: memory at the largest size / the smallest (goal: within 10 %), streaming /
in-RAM steps/s (goal >= 0.9) and 2 / 1 processes.

    python -m clinisynth_lab.benchmarks.finetune_scale [--sizes 2000,10000,40000] [--steps 60]
"""

from __future__ import annotations

import argparse
import io
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from clinisynth_lab.benchmarks.hostload import peak_rss_mb, process_tree

if TYPE_CHECKING:
    from clinisynth import Client
    from clinisynth_server.store.base import ArtifactStore

CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]
POOL = 2000


# -- memory of a job's process tree (hostload's /proc readers) ------------------------------
def _pss_kb(pid: int) -> float:
    """Proportional set size: shared pages (forked DataLoader workers) counted once overall."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


@dataclass
class MemorySampler:
    """Samples a job's worker tree until stopped: peak VmHWM of its biggest process and
    the peak PSS sum of the tree."""

    pid: int
    interval_s: float = 0.25
    hwm_mb: float = 0.0
    tree_pss_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            tree = list(process_tree(self.pid))
            peaks = [m for m in map(peak_rss_mb, tree) if m == m]  # NaN: the process is gone
            self.hwm_mb = max([self.hwm_mb, *peaks])
            self.tree_pss_mb = max(self.tree_pss_mb, sum(_pss_kb(p) for p in tree) / 1024)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# -- data -------------------------------------------------------------------------------------
def image_chunks(n: int, size: int, chunk: int = 2000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``n`` distinct phantoms in chunks: a drawn pool, then pool images shifted by k pixels."""
    from clinisynth_lab.phantoms import cells

    pool, labels = cells.generate(min(n, POOL), seed=0, size=size)
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        base = idx % len(pool)
        shift = idx // len(pool)
        images = np.stack(
            [np.roll(pool[b], int(s), axis=1) for b, s in zip(base, shift, strict=True)]
        )
        yield images, labels[base]


def upload_set(client: Client, n: int, size: int, prefix: str, scratch: pathlib.Path) -> float:
    """Write ``n`` images as an ImageFolder and upload them as shards; seconds taken."""
    from clinisynth_lab.phantoms.datasets import write_image_folder

    folder = scratch / prefix.replace("/", "-")
    for k, (images, labels) in enumerate(image_chunks(n, size)):
        write_image_folder(folder, images, labels, CLASSES, start_id=1 + k * 2000)
    t0 = time.perf_counter()
    client.finetune.upload_dataset(folder, prefix, shards=True, shard_mb=16)
    took = time.perf_counter() - t0
    shutil.rmtree(folder)
    return took


# -- jobs -------------------------------------------------------------------------------------
@dataclass
class Run:
    arm: str
    images: int
    hwm_mb: float
    tree_pss_mb: float
    steps_per_s: float
    wait_share: float


def run_job(client: Client, store: ArtifactStore, prefix: str, params: dict[str, object]) -> Run:
    from clinisynth_server.finetune.records import JobStore

    jobs = JobStore(store)
    ft = client.finetune
    job = ft.create("diffusion_pretrain", prefix, params=params)
    pid = 0
    while not pid:
        record = jobs.get(job.id)
        pid = int((record.worker or {}).get("pid", 0) or 0)
        if record.state in ("failed", "cancelled"):
            raise RuntimeError(f"job {job.id} {record.state}: {record.failure_reason}")
        time.sleep(0.05)
    sampler = MemorySampler(pid).start()
    try:
        done = ft.wait(job.id, timeout=3600)
    finally:
        sampler.stop()
    if done.state != "succeeded":
        raise RuntimeError(f"job {job.id} {done.state}: {done.failure_reason}")
    progress = [e.metrics for e in ft.watch(job.id) if e.type == "progress"][1:]
    rates = [m["steps_per_s"] for m in progress]
    waits = [m.get("data_wait_s", 0.0) * m["steps_per_s"] for m in progress]
    return Run(
        "",
        0,
        sampler.hwm_mb,
        sampler.tree_pss_mb,
        statistics.median(rates),
        statistics.median(waits) if waits else 0.0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clinisynth benchmark finetune --scale", description=__doc__
    )
    parser.add_argument("--sizes", default="2000,10000,40000", help="data set sizes (images)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", default="16,32", help="UNet block_out_channels")
    parser.add_argument("--data-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process arm")
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    sizes = sorted(int(s) for s in args.sizes.split(","))

    import clinisynth
    from clinisynth_lab.benchmarks.finetune import start_finetune
    from clinisynth_server.store import open_store

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-ftscale-"))
    store_url = str(tmp / "store")
    running = start_finetune(store_url, tmp / "work", args.threads)
    base = {
        "max_steps": args.steps,
        "batch_size": args.batch,
        "learning_rate": 1e-4,
        "block_out_channels": args.channels,
        "size": args.size,
        "channels": 1,
        "conditioning": "class",
        "log_every": max(1, args.steps // 6),
        "checkpoint_every": args.steps,
        "lr_schedule": "constant",
        "data_workers": args.data_workers,
    }
    arms: list[tuple[str, int, dict[str, object]]] = [("in-RAM", sizes[0], {"streaming": "off"})]
    arms += [("stream", n, {}) for n in sizes]
    if not args.no_ddp:
        arms.append(("stream x2", sizes[0], {"nproc_per_node": 2}))
    results: dict[tuple[str, int], list[Run]] = {}
    try:
        with clinisynth.Client(endpoints={"finetune": running.address}, timeout=3600) as client:
            store = open_store(store_url)
            for n in sizes:
                took = upload_set(client, n, args.size, f"datasets/bench-scale-{n}", tmp)
                print(f"uploaded {n} images as shards in {took:.1f} s")
            for round_ in range(args.repeats):
                for arm, n, extra in arms:
                    run = run_job(client, store, f"datasets/bench-scale-{n}", {**base, **extra})
                    run.arm, run.images = arm, n
                    results.setdefault((arm, n), []).append(run)
                    print(
                        f"round {round_ + 1} {arm:9s} {n:6d} images: "
                        f"{run.steps_per_s:.2f} steps/s, training process peak "
                        f"{run.hwm_mb:.0f} MB, tree PSS {run.tree_pss_mb:.0f} MB, data wait "
                        f"{run.wait_share * 100:.1f} %"
                    )
    finally:
        running.stop(0)
        shutil.rmtree(tmp, ignore_errors=True)

    def med(arm: str, n: int, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results[(arm, n)])

    print()
    print("| arm | images | steps/s | training process peak (VmHWM) | job tree PSS | data wait |")
    print("|---|---|---|---|---|---|")
    for arm, n, _ in arms:
        print(
            f"| {arm} | {n} | {med(arm, n, 'steps_per_s'):.2f} | {med(arm, n, 'hwm_mb'):.0f} MB"
            f" | {med(arm, n, 'tree_pss_mb'):.0f} MB | {med(arm, n, 'wait_share') * 100:.1f} % |"
        )
    small, large = sizes[0], sizes[-1]
    memory = med("stream", large, "hwm_mb") / med("stream", small, "hwm_mb")
    tree = med("stream", large, "tree_pss_mb") / med("stream", small, "tree_pss_mb")
    speed = med("stream", small, "steps_per_s") / med("in-RAM", small, "steps_per_s")
    print()
    print(
        f"memory {large} / {small} images: training process {memory:.3f}, job tree {tree:.3f} "
        f"(goal <= 1.10: {'met' if max(memory, tree) <= 1.10 else 'MISSED'})"
    )
    print(
        f"steps/s streaming / in-RAM at {small}: {speed:.3f} "
        f"(goal >= 0.9: {'met' if speed >= 0.9 else 'MISSED'})"
    )
    in_ram = med("in-RAM", small, "hwm_mb") / med("stream", small, "hwm_mb")
    print(f"training process memory in-RAM / streaming at {small}: {in_ram:.3f}")
    if not args.no_ddp:
        ddp = med("stream x2", small, "steps_per_s") / med("stream", small, "steps_per_s")
        print(f"steps/s 2 processes / 1 at {small} (same global batch): {ddp:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
