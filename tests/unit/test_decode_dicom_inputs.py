"""Client DICOM at the edge (issue #19 item 6): every corruption is INVALID_ARGUMENT naming the
problem, and the compressed transfer syntaxes hospitals send decode to the source pixels.

The corruptions are a deterministic table (one row per failure class, each asserting the words
the caller needs) plus hypothesis-driven truncations and bit flips of native and compressed
files, run through :func:`decode_image` and through the path the services take
(:func:`deidentify_input`, then :func:`decode_image`). Compressed files are built here with
pydicom's encoders (RLE, JPEG-LS via pyjpegls, JPEG 2000 via pylibjpeg-openjpeg), baseline JPEG
with Pillow, lossless JPEG (Process 14) with the small encoder in ``tests/dicom_jpeg_lossless``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.imaging.decode import decode_image
from clinisynth_server.imaging.deid import deidentify_input
from tests.dicom_jpeg_lossless import encode_jpeg_lossless

SIZE = 32  # OpenJPEG refuses smaller images at its default 6 resolution levels
PIXEL_TAG = b"\xe0\x7f\x10\x00"


def stored_pixels(bits: int = 16, frames: int = 1, samples: int = 1) -> np.ndarray:
    """A smooth gradient plus a bright square: compressible, and every value distinct enough
    that a wrong decode (swapped bytes, wrong frame, lost rows) changes many pixels."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    top = 4095 if bits == 16 else 255
    base = (yy * SIZE + xx) * top // (SIZE * SIZE - 1)
    base[4:8, 4:8] = top
    dtype = np.uint16 if bits == 16 else np.uint8
    planes = [np.roll(base, f, axis=1) for f in range(frames)]
    arr = np.stack(planes).astype(dtype)
    if samples == 3:
        arr = np.stack([arr, arr[:, ::-1], arr[:, :, ::-1]], axis=-1)
    return arr[0] if frames == 1 else arr


def dataset(
    bits: int = 16, frames: int = 1, samples: int = 1, window: bool = True
) -> tuple[Dataset, np.ndarray]:
    """A minimal valid Secondary Capture image; ``window`` sets a full-range LINEAR window so
    decoded = (stored - (c - 0.5)) / (w - 1) + 0.5: one stored unit is 1 / (w - 1) decoded."""
    arr = stored_pixels(bits, frames, samples)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = 12 if bits == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if window and samples == 1:
        top = (1 << ds.BitsStored) - 1
        ds.WindowCenter, ds.WindowWidth = (top + 1) // 2, top + 1
    ds.add_new(0x7FE00010, "OW" if bits > 8 else "OB", arr.tobytes())
    return ds, arr


def to_bytes(ds: Dataset, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, **kwargs)
    return buf.getvalue()


def native(**kwargs: object) -> bytes:
    return to_bytes(dataset(**kwargs)[0])  # type: ignore[arg-type]  # kwargs of dataset()


def variant(change: Callable[[Dataset], object], **save: object) -> bytes:
    ds, _ = dataset()
    change(ds)
    return to_bytes(ds, **save)


def _drop(keyword: str) -> Callable[[Dataset], object]:
    return lambda ds: delattr(ds, keyword)


def _set(**values: object) -> Callable[[Dataset], object]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return change


def _syntax(uid: str, frame: bytes = b"\xff\xd8not a codestream") -> Callable[[Dataset], object]:
    def change(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = uid
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"

    return change


def _patch(data: bytes, marker: bytes, offset: int, new: bytes) -> bytes:
    at = data.index(marker) + offset
    return data[:at] + new + data[at + len(new) :]


def corruptions() -> list[tuple[str, bytes, str]]:
    """(id, bytes, words the message must contain) — one row per failure class."""
    good = native()
    pixels_at = good.index(PIXEL_TAG)
    rows = b"\x28\x00\x10\x00US"
    rows_bad: list[tuple[str, bytes, str]] = [
        ("not-dicom", b"\x00" * 200, "neither PNG, JPEG nor DICOM"),
        ("bad-preamble-magic", good[:128] + b"DICX" + good[132:], "neither PNG, JPEG nor DICOM"),
        ("preamble-only", good[:132], "no PixelData"),
        ("garbage-meta", good[:132] + b"\xff" * 64, "no PixelData"),
        ("cut-in-meta", good[:160], "no PixelData"),
        ("cut-before-pixels", good[:pixels_at], "truncated"),
        ("cut-in-pixel-header", good[: pixels_at + 6], "truncated"),
        ("cut-in-pixels-start", good[: pixels_at + 40], "truncated"),
        ("cut-in-pixels-middle", good[: pixels_at + 12 + 256], "truncated"),
        ("cut-last-byte", good[:-1], "truncated"),
        ("unknown-vr-rows", _patch(good, rows, 4, b"ZZ"), "Rows"),
        ("unknown-vr-pixels", _patch(good, PIXEL_TAG, 4, b"QQ"), "PixelData"),
        ("rows-length-3", _patch(good, rows, 6, b"\x03\x00"), "PixelData"),
        ("missing-pixel-data", variant(_drop("PixelData")), "no PixelData"),
        ("rows-inconsistent", variant(_set(Rows=SIZE * 2)), "inconsistent"),
        ("frames-inconsistent", variant(_set(NumberOfFrames=3)), "NumberOfFrames"),
        ("bits-allocated-12", variant(_set(BitsAllocated=12)), "Bits Allocated"),
        ("bits-stored-over-allocated", variant(_set(BitsStored=20)), "Bits Stored"),
        ("pixel-representation-2", variant(_set(PixelRepresentation=2)), "Pixel Representation"),
        ("photometric-cmyk", variant(_set(PhotometricInterpretation="CMYK")), "CMYK"),
        ("photometric-hsv", variant(_set(PhotometricInterpretation="HSV")), "HSV"),
        ("ybr-one-sample", variant(_set(PhotometricInterpretation="YBR_FULL")), "SamplesPerPixel"),
        ("mono-three-samples", variant(_set(SamplesPerPixel=3)), "SamplesPerPixel"),
        ("syntax-private", _private_syntax(), "unsupported transfer syntax 1.2.3.4.5"),
        ("syntax-mpeg2", variant(_syntax("1.2.840.10008.1.2.4.100")), "MPEG2"),
        ("syntax-mpeg4", variant(_syntax("1.2.840.10008.1.2.4.102")), "MPEG-4"),
    ]
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel"):
        rows_bad.append((f"missing-{keyword}", variant(_drop(keyword)), f"missing {keyword}"))
    rows_bad.append(
        (
            "missing-photometric",
            variant(_drop("PhotometricInterpretation")),
            "missing PhotometricInterpretation",
        )
    )
    for uid in (
        RLELossless,
        JPEGBaseline8Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
    ):
        rows_bad.append((f"garbage-{uid.name}", variant(_syntax(uid)), str(uid)))
    return rows_bad


def _private_syntax() -> bytes:
    ds, _ = dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    return to_bytes(ds, implicit_vr=False, little_endian=True)


CORRUPTIONS = corruptions()


def _decode(data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on every odd value it meets
        return decode_image(data, field="image")


@pytest.mark.parametrize(
    ("data", "words"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS]
)
def test_corrupt_dicom_is_invalid_argument_naming_the_problem(data: bytes, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        _decode(data)
    violation = info.value.violations[0]
    assert violation.field == "image"
    assert words in violation.description, violation.description


@pytest.mark.parametrize(
    ("data", "words"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS]
)
def test_corrupt_dicom_through_the_service_path(data: bytes, words: str) -> None:
    """Reward / counterfactual de-identify first, then decode: either step refuses on the field."""
    with pytest.raises(InvalidArgument) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _decode(deidentify_input(data, field="image"))
    assert info.value.violations[0].field == "image"


def _check_outcome(data: bytes) -> None:
    """A corrupted file either decodes to a finite [0, 1] image or is INVALID_ARGUMENT."""
    try:
        arr = _decode(data)
    except InvalidArgument as exc:
        assert exc.violations[0].field == "image"
        return
    assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0


def _compressed(uid: UID) -> bytes:
    ds, _ = dataset()
    ds.compress(uid)
    return to_bytes(ds)


SAMPLES = {
    "native": native(),
    "rle": _compressed(RLELossless),
    "jpegls": _compressed(JPEGLSLossless),
    "j2k": _compressed(JPEG2000Lossless),
}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(SAMPLES)), cut=st.floats(0.0, 1.0))
def test_truncation_anywhere_is_invalid_argument(kind: str, cut: float) -> None:
    data = SAMPLES[kind]
    _check_outcome(data[: int(cut * (len(data) - 1))])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(SAMPLES)),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), min_size=1, max_size=8),
)
def test_bit_flips_are_invalid_argument_or_a_valid_image(
    kind: str, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(SAMPLES[kind])
    for at, bit in flips:
        data[128 + at % (len(data) - 128)] ^= 1 << bit  # keep the sniffable magic at 128
    _check_outcome(bytes(data))


# --------------------------------------------------------------------------------------------
# Compressed transfer syntaxes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "samples"),
    [
        (RLELossless, 1),
        (RLELossless, 3),
        (JPEGLSLossless, 1),
        (JPEGLSLossless, 3),
        (JPEG2000Lossless, 1),
        (JPEG2000Lossless, 3),
    ],
    ids=lambda v: v.name if isinstance(v, UID) else f"{v}-sample",
)
def test_lossless_syntaxes_decode_exactly(uid: UID, samples: int) -> None:
    ds, _ = dataset(samples=samples, bits=8 if samples == 3 else 16)
    expected = _decode(to_bytes(ds))
    ds.compress(uid)
    assert ds.file_meta.TransferSyntaxUID == uid
    np.testing.assert_array_equal(_decode(to_bytes(ds)), expected)


@pytest.mark.parametrize(
    ("uid", "predictor"), [(JPEGLossless, 4), (JPEGLossless, 7), (JPEGLosslessSV1, 1)]
)
def test_jpeg_lossless_process_14_decodes_exactly(uid: UID, predictor: int) -> None:
    ds, arr = dataset()
    expected = _decode(to_bytes(ds))
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([encode_jpeg_lossless(arr, precision=12, predictor=predictor)])
    ds["PixelData"].VR = "OB"
    np.testing.assert_array_equal(_decode(to_bytes(ds)), expected)


def test_jpegls_near_lossless_within_its_bound() -> None:
    ds, _ = dataset()
    expected = _decode(to_bytes(ds))
    ds.compress(JPEGLSNearLossless, jls_error=2)
    got = _decode(to_bytes(ds))
    # NEAR=2 bounds every stored value to +-2; the full-range window maps 1 unit to 1/4095.
    assert np.abs(got - expected).max() <= 2 / 4095 + 1e-6


def test_jpeg2000_lossy_close_to_source() -> None:
    ds, _ = dataset()
    expected = _decode(to_bytes(ds))
    ds.compress(JPEG2000, j2k_cr=[4])
    got = _decode(to_bytes(ds))
    # 4:1 on a 12-bit gradient: PSNR well over 40 dB (measured ~60 dB); 40 dB is a broken decode's
    # opposite (a wrong frame / byte order / bit depth gives < 20 dB).
    mse = float(np.mean((got - expected) ** 2))
    assert mse == 0.0 or 10 * np.log10(1.0 / mse) > 40.0


@pytest.mark.parametrize("samples", [1, 3], ids=["gray", "rgb"])
def test_jpeg_baseline_from_pillow_close_to_source(samples: int) -> None:
    ds, arr = dataset(bits=8, samples=samples)
    expected = _decode(to_bytes(ds))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, subsampling=0)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    if samples == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"  # what Pillow's JFIF stores: YCbCr
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    got = _decode(to_bytes(ds))
    assert got.shape == expected.shape
    # quality 95, no chroma subsampling, on a gradient with one hard-edged square: the edge
    # rings by a few 8-bit levels; mean error stays under 1 level, max under 16 levels.
    err = np.abs(got - expected)
    assert err.mean() < 1 / 255 and err.max() < 16 / 255


def test_multi_frame_rle_decodes_the_first_frame() -> None:
    ds, arr = dataset(frames=3)
    ds.compress(RLELossless)
    got = _decode(to_bytes(ds))
    assert got.shape == (SIZE, SIZE)
    single, _ = dataset()
    single.PixelData = arr[0].tobytes()
    np.testing.assert_array_equal(got, _decode(to_bytes(single)))


def test_compressed_input_survives_deidentification() -> None:
    """The services de-identify before decoding: the encapsulated pixels must come through."""
    ds, _ = dataset()
    expected = _decode(to_bytes(ds))
    ds.compress(JPEG2000Lossless)
    clean = deidentify_input(to_bytes(ds), field="image")
    assert pydicom.dcmread(io.BytesIO(clean)).file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(_decode(clean), expected)
