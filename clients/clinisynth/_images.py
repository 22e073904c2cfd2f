"""Turning what users hold (paths, bytes, PIL images, numpy arrays) into Image messages and back."""

from __future__ import annotations

import io
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage

from clinisynth.v1 import common_pb2

PACS_SCHEME = "pacs://"


@dataclass(frozen=True)
class PacsRef:
    """An image in a PACS the service knows by name (``[pacs.NAME]`` in its config), by UID.

    The service fetches it (WADO-RS or C-GET) and de-identifies it before anything is stored;
    ``pacs://NAME/<study>/<series>/<sop>`` is the same reference as a string (CLI arguments).
    """

    pacs: str
    study_uid: str
    series_uid: str
    sop_uid: str

    @classmethod
    def from_url(cls, url: str) -> PacsRef:
        parts = url[len(PACS_SCHEME) :].strip("/").split("/") if is_pacs_url(url) else []
        if len(parts) != 4 or not all(parts):
            raise ValueError(
                f"{url!r}: a PACS reference is pacs://NAME/<study uid>/<series uid>/<sop uid>"
            )
        return cls(*parts)

    def to_proto(self) -> common_pb2.Image:
        return common_pb2.Image(
            pacs=common_pb2.PacsRef(
                pacs=self.pacs,
                study_uid=self.study_uid,
                series_uid=self.series_uid,
                sop_uid=self.sop_uid,
            )
        )


def is_pacs_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PACS_SCHEME)


ImageLike = str | os.PathLike | bytes | PILImage.Image | np.ndarray | common_pb2.Image | PacsRef

FORMATS = {
    "png": common_pb2.IMAGE_FORMAT_PNG,
    "png16": common_pb2.IMAGE_FORMAT_PNG16,
    "dicom": common_pb2.IMAGE_FORMAT_DICOM,
    "raw": common_pb2.IMAGE_FORMAT_RAW,
}


def is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def to_proto_image(image: ImageLike) -> common_pb2.Image:
    """Encode an image for a request: files and bytes as they are, arrays losslessly, PACS
    references (:class:`PacsRef` or ``pacs://`` strings) for the service to fetch."""
    if isinstance(image, common_pb2.Image):
        return image
    if isinstance(image, PacsRef):
        return image.to_proto()
    if is_pacs_url(image):
        return PacsRef.from_url(str(image)).to_proto()
    if isinstance(image, (str, os.PathLike)):
        image = pathlib.Path(image).read_bytes()
    if isinstance(image, bytes):
        if is_dicom(image):
            return common_pb2.Image(dicom=image)
        return common_pb2.Image(encoded=image)
    if isinstance(image, PILImage.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return common_pb2.Image(encoded=buf.getvalue(), width=image.width, height=image.height)
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        if arr.dtype.kind in "ui":  # integer pixels: scale to [0, 1] floats (what servers take)
            top = np.iinfo(arr.dtype).max if arr.dtype.kind == "u" else max(int(arr.max()), 1)
            arr = arr.astype(np.float32) / np.float32(top)
        elif arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float32)
        return common_pb2.Image(
            raw=common_pb2.RawArray(
                data=arr.astype(arr.dtype.newbyteorder("<")).tobytes(),
                shape=list(arr.shape),
                dtype=str(arr.dtype),
            )
        )
    raise TypeError(f"cannot send {type(image).__name__} as an image")


def raw_to_array(raw: common_pb2.RawArray) -> np.ndarray:
    return np.frombuffer(raw.data, dtype=np.dtype(raw.dtype).newbyteorder("<")).reshape(
        tuple(raw.shape)
    )


def decode_image(image: common_pb2.Image) -> tuple[bytes, np.ndarray | None]:
    """The encoded bytes of an image message and, for raw payloads, the array."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return image.encoded, None
    if kind == "dicom":
        return image.dicom, None
    if kind == "raw":
        return b"", raw_to_array(image.raw)
    return b"", None


def to_pil(data: bytes, array: np.ndarray | None) -> PILImage.Image:
    if array is not None:
        arr = array
        if arr.dtype.kind == "f":
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        return PILImage.fromarray(arr)
    if is_dicom(data):
        raise ValueError("DICOM bytes: read them with pydicom (image.save() writes the .dcm)")
    return PILImage.open(io.BytesIO(data))


def to_numpy(data: bytes, array: np.ndarray | None) -> np.ndarray:
    """Pixels as float32 in [0, 1]."""
    if array is not None:
        arr = array.astype(np.float32)
        return arr if array.dtype.kind == "f" else arr / np.iinfo(array.dtype).max
    pil = PILImage.open(io.BytesIO(data))
    arr = np.asarray(pil)
    scale = 65535.0 if arr.dtype == np.uint16 or pil.mode.startswith("I") else 255.0
    return arr.astype(np.float32) / scale


def suffix_for(image: common_pb2.Image) -> str:
    kind = image.WhichOneof("data")
    return {"encoded": ".png", "dicom": ".dcm", "raw": ".npy"}.get(kind or "", ".bin")


def any_to_str(value: Any) -> str:
    return "" if value is None else str(value)
