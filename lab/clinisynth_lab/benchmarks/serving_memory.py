"""Serving-memory benchmark: what N served models cost in Triton, split vs packed layout.

Each layout in turn imports the same folder N times (``--counts``, default 1 and 4; each a
distinct served model) through the finetune service's ImportModel, then reads every
python-backend process of Triton serving those models: their count, resident set (RSS) and
proportional set (PSS: shared pages split among the processes mapping them, from
``/proc/<pid>/smaps_rollup``), and GPU memory per process where ``nvidia-smi`` is present. The
figures are for the first n of the N models, read once all N are loaded. The layout's models
are then deleted (unloaded) before the other layout starts, so neither shares pages with the
other's processes. Ratios are packed ÷ split.

Latency: one model of each layout is imported again and ``generate`` is timed through the
generator service, interleaved (split, packed, split, …) so host load that comes and goes hits
both; the medians are compared, for one request and for ``--clients`` concurrent ones (where
the split layout can overlap one request's VAE decode with another's denoiser, the packed
model's single process cannot).

    clinisynth benchmark serving_memory [--preset tiny|small|sd15] [--counts 1,4]
        [--steps 4] [--repeats 5] [--clients 4] [--device cpu|gpu --dtype float16] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from clinisynth_lab.benchmarks import generator as gen
from clinisynth_lab.benchmarks import hostload

LAYOUTS = ("split", "packed")
PROMPT = gen.PROMPT
STUB = "triton_python_backend_stub"


def pss_mb(pid: int) -> float:
    """``Pss`` of ``/proc/<pid>/smaps_rollup`` in MB; NaN where the kernel has no rollup."""
    try:
        text = (hostload.PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return float("nan")
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb(pid: int) -> float:
    """``VmRSS`` (current resident set) in MB; NaN once the process is gone."""
    try:
        text = (hostload.PROC / str(pid) / "status").read_text()
    except OSError:
        return float("nan")
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stub_processes(triton_pid: int, repo: pathlib.Path) -> dict[int, str]:
    """Triton's python-backend processes: pid → the Triton model they serve."""
    out = {}
    for pid, cmd in hostload.process_tree(triton_pid).items():
        if STUB in cmd:
            label = gen._stub_label(cmd, repo)
            if label:
                out[pid] = label
    return out


def measure_models(
    triton_pid: int, repo: pathlib.Path, triton_models: Sequence[str]
) -> dict[str, float]:
    """Processes, RSS, PSS and GPU MB of the stubs serving ``triton_models``, summed."""
    wanted = set(triton_models)
    pids = [pid for pid, model in stub_processes(triton_pid, repo).items() if model in wanted]
    gpu = hostload.gpu_memory_mb()
    return {
        "processes": float(len(pids)),
        "rss_mb": sum(rss_mb(p) for p in pids),
        "pss_mb": sum(pss_mb(p) for p in pids),
        "gpu_mb": sum(gpu.get(p, 0.0) for p in pids) if gpu else float("nan"),
    }


def triton_models(details: Any) -> list[str]:
    """The Triton models serving an imported version (its components' addresses, mapped)."""
    from clinisynth_server.triton import packing

    return sorted({packing.served_model(c.triton_model) for c in details.components})


def _all_exited(triton_pid: int, repo: pathlib.Path, models: Sequence[str]) -> bool:
    return measure_models(triton_pid, repo, models)["processes"] == 0


def wait_for(check: Callable[[], bool], timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clinisynth benchmark serving_memory")
    parser.add_argument("--preset", choices=sorted(gen.PRESETS), default="tiny")
    parser.add_argument("--counts", type=gen._levels, default=(1, 4), help="N models, e.g. 1,4")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved latency runs")
    parser.add_argument("--clients", type=int, default=4, help="concurrent requests (0: none)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", type=pathlib.Path, help="write results.json / results.md here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    ns = parser.parse_args(argv)
    if not ns.counts or ns.repeats < 1 or ns.steps < 1 or ns.clients < 0:
        parser.error("--counts needs a value, --repeats / --steps ≥ 1, --clients ≥ 0")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    signal.signal(signal.SIGTERM, gen._stop_on_sigterm)
    gen.same_openmp_settings()
    work = pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-bench-"))
    try:
        results = run(ns, work)
    finally:
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)
    gen.write_figures(ns.out, results, report(results))
    return 0


def run(ns: argparse.Namespace, work: pathlib.Path) -> dict[str, Any]:
    import clinisynth

    preset = gen.PRESETS[ns.preset]
    folder = work / "model"
    params = gen.build_folder(preset, folder)
    counts = sorted(set(ns.counts))
    options = {"device": ns.device, "dtype": ns.dtype, "max_batch_size": 8}
    memory: dict[str, dict[int, dict[str, float]]] = {}
    import_s: dict[str, float] = {}
    latency: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    concurrent: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    stack = gen.Stack(work, own_session=True)
    with (
        stack.running() as running,
        clinisynth.Client(endpoints=running.addresses, timeout=1800) as client,
    ):
        pid = running.triton.pid
        assert pid is not None
        for layout in LAYOUTS:
            imported = []
            started = time.perf_counter()
            for i in range(counts[-1]):
                print(f"importing {layout} model {i + 1}/{counts[-1]}", flush=True)
                imported.append(
                    client.import_model(folder, name=f"mem-{layout}-{i}", layout=layout, **options)
                )
            import_s[layout] = (time.perf_counter() - started) / counts[-1]
            time.sleep(2.0)  # let the stubs settle after their first forward-free load
            memory[layout] = {
                n: measure_models(
                    pid, running.repo, [m for d in imported[:n] for m in triton_models(d)]
                )
                for n in counts
            }
            served = [m for d in imported for m in triton_models(d)]
            for details in imported:
                client.delete_model(details.ref)
            wait_for(functools.partial(_all_exited, pid, running.repo, served))

        names = {}
        for layout in LAYOUTS:
            details = client.import_model(folder, name=f"lat-{layout}", layout=layout, **options)
            names[layout] = details.ref

        def generate(layout: str, seed: int) -> Any:
            return client.generate(
                names[layout], prompt=PROMPT, seed=seed, steps=ns.steps, format="raw"
            )

        for layout in LAYOUTS:
            generate(layout, 0)  # warm-up: first forwards allocate
        for r in range(ns.repeats):
            for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
                start = time.perf_counter()
                generate(layout, 100 + r)
                latency[layout].append(time.perf_counter() - start)
        if ns.clients:
            for r in range(ns.repeats):
                for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
                    seeds = range(1000 + r * ns.clients, 1000 + (r + 1) * ns.clients)
                    start = time.perf_counter()
                    gen.run_concurrent(functools.partial(generate, layout), ns.clients, seeds)
                    concurrent[layout].append(time.perf_counter() - start)
    return {
        "preset": preset.name,
        "description": preset.description,
        "parameters": params,
        "device": ns.device,
        "dtype": ns.dtype,
        "steps": ns.steps,
        "repeats": ns.repeats,
        "clients": ns.clients,
        "cpus": os.cpu_count(),
        "memory": memory,
        "import_s": import_s,
        "latency_s": latency,
        "concurrent_s": concurrent,
    }


def _ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.2f}"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(r: dict[str, Any]) -> str:
    mem = r["memory"]
    lines = [
        f"serving memory: preset {r['preset']} ({r['description']}), {r['device']} "
        f"{r['dtype']}, {r['cpus']} CPUs",
        "",
        "| models | layout | backend processes | RSS MB | PSS MB | GPU MB | "
        "RSS / model | PSS / model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    counts = sorted(int(n) for n in mem["split"])
    for n in counts:
        for layout in LAYOUTS:
            m = mem[layout][n] if n in mem[layout] else mem[layout][str(n)]
            gpu = "-" if math.isnan(m["gpu_mb"]) else f"{m['gpu_mb']:.0f}"
            lines.append(
                f"| {n} | {layout} | {m['processes']:.0f} | {m['rss_mb']:.0f} | "
                f"{m['pss_mb']:.0f} | {gpu} | {m['rss_mb'] / n:.0f} | {m['pss_mb'] / n:.0f} |"
            )
    lines += [
        "",
        "| models | processes packed ÷ split | RSS packed ÷ split | PSS packed ÷ split "
        "| GPU packed ÷ split |",
        "|---|---|---|---|---|",
    ]
    for n in counts:
        s = mem["split"][n] if n in mem["split"] else mem["split"][str(n)]
        p = mem["packed"][n] if n in mem["packed"] else mem["packed"][str(n)]
        lines.append(
            f"| {n} | {_ratio(p['processes'], s['processes'])} | {_ratio(p['rss_mb'], s['rss_mb'])}"
            f" | {_ratio(p['pss_mb'], s['pss_mb'])} | {_ratio(p['gpu_mb'], s['gpu_mb'])} |"
        )
    lat = {k: _median(v) for k, v in r["latency_s"].items()}
    con = {k: _median(v) for k, v in r["concurrent_s"].items()}
    lines += [
        "",
        f"latency, {r['steps']} steps, median of {r['repeats']} interleaved runs: "
        f"split {lat['split'] * 1000:.0f} ms, packed {lat['packed'] * 1000:.0f} ms, "
        f"packed ÷ split {_ratio(lat['packed'], lat['split'])}",
    ]
    if r["clients"]:
        lines.append(
            f"{r['clients']} concurrent requests, median wall time: split "
            f"{con['split'] * 1000:.0f} ms, packed {con['packed'] * 1000:.0f} ms, "
            f"packed ÷ split {_ratio(con['packed'], con['split'])}"
        )
    lines.append(
        f"import (per model): split {r['import_s']['split']:.1f} s, "
        f"packed {r['import_s']['packed']:.1f} s"
    )
    return "\n".join(lines)
