"""``clinisynth pacs outbox``: what the services' PACS outbox holds, and its delivery state."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt

from clinisynth.cli._common import client_from, print_json


def _when(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_outbox(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        items = client.pacs_outbox(
            status=ns.status, destination=ns.destination, limit=ns.limit, timeout=ns.timeout
        )
    if ns.json:
        print_json([dataclasses.asdict(i) for i in items])
        return 0
    for i in items:
        error = f"  {i.last_error}" if i.last_error and i.status != "delivered" else ""
        print(
            f"{i.status:9s} {i.destination:12s} {i.sop_instance_uid}  attempts={i.attempts}"
            f"  enqueued={_when(i.enqueued_at)} delivered={_when(i.delivered_at)}{error}"
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pacs", help="PACS destinations: the delivery outbox")
    actions = p.add_subparsers(dest="pacs_command", metavar="ACTION", required=True)
    o = actions.add_parser("outbox", help="list instances pending / delivered / failed")
    o.add_argument("--status", choices=["pending", "delivered", "failed"])
    o.add_argument("--destination", help="only this [pacs.NAME] destination")
    o.add_argument("--limit", type=int, default=100, help="newest N (max 1000)")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=cmd_outbox)
