"""The bucket frame: a body and one keyed CRC32, built and checked on the body's device.

An optimizer sends one frame per bucket per sync: a uint8 tensor on the parameters' device (GPU
with NCCL, CPU with gloo). Both sides know the codec settings and the bucket's shapes, so the
body's length and layout never ride the wire, and neither does a settings string. What does is
four bytes::

    offset  size  field
    0       L     body (the codec's bytes; L is fixed by the settings and the shapes)
    L       4     CRC32 (zlib polynomial, little-endian) of key || body

where ``key = b"TW" | wire format version (2) | flag | digest`` is never sent: ``digest`` is the
CRC32 of the codec settings and the bucket's shapes (:func:`layout_digest`), ``flag`` is 1 when
the sender contributes and 0 when it contributes nothing this round (its body is then all zero).
A receiver recomputes the CRC under both flags: a match says whether the sender contributes;
no match means the frame was corrupted in transit or built with another wire version, other
settings or other shapes, and it is dropped. Version 1 put a 20+ byte header and the settings
text on every per-tensor payload (87 of the 127 bytes of a 64x64 sign payload); a frame spends 4
bytes per bucket, whatever the bucket holds.

The key is folded in without touching the body twice: CRC32 is affine, so
``crc32(key || body) = crc32(body) XOR shift_L(crc32(key))`` where ``shift_L`` runs a CRC
register through ``L`` zero bytes; that constant is computed once per (key, L) on the host.
Sealing and opening therefore need no host value of the data: opening a batch of P frames
yields one status per frame on device, which the caller reads once per bucket.
"""

from __future__ import annotations

import functools
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
    "STATUS_CRC",
    "STATUS_BODY",
    "STATUS_REASONS",
    "Envelope",
    "layout_digest",
]

WIRE_VERSION = 2
_KEY = struct.Struct("<2sBBI")  # b"TW", version, flag, digest: hashed, never sent
ENVELOPE_BYTES = 4  # the CRC32

#: Status codes of :meth:`Envelope.open_rows`, one per frame.
STATUS_OK = 0
STATUS_EMPTY = 1  # a valid frame whose sender contributes nothing this round
STATUS_CRC = 3  # neither key matches: corrupted, or another version, settings or shapes
STATUS_BODY = 4  # the CRC matches but the body does not decode (set by the codec's decoder)
STATUS_REASONS = {
    STATUS_OK: "ok",
    STATUS_EMPTY: "no contribution",
    STATUS_CRC: "CRC32 mismatch (corrupted in transit, or built with another wire version, "
    "other codec settings or other tensor shapes)",
    STATUS_BODY: "body does not decode (codes, indices or values out of range, or non-finite)",
}


def layout_digest(settings: str, shapes: Sequence[tuple[int, ...]]) -> int:
    """32-bit digest of a codec's settings and a bucket's shapes (what both sides must share)."""
    check_type("settings", settings, str)
    text = settings + "|" + ";".join("x".join(str(d) for d in s) for s in shapes)
    return zlib.crc32(text.encode("ascii"))


@functools.cache
def _key_term(digest: int, flag: int, body_len: int) -> int:
    """``shift_L(crc32(key))``: what the unsent key adds to ``crc32(body)`` (host, cached)."""
    c = zlib.crc32(_KEY.pack(b"TW", WIRE_VERSION, flag, digest))
    zeros = bytes(body_len)
    return zlib.crc32(zeros, c) ^ zlib.crc32(zeros)


class Envelope:
    """Seal bodies into frames and check batches of received frames, for one bucket layout.

    Args:
        digest: :func:`layout_digest` of the codec settings and the bucket shapes.
        body_len: exact body size in bytes (the codec's, from the shapes alone).
    """

    def __init__(self, digest: int, body_len: int) -> None:
        self.digest = check_int("digest", digest, 0, 2**32 - 1)
        self.body_len = check_int("body_len", body_len, 0, 2**32 - 1)
        self.nbytes = self.body_len + ENVELOPE_BYTES
        self._terms = (_key_term(digest, 0, body_len), _key_term(digest, 1, body_len))

    def seal(self, body: Tensor, contributes: Tensor | bool = True) -> Tensor:
        """Frame ``body`` (uint8, ``body_len`` bytes) on its own device.

        ``contributes`` may be a device bool: a worker whose update turned out non-finite sends
        an all-zero body under flag 0, decided on device without a host round trip.
        """
        check_type("body", body, Tensor)
        if body.dtype != torch.uint8 or body.numel() != self.body_len:
            raise ValueError(
                f"body must be uint8 with {self.body_len} bytes, got {body.dtype} with "
                f"{body.numel()}"
            )
        dev = body.device
        flat = body.reshape(-1)
        frame = torch.empty(self.nbytes, dtype=torch.uint8, device=dev)
        if isinstance(contributes, bool):
            frame[: self.body_len] = flat if contributes else 0
            term = torch.tensor(self._terms[int(contributes)], dtype=torch.int64, device=dev)
        else:
            frame[: self.body_len] = torch.where(contributes, flat, torch.zeros_like(flat))
            t0, t1 = self._terms
            term = torch.where(contributes, t1, t0).to(torch.int64)
        crc = crc32_rows(frame[None, : self.body_len])[0] ^ term
        shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=dev)
        frame[self.body_len :] = ((crc >> shifts) & 0xFF).to(torch.uint8)
        return frame

    def open_rows(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Check a batch of received frames ``(P, nbytes)``; return ``(bodies, status)``.

        ``bodies`` is a ``(P, body_len)`` view; ``status`` an int64 ``(P,)`` device tensor of
        :data:`STATUS_OK`, :data:`STATUS_EMPTY` or :data:`STATUS_CRC`. Nothing is read back to
        the host. A batch of the wrong size raises at once: the sizes are known to every rank,
        so that is a caller's error, not a peer's.
        """
        check_type("frames", frames, Tensor)
        if frames.dtype != torch.uint8 or frames.ndim != 2 or frames.shape[1] != self.nbytes:
            raise ValueError(
                f"frames must be uint8 of shape (P, {self.nbytes}), got {frames.dtype} "
                f"{tuple(frames.shape)}"
            )
        dev = frames.device
        L = self.body_len
        shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=dev)
        stored = (frames[:, L:].to(torch.int64) << shifts).sum(dim=1)
        crc = crc32_rows(frames[:, :L])
        t0, t1 = self._terms
        status = torch.full((frames.shape[0],), STATUS_CRC, dtype=torch.int64, device=dev)
        status = torch.where(stored == crc ^ t0, STATUS_EMPTY, status)
        status = torch.where(stored == crc ^ t1, STATUS_OK, status)
        return frames[:, :L], status
