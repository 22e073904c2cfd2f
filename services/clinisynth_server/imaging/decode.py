"""Decode client-supplied images (PNG / JPEG / DICOM / raw arrays) into float arrays.

Everything here is edge validation of client input: every failure raises
``InvalidArgument.for_field(field, ...)`` with the caller's proto field name, before any model
work. Outputs are ``float32`` arrays, ``HxW`` for grayscale and ``HxWx3`` for colour, in [0, 1]
(PNG / JPEG / DICOM) or as sent (raw arrays).

DICOM windowing, in order:

1. Modality LUT: stored values → RescaleSlope · x + RescaleIntercept (or a Modality LUT
   Sequence), i.e. Hounsfield units for CT.
2. VOI: an explicit ``window=(center, width)`` argument, else the first WindowCenter /
   WindowWidth of the file, applied with the file's VOILUTFunction (LINEAR — the default —,
   LINEAR_EXACT or SIGMOID) as in PS3.3 C.11.2.1.2; with no window, min–max scaling of the
   modality values (a constant image maps to 0). A VOI LUT Sequence is ignored (min–max).
3. MONOCHROME1 (0 = white) is inverted so that 1.0 is always white.

Colour DICOM (RGB, YBR_* — converted to RGB by pydicom — and PALETTE COLOR) is scaled by
``2**BitsStored - 1`` with no windowing.

Memory: a small upload can declare a huge image (a 16 KB PNG of 4096², a 500 KB deflated DICOM
that inflates to 500 MB), so every decoder reads the *declared* size from the header first
(:func:`inspect_image`: PNG chunks, JPEG SOF, DICOM header read before its pixels) and refuses it
against ``max_pixels`` per image and, when given, a :class:`PixelBudget` per request — before a
pixel is decoded. Deflated DICOM is inflated with a bound derived from the declared size; PNG
metadata chunks (text, iCCP) never reach Pillow, so their inflation costs nothing.
"""

from __future__ import annotations

import io
import math
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from clinisynth_server.errors import InvalidArgument

#: Default cap on height × width of any decoded input (4096²).
DEFAULT_MAX_PIXELS = 4096 * 4096

#: Default pixels one request may decode in all (4 × 4096² = 256 × 512²).
DEFAULT_MAX_REQUEST_PIXELS = 4 * DEFAULT_MAX_PIXELS

#: Declared pixel-data bytes (all frames, samples, bits) allowed per pixel of ``max_pixels``:
#: 16-bit RGB of the largest image, or several frames of a smaller one.
MAX_BYTES_PER_PIXEL = 6

#: A deflated DICOM must reach its pixel data within this many inflated bytes.
MAX_DICOM_HEADER_BYTES = 1 << 20

#: Inflated bytes allowed past header + declared pixel data (trailing elements, padding).
DICOM_INFLATE_SLACK = 1 << 20

#: PNG chunks Pillow needs for the pixels; the rest (text, iCCP, ...) is dropped before decoding.
_PNG_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type → samples per pixel

#: dtypes a raw array payload may declare (little-endian); all decode to float32.
RAW_DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2", "float64": "<f8"}

Channels = Literal[1, 3] | None

#: Transfer syntaxes decoded (compressed ones through the pylibjpeg / pyjpegls plug-ins of the
#: server extra): what hospital PACS send. Anything else is refused by name before decoding.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)

#: Raised through untouched when decoding client bytes; anything else is the client's fault.
_FATAL = (MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit)

#: Pixel module elements (PS3.3 C.7.6.3) every PixelData image must carry, with their tags.
_PIXEL_MODULE = {
    "Rows": "(0028,0010)",
    "Columns": "(0028,0011)",
    "SamplesPerPixel": "(0028,0002)",
    "PhotometricInterpretation": "(0028,0004)",
    "BitsAllocated": "(0028,0100)",
    "BitsStored": "(0028,0101)",
    "PixelRepresentation": "(0028,0103)",
}
_ONE_SAMPLE = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"})
_THREE_SAMPLES = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------


def _check_pixels(field: str, height: int, width: int, max_pixels: int) -> None:
    if height < 1 or width < 1:
        raise InvalidArgument.for_field(field, f"image is empty ({height}x{width})")
    if height * width > max_pixels:
        raise InvalidArgument.for_field(
            field,
            f"image is {height}x{width} = {height * width} pixels, over the limit of "
            f"{max_pixels}; downscale it before sending",
        )


@dataclass(frozen=True)
class ImageHeader:
    """What an image declares about its size, read without decoding a pixel."""

    kind: str  # png | jpeg | dicom | raw
    height: int
    width: int
    frames: int = 1
    samples: int = 1
    bytes_per_sample: int = 1

    @property
    def pixels(self) -> int:
        """Pixels one decode produces (one frame)."""
        return self.height * self.width

    @property
    def nbytes(self) -> int:
        """Declared size of all pixel data as stored uncompressed."""
        return self.pixels * self.frames * self.samples * self.bytes_per_sample

    def describe(self) -> str:
        frames = f" x {self.frames} frames" if self.frames > 1 else ""
        return f"{self.height}x{self.width}{frames} = {self.pixels} pixels"


class PixelBudget:
    """Pixels one request may decode in all, charged per image before its pixels are decoded.

    Why: the per-image limit alone lets 256 small uploads each declare 4096² (16 GB decoded).
    Thread-safe, so one budget can be shared by the workers of one request.
    """

    def __init__(self, limit: int = DEFAULT_MAX_REQUEST_PIXELS) -> None:
        if limit < 1:
            raise ValueError(f"pixel budget must be positive, got {limit}")
        self.limit = int(limit)
        self.used = 0
        self.exceeded = False  # set by the first refused charge: callers stop decoding
        self._lock = threading.Lock()

    def charge(self, field: str, header: ImageHeader) -> None:
        """Add one image's declared pixels; INVALID_ARGUMENT on ``field`` past the budget."""
        with self._lock:
            total = self.used + header.pixels
            if total > self.limit:
                self.exceeded = True
                raise InvalidArgument.for_field(
                    field,
                    f"image declares {header.describe()}, bringing this request to {total} "
                    f"pixels, over the per-request pixel budget of {self.limit}; send fewer or "
                    "smaller images per request",
                )
            self.used = total


def _check_header(field: str, header: ImageHeader, max_pixels: int) -> None:
    _check_pixels(field, header.height, header.width, max_pixels)
    max_bytes = max_pixels * MAX_BYTES_PER_PIXEL
    if header.nbytes > max_bytes:
        raise InvalidArgument.for_field(
            field,
            f"image declares {header.describe()}, {header.nbytes} bytes of pixel data, over "
            f"the limit of {max_bytes} bytes; send fewer frames or a smaller image",
        )


def inspect_image(data: bytes, *, field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The declared size of PNG / JPEG / DICOM bytes, checked against ``max_pixels``.

    Reads headers only (PNG IHDR, JPEG SOF via Pillow's lazy open, the DICOM elements before
    PixelData), so a decompression bomb costs what its file costs.
    """
    kind = sniff_format(bytes(data[:132]))
    if kind == "png":
        header = _png_header(data, field)
    elif kind == "jpeg":
        header = _jpeg_header(data, field)
    elif kind == "dicom":
        ds = read_dicom(data, field=field, stop_before_pixels=True, max_pixels=max_pixels)
        check_transfer_syntax(ds, field=field)
        header = dicom_header(ds, field=field)
    else:
        raise InvalidArgument.for_field(
            field,
            f"not an image: {len(data)} bytes that are neither PNG, JPEG nor DICOM Part 10",
        )
    _check_header(field, header, max_pixels)
    return header


def _to_channels(arr: np.ndarray, channels: Channels, field: str) -> np.ndarray:
    """Convert HxW / HxWx3 float images to the requested channel count (None keeps it).

    Gray from RGB uses the ITU-R BT.601 luma weights (what PIL's "L" conversion uses).
    """
    if channels is None:
        return arr
    if channels not in (1, 3):
        raise InvalidArgument.for_field(field, f"channels must be 1 or 3, got {channels!r}")
    if channels == 1 and arr.ndim == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return (arr @ weights).astype(np.float32)
    if channels == 3 and arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def sniff_format(data: bytes) -> Literal["png", "jpeg", "dicom"] | None:
    """Recognise PNG, JPEG and DICOM Part 10 (128-byte preamble + ``DICM``) by magic bytes."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def decode_image(
    data: bytes,
    *,
    field: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    channels: Channels = None,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """PNG, JPEG or DICOM bytes (sniffed) → float32 image in [0, 1].

    The declared size is checked against ``max_pixels`` and charged to ``budget`` first.
    """
    kind = sniff_format(bytes(data[:132]))
    if kind == "dicom":
        return decode_dicom(
            data, field=field, max_pixels=max_pixels, channels=channels, budget=budget
        )
    if kind in ("png", "jpeg"):
        return decode_png_jpeg(
            data, field=field, max_pixels=max_pixels, channels=channels, budget=budget
        )
    raise InvalidArgument.for_field(
        field,
        f"not an image: {len(data)} bytes that are neither PNG, JPEG nor DICOM Part 10 "
        "(send PNG, JPEG, DICOM with a 128-byte preamble and 'DICM', or a raw array)",
    )


# --------------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------------


def decode_png_jpeg(
    data: bytes,
    *,
    field: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    channels: Channels = None,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """PNG or JPEG bytes → float32 in [0, 1]: gray (8- or 16-bit) as HxW, colour as HxWx3.

    Palette images become RGB; alpha is dropped (not composited). The declared size is checked
    (and charged to ``budget``) from the header before any pixel is decoded; a PNG reaches
    Pillow with its pixel chunks only.
    """
    if not data:
        raise InvalidArgument.for_field(field, "image bytes are empty")
    if bytes(data[:8]) == _PNG_MAGIC:
        header = _png_header(data, field)
        _check_header(field, header, max_pixels)
        if budget is not None:
            budget.charge(field, header)
        data = _png_pixel_chunks(data)
    elif budget is not None:
        header = _jpeg_header(data, field)
        _check_header(field, header, max_pixels)
        budget.charge(field, header)
    try:
        image = _open_pil(data)
    except Image.DecompressionBombError as exc:
        raise InvalidArgument.for_field(field, f"image is too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument.for_field(
            field, f"not a readable PNG or JPEG ({len(data)} bytes): {exc}"
        ) from exc
    with image:
        if image.format not in ("PNG", "JPEG"):
            raise InvalidArgument.for_field(
                field, f"unsupported image format {image.format}; send PNG, JPEG or DICOM"
            )
        width, height = image.size
        _check_pixels(field, height, width, max_pixels)
        try:
            image.load()
            arr = _pil_to_float(image)
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidArgument.for_field(
                field, f"corrupt or truncated {image.format}: {exc}"
            ) from exc
    return _to_channels(arr, channels, field)


def _open_pil(data: bytes) -> Image.Image:
    """Pillow's lazy open (header only); its own bomb check stays on, ours runs regardless."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _png_chunks(data: bytes, field: str) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each chunk incl. length and CRC; a truncated tail runs to the end."""
    chunks: list[tuple[bytes, int, int]] = []
    pos, end = 8, len(data)
    while pos + 8 <= end:
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = bytes(data[pos + 4 : pos + 8])
        stop = min(pos + 12 + length, end)
        chunks.append((kind, pos, stop))
        pos = stop
        if kind == b"IEND":
            break
    if not chunks or chunks[0][0] != b"IHDR" or chunks[0][2] - chunks[0][1] < 21:
        raise InvalidArgument.for_field(
            field, f"not a readable PNG or JPEG ({len(data)} bytes): no IHDR chunk first"
        )
    return chunks


def _png_header(data: bytes, field: str) -> ImageHeader:
    """Size from the IHDR chunk (no decompression)."""
    start = _png_chunks(data, field)[0][1]
    width, height, depth, colour = struct.unpack(">IIBB", data[start + 8 : start + 18])
    if colour not in _PNG_SAMPLES or depth not in (1, 2, 4, 8, 16):
        raise InvalidArgument.for_field(
            field, f"not a readable PNG or JPEG: bit depth {depth}, colour type {colour}"
        )
    return ImageHeader("png", height, width, 1, _PNG_SAMPLES[colour], 2 if depth == 16 else 1)


def _png_pixel_chunks(data: bytes) -> bytes:
    """The PNG with only the chunks its pixels need (drops text / iCCP bloat, CRCs kept)."""
    chunks = _png_chunks(data, "image")
    if all(kind in _PNG_PIXEL_CHUNKS for kind, _, _ in chunks):
        return data
    return _PNG_MAGIC + b"".join(
        bytes(data[a:b]) for kind, a, b in chunks if kind in _PNG_PIXEL_CHUNKS
    )


def _jpeg_header(data: bytes, field: str) -> ImageHeader:
    """Size from the JPEG frame header via Pillow's lazy open (no pixel decoded)."""
    try:
        with _open_pil(data) as image:
            width, height = image.size
            samples = len(image.getbands())
    except Image.DecompressionBombError as exc:
        raise InvalidArgument.for_field(field, f"image is too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument.for_field(
            field, f"not a readable JPEG ({len(data)} bytes): {exc}"
        ) from exc
    return ImageHeader("jpeg", height, width, 1, samples, 1)


def _pil_to_float(image: Image.Image) -> np.ndarray:
    """Float32 in [0, 1], scaled in place so a big image costs one float copy, not three."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit gray PNG; Pillow may report it as "I" (32-bit container) on some versions.
        return (np.asarray(image, dtype=np.float64) / 65535.0).clip(0.0, 1.0).astype(np.float32)
    converted = image.convert("L" if mode in ("1", "L", "LA") else "RGB")
    arr = np.array(converted, dtype=np.float32)
    converted.close()
    np.divide(arr, np.float32(255.0), out=arr)
    return arr


# --------------------------------------------------------------------------------------------
# Raw arrays
# --------------------------------------------------------------------------------------------


def decode_raw(
    data: bytes,
    shape: Sequence[int],
    dtype: str = "float32",
    *,
    field: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    channels: Channels = None,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """A raw little-endian C-order payload → float32 array of ``shape`` (HxW or HxWxC, C 1/3).

    Values are returned as sent (no rescaling). Refused: unknown dtype, bad shape, a byte count
    that does not match shape × itemsize, more than ``max_pixels`` pixels, NaN / Inf.
    """
    if dtype not in RAW_DTYPES:
        raise InvalidArgument.for_field(
            field, f"dtype {dtype!r} is not supported; use one of {sorted(RAW_DTYPES)}"
        )
    dims = tuple(shape)
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise InvalidArgument.for_field(field, f"shape must be integers, got {list(dims)}")
    dims = tuple(int(d) for d in dims)
    if len(dims) not in (2, 3) or any(d < 1 for d in dims):
        raise InvalidArgument.for_field(
            field, f"shape must be [H, W] or [H, W, C] with positive sizes, got {list(dims)}"
        )
    if len(dims) == 3 and dims[2] not in (1, 3):
        raise InvalidArgument.for_field(
            field, f"channel count must be 1 or 3, got {dims[2]} (shape {list(dims)})"
        )
    _check_pixels(field, dims[0], dims[1], max_pixels)
    np_dtype = np.dtype(RAW_DTYPES[dtype])
    if budget is not None:
        samples = dims[2] if len(dims) == 3 else 1
        budget.charge(field, ImageHeader("raw", dims[0], dims[1], 1, samples, np_dtype.itemsize))
    expected = math.prod(dims) * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument.for_field(
            field,
            f"{len(data)} bytes do not match shape {list(dims)} of {dtype} "
            f"({expected} bytes expected)",
        )
    arr = np.frombuffer(data, dtype=np_dtype).reshape(dims).astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int((~finite).sum())
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise InvalidArgument.for_field(
            field,
            f"array has {bad} NaN/Inf value(s) (first at index {list(first)}, "
            f"as float32: {arr[first]}); send finite values",
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return _to_channels(arr, channels, field)


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


_TAG_IN_TEXT = re.compile(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)")


def describe_error(exc: BaseException) -> str:
    """A pydicom error as one short line, each ``(gggg,eeee)`` tag followed by its keyword.

    Why: pydicom names elements by tag number ("tag (0028,0010)"); a caller fixing a file looks
    for "Rows".
    """

    def named(match: re.Match[str]) -> str:
        keyword = keyword_for_tag(int(match.group(1) + match.group(2), 16))
        return f"{match.group(0)} {keyword}" if keyword else match.group(0)

    text = _TAG_IN_TEXT.sub(named, " ".join(str(exc).split())[:200])
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_dicom(
    data: bytes,
    *,
    field: str,
    stop_before_pixels: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Dataset:
    """Parse DICOM Part 10 bytes (pixels not yet decoded); InvalidArgument if not.

    A Deflated Explicit VR Little Endian body is inflated with a bound (see
    :func:`_inflate_bounded`) instead of pydicom's unbounded ``zlib.decompress``.
    """
    if not data:
        raise InvalidArgument.for_field(field, "DICOM bytes are empty")
    try:
        fp = io.BytesIO(data)
        preamble = read_preamble(fp, False)
        file_meta = _read_file_meta_info(fp)
        if file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            body = _inflate_bounded(
                memoryview(data)[fp.tell() :], field, max_pixels, stop_before_pixels
            )
            dataset = read_dataset(
                io.BytesIO(body), False, True, stop_when=_at_pixels if stop_before_pixels else None
            )
            ds: Dataset = FileDataset("", dataset, preamble, file_meta, False, True)
        else:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
        _check_not_truncated(ds, field)
        return ds
    except (InvalidArgument, MemoryError):
        raise
    except InvalidDicomError as exc:
        raise InvalidArgument.for_field(
            field, "not a DICOM Part 10 file (no 128-byte preamble + 'DICM')"
        ) from exc
    except Exception as exc:  # pydicom raises many types on hostile bytes (unknown VR: NotImpl.)
        raise InvalidArgument.for_field(field, f"malformed DICOM: {describe_error(exc)}") from exc


def _check_not_truncated(ds: Dataset, field: str) -> None:
    """A file cut inside an element's value: pydicom keeps the short value, we refuse it.

    Why: a file one byte short would otherwise be re-saved padded (de-identification) and
    decode as a different image.
    """
    for tag in (0x7FE00008, 0x7FE00009, 0x7FE00010):
        raw = ds._dict.get(BaseTag(tag))  # the raw element: declared length, value as read
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if (
            isinstance(length, int)
            and length != 0xFFFFFFFF
            and isinstance(value, bytes)
            and len(value) < length
        ):
            raise InvalidArgument.for_field(
                field,
                f"DICOM file is truncated: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) "
                f"declares {length} bytes, the file holds {len(value)}",
            )


def _at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    """``read_dataset`` stop condition: the first pixel data element (or anything after it)."""
    return int(tag) >= 0x7FE00008


def _inflate_bounded(body: memoryview, field: str, max_pixels: int, header_only: bool) -> bytes:
    """Inflate a deflated DICOM body, never past what its own header declares.

    First at most :data:`MAX_DICOM_HEADER_BYTES` are inflated and the header read from them;
    the declared pixel data (checked against ``max_pixels``) then bounds the rest to header +
    declared bytes + :data:`DICOM_INFLATE_SLACK`. A body that would inflate further is refused,
    so a 500 KB bomb costs about what it declares, not the 500 MB it expands to.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray(inflater.decompress(body, MAX_DICOM_HEADER_BYTES))
    if inflater.eof or not inflater.unconsumed_tail:
        return bytes(out)
    header = read_dataset(io.BytesIO(bytes(out)), False, True, stop_when=_at_pixels)
    if "Rows" not in header or "Columns" not in header:
        raise InvalidArgument.for_field(
            field,
            f"deflated DICOM has no Rows / Columns in its first {MAX_DICOM_HEADER_BYTES} "
            "inflated bytes; refused before inflating the rest",
        )
    declared = dicom_header(header, field=field)
    _check_header(field, declared, max_pixels)
    if header_only:
        return bytes(out)
    bound = MAX_DICOM_HEADER_BYTES + declared.nbytes + DICOM_INFLATE_SLACK
    while inflater.unconsumed_tail and not inflater.eof:
        out += inflater.decompress(inflater.unconsumed_tail, bound + 1 - len(out))
        if len(out) > bound:
            raise InvalidArgument.for_field(
                field,
                f"deflated DICOM inflates past {bound} bytes, more than its declared "
                f"{declared.describe()} ({declared.nbytes} bytes of pixel data) needs; refused",
            )
    return bytes(out)


def check_transfer_syntax(ds: Dataset, *, field: str) -> UID:
    """The file's transfer syntax, refused by name unless this server can decode its pixels.

    Why: pydicom's own error for an unknown syntax is a plug-in hint meant for developers; the
    caller needs to know which syntax to transcode to.
    """
    meta = getattr(ds, "file_meta", None)
    raw = meta.get("TransferSyntaxUID") if meta is not None else None
    if not raw:
        raise InvalidArgument.for_field(
            field, "DICOM file meta has no TransferSyntaxUID (0002,0010); cannot read the pixels"
        )
    syntax = UID(str(raw).strip().rstrip("\x00"))
    supported = ", ".join(f"{uid.name} ({uid})" for uid in TRANSFER_SYNTAXES)
    if syntax not in TRANSFER_SYNTAXES:
        label = f"{syntax.name} ({syntax})" if syntax.name != str(syntax) else str(syntax)
        raise InvalidArgument.for_field(
            field,
            f"unsupported transfer syntax {label}; transcode to one of: {supported}",
        )
    if syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:  # server extra installed without its pixel-data plug-ins
            raise InvalidArgument.for_field(
                field,
                f"transfer syntax {syntax.name} ({syntax}) cannot be decoded by this server "
                "(no pixel-data plug-in installed); send an uncompressed syntax",
            )
    return syntax


def _check_pixel_module(ds: Dataset, field: str) -> None:
    """Every required pixel module element present and readable, named when not."""
    missing: list[str] = []
    for keyword, tag in _PIXEL_MODULE.items():
        try:
            value = ds.get(keyword)
        except Exception as exc:  # a bad VR / length surfaces when the element is parsed
            raise InvalidArgument.for_field(
                field, f"DICOM element {keyword} {tag} is malformed: {exc}"
            ) from exc
        if value is None or value == "":
            missing.append(f"{keyword} {tag}")
    if missing:
        raise InvalidArgument.for_field(
            field, f"DICOM image pixel module is missing {', '.join(missing)}"
        )


def _check_native_size(ds: Dataset, declared: ImageHeader, bits: int, field: str) -> None:
    """Uncompressed PixelData holds at least what the header declares (truncated files)."""
    expected = math.ceil(declared.pixels * declared.frames * declared.samples * bits / 8)
    try:
        got = len(ds.PixelData)
    except Exception as exc:
        raise InvalidArgument.for_field(
            field, f"DICOM element PixelData (7FE0,0010) is malformed: {exc}"
        ) from exc
    if got < expected:
        raise InvalidArgument.for_field(
            field,
            f"DICOM PixelData holds {got} bytes but Rows x Columns x SamplesPerPixel x "
            f"NumberOfFrames x BitsAllocated ({declared.height} x {declared.width} x "
            f"{declared.samples} x {declared.frames} x {bits}) declare {expected}: the file is "
            "truncated or its sizes are inconsistent",
        )


def dicom_header(ds: Dataset, *, field: str) -> ImageHeader:
    """The declared size of a DICOM image: Rows, Columns, frames, samples, BitsAllocated."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (AttributeError, ValueError, TypeError, KeyError, NotImplementedError) as exc:
        raise InvalidArgument.for_field(
            field, f"DICOM image pixel module is incomplete: {describe_error(exc)}"
        ) from exc
    if frames < 1 or samples < 1 or bits < 1:
        raise InvalidArgument.for_field(
            field, f"DICOM declares {frames} frames, {samples} samples, {bits} bits allocated"
        )
    return ImageHeader("dicom", rows, cols, frames, samples, max(1, (bits + 7) // 8))


def _first_number(value: object) -> float | None:
    """First value of a possibly multi-valued DS/IS, or None when empty."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if not value:
            return None
        value = value[0]
    if not isinstance(value, (int, float, str, bytes)):
        raise TypeError(f"not a DS / IS value: {type(value).__name__}")
    return float(value)


def apply_window(
    values: np.ndarray,
    center: float,
    width: float,
    function: str = "LINEAR",
    *,
    overwrite: bool = False,
) -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2 mapped to [0, 1] (float32).

    Computed in float32 with in-place steps: a 4096² image costs one float32 array (64 MB),
    not a float64 copy per arithmetic step. ``overwrite``: ``values`` (float32) may be reused.
    """
    x = _float32_work(values, overwrite)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        x -= np.float32(center)
        x *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):  # exp → inf far below the window: 1 / inf = 0, right
            np.exp(x, out=x)
        x += np.float32(1.0)
        np.reciprocal(x, out=x)
    elif function == "LINEAR_EXACT":
        x -= np.float32(center)
        x /= np.float32(width)
        x += np.float32(0.5)
    else:
        if width < 1:
            raise ValueError(f"LINEAR window width must be >= 1, got {width}")
        if width == 1:
            np.greater(x, np.float32(center - 0.5), out=x, casting="unsafe")  # 1.0 / 0.0
        else:
            x -= np.float32(center - 0.5)
            x /= np.float32(width - 1)
            x += np.float32(0.5)
    return np.clip(x, 0.0, 1.0, out=x)


def _float32_work(values: np.ndarray, overwrite: bool) -> np.ndarray:
    """A float32 array to compute in: ``values`` itself when allowed, else one copy."""
    if overwrite and values.dtype == np.float32 and values.flags.writeable:
        return values
    return np.array(values, dtype=np.float32)


def _min_max(values: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    x = _float32_work(values, overwrite)
    low, high = float(x.min()), float(x.max())
    if high <= low:
        x[...] = 0.0
        return x
    x -= np.float32(low)
    x /= np.float32(high - low)
    return np.clip(x, 0.0, 1.0, out=x)


def _modality_values(ds: Dataset, stored: np.ndarray, field: str) -> np.ndarray:
    """Stored values → modality values (PS3.3 C.11.1) as one float32 array.

    The rescale is done here in float32 in place (pydicom's ``apply_modality_lut`` returns a
    float64 copy: 128 MB for a 4096² image); a Modality LUT goes through pydicom.
    """
    try:
        if ds.get("ModalityLUTSequence"):
            return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        values = stored.astype(np.float32)
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            slope = _first_number(ds.RescaleSlope)
            intercept = _first_number(ds.RescaleIntercept)
            slope = 1.0 if slope is None else slope
            intercept = 0.0 if intercept is None else intercept
            if not (math.isfinite(slope) and math.isfinite(intercept)):
                raise ValueError(f"rescale slope / intercept {slope} / {intercept}")
            if slope != 1.0:
                values *= np.float32(slope)
            if intercept != 0.0:
                values += np.float32(intercept)
        return values
    except Exception as exc:
        raise InvalidArgument.for_field(field, f"bad Modality LUT / rescale: {exc}") from exc


def decode_dicom(
    data: bytes,
    *,
    field: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    channels: Channels = None,
    frame: int = 0,
    window: tuple[float, float] | None = None,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """DICOM bytes → float32 image in [0, 1] with the windowing described in the module doc.

    ``frame`` picks one frame of a multi-frame file; ``window=(center, width)`` overrides the
    file's window.
    """
    ds = read_dicom(data, field=field, max_pixels=max_pixels)
    return decode_dicom_dataset(
        ds,
        field=field,
        max_pixels=max_pixels,
        channels=channels,
        frame=frame,
        window=window,
        budget=budget,
    )


def decode_dicom_dataset(
    ds: Dataset,
    *,
    field: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    channels: Channels = None,
    frame: int = 0,
    window: tuple[float, float] | None = None,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """As :func:`decode_dicom`, for an already parsed dataset.

    Elements are parsed lazily, so a malformed one can surface anywhere below: whatever the
    client's dataset makes pydicom or a plug-in raise is INVALID_ARGUMENT on ``field``.
    """
    try:
        return _decode_dicom_dataset(ds, field, max_pixels, channels, frame, window, budget)
    except (InvalidArgument, *_FATAL):
        raise
    except BaseException as exc:
        raise InvalidArgument.for_field(field, f"malformed DICOM: {describe_error(exc)}") from exc


def _decode_dicom_dataset(
    ds: Dataset,
    field: str,
    max_pixels: int,
    channels: Channels,
    frame: int,
    window: tuple[float, float] | None,
    budget: PixelBudget | None,
) -> np.ndarray:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = getattr(ds, "SOPClassUID", None)
        kind = f" ({sop.name})" if sop is not None and hasattr(sop, "name") else ""
        raise InvalidArgument.for_field(
            field,
            f"DICOM object{kind} has no PixelData (7FE0,0010): it is not an image, or the file "
            "is truncated before its pixel data",
        )
    syntax = check_transfer_syntax(ds, field=field)
    if "PixelData" in ds:
        _check_pixel_module(ds, field)
    declared = dicom_header(ds, field=field)
    try:
        photometric = str(ds.PhotometricInterpretation).strip().upper()
    except (AttributeError, ValueError, TypeError, KeyError, NotImplementedError) as exc:
        raise InvalidArgument.for_field(
            field, f"DICOM image pixel module is incomplete: {describe_error(exc)}"
        ) from exc
    samples, frames = declared.samples, declared.frames
    if (photometric in _ONE_SAMPLE and samples != 1) or (
        photometric in _THREE_SAMPLES and samples != 3
    ):
        raise InvalidArgument.for_field(
            field,
            f"DICOM PhotometricInterpretation {photometric} needs SamplesPerPixel "
            f"{1 if photometric in _ONE_SAMPLE else 3}, the file declares {samples}",
        )
    if photometric not in _ONE_SAMPLE | _THREE_SAMPLES:
        raise InvalidArgument.for_field(
            field,
            f"unsupported PhotometricInterpretation {photometric!r}; send one of "
            f"{', '.join(sorted(_ONE_SAMPLE | _THREE_SAMPLES))}",
        )
    _check_header(field, declared, max_pixels)
    if budget is not None:
        budget.charge(field, declared)
    if not 0 <= frame < frames:
        raise InvalidArgument.for_field(
            field, f"frame {frame} requested but the file has {frames} frame(s)"
        )
    if "PixelData" in ds and not syntax.is_compressed:
        _check_native_size(ds, declared, int(ds.BitsAllocated), field)
    try:
        stored = pixel_array(ds, index=frame if frames > 1 else None)
    except _FATAL:
        raise
    except BaseException as exc:  # plug-ins raise many types; Rust ones panic (BaseException)
        raise InvalidArgument.for_field(
            field,
            f"cannot decode the DICOM pixel data (transfer syntax {syntax.name}, {syntax}): "
            f"{'corrupt or truncated codestream: ' if syntax.is_compressed else ''}{exc}",
        ) from exc
    if frames > 1 and stored.ndim == (4 if samples > 1 else 3):
        stored = stored[frame]

    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(stored, ds)
        except Exception as exc:
            raise InvalidArgument.for_field(field, f"bad palette colour LUT: {exc}") from exc
        top = float(np.max(rgb)) if rgb.dtype.kind == "f" else float(np.iinfo(rgb.dtype).max)
        arr = _scaled(rgb, max(top, 1.0))
    elif samples == 3 or photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        bits = int(ds.get("BitsStored", 8))
        arr = _scaled(stored, float((1 << bits) - 1))
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        arr = _window_gray(ds, stored, window, field)
        if photometric == "MONOCHROME1":
            np.subtract(np.float32(1.0), arr, out=arr)
    else:
        raise InvalidArgument.for_field(
            field, f"unsupported PhotometricInterpretation {photometric!r}"
        )
    return _to_channels(arr, channels, field)


def _scaled(values: np.ndarray, top: float) -> np.ndarray:
    """``values / top`` clipped to [0, 1] in one float32 array (no float64 copies)."""
    arr = values.astype(np.float32)
    arr /= np.float32(top)
    return np.clip(arr, 0.0, 1.0, out=arr)


def _window_gray(
    ds: Dataset, stored: np.ndarray, window: tuple[float, float] | None, field: str
) -> np.ndarray:
    values = _modality_values(ds, stored, field)
    if window is not None:
        center, width = float(window[0]), float(window[1])
        function = "LINEAR"
    else:
        try:
            center_value = _first_number(ds.get("WindowCenter"))
            width_value = _first_number(ds.get("WindowWidth"))
        except (TypeError, ValueError, KeyError, NotImplementedError):
            center_value = width_value = None
        if center_value is None or width_value is None or width_value <= 0:
            return _min_max(values, overwrite=True)
        center, width = center_value, width_value
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise InvalidArgument.for_field(field, f"bad window center/width {center}/{width}")
    try:
        return apply_window(values, center, width, function, overwrite=True)
    except ValueError as exc:
        raise InvalidArgument.for_field(field, str(exc)) from exc


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------


def resize_to(
    array: np.ndarray, size: tuple[int, int], *, resample: str = "bilinear"
) -> np.ndarray:
    """Resize an HxW or HxWxC float image to ``size = (height, width)`` (float32 out).

    Each channel is resized as a 32-bit float PIL image, so no quantisation happens; Pillow
    antialiases when shrinking. ``resample``: nearest, bilinear, bicubic, lanczos or area.
    """
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise ValueError(f"array must be HxW or HxWxC, got shape {arr.shape}")
    if arr.shape[:2] == (height, width):
        return arr.copy()
    method = _RESAMPLE[resample]

    def one(plane: np.ndarray) -> np.ndarray:
        image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode "F"
        return np.asarray(image.resize((width, height), method), dtype=np.float32)

    if arr.ndim == 2:
        return one(arr)
    return np.stack([one(arr[:, :, c]) for c in range(arr.shape[2])], axis=2)
