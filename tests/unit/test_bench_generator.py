"""The generator benchmark's plumbing: options, presets, stage timing, load, memory, the report.

Fast and without the stack (the benchmark itself runs it); the figures come from running
``clinisynth benchmark generator``.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import threading
import time

import pytest

from clinisynth_lab.benchmarks import generator as bench
from clinisynth_lab.benchmarks import hostload


def test_levels_and_preset_defaults() -> None:
    assert bench._levels("1,8,32") == (1, 8, 32)
    assert bench._levels("0") == () and bench._levels("") == ()
    with pytest.raises(argparse.ArgumentTypeError):
        bench._levels("eight")
    with pytest.raises(argparse.ArgumentTypeError):
        bench._levels("-1")
    small = bench.parse_args([])
    assert (small.preset, small.steps, small.repeats, small.clients) == ("small", (20,), 3, (8,))
    sd15 = bench.parse_args(["--preset", "sd15"])
    assert (sd15.steps, sd15.repeats, sd15.clients) == ((2,), 1, ())
    gpu = bench.parse_args(["--preset", "sd15", "--steps", "30,50", "--clients", "1,8,32"])
    assert (gpu.steps, gpu.clients) == ((30, 50), (1, 8, 32))
    with pytest.raises(SystemExit):
        bench.parse_args(["--background-load", "-1"])


def test_import_stages_from_progress_events() -> None:
    events = [(1.0, "upload"), (2.0, "upload"), (2.5, "fetch"), (3.0, "validate"), (7.0, "load")]
    stages = bench.import_stages(0.0, events, 9.0)
    assert stages == [("upload", 2.0), ("fetch", 0.5), ("validate", 4.0), ("load", 2.0)]


def test_parameter_counts_read_from_safetensors_headers(tmp_path: pathlib.Path) -> None:
    import torch
    from safetensors.torch import save_file

    for sub, shapes in {"unet": [(3, 4), (5,)], "text_encoder": [(2, 2)], "vae": []}.items():
        (tmp_path / sub).mkdir()
        if shapes:
            tensors = {f"w{i}": torch.zeros(shape) for i, shape in enumerate(shapes)}
            save_file(tensors, str(tmp_path / sub / "model.safetensors"))
    assert bench.parameter_counts(tmp_path) == {"unet": 17, "text_encoder": 4, "vae": 0}


def test_stub_label_names_the_model() -> None:
    repo = pathlib.Path("/r/models")
    cmd = f"/x/triton_python_backend_stub {repo}/m.denoiser/1/model.py 123 shm"
    assert bench._stub_label(cmd, repo) == "m.denoiser"
    assert bench._stub_label("/bin/tritonserver --model-repository=/r/models", repo) == ""


def test_run_concurrent_runs_every_seed_from_that_many_threads() -> None:
    active, peak, seen = [0], [0], []
    lock = threading.Lock()
    gate = threading.Barrier(4)

    def call(seed: int) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            seen.append(seed)
        if seed < 4:
            gate.wait(timeout=30)  # the first four are in flight together
        with lock:
            active[0] -= 1

    latencies = bench.run_concurrent(call, 4, list(range(10)))
    assert sorted(seen) == list(range(10)) and len(latencies) == 10
    assert peak[0] == 4

    def failing(seed: int) -> None:
        raise ValueError(f"seed {seed}")

    with pytest.raises(ValueError):
        bench.run_concurrent(failing, 2, [1, 2, 3])


def _run_figures() -> dict[str, object]:
    side = {
        "latency_s": 2.0,
        "stages_s": {"denoiser": 1.8, "other": 0.2},
        "concurrent": {
            "8": {"images_per_s": 0.5, "p50_s": 10.0, "p99_s": 12.0, "rows_per_execution": 9.5}
        },
        "sequential_images_per_s": {},
        "batched_images_per_s": {},
    }
    theirs = {
        **side,
        "latency_s": 1.6,
        "concurrent": {},
        "sequential_images_per_s": {"8": 0.625},
        "batched_images_per_s": {"8": 1.0},
    }
    return {
        "preset": "sd15",
        "description": "d",
        "size": 512,
        "guidance_scale": 7.5,
        "device": "cpu",
        "dtype": "float32",
        "instances": 1,
        "background_load": 1,
        "triton_own_session": False,
        "machine": "m",
        "repeats": 3,
        "runs": {"2": {"stack": side, "pipeline": theirs, "pixel_max_diff": 1e-6}},
        "import": {"seconds": 5.0, "stages": [("upload", 1.0), ("load", 4.0)]},
        "memory_mb": {"m.denoiser": 3500.0, "gone": math.nan},
        "gpu_memory_mb": {},
        "host_peak_mb": 9000.0,
        "host_peak_above_start_mb": 8000.0,
    }


def test_report_prints_the_ratios() -> None:
    text = bench.report(_run_figures())
    assert "| 2 | one request, latency (median of 3) | 2.00 s | 1.60 s | 1.25 | ≤ 1.05 |" in text
    assert "(p50 10.00 s, p99 12.00 s; 9.5 rows per denoiser execution) | 0.500 |" in text
    assert "| 8 requests ÷ the pipeline 8× in a row | 0.500 img/s | 0.625 img/s | 0.80 |" in text
    assert "| 8 requests ÷ the pipeline at batch 8 | 0.500 img/s | 1.000 img/s | 0.50 |" in text
    assert "import through ImportModel: 5.0 s (upload 1.0 s, load 4.0 s)" in text
    assert "m.denoiser 3500 MB" in text and "gone" not in text
    assert "≈ 1.6 TFLOP/s in the U-Net" in text  # 0.5 img/s × 2 steps × 1.6 TFLOP


def test_openmp_settings_are_shared_with_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from clinisynth_server.triton import launcher

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("KMP_BLOCKTIME", "7")
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert bench.same_openmp_settings() == {
        "GOMP_SPINCOUNT": str(launcher.OMP_SPIN_COUNT),
        "KMP_BLOCKTIME": "7",
    }


# -- host load and memory --------------------------------------------------------------------------
def _nice_of(pid: int) -> int:
    return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_background_load_is_niced_and_goes_away() -> None:
    with hostload.BackgroundLoad(2) as load:
        pids = [p.pid for p in load.procs]
        assert len(pids) == 2
        for pid in pids:
            for _ in range(600):  # the child lowers its own priority as it starts
                if _nice_of(pid) == 19:
                    break
                time.sleep(0.05)
            assert _nice_of(pid) == 19
            assert os.getsid(pid) == os.getsid(0)  # the benchmark's session, as a shell job
    for pid in pids:
        assert not pathlib.Path(f"/proc/{pid}").exists() or "Z" in _state(pid)
    with pytest.raises(ValueError):
        hostload.BackgroundLoad(-1)


def _state(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_host_memory_reads_meminfo_and_tracks_a_peak() -> None:
    text = "MemTotal:       1048576 kB\nMemFree: 1 kB\nMemAvailable:    524288 kB\n"
    assert hostload.host_used_mb(text) == 512.0
    with hostload.HostMemory(interval_s=0.01) as mem:
        block = bytearray(64 * 2**20)  # touched: resident
        block[::4096] = b"x" * len(block[::4096])
    assert mem.peak_mb >= mem.baseline_mb > 0
    del block


def test_peak_rss_and_process_tree_of_this_process() -> None:
    assert hostload.peak_rss_mb(os.getpid()) > 1
    assert math.isnan(hostload.peak_rss_mb(2**22 + 12345))
    tree = hostload.process_tree(os.getpid())
    assert os.getpid() in tree and "python" in tree[os.getpid()]


def test_no_gpu_means_no_gpu_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostload.shutil, "which", lambda name: None)
    assert hostload.gpu_memory_mb() == {}
    assert math.isnan(hostload.gpu_used_total_mb())
    with hostload.GpuMemory() as gpu:
        pass
    assert math.isnan(gpu.peak_mb)
