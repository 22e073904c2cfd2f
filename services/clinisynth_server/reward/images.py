"""Images entering the reward service: validated, decoded, and stored by content.

An input image is inline bytes (PNG / JPEG / DICOM), a raw array, or a key in the artifact store.
Every failure is INVALID_ARGUMENT on the caller's field (``images[3].encoded``): unknown
reference, a reference outside what callers may read (``store.base.readable_key``: never a
record, job, checkpoint, secret or model repository; refused before any store call), oversized
upload, non-image bytes, bad raw shape.

Uploaded DICOM may be a patient's image: :func:`admit` de-identifies it (PS3.15 basic profile,
``imaging.deid``) before anything else sees it, so what is decoded, hashed, stored and later
exported is the de-identified object.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.imaging import decode as imdecode
from clinisynth_server.imaging import deid
from clinisynth_server.imaging.encode import encode_png
from clinisynth_server.store.base import ArtifactStore, readable_key
from clinisynth_server.tenancy import Viewer, sees_object

IMAGES_PREFIX = "feedback/images/"
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}
IMAGE_KEY_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


@dataclass(frozen=True)
class ImageInput:
    """What the caller sent. ``kind``: encoded | dicom | raw | ref."""

    kind: str
    data: bytes = b""
    shape: tuple[int, ...] = ()
    dtype: str = ""
    key: str = ""
    # Who reads a ``ref``: another tenant's stored object reads as a missing one (tenancy).
    viewer: Viewer | None = None

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class StoredImage:
    key: str
    sha256: str
    size: int


def check_size(image: ImageInput, field: str, max_bytes: int) -> None:
    if image.nbytes > max_bytes:
        raise InvalidArgument.for_field(
            field,
            f"upload is {image.nbytes} bytes, over the limit of {max_bytes}; downscale it or "
            "put it in the store and send a reference",
        )


def admit(image: ImageInput, *, field: str, max_bytes: int) -> ImageInput:
    """The upload as it may be kept: inline DICOM de-identified, everything else unchanged.

    The size limit is checked first, so no oversized object is parsed.
    """
    if image.kind not in ("encoded", "dicom"):
        return image
    where = f"{field}.{image.kind}"
    check_size(image, where, max_bytes)
    clean = deid.deidentify_input(image.data, field=where)
    return image if clean is image.data else replace(image, data=clean)


def deidentified_copy(data: bytes, *, field: str) -> bytes:
    """Stored image bytes on their way out (an export): DICOM de-identified again.

    Images stored before uploads were de-identified, or placed in the store by other means
    and referenced, must not leave with their identifiers.
    """
    return deid.deidentify_input(data, field=field)


def decode(
    image: ImageInput,
    *,
    field: str,
    store: ArtifactStore,
    max_bytes: int,
    channels: int | None = None,
    budget: imdecode.PixelBudget | None = None,
) -> np.ndarray:
    """Float32 [H, W] / [H, W, 3] in [0, 1]; INVALID_ARGUMENT on ``field`` otherwise.

    ``budget``: the request's pixel budget, charged before the pixels are decoded.
    """
    ch: imdecode.Channels = 1 if channels == 1 else 3 if channels == 3 else None
    if image.kind == "none":
        raise InvalidArgument.for_field(field, "no image data (set encoded, dicom, raw or ref)")
    if image.kind == "ref":
        data = read_ref(image.key, field=f"{field}.ref.key", store=store, viewer=image.viewer)
        return imdecode.decode_image(data, field=f"{field}.ref", channels=ch, budget=budget)
    check_size(image, f"{field}.{image.kind}", max_bytes)
    if image.kind == "raw":
        arr = imdecode.decode_raw(
            image.data,
            image.shape,
            image.dtype or "float32",
            field=f"{field}.raw",
            channels=ch,
            budget=budget,
        )
        if arr.min() < 0 or arr.max() > 1:
            raise InvalidArgument.for_field(f"{field}.raw", "raw values must lie in [0, 1]")
        return arr
    return imdecode.decode_image(
        image.data,
        field=f"{field}.{image.kind}",
        channels=ch,
        budget=budget,
    )


def _visible(store: ArtifactStore, key: str, viewer: Viewer | None) -> bool:
    return store.exists(key) if viewer is None else sees_object(store, key, viewer)


def read_ref(key: str, *, field: str, store: ArtifactStore, viewer: Viewer | None = None) -> bytes:
    readable_key(key, field)  # before any store call: a refused key is never read
    if not _visible(store, key, viewer):
        raise InvalidArgument.for_field(field, f"unknown image reference: no stored object {key!r}")
    return store.get_bytes(key)


def encoded_bytes(image: ImageInput, pixels: np.ndarray) -> tuple[bytes, str]:
    """The bytes to keep for an upload and their suffix (raw arrays become 16-bit / RGB PNG)."""
    if image.kind in ("encoded", "dicom"):
        kind = imdecode.sniff_format(image.data[:132]) or "png"
        return image.data, SUFFIXES.get(kind, ".png")
    bits = 16 if pixels.ndim == 2 else 8
    return encode_png(pixels, None, bits=bits), ".png"


def store_upload(store: ArtifactStore, data: bytes, suffix: str) -> StoredImage:
    """Content-addressed: ``feedback/images/<sha256><suffix>``, written once (durable)."""
    sha = hashlib.sha256(data).hexdigest()
    key = f"{IMAGES_PREFIX}{sha}{suffix}"
    store.put_if_absent(key, data)
    return StoredImage(key, sha, len(data))


def stored_ref(
    store: ArtifactStore, key: str, field: str, viewer: Viewer | None = None
) -> StoredImage:
    readable_key(key, field)  # before any store call: a refused key is never read
    if not _visible(store, key, viewer):
        raise InvalidArgument.for_field(field, f"unknown image reference: no stored object {key!r}")
    info = store.stat(key)
    return StoredImage(key, info.sha256 or "", info.size)


def display_png(data: bytes) -> bytes:
    """PNG bytes for the review page (DICOM / 16-bit / JPEG converted; 8-bit PNG as is)."""
    kind = imdecode.sniff_format(data[:132])
    if kind == "png":
        arr = imdecode.decode_image(data, field="image")
        if data[24] == 8:  # bit depth byte of IHDR
            return data
        return encode_png(arr, None, bits=8)
    arr = imdecode.decode_image(data, field="image")
    return encode_png(arr, None, bits=8)
