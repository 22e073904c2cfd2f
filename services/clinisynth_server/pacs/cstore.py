"""DIMSE C-STORE delivery with pynetdicom: one association per batch, optional TLS."""

from __future__ import annotations

import io
import ssl
from collections.abc import Sequence

import pydicom
from pynetdicom import AE

from clinisynth_server.pacs.config import PacsDestination
from clinisynth_server.pacs.stow import DeliveryError

#: C-STORE statuses that mean stored: success (0x0000) and the warnings (0xB000, 0xB007,
#: 0xB006: coercion / elements discarded) under which the SCP still keeps the instance.
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


def _tls_args(dest: PacsDestination) -> tuple[ssl.SSLContext, str] | None:
    if not dest.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.ca_file or None)
    if dest.cert_file:
        context.load_cert_chain(dest.cert_file, dest.key_file or None)
    return context, dest.host


def cstore(dest: PacsDestination, instances: Sequence[tuple[str, bytes]]) -> set[str]:
    """C-STORE ``(sop_instance_uid, part10 bytes)`` pairs; the SOP Instance UIDs stored."""
    datasets = [pydicom.dcmread(io.BytesIO(data)) for _, data in instances]
    ae = AE(ae_title=dest.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    for sop_class, syntax in sorted(
        {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    ):
        ae.add_requested_context(sop_class, syntax)
    try:
        assoc = ae.associate(
            dest.host, dest.port, ae_title=dest.called_ae, tls_args=_tls_args(dest)
        )
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"C-STORE to {dest.name}: {exc}") from exc
    if not assoc.is_established:
        raise DeliveryError(
            f"C-STORE to {dest.name} ({dest.host}:{dest.port} {dest.called_ae}): "
            "association rejected, aborted or never established"
        )
    stored: set[str] = set()
    try:
        for (uid, _), ds in zip(instances, datasets, strict=True):
            status = assoc.send_c_store(ds)
            if status and int(getattr(status, "Status", -1)) in _STORED:
                stored.add(uid)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return stored
