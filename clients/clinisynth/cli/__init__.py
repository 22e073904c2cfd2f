"""``clinisynth``: the command line, built only on the public SDK (and, for ``up``, the server
package when ``clinisynth[server]`` is installed).

Each sub-command family lives in its own module with an ``add_parser(subparsers)`` function.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from clinisynth._errors import ClinisynthError

# Modules that contribute sub-commands, in help order. A module missing here is a bug.
COMMAND_MODULES = (
    "stack",
    "generator",
    "models",
    "reward",
    "counterfactual",
    "finetune",
    "benchmark",
    "demo",
    "pacs",
    "audit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinisynth",
        description="Clinically aligned synthetic medical images: generate, score, explain, "
        "fine-tune. Finds the stack started by `clinisynth up` unless --address is given.",
    )
    parser.add_argument("--address", help="host running every service at its default port")
    parser.add_argument("--token", help="bearer token (default: $CLINISYNTH_TOKEN)")
    parser.add_argument(
        "--token-file",
        help="file holding the bearer token, re-read on every call (default: "
        "$CLINISYNTH_TOKEN_FILE); preferred over --token, which shows in process lists",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS")
    parser.add_argument(
        "--ca-file",
        help="CA certificate to trust for TLS (implies --tls; default: $CLINISYNTH_TLS_CA, "
        "else the system's roots)",
    )
    parser.add_argument(
        "--cert-file",
        help="client certificate (PEM) for servers that verify them, mTLS (implies --tls; with "
        "--key-file; default: $CLINISYNTH_CLIENT_CERT)",
    )
    parser.add_argument(
        "--key-file",
        help="the client certificate's private key (PEM; default: $CLINISYNTH_CLIENT_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="per-call deadline, seconds")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"clinisynth.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"clinisynth.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's exit
    except BrokenPipeError:
        # `clinisynth status --json | head -3`: the reader left; exit quietly, as cat does. Point
        # stdout at /dev/null so the interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except ClinisynthError as err:
        print(f"error: {err}", file=sys.stderr)
        for v in err.field_violations:
            print(f"  {v.field}: {v.description}", file=sys.stderr)
        return 2 if err.code == "INVALID_ARGUMENT" else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
