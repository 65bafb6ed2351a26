"""The ``Codec`` interface every thinwire codec implements.

A codec turns a tensor into one self-describing payload (see :mod:`.payload`) and back, and says
exactly how many bytes that payload has from the shape alone. The interface is shaped like
hivemind's ``CompressionBase`` (compress / extract / estimate ratio). Communicators never see a
codec: its payloads travel as bytes (``all_gather_bytes``) or, since ``wire_bytes`` gives their
size from the shape, as equal-size uint8 tensors (``all_gather_into_tensor``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from thinwire.compression.payload import PayloadError, unpack_payload

__all__ = ["Codec", "ShapeLike", "as_shape"]

ShapeLike = int | Sequence[int] | torch.Size


def as_shape(shape: ShapeLike) -> tuple[int, ...]:
    """``n`` -> ``(n,)``; a sequence of non-negative ints -> a tuple."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        dims: tuple[int, ...] = (shape,)
    elif isinstance(shape, Sequence | torch.Size):
        dims = tuple(shape)
    else:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"shape must be in [0, inf) per dimension, got {shape!r}")
    return dims


class Codec(ABC):
    """Encode a tensor into bytes, decode it back, and know the exact size in advance.

    Subclasses define ``codec_id``, ``settings`` (a canonical string of their configuration,
    written into every payload so a payload from another configuration is rejected) and the
    four abstract methods.
    """

    codec_id: int = 0

    @property
    @abstractmethod
    def settings(self) -> str:
        """Canonical text of this codec's configuration, stored in each payload header."""

    @abstractmethod
    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> bytes:
        """Encode ``x`` (float32, float16 or bfloat16, any shape) into one payload."""

    def roundtrip(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[bytes, torch.Tensor]:
        """Encode ``x`` and return the payload with what a receiver will decode (float32).

        Error feedback needs the transmitted value; this default decodes the payload, subclasses
        may return it without the round trip.
        """
        payload = self.encode(x, generator=generator)
        return payload, self.decode(payload)

    @abstractmethod
    def decode(
        self, payload: bytes | bytearray | memoryview | torch.Tensor, numel: int | None = None
    ) -> torch.Tensor:
        """Decode a payload into a float32 tensor of the encoded shape.

        With ``numel`` (the communicator's flat-codec form) the payload must hold exactly that
        many elements and the result is flattened.

        Raises:
            PayloadError: the payload is truncated, corrupted, foreign or inconsistent.
        """

    @abstractmethod
    def body_nbytes(self, shape: tuple[int, ...]) -> int:
        """Exact body size for a tensor of ``shape``."""

    def wire_bytes(self, shape: ShapeLike) -> int:
        """Exact ``len(encode(x))`` for any ``x`` of this shape (an int means a 1-D tensor)."""
        from thinwire.compression.payload import header_nbytes

        dims = as_shape(shape)
        return header_nbytes(len(dims), self.settings) + self.body_nbytes(dims)

    def ratio(self, shape: ShapeLike, dense_bits: int = 32) -> float:
        """Dense size at ``dense_bits`` per element over this codec's wire size."""
        dims = as_shape(shape)
        n = 1
        for d in dims:
            n *= d
        return n * dense_bits / 8 / self.wire_bytes(dims)

    def _open(self, payload: bytes | bytearray | memoryview | torch.Tensor, numel: int | None):
        header, body = unpack_payload(payload, codec_id=self.codec_id, settings=self.settings)
        if numel is not None and header.numel != numel:
            raise PayloadError(f"payload numel must be {numel}, got {header.numel}")
        want = self.body_nbytes(header.shape)
        if len(body) != want:
            raise PayloadError(
                f"payload body must be {want} bytes for shape {header.shape}, got {len(body)}"
            )
        return header, body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"
