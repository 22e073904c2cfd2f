"""``clinisynth up | down | status | health``: the one-command local stack."""

from __future__ import annotations

import argparse
import contextlib
import json
import types

from clinisynth import Client
from clinisynth._discovery import discover, state_file
from clinisynth.cli._common import print_json


def _server_stack() -> types.ModuleType:
    try:
        from clinisynth_server import stack
    except ImportError as exc:  # the SDK alone cannot run services
        raise SystemExit(
            f"`clinisynth up` needs the server side: pip install 'clinisynth[server]' ({exc})"
        ) from exc
    return stack


def cmd_up(ns: argparse.Namespace) -> int:
    stack = _server_stack()
    if ns.detach:
        info = stack.start_detached(store_url=ns.store, timeout_s=ns.wait)
        print_json(info)
        return 0
    return stack.run_foreground(store_url=ns.store)


def cmd_down(ns: argparse.Namespace) -> int:
    stack = _server_stack()
    stopped = stack.stop_detached(timeout_s=ns.wait)
    print("stopped" if stopped else "no stack running")
    return 0


_STATE_KEYS = ("pid", "store", "home", "started", "triton_key_in_argv")


def cmd_status(ns: argparse.Namespace) -> int:
    endpoints = discover()
    if endpoints is None:
        if ns.json:
            print_json({"running": False})
        else:
            print("no stack running (start one with `clinisynth up --detach`)")
        return 1
    data = endpoints.to_dict()
    with contextlib.suppress(OSError, json.JSONDecodeError):
        state = json.loads(state_file().read_text())
        data.update({k: v for k, v in state.items() if k in _STATE_KEYS})
    with Client(endpoints=endpoints, timeout=5) as client:
        health = client.health()
    running = all(v == "SERVING" for v in health.values())
    data["health"], data["running"] = health, running
    if ns.json:
        print_json(data)
    else:
        for key in ("generator", "reward", "counterfactual", "finetune", "triton"):
            print(f"{key:15s} {data.get(key, '')}  {health.get(key, '')}")
        metrics = data.get("metrics")
        for key, value in (metrics if isinstance(metrics, dict) else {}).items():
            print(f"metrics:{key:7s} {value}")
        if data.get("review_url"):
            print(f"review page     {data['review_url']}")
        if data.get("triton_key_in_argv"):
            print(
                "warning         Triton's key is on its command line (no C compiler to build "
                "the argv_key library): any local user can read it from /proc"
            )
    return 0 if running else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start Triton, the store and the four services")
    p.add_argument(
        "--detach",
        "-d",
        action="store_true",
        help="return once every service is ready; stop with `clinisynth down`",
    )
    p.add_argument(
        "--store",
        default=None,
        help="artifact store URL (default: a folder under $CLINISYNTH_HOME)",
    )
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for readiness")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the stack started with `up --detach`")
    p.add_argument("--wait", type=float, default=60.0)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="addresses and health of the running stack")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_status)
