"""The bucket envelope: one compact, checksummed frame per bucket, built and opened on device.

An optimizer sends one payload per bucket per sync: a uint8 tensor on the parameters' device
(GPU with NCCL, CPU with gloo). Both sides know the codec settings and the bucket's shapes, so
neither rides the wire; a 4-byte digest of them does, and a payload built from other settings
or other shapes is rejected as foreign. Layout (little-endian), wire format version 2::

    offset  size  field
    0       2     magic b"TW"
    2       1     format version (2)
    3       1     flags: 1 = carries a contribution, 0 = this worker contributes nothing
    4       4     digest: CRC32 of the codec settings and the bucket's shapes
    8       4     body length in bytes
    12      L     body (the codec's bytes)
    12+L    4     CRC32 (zlib polynomial) of every byte before it

16 bytes in all, whatever the bucket holds (version 1 wrote the settings string and the shape
into every per-tensor payload: 87 of the 127 bytes of a 64x64 sign payload). The CRC sits at
the end so it covers one contiguous range. Building a frame needs no host value of the data,
and opening a batch of P frames yields one status code per frame on device: the caller pulls
those few scalars once per bucket, never the payload.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

from thinwire._validate import check_int, check_type
from thinwire.compression.crc import crc32_rows

__all__ = [
    "ENVELOPE_BYTES",
    "WIRE_VERSION",
    "STATUS_OK",
    "STATUS_EMPTY",
    "STATUS_HEADER",
    "STATUS_CRC",
    "STATUS_BODY",
    "STATUS_REASONS",
    "Envelope",
    "layout_digest",
]

MAGIC = b"TW"
WIRE_VERSION = 2
_HEAD = struct.Struct("<2sBBII")  # magic, version, flags, digest, body length
HEADER_BYTES = _HEAD.size  # 12
TRAILER_BYTES = 4
ENVELOPE_BYTES = HEADER_BYTES + TRAILER_BYTES
_FLAGS_OFFSET = 3

#: Status codes of :meth:`Envelope.open_rows`, one per frame.
STATUS_OK = 0
STATUS_EMPTY = 1  # a valid frame whose sender contributes nothing this round
STATUS_HEADER = 2  # wrong magic, version, flags, digest or length: foreign or corrupted
STATUS_CRC = 3  # header as expected but the checksum fails: corrupted in transit
STATUS_BODY = 4  # checksum passes but the body does not decode (set by the codec's decoder)
STATUS_REASONS = {
    STATUS_OK: "ok",
    STATUS_EMPTY: "no contribution",
    STATUS_HEADER: "foreign or corrupted header (magic, version, digest or length)",
    STATUS_CRC: "CRC32 mismatch (corrupted in transit)",
    STATUS_BODY: "body does not decode (codes, indices or values out of range, or non-finite)",
}


def layout_digest(settings: str, shapes: Sequence[tuple[int, ...]]) -> int:
    """32-bit digest of a codec's settings and a bucket's shapes (what both sides must share)."""
    check_type("settings", settings, str)
    text = settings + "|" + ";".join("x".join(str(d) for d in s) for s in shapes)
    return zlib.crc32(text.encode("ascii"))


class Envelope:
    """Seal bodies into frames and open batches of received frames, for one bucket layout.

    Args:
        digest: :func:`layout_digest` of the codec settings and the bucket shapes.
        body_len: exact body size in bytes (the codec's, from the shapes alone).
    """

    def __init__(self, digest: int, body_len: int) -> None:
        self.digest = check_int("digest", digest, 0, 2**32 - 1)
        self.body_len = check_int("body_len", body_len, 0, 2**32 - 1)
        self.nbytes = ENVELOPE_BYTES + self.body_len
        self._heads: dict[tuple[torch.device, int], Tensor] = {}

    def _head(self, device: torch.device, flags: int) -> Tensor:
        key = (device, flags)
        if key not in self._heads:
            raw = _HEAD.pack(MAGIC, WIRE_VERSION, flags, self.digest, self.body_len)
            self._heads[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
        return self._heads[key]

    def seal(self, body: Tensor, contributes: Tensor | bool = True) -> Tensor:
        """Frame ``body`` (uint8, ``body_len`` bytes) on its own device.

        ``contributes`` may be a device bool: a worker whose update turned out non-finite sends
        a frame with flag 0 and an all-zero body, decided on device without a host round trip.
        """
        check_type("body", body, Tensor)
        if body.dtype != torch.uint8 or body.numel() != self.body_len:
            raise ValueError(
                f"body must be uint8 with {self.body_len} bytes, got {body.dtype} with "
                f"{body.numel()}"
            )
        dev = body.device
        if isinstance(contributes, bool):
            head = self._head(dev, int(contributes))
            if not contributes:
                body = torch.zeros_like(body)
        else:
            head = torch.where(contributes, self._head(dev, 1), self._head(dev, 0))
            body = torch.where(contributes, body.reshape(-1), torch.zeros_like(body.reshape(-1)))
        frame = torch.empty(self.nbytes, dtype=torch.uint8, device=dev)
        frame[:HEADER_BYTES] = head
        frame[HEADER_BYTES : HEADER_BYTES + self.body_len] = body.reshape(-1)
        crc = crc32_rows(frame[None, : HEADER_BYTES + self.body_len])[0]
        shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=dev)
        frame[HEADER_BYTES + self.body_len :] = ((crc >> shifts) & 0xFF).to(torch.uint8)
        return frame

    def open_rows(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Check a batch of received frames ``(P, nbytes)``; return ``(bodies, status)``.

        ``bodies`` is a ``(P, body_len)`` view; ``status`` an int64 ``(P,)`` device tensor of
        :data:`STATUS_OK`, :data:`STATUS_EMPTY`, :data:`STATUS_HEADER` or :data:`STATUS_CRC`.
        Nothing is pulled to the host; a frame of the wrong size for every row raises at once
        (the sizes are known to every rank, so that is a caller's error, not a peer's).
        """
        check_type("frames", frames, Tensor)
        if frames.dtype != torch.uint8 or frames.ndim != 2 or frames.shape[1] != self.nbytes:
            raise ValueError(
                f"frames must be uint8 of shape (P, {self.nbytes}), got {frames.dtype} "
                f"{tuple(frames.shape)}"
            )
        dev = frames.device
        head = frames[:, :HEADER_BYTES]
        want = self._head(dev, 1)
        flags = head[:, _FLAGS_OFFSET]
        others = torch.cat([head[:, :_FLAGS_OFFSET], head[:, _FLAGS_OFFSET + 1 :]], dim=1)
        want_others = torch.cat([want[:_FLAGS_OFFSET], want[_FLAGS_OFFSET + 1 :]])
        header_ok = (others == want_others).all(dim=1) & (flags <= 1)
        end = HEADER_BYTES + self.body_len
        shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=dev)
        stored = (frames[:, end:].to(torch.int64) << shifts).sum(dim=1)
        crc_ok = crc32_rows(frames[:, :end]) == stored
        status = torch.full((frames.shape[0],), STATUS_OK, dtype=torch.int64, device=dev)
        status = torch.where(flags == 0, STATUS_EMPTY, status)
        status = torch.where(crc_ok, status, STATUS_CRC)
        status = torch.where(header_ok, status, STATUS_HEADER)
        return frames[:, HEADER_BYTES:end], status
