"""DICOM windowing of a full-size image costs one float32 image, not float64 copies (issue #14).

A 4096² 16-bit CT slice with a rescale and a VOI window is decoded under ``tracemalloc`` (numpy
reports its buffers to it). The bound: the parsed pixel data and the stored array (2 bytes a
pixel each) plus one float32 image and 25 % slack — 1.5 float32 images' worth over the input.
The former path (pydicom's float64 rescale, a float64 copy, float64 temporaries per step) peaked
at over 8 float32 images' worth. The values stay those of the float64 formula (to 1e-6).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from clinisynth_server.imaging.decode import decode_dicom

SIDE = 4096
SLOPE, INTERCEPT = 0.5, -1024.0


def _ct(side: int, *, photometric: str = "MONOCHROME2", window: bool = True) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
    if window:
        ds.WindowCenter, ds.WindowWidth = 40, 400
    rng = np.random.default_rng(1)
    ds.PixelData = rng.integers(0, 4096, (side, side), dtype=np.uint16).tobytes()
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _expected(data: bytes, photometric: str, window: bool) -> np.ndarray:
    import pydicom

    stored = pydicom.dcmread(DicomBytesIO(data)).pixel_array.astype(np.float64)
    hu = stored * SLOPE + INTERCEPT
    if window:
        y = np.clip((hu - (40 - 0.5)) / (400 - 1) + 0.5, 0, 1)
    else:
        y = (hu - hu.min()) / (hu.max() - hu.min())
    return 1.0 - y if photometric == "MONOCHROME1" else y


def test_windowing_a_4096_square_ct_costs_one_float32_image():
    data = _ct(SIDE)
    float32_image = SIDE * SIDE * 4
    tracemalloc.start()
    try:
        out = decode_dicom(data, field="image")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.dtype == np.float32 and out.shape == (SIDE, SIDE)
    bound = 2 * SIDE * SIDE * 2 + 1.25 * float32_image  # pixel data + stored + the float32 image
    assert peak < bound, f"peak {peak / 2**20:.0f} MB > {bound / 2**20:.0f} MB"
    assert float(np.abs(out - _expected(data, "MONOCHROME2", True)).max()) < 1e-6


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("window", [True, False])
def test_float32_windowing_matches_the_float64_formula(photometric, window):
    data = _ct(256, photometric=photometric, window=window)
    out = decode_dicom(data, field="image")
    assert out.dtype == np.float32
    assert float(np.abs(out - _expected(data, photometric, window)).max()) < 1e-6
