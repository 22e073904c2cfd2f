"""DICOMweb STOW-RS delivery (PS3.18 §10.5): one multipart/related POST per batch."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Sequence

import requests

from clinisynth_server.pacs.config import PacsDestination


class DeliveryError(Exception):
    """The destination could not take the batch now (down, refused, timed out); retry later."""


#: DICOM JSON tags of the STOW-RS response (PS3.18 Table 10.5.3-1).
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"


def _verify(dest: PacsDestination) -> bool | str:
    return dest.ca_file or True


def stow(dest: PacsDestination, instances: Sequence[tuple[str, bytes]]) -> set[str]:
    """POST ``(sop_instance_uid, part10 bytes)`` pairs; the SOP Instance UIDs the PACS stored.

    A 200 / 202 answer lists what was stored (202: some failed; those are retried by the
    outbox); transport failures and other statuses raise :class:`DeliveryError`.
    """
    boundary = uuid.uuid4().hex
    body = bytearray()
    for _, data in instances:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += data
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    token = dest.token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    cert = (dest.cert_file, dest.key_file) if dest.cert_file else None
    try:
        resp = requests.post(
            f"{dest.dicomweb_url}/studies",
            data=bytes(body),
            headers=headers,
            timeout=dest.timeout_s,
            verify=_verify(dest),
            cert=cert,
        )
    except (requests.RequestException, ssl.SSLError, OSError) as exc:
        raise DeliveryError(f"STOW-RS to {dest.name}: {type(exc).__name__}: {exc}") from exc
    if resp.status_code not in (200, 202):
        raise DeliveryError(f"STOW-RS to {dest.name}: HTTP {resp.status_code} {resp.text[:200]}")
    try:
        payload = resp.json()
    except ValueError as exc:
        raise DeliveryError(f"STOW-RS to {dest.name}: answer is not DICOM JSON") from exc
    stored: set[str] = set()
    for item in (payload.get(_REFERENCED_SOP_SEQUENCE) or {}).get("Value", []):
        values = (item.get(_REFERENCED_SOP_INSTANCE_UID) or {}).get("Value", [])
        stored.update(str(v) for v in values)
    return stored
