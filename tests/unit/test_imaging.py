"""Tests for clinisynth_server.imaging: codecs, provenance, DICOM validity, de-identification.

DICOM validity is checked with the real dicom3tools validator (``dciodvfy``, Debian package
``dicom3tools``); real inputs are pydicom's bundled test files (CT_small.dcm, MR_small.dcm).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.imaging import (
    DICOM_PRIVATE_CREATOR,
    IDENTIFYING_ATTRIBUTES,
    PNG_PROVENANCE_KEY,
    Provenance,
    decode_dicom,
    decode_image,
    decode_png_jpeg,
    decode_provenance_from_dicom,
    decode_provenance_from_png,
    decode_raw,
    deidentify,
    deidentify_bytes,
    encode_dicom,
    encode_dicom_series,
    encode_png,
    encode_raw,
    resize_to,
    safe_log_repr,
    synthetic_patient_id,
)

DCIODVFY = shutil.which("dciodvfy")


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def _provenance(**overrides: object) -> Provenance:
    values: dict[str, object] = {
        "model_name": "tiny-cxr-ldm",
        "model_version": "3",
        "model_digest": "sha256:" + "ab" * 32,
        "seed": 2**63 + 7,
        "sampler": "ddim",
        "steps": 25,
        "guidance_scale": 7.5,
        "size": (24, 40),
        "request_id": "req-0001",
        "prompt": "small left pleural effusion — épanchement 胸水",
        "negative_prompt": "text, markers",
        "class_name": "effusion",
        "created": "2025-03-04T05:06:07.123456Z",
        "extra": {"source": "unit-test"},
    }
    values.update(overrides)
    return Provenance(**values)  # type: ignore[arg-type]


@pytest.fixture
def provenance() -> Provenance:
    return _provenance()


@pytest.fixture
def gray() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.random((24, 40))
    image[0, 0], image[0, 1] = 0.0, 1.0  # full range present
    return image


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(1).random((24, 40, 3))


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"{name} ships inside the pydicom wheel"
    return Path(path)


def _dciodvfy(data: bytes, tmp_path: Path) -> tuple[list[str], str]:
    """Run the real validator; return its error lines and full output."""
    target = tmp_path / "image.dcm"
    target.write_bytes(data)
    result = subprocess.run(
        [DCIODVFY, str(target)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "Error" in line]
    if result.returncode != 0 and not errors:
        errors = [f"dciodvfy exited with {result.returncode}"]
    return errors, output


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


def test_provenance_dict_and_json_round_trip(provenance: Provenance) -> None:
    assert Provenance.from_dict(provenance.to_dict()) == provenance
    assert Provenance.from_json(provenance.to_json()) == provenance
    data = json.loads(provenance.to_json())
    assert data["schema"] == "clinisynth.provenance/1"
    assert data["size"] == [24, 40]
    assert data["seed"] == 2**63 + 7
    assert data["created"] == "2025-03-04T05:06:07.123456Z"


def test_provenance_is_hashable_and_immutable(provenance: Provenance) -> None:
    assert hash(provenance) == hash(Provenance.from_json(provenance.to_json()))
    with pytest.raises(AttributeError):
        provenance.seed = 1  # type: ignore[misc]


def test_provenance_defaults_and_normalisation() -> None:
    prov = _provenance(created="2025-03-04T05:06:07+00:00", extra={})
    assert prov.created == "2025-03-04T05:06:07.000000Z"
    assert prov.software_name == "clinisynth"
    fresh = Provenance(
        model_name="m",
        model_version="1",
        model_digest="d",
        seed=0,
        sampler="ddpm",
        steps=1,
        guidance_scale=1,
        size=(1, 1),
        request_id="r",
    )
    assert fresh.created.endswith("Z")
    assert fresh.created_datetime.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "overrides",
    [
        {"created": "2025-03-04T05:06:07+02:00"},
        {"created": "yesterday"},
        {"seed": -1},
        {"seed": 2**64},
        {"steps": -3},
        {"guidance_scale": float("nan")},
        {"size": (0, 4)},
        {"extra": {"k": 1}},
    ],
)
def test_provenance_rejects_bad_values(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _provenance(**overrides)


def test_provenance_from_dict_ignores_unknown_keys_and_checks_required(
    provenance: Provenance,
) -> None:
    data = provenance.to_dict() | {"future_field": [1, 2]}
    assert Provenance.from_dict(data) == provenance
    del data["seed"]
    with pytest.raises(ValueError, match="seed"):
        Provenance.from_dict(data)
    with pytest.raises(ValueError, match="schema"):
        Provenance.from_dict(provenance.to_dict() | {"schema": "clinisynth.provenance/2"})


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "mode", "tolerance"), [(8, "L", 0.5 / 255), (16, None, 0.5 / 65535)]
)
def test_png_gray_round_trip(
    gray: np.ndarray, provenance: Provenance, bits: int, mode: str | None, tolerance: float
) -> None:
    data = encode_png(gray, provenance, bits=bits)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.size == (40, 24)
        if mode is not None:
            assert image.mode == mode
        else:
            assert image.mode in ("I;16", "I")  # 16-bit gray, whichever name Pillow uses
        image.load()
        assert PNG_PROVENANCE_KEY in image.text
    decoded = decode_png_jpeg(data, field="image")
    assert decoded.dtype == np.float32
    assert decoded.shape == gray.shape
    assert np.abs(decoded - gray).max() <= tolerance + 1e-7
    assert decode_provenance_from_png(data) == provenance


def test_png_16_bit_keeps_more_precision_than_8_bit(gray: np.ndarray) -> None:
    err8 = np.abs(decode_image(encode_png(gray, None, bits=8), field="x") - gray).max()
    err16 = np.abs(decode_image(encode_png(gray, None, bits=16), field="x") - gray).max()
    assert err16 < err8 / 100


def test_png_rgb_round_trip(rgb: np.ndarray, provenance: Provenance) -> None:
    data = encode_png(rgb, provenance)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
    decoded = decode_image(data, field="image")
    assert decoded.shape == rgb.shape
    assert np.abs(decoded - rgb).max() <= 0.5 / 255 + 1e-7
    assert decode_provenance_from_png(data) == provenance
    gray = decode_image(data, field="image", channels=1)
    assert gray.shape == rgb.shape[:2]


def test_png_value_range_and_clipping(provenance: Provenance) -> None:
    signed = np.array([[-1.0, 0.0, 1.0, 1.3]])  # a sampler in [-1, 1] overshooting
    decoded = decode_image(encode_png(signed, provenance, value_range=(-1.0, 1.0)), field="x")
    np.testing.assert_allclose(decoded[0], [0.0, 128 / 255, 1.0, 1.0], atol=1e-6)


def test_png_without_provenance_and_bad_png() -> None:
    plain = io.BytesIO()
    Image.new("L", (4, 4)).save(plain, format="PNG")
    assert decode_provenance_from_png(plain.getvalue()) is None
    with pytest.raises(InvalidArgument) as info:
        decode_provenance_from_png(b"not a png", field="images[0].png")
    assert info.value.violations[0].field == "images[0].png"


def test_encoders_refuse_nan_and_bad_shapes(provenance: Provenance) -> None:
    with pytest.raises(ValueError, match="NaN"):
        encode_png(np.full((4, 4), np.nan), provenance)
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((4, 4, 2)), provenance)
    with pytest.raises(ValueError, match="8-bit"):
        encode_png(np.zeros((4, 4, 3)), provenance, bits=16)
    with pytest.raises(ValueError, match="modality"):
        encode_dicom(np.zeros((4, 4)), provenance, modality="XX")


def test_jpeg_decodes() -> None:
    # a smooth colour ramp: JPEG is lossy, and noise would not survive chroma subsampling
    ramp = np.linspace(0.0, 1.0, 40)
    smooth = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None][:24], 0.5), axis=2)
    out = io.BytesIO()
    Image.fromarray(np.rint(smooth * 255).astype(np.uint8)).save(out, format="JPEG", quality=95)
    decoded = decode_image(out.getvalue(), field="image")
    assert decoded.shape == (24, 40, 3)
    assert np.abs(decoded - smooth).mean() < 0.02


# --------------------------------------------------------------------------------------------
# Raw arrays
# --------------------------------------------------------------------------------------------


def test_raw_round_trip(rgb: np.ndarray) -> None:
    raw = encode_raw(rgb)
    assert raw.dtype == "float32"
    assert raw.shape == (24, 40, 3)
    assert len(raw.data) == 24 * 40 * 3 * 4
    decoded = decode_raw(raw.data, raw.shape, raw.dtype, field="image.raw")
    np.testing.assert_array_equal(decoded, rgb.astype(np.float32))


@pytest.mark.parametrize(
    ("data", "shape", "dtype", "message"),
    [
        (np.array([[0.0, np.nan]], "<f4").tobytes(), (1, 2), "float32", "NaN/Inf"),
        (np.array([[np.inf, 0.0]], "<f4").tobytes(), (1, 2), "float32", "NaN/Inf"),
        (b"\x00" * 12, (2, 2), "float32", "do not match"),
        (b"\x00" * 16, (2, 2), "int64", "not supported"),
        (b"\x00" * 32, (2, 2, 2), "float32", "channel count"),
        (b"\x00" * 16, (4,), "float32", "shape"),
        (b"\x00" * 16, (0, 4), "float32", "shape"),
    ],
)
def test_raw_rejections_name_the_field(
    data: bytes, shape: tuple[int, ...], dtype: str, message: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_raw(data, shape, dtype, field="requests[3].image.raw")
    err = info.value
    assert err.code == "INVALID_ARGUMENT"
    assert err.violations[0].field == "requests[3].image.raw"
    assert message in err.violations[0].description


def test_oversize_inputs_rejected_before_decoding(gray: np.ndarray) -> None:
    raw = encode_raw(gray)
    with pytest.raises(InvalidArgument, match="over the limit"):
        decode_raw(raw.data, raw.shape, field="image", max_pixels=100)
    with pytest.raises(InvalidArgument, match="over the limit"):
        decode_image(encode_png(gray, None), field="image", max_pixels=100)
    ct = _testdata("CT_small.dcm").read_bytes()
    with pytest.raises(InvalidArgument, match="over the limit") as info:
        decode_dicom(ct, field="image.dicom", max_pixels=128 * 127)
    assert info.value.violations[0].field == "image.dicom"


# --------------------------------------------------------------------------------------------
# DICOM encode: validity (dciodvfy) and synthetic marking
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    DCIODVFY is None,
    reason="dciodvfy not on PATH: install Debian package dicom3tools (CI installs it)",
)
@pytest.mark.parametrize(
    ("kind", "bits", "modality"),
    [("gray", 8, "OT"), ("gray", 16, "DX"), ("gray", 8, "CR"), ("rgb", 8, "XC")],
)
def test_dicom_passes_dciodvfy(
    kind: str,
    bits: int,
    modality: str,
    gray: np.ndarray,
    rgb: np.ndarray,
    provenance: Provenance,
    tmp_path: Path,
) -> None:
    array = gray if kind == "gray" else rgb
    data = encode_dicom(array, provenance, bits=bits, modality=modality)
    errors, output = _dciodvfy(data, tmp_path)
    assert not errors, f"dciodvfy reported errors:\n{output}"
    assert "SCImage" in output  # it recognised the Secondary Capture IOD


def test_dicom_marked_synthetic_with_provenance(gray: np.ndarray, provenance: Provenance) -> None:
    data = encode_dicom(gray, provenance, bits=16, modality="DX", body_part="chest")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "NO"
    assert ds.ConversionType == "SYN"
    assert ds.Manufacturer == "clinisynth"
    assert ds.Modality == "DX"
    assert ds.BodyPartExamined == "CHEST"
    assert str(ds.PatientName) == "SYNTHETIC^IMAGE"
    assert ds.PatientID == synthetic_patient_id("req-0001")
    assert "synthetic" in ds.DerivationDescription.lower()
    assert "SYNTHETIC" in ds.ImageComments and "seed=9223372036854775815" in ds.ImageComments
    assert ds.ContentDate == "20250304" and ds.ContentTime.startswith("050607")
    equipment = ds.ContributingEquipmentSequence[0]
    assert equipment.ManufacturerModelName == "tiny-cxr-ldm"
    assert "3" in list(equipment.SoftwareVersions)
    block = ds.private_block(0x0011, DICOM_PRIVATE_CREATOR)
    assert json.loads(block[0x01].value)["seed"] == provenance.seed
    assert block[0x04].value == provenance.model_digest
    assert decode_provenance_from_dicom(data) == provenance
    assert (ds.BitsAllocated, ds.BitsStored, ds.PhotometricInterpretation) == (
        16,
        16,
        "MONOCHROME2",
    )


def test_dicom_uids_fresh_and_series_shared(gray: np.ndarray, provenance: Provenance) -> None:
    first = pydicom.dcmread(io.BytesIO(encode_dicom(gray, provenance)))
    second = pydicom.dcmread(io.BytesIO(encode_dicom(gray, provenance)))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert first[keyword].value != second[keyword].value
    series = [
        pydicom.dcmread(io.BytesIO(b))
        for b in encode_dicom_series([gray, gray], [provenance, provenance])
    ]
    assert series[0].SeriesInstanceUID == series[1].SeriesInstanceUID
    assert series[0].SOPInstanceUID != series[1].SOPInstanceUID
    assert [int(d.InstanceNumber) for d in series] == [1, 2]


@pytest.mark.parametrize(
    ("kind", "bits", "tolerance"),
    [("gray", 8, 0.5 / 255), ("gray", 16, 1e-4), ("rgb", 8, 0.5 / 255)],
)
def test_dicom_round_trip_values(
    kind: str,
    bits: int,
    tolerance: float,
    gray: np.ndarray,
    rgb: np.ndarray,
    provenance: Provenance,
) -> None:
    array = gray if kind == "gray" else rgb
    decoded = decode_dicom(encode_dicom(array, provenance, bits=bits), field="image")
    assert decoded.shape == array.shape
    assert np.abs(decoded - array).max() <= tolerance + 1e-7


def test_decode_provenance_from_foreign_dicom_is_none() -> None:
    assert decode_provenance_from_dicom(_testdata("CT_small.dcm").read_bytes()) is None
    with pytest.raises(InvalidArgument):
        decode_provenance_from_dicom(b"\x00" * 300, field="image.dicom")


# --------------------------------------------------------------------------------------------
# DICOM decode of real files, with windowing
# --------------------------------------------------------------------------------------------


def test_decode_ct_small_min_max_of_hounsfield_units() -> None:
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds  # so the documented min-max rule applies
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (hu - hu.min()) / (hu.max() - hu.min())
    decoded = decode_dicom(path.read_bytes(), field="image")
    assert decoded.shape == (128, 128)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, expected, atol=1e-6)


def test_decode_mr_small_uses_window_center_width() -> None:
    path = _testdata("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)  # 600 / 1600
    x = ds.pixel_array.astype(np.float64)
    expected = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    decoded = decode_dicom(path.read_bytes(), field="image")
    assert decoded.shape == (64, 64)
    np.testing.assert_allclose(decoded, expected, atol=1e-6)
    assert decoded.min() > 0.0  # the window is wider than the data: no clipping to black
    # an explicit window overrides the file's
    narrow = decode_dicom(path.read_bytes(), field="image", window=(center, 2.0))
    assert set(np.unique(narrow)).issubset({0.0, 0.5, 1.0})


def test_decode_monochrome1_is_inverted() -> None:
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    normal = decode_dicom(_testdata("CT_small.dcm").read_bytes(), field="image")
    ds.PhotometricInterpretation = "MONOCHROME1"
    out = io.BytesIO()
    ds.save_as(out)
    inverted = decode_dicom(out.getvalue(), field="image")
    np.testing.assert_allclose(inverted, 1.0 - normal, atol=1e-6)


def test_decode_image_sniffs_dicom_and_converts_channels() -> None:
    data = _testdata("MR_small.dcm").read_bytes()
    assert decode_image(data, field="image").shape == (64, 64)
    assert decode_image(data, field="image", channels=3).shape == (64, 64, 3)


def test_non_image_bytes_rejected_with_field() -> None:
    for blob in (b"", b"hello, world", b"%PDF-1.4 " + b"\x00" * 200):
        with pytest.raises(InvalidArgument) as info:
            decode_image(blob, field="request.image")
        assert info.value.violations[0].field == "request.image"
    with pytest.raises(InvalidArgument, match="not a DICOM"):
        decode_dicom(b"hello, world", field="request.image")
    with pytest.raises(InvalidArgument, match="not a readable PNG or JPEG"):
        decode_png_jpeg(b"\x89PNG\r\n\x1a\n-truncated", field="request.image")
    truncated_png = encode_png(np.random.default_rng(2).random((64, 64)), None)[:-200]
    with pytest.raises(InvalidArgument) as info:
        decode_image(truncated_png, field="request.image")
    assert info.value.violations[0].field == "request.image"
    truncated_dicom = _testdata("CT_small.dcm").read_bytes()[:-5000]
    with pytest.raises(InvalidArgument) as info:
        decode_image(truncated_dicom, field="request.image")
    assert info.value.violations[0].field == "request.image"


def test_dicom_without_pixel_data_rejected() -> None:
    data = _testdata("rtplan.dcm").read_bytes()  # a real RT Plan: a DICOM object, no image
    with pytest.raises(InvalidArgument, match="no PixelData") as info:
        decode_dicom(data, field="image.dicom")
    assert info.value.violations[0].field == "image.dicom"
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    del ds.PixelData
    out = io.BytesIO()
    ds.save_as(out)
    with pytest.raises(InvalidArgument, match="no PixelData"):
        decode_image(out.getvalue(), field="image.dicom")


# --------------------------------------------------------------------------------------------
# resize_to
# --------------------------------------------------------------------------------------------


def test_resize_to_shapes_and_values(gray: np.ndarray, rgb: np.ndarray) -> None:
    assert resize_to(gray, (12, 20)).shape == (12, 20)
    assert resize_to(rgb, (48, 80)).shape == (48, 80, 3)
    constant = np.full((10, 10), 0.25)
    np.testing.assert_allclose(resize_to(constant, (7, 13), resample="bicubic"), 0.25, atol=1e-6)
    assert resize_to(gray, gray.shape[:2]).dtype == np.float32
    with pytest.raises(ValueError):
        resize_to(gray, (0, 4))


# --------------------------------------------------------------------------------------------
# De-identification and safe logging
# --------------------------------------------------------------------------------------------


def _with_extra_identifiers(ds: Dataset) -> Dataset:
    """Add identifiers the test files lack: a nested person name, an address, an overlay."""
    ds.InstitutionAddress = "1 Hospital Road, Springfield"
    ds.PerformingPhysicianName = "House^Gregory"
    ds.OperatorsName = "Tech^Tina"
    ds.PatientAge = "042Y"
    ds.OtherPatientIDs = "MRN-777"
    item = Dataset()
    item.PerformingPhysicianName = "Nested^Doctor"
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.ReferencedSOPClassUID = ds.SOPClassUID
    ds.ReferencedImageSequence = DicomSequence([item])
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)  # overlay data
    ds.private_block(0x0029, "HOSPITAL PRIVATE", create=True).add_new(0x01, "LO", "secret")
    return ds


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_deidentify_real_file_removes_every_listed_attribute(name: str) -> None:
    original = _with_extra_identifiers(pydicom.dcmread(_testdata(name)))
    present = [k for k in IDENTIFYING_ATTRIBUTES if k in original and original[k].value]
    assert len(present) >= 10, present  # the test is only meaningful on a file that has them
    original_uids = {
        k: str(original[k].value)
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    }
    original_name = str(original.PatientName)
    study_date = original.StudyDate

    clean = deidentify(original, date_shift_days=-100, uid_salt="study-secret")

    for keyword in IDENTIFYING_ATTRIBUTES:
        if keyword in clean:
            assert clean[keyword].value in ("", None), f"{keyword} still set in {name}"
    assert not any(elem.tag.is_private for elem in clean)
    assert not any(0x6000 <= elem.tag.group <= 0x60FF for elem in clean)

    def walk(ds: Dataset) -> list[str]:
        names = []
        for elem in ds:
            if elem.VR == "PN" and elem.value:
                names.append(str(elem.value))
            if elem.VR == "SQ":
                for child in elem.value:
                    names.extend(walk(child))
        return names

    assert walk(clean) == []
    for keyword, old in original_uids.items():
        assert str(clean[keyword].value) != old
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    # references inside sequences are rewritten consistently; registered UIDs are kept
    ref = clean.ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == clean.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == original.SOPClassUID == clean.SOPClassUID
    assert clean.StudyDate != study_date and len(clean.StudyDate) == 8
    assert clean.PatientIdentityRemoved == "YES"
    assert "basic profile" in clean.DeidentificationMethod
    assert len(clean.DeidentificationMethod) <= 64
    assert clean.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    # the input is untouched and the pixels survive
    assert str(original.PatientName) == original_name
    np.testing.assert_array_equal(clean.pixel_array, original.pixel_array)

    text = safe_log_repr(clean) + safe_log_repr(original)
    for secret in (original_name, original.PatientID, *original_uids.values(), "secret"):
        assert secret not in text


def test_deidentify_without_shift_removes_dates_and_same_salt_is_stable() -> None:
    original = pydicom.dcmread(_testdata("CT_small.dcm"))
    clean = deidentify(original, uid_salt="s")
    again = deidentify(original, uid_salt="s")
    other = deidentify(original)
    assert clean.StudyDate == "" and clean.ContentDate == "" and clean.StudyTime == ""
    assert clean.LongitudinalTemporalInformationModified == "REMOVED"
    assert clean.StudyInstanceUID == again.StudyInstanceUID != other.StudyInstanceUID


def test_deidentify_bytes_round_trip_and_burned_in_refused() -> None:
    data = _testdata("CT_small.dcm").read_bytes()
    clean = deidentify_bytes(data, pseudonym="SUBJ-01")
    ds = pydicom.dcmread(io.BytesIO(clean))
    assert ds.PatientID == "SUBJ-01"
    np.testing.assert_array_equal(
        decode_dicom(clean, field="image"), decode_dicom(data, field="image")
    )
    burned = pydicom.dcmread(io.BytesIO(data))
    burned.BurnedInAnnotation = "YES"
    with pytest.raises(InvalidArgument, match="BurnedInAnnotation") as info:
        deidentify(burned, field="image.dicom")
    assert info.value.violations[0].field == "image.dicom"


def test_safe_log_repr_never_shows_pixels_or_identity() -> None:
    data = _testdata("CT_small.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    for text in (safe_log_repr(ds), safe_log_repr(data)):
        assert "CT Image Storage" in text and "Rows=128" in text
        assert "CompressedSamples" not in text  # the patient name
        assert str(ds.PatientID) not in text
        assert str(ds.SOPInstanceUID) not in text
        assert len(text) < 400
    arr = np.array([[0.0, np.nan], [2.0, 1.0]])
    assert safe_log_repr(arr) == "array(shape=[2, 2], dtype=float64, min=0, max=2, nonfinite=1)"
    assert safe_log_repr(b"\x89PNG\r\n\x1a\n....") == "bytes(len=12, kind=png)"
    assert safe_log_repr(object()) == "<object>"


@pytest.mark.skipif(
    DCIODVFY is None,
    reason="dciodvfy not on PATH: install Debian package dicom3tools (CI installs it)",
)
def test_deidentified_real_file_still_passes_dciodvfy(tmp_path: Path) -> None:
    clean = deidentify_bytes(_testdata("CT_small.dcm").read_bytes(), date_shift_days=-30)
    errors, output = _dciodvfy(clean, tmp_path)
    assert not errors, f"dciodvfy reported errors after de-identification:\n{output}"
