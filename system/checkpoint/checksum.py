"""CRC-32 of checkpoint bytes, as fast as the machine allows.

The checksum is the standard CRC-32 (the polynomial of zlib, gzip and PNG: ``zlib.crc32``). It is
computed with ISA-L's ``crc32`` (the ``isal`` package: carry-less-multiply code, about 20 GB/s per
core, releasing the GIL) when that is installed, else with ``zlib.crc32`` (about 1-4 GB/s). Both give
the same numbers, so a checkpoint written with one verifies with the other.
"""

from __future__ import annotations

import zlib

try:
    from isal.isal_zlib import crc32 as _fast_crc32
except ImportError:  # pragma: no cover - isal is a dependency; this keeps odd platforms working
    _fast_crc32 = None

IMPLEMENTATION = "isal" if _fast_crc32 is not None else "zlib"
"""Which library computes :func:`crc32` here: ``"isal"`` or ``"zlib"``."""

_crc32 = _fast_crc32 or zlib.crc32


def crc32(data, value: int = 0) -> int:
    """CRC-32 (zlib's) of ``data`` continuing from ``value``.

    Args:
        data: any C-contiguous buffer (bytes, memoryview of a staging buffer or an mmap).
        value: the CRC of the preceding bytes (0 to start).

    Returns:
        The unsigned 32-bit CRC, equal to ``zlib.crc32(data, value)``.
    """
    return _crc32(data, value)
