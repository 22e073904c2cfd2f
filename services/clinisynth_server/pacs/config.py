"""PACS destinations, read from the ``[pacs.NAME]`` tables of the ``CLINISYNTH_CONFIG`` file.

A destination is either DICOMweb (``dicomweb_url``, optional ``token_file`` holding a bearer
token, optional ``ca_file`` for https) or DIMSE (``host``, ``port``, ``called_ae``, optional
``ae_title`` = our calling AE, optional ``tls = true`` with ``ca_file`` / ``cert_file`` /
``key_file``). Secrets live in files, never in the TOML itself.
"""

from __future__ import annotations

import pathlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from clinisynth_server.errors import InvalidArgument

DEFAULT_AE_TITLE = "CLINISYNTH"
_KNOWN = {
    "dicomweb_url",
    "token_file",
    "host",
    "port",
    "ae_title",
    "called_ae",
    "tls",
    "ca_file",
    "cert_file",
    "key_file",
    "timeout_s",
}


@dataclass(frozen=True)
class PacsDestination:
    """One configured PACS; ``protocol`` is ``"dicomweb"`` or ``"dimse"``."""

    name: str
    protocol: str
    dicomweb_url: str = ""
    token_file: str = ""
    host: str = ""
    port: int = 0
    ae_title: str = DEFAULT_AE_TITLE
    called_ae: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    timeout_s: float = 30.0

    def token(self) -> str:
        """The bearer token, read at each delivery so a rotated file takes effect at once."""
        if not self.token_file:
            return ""
        return pathlib.Path(self.token_file).read_text().strip()


def _ae(value: Any, where: str) -> str:
    text = str(value)
    if not 1 <= len(text) <= 16 or "\\" in text or not text.isprintable():
        raise InvalidArgument.for_field(
            where, f"an AE title is 1..16 printable characters: {text!r}"
        )
    return text


def parse_destination(name: str, table: Mapping[str, Any]) -> PacsDestination:
    """Check one ``[pacs.NAME]`` table; config errors name ``pacs.NAME.<key>``."""
    where = f"pacs.{name}"
    unknown = set(table) - _KNOWN
    if unknown:
        raise InvalidArgument.for_field(
            where, f"unknown keys {sorted(unknown)}; known {sorted(_KNOWN)}"
        )
    base = PacsDestination(
        name,
        "dicomweb",
        tls=bool(table.get("tls", False)),
        ca_file=str(table.get("ca_file", "")),
        cert_file=str(table.get("cert_file", "")),
        key_file=str(table.get("key_file", "")),
        timeout_s=float(table.get("timeout_s", 30.0)),
    )
    if "dicomweb_url" in table:
        url = str(table["dicomweb_url"]).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise InvalidArgument.for_field(f"{where}.dicomweb_url", "must be an http(s) URL")
        if any(k in table for k in ("host", "port", "called_ae")):
            raise InvalidArgument.for_field(where, "either dicomweb_url or host/port/called_ae")
        return replace(base, dicomweb_url=url, token_file=str(table.get("token_file", "")))
    for key in ("host", "port", "called_ae"):
        if key not in table:
            raise InvalidArgument.for_field(
                f"{where}.{key}", "required for a DIMSE destination (or give dicomweb_url)"
            )
    port = int(table["port"])
    if not 1 <= port <= 65535:
        raise InvalidArgument.for_field(f"{where}.port", f"must be 1..65535, got {port}")
    return replace(
        base,
        protocol="dimse",
        host=str(table["host"]),
        port=port,
        ae_title=_ae(table.get("ae_title", DEFAULT_AE_TITLE), f"{where}.ae_title"),
        called_ae=_ae(table["called_ae"], f"{where}.called_ae"),
    )


def parse_destinations(tables: Mapping[str, Any]) -> dict[str, PacsDestination]:
    out: dict[str, PacsDestination] = {}
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise InvalidArgument.for_field(f"pacs.{name}", "must be a table")
        out[name] = parse_destination(name, table)
    return out


def load_destinations(config_file: str) -> dict[str, PacsDestination]:
    """Every ``[pacs.NAME]`` table of ``config_file`` (none when the path is empty)."""
    if not config_file:
        return {}
    data = tomllib.loads(pathlib.Path(config_file).read_text())
    return parse_destinations(data.get("pacs", {}))


def check_destination(
    name: str, destinations: Mapping[str, PacsDestination], field_name: str = "to_pacs"
) -> PacsDestination:
    """The destination a request names, or ``InvalidArgument`` on ``field_name``."""
    if name not in destinations:
        known = ", ".join(sorted(destinations)) or "none configured"
        raise InvalidArgument.for_field(field_name, f"unknown PACS destination {name!r} ({known})")
    return destinations[name]
