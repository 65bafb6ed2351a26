"""Several payloads in one message: an optimizer sends one bundle per sync, not one per tensor.

Layout (little-endian): ``b"TWB1"``, ``uint32`` count, ``count`` x ``uint32`` lengths, then the
payloads back to back. Each payload carries its own header and CRC (:mod:`.payload`); the bundle
only has to delimit them, and its size is ``8 + 4 * count + sum(lengths)`` exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

from thinwire.compression.payload import PayloadError, as_bytes

__all__ = ["BUNDLE_MAGIC", "pack_bundle", "unpack_bundle", "bundle_nbytes"]

BUNDLE_MAGIC = b"TWB1"
_HEAD = struct.Struct("<4sI")


def bundle_nbytes(lengths: Sequence[int]) -> int:
    """Exact size of a bundle of payloads of these lengths."""
    return _HEAD.size + 4 * len(lengths) + sum(lengths)


def pack_bundle(payloads: Sequence[bytes]) -> bytes:
    """Concatenate payloads behind a count and a length table."""
    lens = [len(p) for p in payloads]
    return (
        _HEAD.pack(BUNDLE_MAGIC, len(lens))
        + struct.pack(f"<{len(lens)}I", *lens)
        + b"".join(payloads)
    )


def unpack_bundle(
    bundle: bytes | bytearray | memoryview | torch.Tensor, count: int | None = None
) -> list[bytes]:
    """Split a bundle back into its payloads.

    Args:
        bundle: the received bytes.
        count: if given, the number of payloads the bundle must hold.

    Raises:
        PayloadError: wrong magic, count, truncated table or lengths that do not add up.
    """
    buf = as_bytes(bundle)
    if len(buf) < _HEAD.size:
        raise PayloadError(f"bundle truncated: {len(buf)} bytes, its header needs {_HEAD.size}")
    magic, n = _HEAD.unpack_from(buf, 0)
    if magic != BUNDLE_MAGIC:
        raise PayloadError(f"bundle magic must be {BUNDLE_MAGIC!r}, got {magic!r}")
    if count is not None and n != count:
        raise PayloadError(f"bundle must hold {count} payloads, got {n}")
    table_end = _HEAD.size + 4 * n
    if len(buf) < table_end:
        raise PayloadError(
            f"bundle truncated: {len(buf)} bytes, its length table needs {table_end}"
        )
    lens = struct.unpack_from(f"<{n}I", buf, _HEAD.size)
    if table_end + sum(lens) != len(buf):
        raise PayloadError(
            f"bundle length must be {table_end + sum(lens)} bytes by its table, got {len(buf)}"
        )
    out, off = [], table_end
    for ln in lens:
        out.append(buf[off : off + ln])
        off += ln
    return out
