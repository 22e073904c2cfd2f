"""Encode generated float images as PNG, raw float32 or DICOM Secondary Capture, with provenance.

Input arrays are ``HxW`` (grayscale), ``HxWx1`` (grayscale) or ``HxWx3`` (RGB) floats whose
nominal range is ``value_range`` (``(0, 1)`` by default). Values outside it are clipped, because
samplers routinely overshoot by a little; NaN / Inf are refused.

Arrays handed to these encoders are produced by the server itself, so a bad array or argument is a
bug, not bad client input: it raises ``ValueError`` (mapped to INTERNAL). Services validate the
client's choice of format before any model work.

DICOM output is a Secondary Capture Image (1.2.840.10008.5.1.4.1.1.7), built with highdicom's
``SCImage``, that ``dciodvfy`` accepts
without errors, unmistakably marked synthetic: ImageType ``DERIVED\\SECONDARY``, ConversionType
``SYN``, a DerivationDescription and ImageComments saying so, the model in
ContributingEquipmentSequence, the full provenance JSON in a private block (creator
``clinisynth``), PatientName ``SYNTHETIC^IMAGE`` and a synthetic PatientID (``SYN-`` + 16 hex,
derived from the request id unless the caller passes one of that form) issued by
``CLINISYNTH-SYNTHETIC`` (IssuerOfPatientID), never a real patient's identifier.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.imaging.provenance import Provenance

#: PNG text chunk key holding the provenance JSON.
PNG_PROVENANCE_KEY = "clinisynth:provenance"
#: Private creator of the DICOM private block; elements are looked up through it, never by a
#: fixed element number.
DICOM_PRIVATE_CREATOR = "clinisynth"
DICOM_PRIVATE_GROUP = 0x0011
#: Element offsets inside the private block.
PRIVATE_PROVENANCE_JSON = 0x01  # UT: the full provenance JSON
PRIVATE_MODEL_NAME = 0x02  # LO
PRIVATE_MODEL_VERSION = 0x03  # LO
PRIVATE_MODEL_DIGEST = 0x04  # UT (digests outgrow LO's 64 characters)
PRIVATE_SEED = 0x05  # LO, decimal (seeds are 64-bit; UV is not universally supported)

#: Modalities accepted for the Secondary Capture's Modality: OT (other, the default), DX / CR
#: (chest radiographs), XC / OP (external camera, fundus photographs), SM (slide microscopy), ...
DICOM_MODALITIES = frozenset({"OT", "DX", "CR", "XC", "OP", "SM", "CT", "MR", "US", "MG", "XA"})

_SYNTHETIC_PATIENT_NAME = "SYNTHETIC^IMAGE"
_MANUFACTURER = "clinisynth"


@dataclass(frozen=True)
class RawArray:
    """A raw array payload: little-endian C-order bytes plus the shape and dtype to read them."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str = "float32"


# --------------------------------------------------------------------------------------------
# Array checks and quantisation
# --------------------------------------------------------------------------------------------


def _as_image(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Check shape / finiteness and map ``value_range`` to [0, 1] (clipped), as float64."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise ValueError(f"image must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"image must be HxW, HxWx1 or HxWx3, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image must not be empty, got shape {arr.shape}")
    if arr.shape[0] > 0xFFFF or arr.shape[1] > 0xFFFF:
        raise ValueError(f"image is too large for DICOM / PNG rows and columns: {arr.shape}")
    low, high = float(value_range[0]), float(value_range[1])
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        raise ValueError(f"value_range must be finite with high > low, got {value_range!r}")
    data = arr.astype(np.float64)
    bad = ~np.isfinite(data)
    if bad.any():
        raise ValueError(f"image has {int(bad.sum())} NaN/Inf values")
    return np.clip((data - low) / (high - low), 0.0, 1.0)


def quantize(
    array: np.ndarray, bits: int, *, value_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """Map a float image to unsigned integers of ``bits`` (8 or 16), rounding to nearest."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    unit = _as_image(array, value_range)
    top = (1 << bits) - 1
    dtype = np.uint8 if bits == 8 else np.uint16
    return np.rint(unit * top).astype(dtype)


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------


def encode_png(
    array: np.ndarray,
    provenance: Provenance | None,
    *,
    bits: int = 8,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> bytes:
    """PNG bytes: 8-bit gray (HxW, bits=8), 16-bit gray (HxW, bits=16) or 8-bit RGB (HxWx3).

    The provenance JSON goes into an iTXt chunk keyed ``clinisynth:provenance`` (iTXt because
    prompts are UTF-8), plus a tEXt ``Software`` chunk.
    """
    pixels = quantize(array, bits, value_range=value_range)
    if pixels.ndim == 3 and bits != 8:
        raise ValueError("RGB PNG output is 8-bit only")
    # uint8 HxW -> "L", uint8 HxWx3 -> "RGB", uint16 HxW -> "I;16" (written as 16-bit gray)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    info = PngImagePlugin.PngInfo()
    if provenance is not None:
        info.add_itxt(PNG_PROVENANCE_KEY, provenance.to_json(), zip=True)
        info.add_text("Software", f"{provenance.software_name} {provenance.software_version}")
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# Raw float32
# --------------------------------------------------------------------------------------------


def encode_raw(array: np.ndarray) -> RawArray:
    """The image as raw little-endian float32 bytes (values not rescaled, NaN/Inf refused)."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"image must be a numeric array, got dtype {arr.dtype}")
    data = np.ascontiguousarray(arr, dtype="<f4")
    if not np.isfinite(data).all():
        raise ValueError("image has NaN/Inf values")
    return RawArray(data=data.tobytes(), shape=tuple(int(d) for d in data.shape), dtype="float32")


# --------------------------------------------------------------------------------------------
# DICOM Secondary Capture
# --------------------------------------------------------------------------------------------


def _clip_text(text: str, limit: int) -> str:
    """Trim to a DICOM VR's length limit (characters), dropping backslashes (value separator)."""
    cleaned = text.replace("\\", "/").replace("\r", " ").replace("\n", " ")
    return cleaned[:limit]


def synthetic_patient_id(request_id: str) -> str:
    """A stable, non-identifying PatientID for a request: ``SYN-`` + 16 hex of its SHA-256."""
    return "SYN-" + hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:16].upper()


#: The only PatientIDs a synthetic image may carry: the form :func:`synthetic_patient_id`
#: issues, so a caller can group images under one synthetic patient but never stamp a real
#: patient's identifier (an MRN, a name) into a synthetic image.
SYNTHETIC_PATIENT_ID_RE = re.compile(r"SYN-[0-9A-F]{16}")
#: IssuerOfPatientID of every synthetic image: the IDs belong to the generator's own domain,
#: so a PACS never matches them against the hospital's patient identifiers.
SYNTHETIC_PATIENT_ID_ISSUER = "CLINISYNTH-SYNTHETIC"


def is_synthetic_patient_id(value: str) -> bool:
    """Whether ``value`` is a PatientID of the form this service issues (``SYN-`` + 16 hex)."""
    return SYNTHETIC_PATIENT_ID_RE.fullmatch(value) is not None


def _describe(provenance: Provenance) -> str:
    parts = [
        "SYNTHETIC IMAGE - generated by a model, not acquired from a patient.",
        f"model={provenance.model_name}",
        f"version={provenance.model_version}",
        f"digest={provenance.model_digest}",
        f"seed={provenance.seed}",
        f"sampler={provenance.sampler}",
        f"steps={provenance.steps}",
        f"guidance_scale={provenance.guidance_scale:g}",
    ]
    if provenance.class_name:
        parts.append(f"class={provenance.class_name}")
    if provenance.prompt:
        parts.append(f"prompt={json.dumps(provenance.prompt, ensure_ascii=False)}")
    if provenance.negative_prompt:
        parts.append(
            f"negative_prompt={json.dumps(provenance.negative_prompt, ensure_ascii=False)}"
        )
    parts.append(f"request={provenance.request_id}")
    return " ".join(parts)


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def encode_dicom(
    array: np.ndarray,
    provenance: Provenance,
    *,
    bits: int = 8,
    modality: str = "OT",
    value_range: tuple[float, float] = (0.0, 1.0),
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    body_part: str | None = None,
    laterality: str | None = None,
    patient_id: str | None = None,
    series_description: str | None = None,
) -> bytes:
    """A DICOM Part 10 Secondary Capture file (Explicit VR Little Endian) for a synthetic image.

    Grayscale arrays become MONOCHROME2 with ``bits`` 8 or 16 (a full-range window is written
    so viewers and :func:`decode_dicom` show the values as generated); HxWx3 arrays become 8-bit
    RGB. ``study_uid`` / ``series_uid`` let the images of one request share a study and series;
    fresh UIDs are generated otherwise (the SOP Instance UID is always fresh).
    ``modality`` must be one of :data:`DICOM_MODALITIES` ("OT" default; "DX"/"CR" for chest
    radiographs; "XC"/"OP" for external camera / fundus). ``body_part`` (e.g. "CHEST") and
    ``laterality`` ("R" / "L", e.g. for a fundus) are written when given. ``patient_id`` must
    be a synthetic ID (:func:`is_synthetic_patient_id`); default: derived from the request id.
    """
    if modality not in DICOM_MODALITIES:
        raise ValueError(f"modality must be one of {sorted(DICOM_MODALITIES)}, got {modality!r}")
    if patient_id is not None and not is_synthetic_patient_id(patient_id):
        raise ValueError(f"patient_id must match {SYNTHETIC_PATIENT_ID_RE.pattern}")
    pixels = quantize(array, bits, value_range=value_range)
    rgb = pixels.ndim == 3
    if rgb and bits != 8:
        raise ValueError("RGB DICOM output is 8-bit only")
    created = provenance.created_datetime
    date = created.strftime("%Y%m%d")
    time = created.strftime("%H%M%S.%f")
    sop_uid = generate_uid()
    # highdicom builds the Secondary Capture IOD (modules, file meta, pixel module, its own
    # Processing Equipment item); the synthetic marking and provenance are laid over it.
    ds: Dataset = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB" if rgb else "MONOCHROME2",
        bits_allocated=bits,
        coordinate_system="PATIENT",
        # Required by highdicom for PATIENT; a synthetic image has no orientation, so the
        # Type 2 attribute is emptied below.
        patient_orientation=("L", "F"),
        study_instance_uid=study_uid or generate_uid(),
        series_instance_uid=series_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=_MANUFACTURER,
        patient_id=patient_id or synthetic_patient_id(provenance.request_id),
        patient_name=_SYNTHETIC_PATIENT_NAME,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    ds.file_meta.ImplementationVersionName = _clip_text(
        f"CLINISYNTH_{provenance.software_version}", 16
    )
    library_equipment = list(ds.get("ContributingEquipmentSequence", []))
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: prompts may be in any language
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.TimezoneOffsetFromUTC = "+0000"
    equipment = Dataset()
    equipment.Manufacturer = _MANUFACTURER
    equipment.ManufacturerModelName = _clip_text(provenance.model_name, 64)
    equipment.SoftwareVersions = [
        _clip_text(provenance.model_version, 64),
        _clip_text(f"{provenance.software_name} {provenance.software_version}", 64),
    ]
    equipment.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code_item("109101", "DCM", "Acquisition Equipment")]
    )
    equipment.ContributionDateTime = created.strftime("%Y%m%d%H%M%S.%f") + "+0000"
    equipment.ContributionDescription = _clip_text(
        f"Synthetic image generated by {provenance.model_name} {provenance.model_version} "
        f"(seed {provenance.seed}, {provenance.sampler}, {provenance.steps} steps)",
        1024,
    )
    ds.ContributingEquipmentSequence = DicomSequence([equipment, *library_equipment])
    # Patient: synthetic, derived from the request so a batch shares a patient
    ds.PatientName = _SYNTHETIC_PATIENT_NAME
    ds.PatientID = patient_id or synthetic_patient_id(provenance.request_id)
    ds.IssuerOfPatientID = SYNTHETIC_PATIENT_ID_ISSUER
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "SYNTHETIC"
    ds.AccessionNumber = ""
    ds.StudyDescription = _clip_text(f"SYNTHETIC {provenance.model_name}", 64)
    # General Series
    ds.Modality = modality
    if laterality not in (None, "R", "L"):
        raise ValueError(f"laterality must be 'R', 'L' or None, got {laterality!r}")
    # Type 2C that dciodvfy cannot evaluate: empty means "unknown" (a warning, not an error).
    ds.Laterality = laterality or ""
    # Always starts with SYNTHETIC, whatever the caller's description.
    described = f" {series_description}" if series_description else ""
    ds.SeriesDescription = _clip_text(
        f"SYNTHETIC {provenance.model_name} {provenance.model_version}{described}", 64
    )
    if body_part:
        ds.BodyPartExamined = _clip_text(body_part.upper(), 16)
    # General Equipment + SC Equipment
    ds.Manufacturer = _MANUFACTURER
    ds.SoftwareVersions = _clip_text(
        f"{provenance.software_name} {provenance.software_version}", 64
    )
    ds.ConversionType = "SYN"
    ds.SecondaryCaptureDeviceManufacturer = _MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = _clip_text(provenance.model_name, 64)
    ds.SecondaryCaptureDeviceSoftwareVersions = _clip_text(provenance.model_version, 64)
    ds.DateOfSecondaryCapture = date
    ds.TimeOfSecondaryCapture = time
    # General Image
    ds.PatientOrientation = ""
    ds.ContentDate = date
    ds.ContentTime = time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = _clip_text(
        "Synthetic image generated by a generative model "
        f"({provenance.model_name} {provenance.model_version}); not acquired from a patient",
        1024,
    )
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = _clip_text(_describe(provenance), 10240)
    # Image Pixel (rows, samples, bits, pixel data: highdicom)
    if not rgb:
        # Full-range linear window: stored 0 -> black, 2**bits - 1 -> white.
        ds.WindowCenter = 1 << (bits - 1)
        ds.WindowWidth = 1 << bits
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    # Private block: the whole provenance, machine-readable
    block = ds.private_block(DICOM_PRIVATE_GROUP, DICOM_PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_PROVENANCE_JSON, "UT", provenance.to_json())
    block.add_new(PRIVATE_MODEL_NAME, "LO", _clip_text(provenance.model_name, 64))
    block.add_new(PRIVATE_MODEL_VERSION, "LO", _clip_text(provenance.model_version, 64))
    block.add_new(PRIVATE_MODEL_DIGEST, "UT", provenance.model_digest)
    block.add_new(PRIVATE_SEED, "LO", str(provenance.seed))

    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def encode_dicom_series(
    arrays: Sequence[np.ndarray],
    provenances: Sequence[Provenance],
    **options: Any,  # encode_dicom's keyword options, forwarded unchanged
) -> list[bytes]:
    """Several images of one request as one study / series (shared UIDs, numbered instances)."""
    if len(arrays) != len(provenances):
        raise ValueError("arrays and provenances must have the same length")
    study_uid, series_uid = generate_uid(), generate_uid()
    return [
        encode_dicom(
            array,
            prov,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=index + 1,
            **options,
        )
        for index, (array, prov) in enumerate(zip(arrays, provenances, strict=True))
    ]


# --------------------------------------------------------------------------------------------
# Reading provenance back
# --------------------------------------------------------------------------------------------


def decode_provenance_from_png(data: bytes, *, field: str = "png") -> Provenance | None:
    """The provenance embedded by :func:`encode_png`, or ``None`` if the PNG carries none.

    Raises ``InvalidArgument`` naming ``field`` when the bytes are not a PNG or the chunk is
    malformed.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise InvalidArgument.for_field(field, f"not a PNG (found {image.format})")
            image.load()  # text chunks after IDAT are read only on load
            text = dict(getattr(image, "text", {}) or {})
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument.for_field(field, f"not a readable PNG: {exc}") from exc
    raw = text.get(PNG_PROVENANCE_KEY)
    if raw is None:
        return None
    try:
        return Provenance.from_json(str(raw))
    except ValueError as exc:
        raise InvalidArgument.for_field(field, f"malformed {PNG_PROVENANCE_KEY}: {exc}") from exc


def decode_provenance_from_dicom(data: bytes, *, field: str = "dicom") -> Provenance | None:
    """The provenance written by :func:`encode_dicom` (private block ``clinisynth``), or
    ``None`` when the file has no such block. ``InvalidArgument`` for non-DICOM bytes."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InvalidArgument.for_field(field, f"not a DICOM Part 10 file: {exc}") from exc
    try:
        block = ds.private_block(DICOM_PRIVATE_GROUP, DICOM_PRIVATE_CREATOR)
    except KeyError:
        return None
    if PRIVATE_PROVENANCE_JSON not in block:
        return None
    try:
        return Provenance.from_json(str(block[PRIVATE_PROVENANCE_JSON].value))
    except ValueError as exc:
        raise InvalidArgument.for_field(field, f"malformed provenance block: {exc}") from exc
