"""Bit packing of small integer codes and fixed-width unsigned integers into ``uint8`` buffers.

Everything here is vectorised torch (at most one Python loop over bit positions, never over
elements) and runs on whatever device the input lives on. One bit order is used throughout,
least-significant bit first (spec ``demo_sparseloco.md`` §2.4, following Psyche's
``serializable_tensor.rs`` code rather than its doc comment):

* the packed stream is a sequence of bits; stream bit ``s`` lives in byte ``s // 8`` at bit
  ``s % 8``;
* value ``i`` of width ``w`` occupies stream bits ``[i*w, (i+1)*w)``, its bit ``j`` at stream bit
  ``i*w + j``;
* the stream is padded with zero bits to a whole number of bytes, and unpacking rejects a buffer
  whose padding bits are not zero, so every valid buffer has exactly one decoding and re-encoding
  reproduces it byte for byte.

Public ops:

* :func:`pack_bits` / :func:`unpack_bits` / :func:`packed_nbytes`: codes of 1, 2, 4 or 8 bits
  (sign bits, 2-bit centroid codes; spec §4.1 value codecs), a fast path that shifts whole bytes.
* :func:`pack_uint` / :func:`unpack_uint` / :func:`uint_nbytes`: any width in 1..32 (the ``fixed``
  index codec of spec §4.1), built on single bits; for widths 1, 2, 4 and 8 it produces the same
  bytes as :func:`pack_bits`, its slow twin.
* :func:`pack12_pairs` / :func:`unpack12_pairs`: templar's 12-bit pair layout (spec §4.1
  ``pack12``, parity A6); for an even count it equals ``pack_uint(idx, 12)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from thinwire._validate import check_choice, check_dtype, check_int, check_type

__all__ = [
    "PACK_BITS_WIDTHS",
    "MAX_UINT_WIDTH",
    "pack_bits",
    "unpack_bits",
    "packed_nbytes",
    "pack_uint",
    "unpack_uint",
    "uint_nbytes",
    "pack12_pairs",
    "unpack12_pairs",
]

# Widths that divide a byte, so codes never straddle a byte boundary (spec §4.1: `8/b` codes per
# byte for the sign and centroid value codecs).
PACK_BITS_WIDTHS = (1, 2, 4, 8)
# Widest field pack_uint accepts: values are handled as int64, and 32 bits covers every index of a
# chunk up to 2^32 elements (spec §2.4 narrows indices to at most u32).
MAX_UINT_WIDTH = 32
# templar's pair packing handles indices of 12 bits, i.e. chunks of at most 64*64 elements
# (spec §4.1 pack12, A6 `compress.py`).
_PACK12_BITS = 12

_CODE_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_codes(name: str, codes: Tensor, width: int) -> Tensor:
    """Validate an integer tensor whose values must fit ``width`` bits; return it flat (same dtype)."""
    check_type(name, codes, Tensor)
    check_dtype(f"{name}.dtype", codes.dtype, _CODE_DTYPES)
    flat = codes.reshape(-1)
    if flat.numel() > 0:
        lo, hi = int(flat.min()), int(flat.max())
        top = (1 << width) - 1
        if lo < 0 or hi > top:
            raise ValueError(
                f"{name} must be in [0, 2^bits - 1] = [0, {top}] for bits={width}, "
                f"got values in [{lo}, {hi}]"
            )
    return flat


def _check_buffer(buf: Tensor, expected_len: int, what: str) -> None:
    check_type("buf", buf, Tensor)
    check_dtype("buf.dtype", buf.dtype, (torch.uint8,))
    if buf.dim() != 1:
        raise ValueError(f"buf must be a 1-D uint8 tensor, got shape {tuple(buf.shape)}")
    if buf.numel() != expected_len:
        raise ValueError(
            f"buf must have exactly {expected_len} bytes for {what}, got {buf.numel()} bytes"
        )


def _check_padding(buf: Tensor, nbits: int) -> None:
    """Reject a buffer whose bits past the first ``nbits`` (the zero padding) are not zero."""
    used = nbits % 8
    if used and int(buf[-1]) >> used:
        raise ValueError(
            f"buf padding bits must be zero, got last byte {int(buf[-1]):#04x} "
            f"with only its low {used} bits in use"
        )


def _pack_bits_unchecked(codes: Tensor, bits: int) -> Tensor:
    """Pack a flat tensor of codes already known to lie in ``[0, 2^bits)``."""
    per_byte = 8 // bits
    n = codes.numel()
    nbytes = _ceil_div(n * bits, 8)
    padded = torch.zeros(nbytes * per_byte, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes
    groups = padded.view(nbytes, per_byte)
    out = groups[:, 0].clone()
    # Slot j of a byte holds the code at bits [j*bits, (j+1)*bits); codes < 2^bits, so the shifted
    # slots are disjoint and OR never carries.
    for j in range(1, per_byte):
        out |= groups[:, j] << (j * bits)
    return out


def _unpack_bits_unchecked(buf: Tensor, bits: int) -> Tensor:
    """Every code slot of ``buf`` (``len(buf) * 8 / bits`` codes, padding included), as uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=buf.device)
    mask = (1 << bits) - 1
    return ((buf.unsqueeze(1) >> shifts) & mask).reshape(-1)


def packed_nbytes(n: int, bits: int) -> int:
    """Exact size of :func:`pack_bits` output: ``ceil(n * bits / 8)`` bytes.

    Args:
        n: number of codes, ``>= 0``.
        bits: bits per code, one of 1, 2, 4, 8.

    Returns:
        The byte count.

    Raises:
        ValueError: ``n`` negative or ``bits`` not in {1, 2, 4, 8}.
    """
    check_int("n", n, 0)
    check_choice("bits", bits, PACK_BITS_WIDTHS)
    return _ceil_div(n * bits, 8)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack codes of ``bits`` bits each into bytes, least-significant bit first (spec §2.4, §4.1).

    Code ``i`` goes to bits ``[(i*bits) % 8, (i*bits) % 8 + bits)`` of byte ``(i*bits) // 8``;
    padding bits in the last byte are zero. Golden values (spec §7 item 9): signs
    ``[0,1,1,0,1,1,1,0]`` -> ``0x76``; 2-bit codes ``[1,3,0,2]`` -> ``0x8d``.

    Args:
        codes: integer codes of any shape (flattened row-major), dtype bool, uint8, int8, int16,
            int32 or int64, each in ``[0, 2^bits - 1]``.
        bits: bits per code, one of 1, 2, 4, 8.

    Returns:
        1-D uint8 tensor of ``packed_nbytes(codes.numel(), bits)`` bytes on ``codes.device``.

    Raises:
        TypeError: ``codes`` is not a tensor of an accepted dtype.
        ValueError: ``bits`` not in {1, 2, 4, 8}, or a code is outside ``[0, 2^bits - 1]``.
    """
    check_choice("bits", bits, PACK_BITS_WIDTHS)
    flat = _check_codes("codes", codes, bits)
    return _pack_bits_unchecked(flat.to(torch.uint8), bits)


def unpack_bits(buf: Tensor, bits: int, n: int) -> Tensor:
    """Exact inverse of :func:`pack_bits`.

    Args:
        buf: 1-D uint8 tensor of exactly ``packed_nbytes(n, bits)`` bytes whose padding bits are
            zero.
        bits: bits per code, one of 1, 2, 4, 8.
        n: number of codes to recover, ``>= 0``.

    Returns:
        1-D uint8 tensor of ``n`` codes on ``buf.device``.

    Raises:
        TypeError: ``buf`` is not a uint8 tensor.
        ValueError: bad ``bits`` or ``n``; ``buf`` not 1-D, of the wrong length, or with nonzero
            padding bits.
    """
    nbytes = packed_nbytes(n, bits)
    _check_buffer(buf, nbytes, f"n={n} codes of {bits} bits")
    _check_padding(buf, n * bits)
    return _unpack_bits_unchecked(buf, bits)[:n]


def uint_nbytes(n: int, width: int) -> int:
    """Exact size of :func:`pack_uint` output: ``ceil(n * width / 8)`` bytes.

    Args:
        n: number of values, ``>= 0``.
        width: bits per value, in ``[1, 32]``.

    Returns:
        The byte count.

    Raises:
        ValueError: ``n`` negative or ``width`` outside ``[1, 32]``.
    """
    check_int("n", n, 0)
    check_int("width", width, 1, MAX_UINT_WIDTH)
    return _ceil_div(n * width, 8)


def pack_uint(values: Tensor, width: int) -> Tensor:
    """Write unsigned integers as a fixed-width, LSB-first bit stream (spec §4.1 ``fixed``).

    Value ``i`` occupies stream bits ``[i*width, (i+1)*width)``, its bit ``j`` at stream bit
    ``i*width + j``; stream bit ``s`` is bit ``s % 8`` of byte ``s // 8``; padding bits are zero.
    For ``width`` in {1, 2, 4, 8} the bytes equal :func:`pack_bits`.

    Memory: one uint8 per stream bit plus one int64 temporary of ``values.numel()`` elements.

    Args:
        values: integers of any shape (flattened row-major), dtype bool, uint8, int8, int16, int32
            or int64, each in ``[0, 2^width - 1]``.
        width: bits per value, in ``[1, 32]``.

    Returns:
        1-D uint8 tensor of ``uint_nbytes(values.numel(), width)`` bytes on ``values.device``.

    Raises:
        TypeError: ``values`` is not a tensor of an accepted dtype.
        ValueError: ``width`` outside ``[1, 32]`` or a value outside ``[0, 2^width - 1]``.
    """
    check_int("width", width, 1, MAX_UINT_WIDTH)
    flat = _check_codes("values", values, width).to(torch.int64)
    n = flat.numel()
    bit_matrix = torch.empty(n, width, dtype=torch.uint8, device=flat.device)
    for j in range(width):
        bit_matrix[:, j] = (flat >> j) & 1
    return _pack_bits_unchecked(bit_matrix.reshape(-1), 1)


def unpack_uint(buf: Tensor, width: int, n: int) -> Tensor:
    """Exact inverse of :func:`pack_uint`.

    Args:
        buf: 1-D uint8 tensor of exactly ``uint_nbytes(n, width)`` bytes whose padding bits are
            zero.
        width: bits per value, in ``[1, 32]``.
        n: number of values to recover, ``>= 0``.

    Returns:
        1-D int64 tensor of ``n`` values on ``buf.device``.

    Raises:
        TypeError: ``buf`` is not a uint8 tensor.
        ValueError: bad ``width`` or ``n``; ``buf`` not 1-D, of the wrong length, or with nonzero
            padding bits.
    """
    nbytes = uint_nbytes(n, width)
    _check_buffer(buf, nbytes, f"n={n} values of width {width}")
    _check_padding(buf, n * width)
    bit_matrix = _unpack_bits_unchecked(buf, 1)[: n * width].view(n, width)
    out = torch.zeros(n, dtype=torch.int64, device=buf.device)
    for j in range(width):
        out |= bit_matrix[:, j].to(torch.int64) << j
    return out


def _check_pack12_count(n: int) -> None:
    if n % 2:
        raise ValueError(f"idx must have an even number of elements for pack12, got {n}")


def pack12_pairs(idx: Tensor) -> Tensor:
    """templar's 12-bit index pair packing (spec §4.1 ``pack12``, parity A6 ``compress.py``).

    Each pair ``(a, b)`` becomes 3 bytes ``[a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4]``;
    ``(0xABC, 0x123)`` -> ``bc 3a 12``. The layout is the LSB-first 12-bit stream, so the bytes
    equal ``pack_uint(idx, 12)``.

    Args:
        idx: integer indices of any shape (flattened row-major), an even count, each in
            ``[0, 4095]``.

    Returns:
        1-D uint8 tensor of ``3 * idx.numel() // 2`` bytes on ``idx.device``.

    Raises:
        TypeError: ``idx`` is not a tensor of an accepted integer dtype.
        ValueError: odd count or an index outside ``[0, 4095]``.
    """
    flat = _check_codes("idx", idx, _PACK12_BITS).to(torch.int64)
    _check_pack12_count(flat.numel())
    pairs = flat.view(-1, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    out = torch.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], dim=1)
    return out.to(torch.uint8).reshape(-1)


def unpack12_pairs(buf: Tensor, n: int) -> Tensor:
    """Exact inverse of :func:`pack12_pairs`.

    Args:
        buf: 1-D uint8 tensor of exactly ``3 * n // 2`` bytes.
        n: number of indices, even and ``>= 0``.

    Returns:
        1-D int64 tensor of ``n`` indices in ``[0, 4095]`` on ``buf.device``.

    Raises:
        TypeError: ``buf`` is not a uint8 tensor.
        ValueError: ``n`` negative or odd; ``buf`` not 1-D or of the wrong length.
    """
    check_int("n", n, 0)
    _check_pack12_count(n)
    _check_buffer(buf, 3 * n // 2, f"n={n} pack12 indices")
    triples = buf.view(-1, 3).to(torch.int64)
    b0, b1, b2 = triples[:, 0], triples[:, 1], triples[:, 2]
    a = b0 | ((b1 & 0xF) << 8)
    b = (b1 >> 4) | (b2 << 4)
    return torch.stack([a, b], dim=1).reshape(-1)
