"""``clinisynth benchmark NAME [args...]``: run a benchmark of the server package."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = (
    "generator",
    "reward",
    "finetune",
    "counterfactual",
    "methods",
    "memory",
    "batch_invariant",
)


def cmd_benchmark(ns: argparse.Namespace) -> int:
    try:
        module = importlib.import_module(f"clinisynth_server.benchmarks.{ns.name}")
    except ImportError as exc:
        raise SystemExit(
            f"benchmark {ns.name!r} needs the server side: pip install 'clinisynth[server]' ({exc})"
        ) from exc
    return int(module.main(ns.args) or 0)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="performance and method benchmarks (print ratios)")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=cmd_benchmark)
