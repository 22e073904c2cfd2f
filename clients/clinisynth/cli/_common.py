"""Helpers shared by the CLI modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from clinisynth import Client


def client_from(ns: argparse.Namespace) -> Client:
    ca_file = getattr(ns, "ca_file", None)  # else $CLINISYNTH_TLS_CA (the SDK)
    roots = None
    if ca_file:
        with open(ca_file, "rb") as f:
            roots = f.read()
    cert_file, key_file = getattr(ns, "cert_file", None), getattr(ns, "key_file", None)
    chain = key = None  # else $CLINISYNTH_CLIENT_CERT / $CLINISYNTH_CLIENT_KEY (the SDK)
    if bool(cert_file) != bool(key_file):
        raise SystemExit("--cert-file and --key-file go together (a client certificate)")
    if cert_file and key_file:
        with open(cert_file, "rb") as f_cert, open(key_file, "rb") as f_key:
            chain, key = f_cert.read(), f_key.read()
    return Client(
        ns.address,
        token=ns.token or os.environ.get("CLINISYNTH_TOKEN"),
        token_file=getattr(ns, "token_file", None),  # else $CLINISYNTH_TOKEN_FILE (the SDK)
        tls=ns.tls or roots is not None or chain is not None,
        root_certificates=roots,
        timeout=ns.timeout,
        certificate_chain=chain,
        private_key=key,
    )


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def parse_sets(pairs: list[str] | None) -> dict[str, str]:
    """``key=value`` pairs from repeated ``--set`` options."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


LAB_MISSING = (
    "`clinisynth {command}` needs the research kit (benchmarks, phantoms), which is not "
    "installed: from a source checkout run `pip install -e lab/` (package clinisynth-lab)"
)


def lab_module(name: str, command: str) -> Any:
    """Import ``clinisynth_lab.NAME`` on demand: the SDK and the product never need it."""
    import importlib

    try:
        return importlib.import_module(f"clinisynth_lab.{name}")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "clinisynth_lab":
            raise SystemExit(LAB_MISSING.format(command=command)) from exc
        raise SystemExit(
            f"`clinisynth {command}` needs {exc.name}, part of the server side: "
            "pip install 'clinisynth[server]'"
        ) from exc
