"""The serving-memory benchmark's plumbing: options, per-process readings, the report.

Fast and without the stack; the figures come from ``clinisynth benchmark serving_memory``.
"""

from __future__ import annotations

import math
import os

import pytest

from clinisynth_lab.benchmarks import serving_memory as bench
from clinisynth_server.triton import packing


def test_options_default_to_one_and_four_models() -> None:
    ns = bench.parse_args([])
    assert (ns.preset, ns.counts, ns.clients, ns.device) == ("tiny", (1, 4), 4, "cpu")
    assert bench.parse_args(["--counts", "1,2,8"]).counts == (1, 2, 8)
    with pytest.raises(SystemExit):
        bench.parse_args(["--counts", "0"])


def test_this_process_has_an_rss_and_a_pss_no_larger() -> None:
    rss, pss = bench.rss_mb(os.getpid()), bench.pss_mb(os.getpid())
    assert rss > 1
    if not math.isnan(pss):  # kernels without smaps_rollup give NaN
        assert 0 < pss <= rss
    assert math.isnan(bench.rss_mb(2**22 + 1))  # above pid_max's default: no such process


def test_report_prints_both_layouts_side_by_side_with_ratios() -> None:
    def m(processes: float, rss: float) -> dict[str, float]:
        return {"processes": processes, "rss_mb": rss, "pss_mb": rss / 2, "gpu_mb": math.nan}

    results = {
        "preset": "tiny",
        "description": "tiny SD",
        "device": "cpu",
        "dtype": "float32",
        "cpus": 2,
        "steps": 4,
        "repeats": 3,
        "clients": 4,
        "memory": {
            "split": {1: m(3, 1200), 4: m(12, 4800)},
            "packed": {1: m(1, 500), 4: m(4, 2000)},
        },
        "latency_s": {"split": [0.2, 0.3, 0.25], "packed": [0.2, 0.2, 0.3]},
        "concurrent_s": {"split": [0.5], "packed": [0.6]},
        "import_s": {"split": 9.0, "packed": 5.0},
    }
    text = bench.report(results)
    assert "| 4 | split | 12 | 4800 | 2400 | - | 1200 | 600 |" in text
    assert "| 4 | packed | 4 | 2000 | 1000 | - | 500 | 250 |" in text
    assert "| 4 | 0.33 | 0.42 | 0.42 | - |" in text  # packed ÷ split
    assert "packed ÷ split 0.80" in text  # latency medians: 0.20 / 0.25
    assert "packed ÷ split 1.20" in text  # 4 concurrent


def test_triton_models_of_an_import_are_its_addresses_served_models() -> None:
    from types import SimpleNamespace

    addresses = [packing.address("m.packed", r) for r in ("denoiser", "vae")]
    details = SimpleNamespace(components=[SimpleNamespace(triton_model=a) for a in addresses])
    assert bench.triton_models(details) == ["m.packed"]
    split = SimpleNamespace(components=[SimpleNamespace(triton_model="m.denoiser")])
    assert bench.triton_models(split) == ["m.denoiser"]
