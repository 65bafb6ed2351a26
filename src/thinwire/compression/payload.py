"""The versioned wire envelope every thinwire codec writes, and ``PayloadError``.

Layout (little-endian), thinwire's own::

    offset  size        field
    0       2           magic b"TW"
    2       1           format version (1)
    3       1           codec id (1 dense, 2 sparse)
    4       1           dtype code of the encoded tensor
    5       1           ndim
    6       2           length of the settings string
    8       4 * ndim    shape, uint32 per dimension
    ...     L           settings string (ASCII, the codec's canonical settings)
    ...     4           body length
    ...     4           CRC32 (zlib) of every byte before it and of the body
    ...     body

The header size depends only on ``ndim`` and the codec's settings, so a codec can state its exact
wire size from the shape alone (``wire_bytes``). Parsing checks every field before the body is
touched; anything truncated, corrupted or foreign raises :class:`PayloadError` and nothing is
half-decoded.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "PayloadError",
    "PayloadHeader",
    "MAGIC",
    "FORMAT_VERSION",
    "DTYPE_CODES",
    "header_nbytes",
    "pack_payload",
    "unpack_payload",
    "as_bytes",
]

MAGIC = b"TW"
FORMAT_VERSION = 1
# Fixed prefix: magic, version, codec id, dtype code, ndim, settings length.
_PREFIX = struct.Struct("<2sBBBBH")
_TRAILER = struct.Struct("<II")  # body length, crc32
_MAX_NDIM = 16

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class PayloadError(ValueError):
    """A payload is truncated, corrupted, foreign or inconsistent with the decoding codec."""


@dataclass(frozen=True)
class PayloadHeader:
    """The parsed, verified header of one payload."""

    codec_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    settings: str
    body_len: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def header_nbytes(ndim: int, settings: str) -> int:
    """Exact size in bytes of the envelope around a body, for a tensor of ``ndim`` dims."""
    return _PREFIX.size + 4 * ndim + len(settings.encode("ascii")) + _TRAILER.size


def as_bytes(payload: bytes | bytearray | memoryview | torch.Tensor) -> bytes:
    """Normalise a payload (bytes-like or a uint8 tensor) to ``bytes``.

    Raises:
        PayloadError: if ``payload`` is of another type or a tensor that is not uint8.
    """
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, torch.Tensor):
        if payload.dtype != torch.uint8:
            raise PayloadError(f"payload tensor must be uint8, got {payload.dtype}")
        return payload.detach().cpu().contiguous().numpy().tobytes()
    raise PayloadError(
        f"payload must be bytes, bytearray, memoryview or a uint8 tensor, got {type(payload).__name__}"
    )


def pack_payload(
    codec_id: int, dtype: torch.dtype, shape: tuple[int, ...], settings: str, body: bytes
) -> bytes:
    """Wrap ``body`` in the envelope described in the module docstring."""
    if dtype not in DTYPE_CODES:
        raise TypeError(f"dtype must be in {{{', '.join(map(str, DTYPE_CODES))}}}, got {dtype}")
    if len(shape) > _MAX_NDIM:
        raise ValueError(f"ndim must be in [0, {_MAX_NDIM}], got {len(shape)}")
    s = settings.encode("ascii")
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, codec_id, DTYPE_CODES[dtype], len(shape), len(s))
    head += struct.pack(f"<{len(shape)}I", *shape) + s + struct.pack("<I", len(body))
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + struct.pack("<I", crc) + body


def unpack_payload(
    payload: bytes | bytearray | memoryview | torch.Tensor,
    *,
    codec_id: int | None = None,
    settings: str | None = None,
    check_shape: Callable[[tuple[int, ...]], None] | None = None,
) -> tuple[PayloadHeader, bytes]:
    """Parse and verify an envelope; return its header and body.

    Args:
        payload: the bytes received.
        codec_id: if given, the codec id the payload must carry.
        settings: if given, the settings string the payload must carry (a payload encoded with
            other settings is foreign to this codec).
        check_shape: if given, called with the declared shape as soon as it is parsed, before
            the body is copied or checksummed (it raises :class:`PayloadError` for a shape the
            caller does not accept: a huge declared size costs nothing then).

    Raises:
        PayloadError: naming the first field that is wrong.
    """
    buf = as_bytes(payload)
    n = len(buf)
    if n < _PREFIX.size:
        raise PayloadError(
            f"payload truncated: {n} bytes, the fixed header alone is {_PREFIX.size}"
        )
    magic, version, cid, dcode, ndim, slen = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise PayloadError(
            f"payload magic must be {MAGIC!r}, got {magic!r} (not a thinwire payload)"
        )
    if version != FORMAT_VERSION:
        raise PayloadError(f"payload version must be {FORMAT_VERSION}, got {version}")
    if codec_id is not None and cid != codec_id:
        raise PayloadError(f"payload codec id must be {codec_id}, got {cid}")
    if dcode not in _CODE_DTYPES:
        raise PayloadError(f"payload dtype code must be in {sorted(_CODE_DTYPES)}, got {dcode}")
    if ndim > _MAX_NDIM:
        raise PayloadError(f"payload ndim must be in [0, {_MAX_NDIM}], got {ndim}")
    head_len = _PREFIX.size + 4 * ndim + slen + _TRAILER.size
    if n < head_len:
        raise PayloadError(f"payload truncated: {n} bytes, its header needs {head_len}")
    off = _PREFIX.size
    shape = struct.unpack_from(f"<{ndim}I", buf, off)
    if check_shape is not None:
        check_shape(tuple(shape))
    off += 4 * ndim
    raw_settings = buf[off : off + slen]
    off += slen
    body_len, crc = _TRAILER.unpack_from(buf, off)
    if n != head_len + body_len:
        raise PayloadError(
            f"payload length must be header {head_len} + body {body_len} = "
            f"{head_len + body_len} bytes, got {n}"
        )
    body = buf[head_len:]
    want = zlib.crc32(body, zlib.crc32(buf[: off + 4]))
    if want != crc:
        raise PayloadError(
            f"payload CRC32 mismatch: header says {crc:#010x}, body gives {want:#010x}"
        )
    try:
        text = raw_settings.decode("ascii")
    except UnicodeDecodeError as exc:  # CRC passed, so the sender wrote this: still foreign
        raise PayloadError(f"payload settings are not ASCII: {raw_settings!r}") from exc
    if settings is not None and text != settings:
        raise PayloadError(
            f"payload settings must be {settings!r}, got {text!r} (encoded by another codec)"
        )
    # Found by fuzzing: a header with a valid CRC can still name dims whose product
    # torch cannot index (strides overflow int64 even when a zero dim makes numel 0); decoding
    # then raised TypeError/RuntimeError from reshape. No real tensor has such a shape.
    span = 1
    for d in shape:
        span *= max(d, 1)
    if span >= 2**63:
        raise PayloadError(f"payload shape must have a product of dims below 2**63, got {shape}")
    header = PayloadHeader(cid, _CODE_DTYPES[dcode], tuple(shape), text, body_len)
    return header, body


def body_tensor(body: bytes, start: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor copy of ``body[start:start+nbytes]`` (the caller checked the bounds)."""
    if nbytes == 0:
        # An empty numpy-backed tensor has stride 0, and
        # `.view(torch.float16)` in the cast dequantizer rejects it; a fresh empty tensor is fine.
        return torch.zeros(0, dtype=torch.uint8)
    return torch.from_numpy(np.frombuffer(body, dtype=np.uint8, count=nbytes, offset=start).copy())
