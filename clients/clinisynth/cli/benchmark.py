"""``clinisynth benchmark NAME [args...]``: a benchmark from the research kit, clinisynth_lab."""

from __future__ import annotations

import argparse

from clinisynth.cli._common import lab_module

BENCHMARKS = (
    "generator",
    "reward",
    "finetune",
    "counterfactual",
    "methods",
    "memory",
    "batch_invariant",
    "memorization",
    "serving_memory",
)


def cmd_benchmark(ns: argparse.Namespace) -> int:
    module = lab_module(f"benchmarks.{ns.name}", f"benchmark {ns.name}")
    return int(module.main(ns.args) or 0)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="performance and method benchmarks (print ratios)")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=cmd_benchmark)
