"""A minimal lossless JPEG (ITU T.81 Process 14, SOF3) encoder for tests.

Why: no PyPI package encodes lossless JPEG offline (pylibjpeg-libjpeg only decodes), yet it is
the transfer syntax (1.2.840.10008.1.2.4.57 / .70) many modalities send. One grayscale
component, one scan, one fixed Huffman table (17 difference categories, 5-bit codes).
"""

from __future__ import annotations

import struct

import numpy as np


def _segment(marker: int, body: bytes) -> bytes:
    return struct.pack(">HH", marker, len(body) + 2) + body


def _predict(rows: np.ndarray, y: int, x: int, predictor: int, precision: int) -> int:
    """T.81 H.1.2.1: the first row uses Ra, the first column Rb, the first sample 2**(P-1)."""
    if y == 0 and x == 0:
        return 1 << (precision - 1)
    if y == 0:
        return int(rows[y, x - 1])
    if x == 0:
        return int(rows[y - 1, x])
    ra, rb, rc = int(rows[y, x - 1]), int(rows[y - 1, x]), int(rows[y - 1, x - 1])
    return {
        1: ra,
        2: rb,
        3: rc,
        4: ra + rb - rc,
        5: ra + ((rb - rc) >> 1),
        6: rb + ((ra - rc) >> 1),
        7: (ra + rb) >> 1,
    }[predictor]


def encode_jpeg_lossless(image: np.ndarray, *, precision: int, predictor: int = 1) -> bytes:
    """HxW unsigned integers (< 2**precision) → a lossless JPEG codestream (SOI ... EOI)."""
    if image.ndim != 2 or not 2 <= precision <= 16 or predictor not in range(1, 8):
        raise ValueError("one grayscale plane, precision 2..16, predictor 1..7")
    height, width = image.shape
    bits: list[int] = []
    for y in range(height):
        for x in range(width):
            diff = (int(image[y, x]) - _predict(image, y, x, predictor, precision)) % 65536
            if diff >= 32768 and diff != 32768:
                diff -= 65536
            size = 16 if diff == 32768 else abs(diff).bit_length()
            bits += [(size >> (4 - i)) & 1 for i in range(5)]  # symbol `size` has code `size`
            if 0 < size < 16:
                extra = diff if diff > 0 else diff - 1
                bits += [(extra >> (size - 1 - i)) & 1 for i in range(size)]
    bits += [1] * (-len(bits) % 8)
    scan = bytearray()
    for i in range(0, len(bits), 8):
        byte = int("".join(map(str, bits[i : i + 8])), 2)
        scan.append(byte)
        if byte == 0xFF:
            scan.append(0x00)  # byte stuffing
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)  # 17 codes of length 5: code k is symbol k
    return (
        b"\xff\xd8"
        + _segment(0xFFC3, struct.pack(">BHHBBBB", precision, height, width, 1, 1, 0x11, 0))
        + _segment(0xFFC4, b"\x00" + counts + bytes(range(17)))
        + _segment(0xFFDA, bytes([1, 1, 0x00, predictor, 0, 0]))
        + bytes(scan)
        + b"\xff\xd9"
    )
