"""De-identification against PS3.15 Table E.1-1, attribute by attribute, and safe logging of
hostile DICOM. :func:`identified_dicom` (every identifying attribute filled with a traceable
value) is shared with the through-the-stack tests in ``tests/grpc/test_deid_inputs.py``."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_dict, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.imaging.decode import decode_dicom
from clinisynth_server.imaging.deid import (
    EMPTIED_ATTRIBUTES,
    IDENTIFYING_ATTRIBUTES,
    REMOVED_ATTRIBUTES,
    deidentify_bytes,
    deidentify_input,
    safe_log_repr,
)

#: Attributes that say how to show the pixels: kept unchanged by de-identification.
WINDOWING = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
)
#: Dates and times the input carries (emptied: no date shift is configured for inputs).
DATES = (
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "AcquisitionDateTime",
)
UNKNOWN_PUBLIC_TAG = 0x00189FF0  # an even-group tag no dictionary defines


def _value(vr: str, index: int) -> object | None:
    """A traceable value for a VR (``SECRET``-marked text), or None for VRs not filled."""
    text = f"SECRET{index:03d}"
    if vr in ("LO", "SH", "LT", "ST", "UT", "UC", "CS"):
        return text
    if vr == "PN":
        return f"Secret^Person{index:03d}"
    if vr == "AE":
        return f"SECRETAE{index:03d}"
    if vr == "UR":
        return f"http://secret{index:03d}.example"
    if vr == "DA":
        return "19010203"
    if vr == "TM":
        return "010203.456"
    if vr == "DT":
        return "19010203010203"
    if vr == "AS":
        return "042Y"
    if vr in ("DS", "IS"):
        return "7"
    if vr in ("US", "UL", "SS", "SL"):
        return 7
    if vr in ("FL", "FD"):
        return 7.0
    if vr in ("OB", "OW", "UN"):
        return f"SECRETBYTES{index:03d}".encode()
    return None


def _sequence(index: int) -> DicomSequence:
    item = Dataset()
    item.CodeValue = f"SECRET{index:03d}"
    item.CodingSchemeDesignator = "99SECRET"
    item.CodeMeaning = f"SECRET{index:03d} meaning"
    item.PersonName = f"Secret^Nested{index:03d}"
    return DicomSequence([item])


def pixels_16(size: int = 16) -> np.ndarray:
    """Stored 16-bit values whose window 500 / 1001 maps back to a [0, 1] ramp image."""
    ramp = np.linspace(0, 1, size * size, dtype=np.float32).reshape(size, size)
    return np.round(ramp * 1000).astype(np.uint16)


def identified_dicom(size: int = 16) -> tuple[bytes, list[str]]:
    """A DICOM image with every identifying attribute filled; ``(bytes, secret strings)``.

    Every text value carries ``SECRET`` / ``Secret`` or a distinctive date, so any survivor can
    be found in the bytes; instance UIDs are fresh and returned among the secrets.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.SourceApplicationEntityTitle = "SECRETSRCAE"
    uids = {
        k: generate_uid()
        for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
    }
    ds.file_meta.MediaStorageSOPInstanceUID = uids["SOPInstanceUID"]
    ds.SOPClassUID = SecondaryCaptureImageStorage
    for keyword, uid in uids.items():
        setattr(ds, keyword, uid)
    ds.Modality = "OT"
    for index, keyword in enumerate(IDENTIFYING_ATTRIBUTES):
        vr = dictionary_VR(keyword)
        value = _sequence(index) if vr == "SQ" else _value(vr, index)
        if value is None:
            continue
        ds.add_new(tag_for_keyword(keyword), vr, value)
    for keyword in DATES:
        setattr(ds, keyword, _value(dictionary_VR(keyword), 0))
    ds.PatientSex = "M"
    ds.BurnedInAnnotation = "NO"
    stored = pixels_16(size)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 500, 1001, "LINEAR"
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
    ds.PixelData = stored.tobytes()
    ds.private_block(0x0029, "HOSPITAL PRIVATE", create=True).add_new(0x01, "LO", "SECRETPRIV")
    ds.add_new(0x60003000, "OW", b"SECRETOVERLAY\x00" * 2)
    ds.add_new(0x50000010, "US", 2)  # curve group
    ds.add_new(UNKNOWN_PUBLIC_TAG, "LO", "SECRETUNKNOWN")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    secrets = ["SECRET", "Secret", "19010203", "010203.456", *uids.values()]
    return buf.getvalue(), secrets


def assert_deidentified(data: bytes, original: bytes, secrets: list[str]) -> None:
    """The checks both test modules make on a stored / exported object, tag by tag."""
    clean = pydicom.dcmread(io.BytesIO(data))
    before = pydicom.dcmread(io.BytesIO(original))
    for keyword in IDENTIFYING_ATTRIBUTES:
        if keyword in clean:
            assert clean[keyword].value in ("", None), f"{keyword} kept: {clean[keyword].value!r}"
            assert keyword in EMPTIED_ATTRIBUTES, f"{keyword} should be removed, not emptied"
    for keyword in DATES:
        assert clean.get(keyword, "") == "", f"{keyword} kept"
    for keyword in (
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
    ):
        assert clean[keyword].value != before[keyword].value, f"{keyword} not remapped"
        assert str(clean[keyword].value).startswith("2.25."), keyword
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert clean.SOPClassUID == before.SOPClassUID  # a registered UID is kept
    assert "SourceApplicationEntityTitle" not in clean.file_meta
    assert not any(e.tag.is_private for e in clean)
    assert not any(0x5000 <= e.tag.group <= 0x60FF for e in clean)  # curves, overlays
    assert UNKNOWN_PUBLIC_TAG not in clean
    for keyword in WINDOWING:
        assert clean[keyword].value == before[keyword].value, f"{keyword} changed"
    assert clean.PixelData == before.PixelData
    assert clean.PatientIdentityRemoved == "YES"
    assert clean.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    for secret in secrets:
        assert secret.encode() not in data, f"{secret!r} survives in the bytes"


def test_identifying_attributes_are_dictionary_keywords_and_cover_table_e1() -> None:
    """A misspelt keyword would silently protect nothing; the key E.1-1 rows are listed."""
    assert [k for k in IDENTIFYING_ATTRIBUTES if k not in keyword_dict] == []
    must = {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientAddress",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "AccessionNumber",
        "StudyDescription",
        "SeriesDescription",
        "StudyID",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "StationName",
        "DeviceSerialNumber",
        "ContentSequence",
        "IconImageSequence",
        "DigitalSignaturesSequence",
        "OriginalAttributesSequence",
        "RequestAttributesSequence",
        "PersonAddress",
        "ServiceEpisodeID",
        "IssuerOfPatientID",
        "TimezoneOffsetFromUTC",
        "ContributionDescription",
        "PerformedStationName",
    }
    assert must - set(IDENTIFYING_ATTRIBUTES) == set()
    assert not dictionary_has_tag(UNKNOWN_PUBLIC_TAG)
    assert set(EMPTIED_ATTRIBUTES).isdisjoint(REMOVED_ATTRIBUTES)


def test_every_identifying_attribute_removed_pixels_and_windowing_kept() -> None:
    data, secrets = identified_dicom()
    filled = pydicom.dcmread(io.BytesIO(data))
    present = [k for k in IDENTIFYING_ATTRIBUTES if k in filled]
    assert len(present) >= len(IDENTIFYING_ATTRIBUTES) - 5, "the fixture must fill them"
    clean = deidentify_input(data, field="image.dicom")
    assert_deidentified(clean, data, secrets)
    np.testing.assert_array_equal(
        decode_dicom(clean, field="image"), decode_dicom(data, field="image")
    )


def test_deidentify_input_is_deterministic_and_leaves_png_alone() -> None:
    """Same upload → same bytes (content-addressed storage deduplicates); PNG passes as is."""
    data, _ = identified_dicom()
    assert deidentify_input(data, field="f") == deidentify_input(data, field="f")
    other, _ = identified_dicom()  # other UIDs: other object
    assert deidentify_input(other, field="f") != deidentify_input(data, field="f")
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    assert deidentify_input(png, field="f") is png


def _with_bad_vr(data: bytes, tag: bytes, vr: bytes) -> bytes:
    at = data.index(tag + vr)
    return data[:at] + tag + b"ZZ" + data[at + len(tag) + 2 :]


@pytest.mark.parametrize(
    ("tag", "vr"),
    [
        (b"\x08\x00\x60\x00", b"CS"),  # Modality: a field safe_log_repr shows
        (b"\x28\x00\x10\x00", b"US"),  # Rows: needed to decode
        (b"\x10\x00\x10\x00", b"PN"),  # PatientName: an identifying field
    ],
)
def test_unknown_vr_never_raises_from_logging_and_is_invalid_argument(tag, vr) -> None:
    data, _ = identified_dicom()
    bad = _with_bad_vr(data, tag, vr)
    text = safe_log_repr(bad)  # used to raise NotImplementedError before validation
    assert text.startswith("bytes(len=") and "SECRET" not in text
    with pytest.raises(InvalidArgument) as info:
        deidentify_bytes(bad, field="image.dicom")
    assert info.value.violations[0].field == "image.dicom"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d[: len(d) // 2],  # truncated
        lambda d: d[:140] + bytes(b ^ 0x5A for b in d[140:400]) + d[400:],  # bit-flipped header
        lambda d: d[:132] + b"\xff" * 64,  # garbage after the magic
    ],
)
def test_malformed_dicom_is_invalid_argument_and_logging_degrades(mangle) -> None:
    data, _ = identified_dicom()
    bad = mangle(data)
    assert "SECRET" not in safe_log_repr(bad)
    try:
        deidentify_bytes(bad, field="image.dicom")
    except InvalidArgument as exc:
        assert exc.violations[0].field == "image.dicom"


def test_safe_log_repr_degrades_for_objects_that_fail_to_describe() -> None:
    class Hostile(Dataset):
        def get(self, *args: object, **kwargs: object) -> object:
            raise RuntimeError("boom")

    assert "undescribable" in safe_log_repr(Hostile())
