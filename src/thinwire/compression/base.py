"""The ``Codec`` interface every thinwire codec implements.

A codec turns a tensor into one self-describing payload (see :mod:`.payload`) and back, and says
exactly how many bytes that payload has from the shape alone. The interface is shaped like
hivemind's ``CompressionBase`` (compress / extract / estimate ratio). Communicators never see a
codec: its payloads travel as bytes (``all_gather_bytes``) or, since ``wire_bytes`` gives their
size from the shape, as equal-size uint8 tensors (``all_gather_into_tensor``).

Decoding is bounded. A payload's header names the shape of the tensor it decodes to, and a few
hundred kilobytes of valid sparse payload can name a tensor of billions of elements, so a decoder
never trusts that shape alone: the caller states what it expects (``shape=`` or ``numel=``), or
the decoded size is capped at ``max_numel`` elements (default :data:`DEFAULT_MAX_NUMEL`). A
payload outside those bounds raises :class:`~thinwire.compression.payload.PayloadError` before
anything of the declared size is allocated.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from thinwire._validate import check_int
from thinwire.compression.payload import PayloadError, unpack_payload

__all__ = ["Codec", "DEFAULT_MAX_NUMEL", "ShapeLike", "as_shape"]

ShapeLike = int | Sequence[int] | torch.Size

#: Elements a decode accepts when the caller gives neither ``shape`` nor ``numel``: 2**28, so the
#: float32 result is at most 1 GiB. Pass ``shape=`` (or ``numel=``) to decode a known larger
#: tensor, or ``max_numel=`` to move the cap.
DEFAULT_MAX_NUMEL = 2**28


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
        self,
        payload: bytes | bytearray | memoryview | torch.Tensor,
        numel: int | None = None,
        *,
        shape: ShapeLike | None = None,
        max_numel: int | None = None,
    ) -> torch.Tensor:
        """Decode a payload into a float32 tensor of the encoded shape.

        The shape in the payload's header is checked against what the caller expects before
        anything of that size is allocated (see the module docstring).

        Args:
            payload: the bytes received.
            numel: the payload must hold exactly this many elements; the result is flattened
                (the communicator's flat-codec form).
            shape: the payload must have exactly this shape (an int means a 1-D tensor).
            max_numel: the payload may hold at most this many elements. Default: no cap beyond
                ``shape``/``numel`` when either is given, else :data:`DEFAULT_MAX_NUMEL`.

        Raises:
            PayloadError: the payload is truncated, corrupted, foreign, inconsistent, of another
                shape or element count than expected, or larger than the cap.
            ValueError: ``numel`` and ``shape`` disagree, or an argument is out of range.
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

    def _open(
        self,
        payload: bytes | bytearray | memoryview | torch.Tensor,
        numel: int | None,
        shape: ShapeLike | None = None,
        max_numel: int | None = None,
    ):
        """Unpack and verify ``payload``; check its shape against the caller's bounds.

        Every check here reads only the header, so an oversized or unexpected shape is rejected
        before a decoder allocates anything of that size.
        """
        if numel is not None:
            check_int("numel", numel, 0)
        dims = None if shape is None else as_shape(shape)
        if dims is not None and numel is not None and math.prod(dims) != numel:
            raise ValueError(
                f"numel must be the product of shape {dims} ({math.prod(dims)}), got {numel}"
            )
        if max_numel is not None:
            check_int("max_numel", max_numel, 0)
        elif dims is None and numel is None:
            max_numel = DEFAULT_MAX_NUMEL

        def bounded(declared: tuple[int, ...]) -> None:
            # Runs on the declared shape before the body is sliced or checksummed.
            n = math.prod(declared)
            if dims is not None and declared != dims:
                raise PayloadError(f"payload shape must be {dims}, got {declared}")
            if numel is not None and n != numel:
                raise PayloadError(f"payload numel must be {numel}, got {n}")
            if max_numel is not None and n > max_numel:
                raise PayloadError(
                    f"payload numel must be in [0, {max_numel}] (max_numel), got {n} for shape "
                    f"{declared}; pass shape= or max_numel= to decode a larger tensor"
                )

        header, body = unpack_payload(
            payload, codec_id=self.codec_id, settings=self.settings, check_shape=bounded
        )
        want = self.body_nbytes(header.shape)
        if len(body) != want:
            raise PayloadError(
                f"payload body must be {want} bytes for shape {header.shape}, got {len(body)}"
            )
        return header, body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"
