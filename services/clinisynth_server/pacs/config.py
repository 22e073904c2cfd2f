"""PACS destinations, read from the ``[pacs.NAME]`` tables of the ``CLINISYNTH_CONFIG`` file.

A destination is either DICOMweb (``dicomweb_url``, optional ``token_file`` holding a bearer
token, optional ``ca_file`` for https) or DIMSE (``host``, ``port``, ``called_ae``, optional
``ae_title`` = our calling AE, optional ``tls = true`` with ``ca_file`` / ``cert_file`` /
``key_file``). Secrets live in files, never in the TOML itself.

How inputs are fetched from it (``retrieve``): ``"wado"`` (WADO-RS; the default for DICOMweb),
``"c-get"`` (the default for DIMSE: the PACS sends the instance back on our association) or
``"c-move"`` (DIMSE: the service opens a short-lived Storage SCP listening on ``move_host``
(default every interface) : ``move_port`` as AE ``move_ae_title`` and asks the PACS to move the
instance there — the PACS must know that AE title, host and port as a destination). The Storage
SCP speaks plain DICOM, so ``c-move`` is refused on a ``tls = true`` destination (use ``c-get``).
``timeout_s`` caps every network wait of one delivery or fetch; a fetch is further capped by the
remaining time of the call that needs it (:mod:`.fetch`).
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
    "retrieve",
    "move_ae_title",
    "move_port",
    "move_host",
}
#: The retrieve methods per protocol; the first is the default.
RETRIEVE = {"dicomweb": ("wado",), "dimse": ("c-get", "c-move")}
_MOVE_KEYS = ("move_ae_title", "move_port", "move_host")


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
    retrieve: str = "wado"
    move_ae_title: str = ""
    move_port: int = 0
    move_host: str = "0.0.0.0"  # the PACS connects to us; an operator may narrow it

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


def _port(value: Any, where: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise InvalidArgument.for_field(where, f"must be an integer port, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise InvalidArgument.for_field(where, f"must be 1..65535, got {port}")
    return port


def _timeout(value: Any, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument.for_field(where, f"must be seconds, got {value!r}") from None
    if not seconds > 0:
        raise InvalidArgument.for_field(where, f"must be > 0 s, got {seconds}")
    return seconds


def _retrieve(dest: PacsDestination, table: Mapping[str, Any], where: str) -> PacsDestination:
    """The retrieve method and, for ``c-move``, our Storage SCP's AE title / port / address."""
    allowed = RETRIEVE[dest.protocol]
    method = str(table.get("retrieve", allowed[0]))
    if method not in allowed:
        every = sorted({m for methods in RETRIEVE.values() for m in methods})
        raise InvalidArgument.for_field(
            f"{where}.retrieve",
            f"{method!r} is not a retrieve method of a {dest.protocol} destination "
            f"(one of {list(allowed)}; every method: {every})",
        )
    if method != "c-move":
        present = [k for k in _MOVE_KEYS if k in table]
        if present:
            raise InvalidArgument.for_field(f"{where}.{present[0]}", 'only for retrieve = "c-move"')
        return replace(dest, retrieve=method)
    for key in ("move_ae_title", "move_port"):
        if key not in table:
            raise InvalidArgument.for_field(
                f"{where}.{key}", 'required for retrieve = "c-move" (the PACS must know it)'
            )
    if dest.tls:
        raise InvalidArgument.for_field(
            f"{where}.retrieve",
            'the C-MOVE Storage SCP speaks plain DICOM: use retrieve = "c-get" over TLS',
        )
    return replace(
        dest,
        retrieve=method,
        move_ae_title=_ae(table["move_ae_title"], f"{where}.move_ae_title"),
        move_port=_port(table["move_port"], f"{where}.move_port"),
        move_host=str(table.get("move_host", dest.move_host)),
    )


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
        timeout_s=_timeout(table.get("timeout_s", 30.0), f"{where}.timeout_s"),
    )
    if "dicomweb_url" in table:
        url = str(table["dicomweb_url"]).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise InvalidArgument.for_field(f"{where}.dicomweb_url", "must be an http(s) URL")
        if any(k in table for k in ("host", "port", "called_ae")):
            raise InvalidArgument.for_field(where, "either dicomweb_url or host/port/called_ae")
        web = replace(base, dicomweb_url=url, token_file=str(table.get("token_file", "")))
        return _retrieve(web, table, where)
    for key in ("host", "port", "called_ae"):
        if key not in table:
            raise InvalidArgument.for_field(
                f"{where}.{key}", "required for a DIMSE destination (or give dicomweb_url)"
            )
    dimse = replace(
        base,
        protocol="dimse",
        host=str(table["host"]),
        port=_port(table["port"], f"{where}.port"),
        ae_title=_ae(table.get("ae_title", DEFAULT_AE_TITLE), f"{where}.ae_title"),
        called_ae=_ae(table["called_ae"], f"{where}.called_ae"),
    )
    return _retrieve(dimse, table, where)


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
