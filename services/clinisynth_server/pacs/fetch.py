"""PACS in: one DICOM instance fetched by its UIDs, de-identified before anything else sees it.

A request names an instance in a configured PACS (``[pacs.NAME]``, :mod:`.config`) by Study /
Series / SOP Instance UID. :class:`PacsReader` fetches it with DICOMweb WADO-RS (destinations
with ``dicomweb_url``) or DIMSE C-GET (``host`` / ``port`` / ``called_ae``), bounded in size and
time, and passes the bytes through :func:`imaging.deid.deidentify_input` — the same PS3.15 basic
profile every inline DICOM input gets — before returning them. The original UIDs never leave
this module: what the services keep is :meth:`PacsReader.lineage`, an HMAC-SHA256 of the three
UIDs under a salt held in the store (``LINEAGE_SALT_KEY``, a service namespace callers cannot
read), so an operator holding the salt can tell which PACS instance an output derives from.

Errors: a bad UID or an unknown PACS is INVALID_ARGUMENT naming the field
(``images[0].pacs.sop_uid``); an instance the PACS does not hold is NOT_FOUND naming the field
of the UID; a PACS that is down, refuses us or times out is UNAVAILABLE; an instance over the
size bound is INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
import secrets
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import pydicom
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt

# pynetdicom builds its SOP class names at import time; mypy cannot see them.
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from clinisynth_server.errors import InvalidArgument, NotFound, Unavailable, ValidationErrors
from clinisynth_server.imaging import deid
from clinisynth_server.pacs.config import PacsDestination
from clinisynth_server.pacs.cstore import _tls_args
from clinisynth_server.store.base import ArtifactStore

log = logging.getLogger(__name__)


class _DropWadoUrls(logging.Filter):
    """urllib3's debug lines show request paths; a WADO-RS path holds the original UIDs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/studies/" not in record.getMessage()


# pynetdicom logs every C-GET identifier (the original UIDs) at INFO: keep only its warnings.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
logging.getLogger("urllib3.connectionpool").addFilter(_DropWadoUrls())

#: The salt of the lineage hash; under the PACS namespace, which callers can never read.
LINEAGE_SALT_KEY = "pacs-outbox/secrets/lineage-salt.txt"
#: The most bytes one fetched instance may have (a large radiograph is ~ 20-50 MiB).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_UID_CHARS = 64
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_CHUNK = 1 << 16
#: C-GET statuses with which the peer answers "done" (success, or warning: some sub-operations
#: failed) rather than "cannot process".
_GET_DONE = {0x0000, 0xB000}


@dataclass(frozen=True)
class PacsRef:
    """An instance in a named PACS, as a request gives it."""

    pacs: str
    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class FetchedInstance:
    """A fetched instance as the service may hold it: de-identified bytes and lineage."""

    data: bytes
    pacs: str
    lineage: str

    def provenance(self) -> dict[str, str]:
        """What an output's provenance records about this input (no original identifier)."""
        return {"input_source": "pacs", "input_pacs": self.pacs, "input_lineage": self.lineage}


def check_uid(value: str, field_name: str, errors: ValidationErrors) -> None:
    """DICOM UID grammar (PS3.5 §9.1): numeric components, no leading zeros, ≤ 64 chars."""
    if not value:
        errors.add(field_name, "required: a DICOM UID")
    elif len(value) > MAX_UID_CHARS:
        errors.add(field_name, f"a DICOM UID has at most {MAX_UID_CHARS} characters")
    elif not _UID_RE.fullmatch(value):
        errors.add(
            field_name,
            "not a DICOM UID: digits in dot-separated components, no leading zeros "
            "(e.g. 1.2.840.10008.1.1)",
        )


def check_ref(
    ref: PacsRef, destinations: Mapping[str, PacsDestination], field_name: str
) -> PacsDestination:
    """The destination ``ref`` names; INVALID_ARGUMENT naming every bad field at once."""
    errors = ValidationErrors()
    if not ref.pacs:
        errors.add(f"{field_name}.pacs", "required: the name of a configured PACS")
    elif ref.pacs not in destinations:
        known = ", ".join(sorted(destinations)) or "none configured"
        errors.add(f"{field_name}.pacs", f"unknown PACS {ref.pacs!r} ({known})")
    check_uid(ref.study_uid, f"{field_name}.study_uid", errors)
    check_uid(ref.series_uid, f"{field_name}.series_uid", errors)
    check_uid(ref.sop_uid, f"{field_name}.sop_uid", errors)
    errors.raise_if_any()
    return destinations[ref.pacs]


def _too_big(field_name: str, max_bytes: int) -> InvalidArgument:
    return InvalidArgument.for_field(
        field_name, f"the PACS instance is over the limit of {max_bytes} bytes"
    )


def _first_part(body: bytes, content_type: str) -> bytes:
    """The first body part of a multipart/related answer (PS3.18 §8.6.1.2)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError(f"no multipart boundary in {content_type!r}")
    delimiter = b"--" + match.group(1).strip().encode()
    start = body.find(delimiter)
    if start < 0:
        raise ValueError("no body part")
    head_end = body.find(b"\r\n\r\n", start)
    if head_end < 0:
        raise ValueError("body part without headers")
    end = body.find(b"\r\n" + delimiter, head_end + 4)
    if end < 0:
        raise ValueError("body part not terminated")
    return body[head_end + 4 : end]


def wado_rs(dest: PacsDestination, ref: PacsRef, *, field: str, max_bytes: int) -> bytes:
    """GET one instance (Part 10 bytes) with WADO-RS: ``/studies/…/series/…/instances/…``."""
    url = (
        f"{dest.dicomweb_url}/studies/{ref.study_uid}/series/{ref.series_uid}"
        f"/instances/{ref.sop_uid}"
    )
    headers = {"Accept": 'multipart/related; type="application/dicom"'}
    token = dest.token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    cert = (dest.cert_file, dest.key_file) if dest.cert_file else None
    try:
        with requests.get(
            url,
            headers=headers,
            timeout=dest.timeout_s,
            verify=dest.ca_file or True,
            cert=cert,
            stream=True,
        ) as resp:
            if resp.status_code == 404:
                raise NotFound(
                    f"{field}.sop_uid: PACS {dest.name!r} holds no such instance in that "
                    "study and series",
                    reason="PACS_INSTANCE_NOT_FOUND",
                    metadata={"field": f"{field}.sop_uid"},
                )
            if resp.status_code != 200:
                raise Unavailable(
                    f"{field}: PACS {dest.name!r} answered WADO-RS with HTTP {resp.status_code}",
                    reason="PACS_UNAVAILABLE",
                )
            declared = int(resp.headers.get("Content-Length") or 0)
            if declared > max_bytes + _CHUNK:
                raise _too_big(field, max_bytes)
            body = bytearray()
            for chunk in resp.iter_content(_CHUNK):
                body += chunk
                if len(body) > max_bytes + _CHUNK:  # multipart framing is a few hundred bytes
                    raise _too_big(field, max_bytes)
            content_type = resp.headers.get("Content-Type", "")
    except (requests.RequestException, ssl.SSLError, OSError) as exc:
        raise Unavailable(
            f"{field}: PACS {dest.name!r} unreachable: {type(exc).__name__}",
            reason="PACS_UNAVAILABLE",
        ) from exc
    try:
        part = _first_part(bytes(body), content_type)
    except ValueError as exc:
        raise Unavailable(
            f"{field}: PACS {dest.name!r} sent no DICOM body part: {exc}",
            reason="PACS_UNAVAILABLE",
        ) from exc
    if len(part) > max_bytes:
        raise _too_big(field, max_bytes)
    return part


def c_get(dest: PacsDestination, ref: PacsRef, *, field: str, max_bytes: int) -> bytes:
    """C-GET one instance at IMAGE level; the peer sends it back on the same association."""
    ae = AE(ae_title=dest.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for context in StoragePresentationContexts[:127]:  # 128 contexts at most, one is the GET
        assert context.abstract_syntax is not None
        ae.add_requested_context(context.abstract_syntax)
        roles.append(build_role(context.abstract_syntax, scp_role=True))
    received: list[bytes] = []
    oversized = threading.Event()

    def on_store(event: evt.Event) -> int:
        data = event.encoded_dataset(include_meta=True)
        if len(data) > max_bytes:
            oversized.set()
            return 0xA700  # out of resources: refused
        received.append(data)
        return 0x0000

    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = ref.study_uid
    query.SeriesInstanceUID = ref.series_uid
    query.SOPInstanceUID = ref.sop_uid
    try:
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.called_ae,
            ext_neg=roles,  # type: ignore[arg-type]  # its stub wants a list of the base class
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
            tls_args=_tls_args(dest),
        )
    except (OSError, ssl.SSLError) as exc:
        raise Unavailable(
            f"{field}: PACS {dest.name!r} unreachable: {type(exc).__name__}",
            reason="PACS_UNAVAILABLE",
        ) from exc
    if not assoc.is_established:
        raise Unavailable(
            f"{field}: PACS {dest.name!r} ({dest.host}:{dest.port}) rejected or never "
            "established the association",
            reason="PACS_UNAVAILABLE",
        )
    final: int | None = None
    try:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status and "Status" in status:
                final = int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()
    if oversized.is_set():
        raise _too_big(field, max_bytes)
    if received:
        return received[0]
    if final is None:
        raise Unavailable(
            f"{field}: PACS {dest.name!r} aborted the C-GET or did not answer in time",
            reason="PACS_UNAVAILABLE",
        )
    raise NotFound(
        f"{field}.sop_uid: PACS {dest.name!r} holds no such instance in that study and series "
        f"(C-GET status 0x{final:04X})",
        reason="PACS_INSTANCE_NOT_FOUND",
        metadata={"field": f"{field}.sop_uid"},
    )


def _check_identity(data: bytes, ref: PacsRef, dest: PacsDestination, field: str) -> None:
    """The PACS sent the instance asked for (a misrouted answer is the PACS's fault)."""
    if not (len(data) >= 132 and data[128:132] == b"DICM"):
        raise Unavailable(
            f"{field}: PACS {dest.name!r} sent an object that is not a DICOM Part 10 file",
            reason="PACS_UNAVAILABLE",
        )
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        got = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    except Exception as exc:  # hostile or broken answer: described without its contents
        raise InvalidArgument.for_field(
            field, f"PACS {dest.name!r} sent an object that is not readable DICOM"
        ) from exc
    if got != (ref.study_uid, ref.series_uid, ref.sop_uid):
        raise Unavailable(
            f"{field}: PACS {dest.name!r} answered with another instance than the one asked for",
            reason="PACS_UNAVAILABLE",
        )


class PacsReader:
    """Fetches referenced instances from the configured PACS and de-identifies them."""

    def __init__(
        self,
        destinations: Mapping[str, PacsDestination],
        store: ArtifactStore,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.destinations = dict(destinations)
        self.store = store
        self.max_bytes = max_bytes
        self._salt: bytes | None = None
        self._lock = threading.Lock()

    def _lineage_salt(self) -> bytes:
        with self._lock:
            if self._salt is None:
                self.store.put_if_absent(LINEAGE_SALT_KEY, secrets.token_hex(32).encode())
                self._salt = self.store.get_bytes(LINEAGE_SALT_KEY).strip()
            return self._salt

    def lineage(self, ref: PacsRef) -> str:
        """``hmac-sha256:<hex>`` over the three original UIDs (the same instance read from
        two PACS, or by WADO-RS and by C-GET, has one lineage)."""
        message = "\x00".join((ref.study_uid, ref.series_uid, ref.sop_uid)).encode()
        digest = hmac.new(self._lineage_salt(), message, hashlib.sha256).hexdigest()
        return f"hmac-sha256:{digest}"

    def fetch(self, ref: PacsRef, *, field: str, max_bytes: int | None = None) -> FetchedInstance:
        """The instance, de-identified (INVALID_ARGUMENT / NOT_FOUND / UNAVAILABLE otherwise)."""
        dest = check_ref(ref, self.destinations, field)
        limit = min(max_bytes or self.max_bytes, self.max_bytes)
        get = wado_rs if dest.protocol == "dicomweb" else c_get
        data = get(dest, ref, field=field, max_bytes=limit)
        _check_identity(data, ref, dest, field)
        clean = deid.deidentify_input(data, field=field)
        fetched = FetchedInstance(clean, dest.name, self.lineage(ref))
        log.info(
            "%s: fetched from PACS %s (%s), lineage %s: %s",
            field,
            dest.name,
            dest.protocol,
            fetched.lineage,
            deid.safe_log_repr(clean),
        )
        return fetched


__all__ = [
    "DEFAULT_MAX_BYTES",
    "LINEAGE_SALT_KEY",
    "FetchedInstance",
    "PacsReader",
    "PacsRef",
    "c_get",
    "check_ref",
    "check_uid",
    "wado_rs",
]
