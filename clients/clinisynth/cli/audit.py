"""``clinisynth audit``: who called what, when, on which model, and how it ended (admins only)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from clinisynth._types import AuditEntry
from clinisynth.cli._common import client_from, print_json


def _when(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _line(e: AuditEntry) -> str:
    models = ",".join(f"{m.name}@{m.version}" if m.version else m.name for m in e.models)
    who = e.principal or "-"
    if e.tenant:
        who += f"/{e.tenant}"
    return (
        f"{_when(e.time)}  {e.service:14s} {who:20s} {e.rpc:22s} {e.code:18s}"
        f" in={e.request_bytes} out={e.response_bytes} {e.duration_ms:.0f}ms"
        + (f" models={models}" if models else "")
        + (f" request={e.request_id}" if e.request_id else "")
    )


def cmd_audit(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        try:
            entries = client.audit(
                since=ns.since,
                until=ns.until,
                principal=ns.principal,
                method=ns.method,
                limit=ns.limit,
                timeout=ns.timeout,
            )
        except ValueError as exc:  # a --since / --until the SDK cannot read
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if ns.json:
        print_json([e.to_dict() for e in entries])
        return 0
    for e in entries:
        print(_line(e))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="the audit trail: one record per call (admins only)")
    p.add_argument(
        "--since", help="calls started at or after: ISO-8601 time or a span back (15m, 2h, 7d)"
    )
    p.add_argument("--until", help="calls started before: ISO-8601 time or a span back")
    p.add_argument("--principal", help="only this caller (exact name)")
    p.add_argument("--method", help="only this RPC: full name or short (SubmitFeedback)")
    p.add_argument("--limit", type=int, help="at most N records (the oldest)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_audit)
