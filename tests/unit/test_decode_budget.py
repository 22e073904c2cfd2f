"""Declared-size checks before decoding: small uploads that declare huge images are refused (or
decoded one at a time) at a memory cost bounded by what they declare, not what they expand to.

Peak memory is measured with tracemalloc, which sees numpy arrays and Python bytes (where zlib's
output and every decoded float array live); Pillow's own C buffers are not traced, so each bound
below is stated for the traced allocations it covers.
"""

from __future__ import annotations

import io
import pathlib
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from clinisynth_lab.benchmarks.memory import deflated_dicom, png_bomb
from clinisynth_server.catalog import ModelRecord
from clinisynth_server.errors import InvalidArgument, ValidationErrors
from clinisynth_server.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    PixelBudget,
    decode_dicom,
    decode_image,
    inspect_image,
    read_dicom,
)
from clinisynth_server.reward import images as imgs
from clinisynth_server.reward.scoring import decode_inputs
from clinisynth_server.store import open_store

MB = 1 << 20
SIDE = 4096


def peak_traced(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result or the exception raised, peak traced MB while ``fn`` ran)."""
    tracemalloc.start()
    try:
        try:
            out: Any = fn()
        except Exception as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1] / MB
    finally:
        tracemalloc.stop()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --------------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------------


def test_png_declaring_huge_dimensions_is_refused_from_its_header() -> None:
    # IHDR says 60000 x 60000 (3.6 G pixels); the file is 100 bytes and no IDAT is valid.
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )
    out, peak = peak_traced(lambda: decode_image(data, field="images[3].encoded"))
    assert isinstance(out, InvalidArgument)
    violation = out.violations[0]
    assert violation.field == "images[3].encoded"
    assert (
        "60000x60000" in violation.description and str(DEFAULT_MAX_PIXELS) in violation.description
    )
    assert peak < 1, f"{peak:.1f} MB traced to refuse a 100-byte file"
    header = inspect_image(png_bomb(64), field="x")
    assert (header.kind, header.height, header.width, header.samples) == ("png", 64, 64, 1)


def test_png_bomb_decodes_with_one_float_copy() -> None:
    data = png_bomb(SIDE)
    assert len(data) < 64 * 1024  # 16 KB on the wire ...
    out, peak = peak_traced(lambda: decode_image(data, field="image"))
    assert isinstance(out, np.ndarray) and out.shape == (SIDE, SIDE)
    assert np.allclose(out, 7 / 255)
    floats = SIDE * SIDE * 4 / MB  # ... 64 MB as float32, which the caller asked for
    # Pixel bytes copied out of Pillow (16 MB) plus one float32 array; the old path made three.
    assert peak < 1.5 * floats, f"{peak:.0f} MB traced for a {floats:.0f} MB result"


def test_png_text_and_iccp_bloat_never_reaches_pillow() -> None:
    plain = png_bomb(16)
    # 40 zTXt chunks of 1 MB text each (1 KB compressed) and a 1 MB iCCP, before IDAT.
    bloat = b"".join(
        png_chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"A" * (MB - 4096))) for i in range(40)
    ) + png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * MB))
    data = plain[:33] + bloat + plain[33:]  # right after IHDR (8 + 25 bytes)
    assert len(data) < 100 * 1024
    out, peak = peak_traced(lambda: decode_image(data, field="image"))
    assert isinstance(out, np.ndarray), out
    np.testing.assert_array_equal(out, decode_image(plain, field="image"))
    assert peak < 1, f"{peak:.1f} MB traced: metadata was inflated"


def test_jpeg_header_is_read_without_decoding() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (10, 20, 30)).save(buf, format="JPEG")
    header = inspect_image(buf.getvalue(), field="x")
    assert (header.kind, header.height, header.width, header.samples) == ("jpeg", 24, 40, 3)
    with pytest.raises(InvalidArgument) as info:
        inspect_image(buf.getvalue(), field="images[1].encoded", max_pixels=40 * 23)
    assert info.value.violations[0].field == "images[1].encoded"
    assert "24x40 = 960 pixels" in info.value.violations[0].description


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def test_deflated_dicom_bomb_is_refused_with_bounded_memory() -> None:
    # Declares 512 x 512 8-bit (256 KB of pixels) but carries 536 MB of pixel data, ~0.5 MB
    # deflated: pydicom's own reader inflates all of it before anything can look at it.
    bomb = deflated_dicom(512, 512, 536 * MB)
    assert len(bomb) < 600 * 1024
    out, peak = peak_traced(lambda: decode_dicom(bomb, field="images[0].dicom"))
    assert isinstance(out, InvalidArgument), out
    assert out.violations[0].field == "images[0].dicom"
    assert "512x512" in out.violations[0].description
    # Bound: the 1 MB header window + the declared 256 KB + 1 MB slack, each held at most
    # twice while growing; 64 MB leaves room and is 8x under what the bomb expands to.
    assert peak < 64, f"{peak:.0f} MB traced to refuse a deflated bomb"
    _, header_peak = peak_traced(lambda: inspect_image(bomb, field="x"))
    assert header_peak < 8, f"{header_peak:.0f} MB traced to read a deflated header"


def test_deflated_dicom_declaring_too_many_pixels_is_refused_before_inflating() -> None:
    big = deflated_dicom(8192, 8192, 8192 * 8192)  # declared and carried: 64 M pixels
    out, peak = peak_traced(lambda: decode_dicom(big, field="image.dicom"))
    assert isinstance(out, InvalidArgument)
    assert "8192x8192" in out.violations[0].description
    assert peak < 8, f"{peak:.0f} MB traced: the body was inflated past its header"


def test_deflated_dicom_decodes_as_pydicom_does() -> None:
    path = get_testdata_file("image_dfl.dcm")
    assert path is not None
    data = pathlib.Path(path).read_bytes()
    ds = read_dicom(data, field="x")
    reference = pydicom.dcmread(path)
    assert ds.Rows == reference.Rows and ds.PatientName == reference.PatientName
    np.testing.assert_array_equal(ds.pixel_array, reference.pixel_array)
    decoded = decode_dicom(data, field="x")
    assert decoded.shape == (reference.Rows, reference.Columns)
    # Small legitimate files inflate whole: pixel values survive the bounded path.
    small = deflated_dicom(64, 48, 64 * 48, fill=9)
    assert read_dicom(small, field="x").pixel_array.max() == 9
    header = inspect_image(small, field="x")
    assert (header.kind, header.height, header.width, header.nbytes) == ("dicom", 64, 48, 3072)


# --------------------------------------------------------------------------------------------
# per-request budget, one image at a time
# --------------------------------------------------------------------------------------------


def test_budget_refuses_the_image_that_crosses_it_naming_field_and_budget() -> None:
    budget = PixelBudget(2 * SIDE * SIDE)
    bomb = png_bomb(SIDE)
    for i in range(2):
        decode_image(bomb, field=f"images[{i}].encoded", budget=budget)
    out, peak = peak_traced(lambda: decode_image(bomb, field="images[2].encoded", budget=budget))
    assert isinstance(out, InvalidArgument)
    violation = out.violations[0]
    assert violation.field == "images[2].encoded"
    assert str(2 * SIDE * SIDE) in violation.description and "budget" in violation.description
    assert peak < 1, "the refused image was decoded"
    assert budget.exceeded


def reward_record(size: int = 32) -> ModelRecord:
    return ModelRecord(
        name="r",
        version=1,
        kind="reward",
        components={"scorer": "r.rs"},
        component_versions={"scorer": 1},
        classes=["a"],
        width=size,
        height=size,
        channels=1,
        created=1.0,
        extra={"conditioning": "class"},
    )


def test_request_over_budget_is_refused_before_any_decode(tmp_path) -> None:
    images = [imgs.ImageInput("encoded", png_bomb(SIDE))] * 8
    errors = ValidationErrors()
    _, peak = peak_traced(
        lambda: decode_inputs(
            images,
            reward_record(),
            store=open_store(str(tmp_path)),
            max_bytes=4 * MB,
            resize=True,
            errors=errors,
            budget=PixelBudget(4 * SIDE * SIDE),
        )
    )
    assert [v.field for v in errors.violations] == ["images[4].encoded"]
    assert str(4 * SIDE * SIDE) in errors.violations[0].description
    assert peak < 4, f"{peak:.0f} MB traced: images were decoded before the budget check"


def test_images_are_decoded_and_fitted_one_at_a_time(tmp_path) -> None:
    side = 2048
    one = side * side * 4 / MB  # 16 MB float32 per decoded image

    def run(n: int) -> float:
        errors = ValidationErrors()
        out, peak = peak_traced(
            lambda: decode_inputs(
                [imgs.ImageInput("encoded", png_bomb(side))] * n,
                reward_record(),
                store=open_store(str(tmp_path)),
                max_bytes=4 * MB,
                resize=True,
                errors=errors,
                budget=PixelBudget(n * side * side),
            )
        )
        assert not errors.violations and out.shape == (n, 1, 32, 32)
        np.testing.assert_allclose(out, 7 / 255, atol=1e-6)
        return peak

    single, eight = run(1), run(8)
    # Holding all eight full-size arrays would cost 8 x 16 MB more; one at a time it is flat.
    assert eight < single + one, f"1 image {single:.0f} MB, 8 images {eight:.0f} MB traced"
