"""Image codecs for the services: PNG / DICOM / raw encode + decode, provenance, de-identification.

numpy, Pillow and pydicom only (no torch), so every service and the Triton models can use it.
"""

from clinisynth_server.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    RAW_DTYPES,
    apply_window,
    decode_dicom,
    decode_dicom_dataset,
    decode_image,
    decode_png_jpeg,
    decode_raw,
    read_dicom,
    resize_to,
    sniff_format,
)
from clinisynth_server.imaging.deid import (
    IDENTIFYING_ATTRIBUTES,
    date_shift_for,
    deidentify,
    deidentify_bytes,
    safe_log_repr,
)
from clinisynth_server.imaging.encode import (
    DICOM_MODALITIES,
    DICOM_PRIVATE_CREATOR,
    PNG_PROVENANCE_KEY,
    RawArray,
    decode_provenance_from_dicom,
    decode_provenance_from_png,
    encode_dicom,
    encode_dicom_series,
    encode_png,
    encode_raw,
    quantize,
    synthetic_patient_id,
)
from clinisynth_server.imaging.provenance import PROVENANCE_SCHEMA, Provenance, utc_now_iso

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DICOM_MODALITIES",
    "DICOM_PRIVATE_CREATOR",
    "IDENTIFYING_ATTRIBUTES",
    "PNG_PROVENANCE_KEY",
    "PROVENANCE_SCHEMA",
    "RAW_DTYPES",
    "Provenance",
    "RawArray",
    "apply_window",
    "date_shift_for",
    "decode_dicom",
    "decode_dicom_dataset",
    "decode_image",
    "decode_png_jpeg",
    "decode_provenance_from_dicom",
    "decode_provenance_from_png",
    "decode_raw",
    "deidentify",
    "deidentify_bytes",
    "encode_dicom",
    "encode_dicom_series",
    "encode_png",
    "encode_raw",
    "quantize",
    "read_dicom",
    "resize_to",
    "safe_log_repr",
    "sniff_format",
    "synthetic_patient_id",
    "utc_now_iso",
]
