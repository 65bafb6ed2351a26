"""Bit packing of small integer codes and fixed-width unsigned integers into ``uint8`` buffers.

Everything here is vectorised torch (at most one Python loop over bit positions, never over
elements) and runs on whatever device the input lives on. One bit order is used throughout,
least-significant bit first (as Psyche's ``serializable_tensor.rs`` code does, whatever its doc
comment draws):

* the packed stream is a sequence of bits; stream bit ``s`` lives in byte ``s // 8`` at bit
  ``s % 8``;
* value ``i`` of width ``w`` occupies stream bits ``[i*w, (i+1)*w)``, its bit ``j`` at stream bit
  ``i*w + j``;
* the stream is padded with zero bits to a whole number of bytes, and unpacking rejects a buffer
  whose padding bits are not zero, so every valid buffer has exactly one decoding and re-encoding
  reproduces it byte for byte.

Public ops:

* :func:`pack_bits` / :func:`unpack_bits` / :func:`packed_nbytes`: codes of 1, 2, 4 or 8 bits
  (sign bits, 2-bit centroid codes), a fast path that shifts whole bytes.
* :func:`pack_uint` / :func:`unpack_uint` / :func:`uint_nbytes`: any width in 1..32 (the ``fixed``
  index codec), built on single bits; for widths 1, 2, 4 and 8 it produces the same
  bytes as :func:`pack_bits`, its slow twin.
* :func:`pack12_pairs` / :func:`unpack12_pairs`: templar's 12-bit pair layout (``pack12``, as
  templar's ``compress.py``); for an even count it equals ``pack_uint(idx, 12)``.

Batched, unchecked row ops for code running inside an optimizer step, where reading a tensor's
values on the host (``.item()``, ``int(t)``, ``nonzero()``) would stall the device:
:func:`pack_bits_rows` / :func:`unpack_bits_rows`, :func:`pack_uint_rows` /
:func:`unpack_uint_rows` and :func:`padding_ok_rows`. They treat each row of an ``(R, ...)``
tensor as one independent stream with exactly the byte layout above, check only shapes (Python
ints), and report bad padding as a device bool per row instead of raising. The checked
single-stream functions are these row ops on one row plus their validation.
"""

from __future__ import annotations

import functools

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
    "pack_bits_rows",
    "unpack_bits_rows",
    "pack_uint_rows",
    "unpack_uint_rows",
    "padding_ok_rows",
]

# Widths that divide a byte, so codes never straddle a byte boundary (`8/b` codes per byte for
# the sign and centroid value codecs).
PACK_BITS_WIDTHS = (1, 2, 4, 8)
# Widest field pack_uint accepts: values are handled as int64, and 32 bits covers every index of a
# chunk up to 2^32 elements (Psyche narrows indices to at most u32).
MAX_UINT_WIDTH = 32
# templar's pair packing handles indices of 12 bits, i.e. chunks of at most 64*64 elements
# (templar's `compress.py`).
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


def _check_rows(name: str, t: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """Shape/dtype checks of a row op's input (metadata only: nothing is read from the device)."""
    check_type(name, t, Tensor)
    check_dtype(f"{name}.dtype", t.dtype, dtypes)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, elements), got shape {tuple(t.shape)}")


def _check_row_bytes(buf: Tensor, expected: int, what: str) -> None:
    _check_rows("buf", buf, (torch.uint8,))
    if buf.shape[1] != expected:
        raise ValueError(
            f"buf rows must have exactly {expected} bytes for {what}, got shape {tuple(buf.shape)}"
        )


def pack_bits_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack each row of ``codes`` like :func:`pack_bits`, without checking the code values.

    Sync-free: only shapes are inspected. Codes must already lie in ``[0, 2^bits)``; any higher
    bits are masked off (a valid code is unchanged), so a bad code cannot spill into its
    neighbours.

    Args:
        codes: ``(R, n)`` uint8 codes, one stream per row.
        bits: bits per code, one of 1, 2, 4, 8.

    Returns:
        ``(R, packed_nbytes(n, bits))`` uint8 on ``codes.device``; row ``r`` equals
        ``pack_bits(codes[r], bits)``.

    Raises:
        TypeError: ``codes`` is not a uint8 tensor. ValueError: not 2-D, or bad ``bits``.
    """
    check_choice("bits", bits, PACK_BITS_WIDTHS)
    _check_rows("codes", codes, (torch.uint8,))
    rows, n = codes.shape
    per_byte = 8 // bits
    nbytes = _ceil_div(n * bits, 8)
    padded = torch.zeros(rows, nbytes * per_byte, dtype=torch.uint8, device=codes.device)
    padded[:, :n] = codes if bits == 8 else codes & ((1 << bits) - 1)
    groups = padded.view(rows, nbytes, per_byte)
    out = groups[:, :, 0].clone()
    # Slot j of a byte holds the code at bits [j*bits, (j+1)*bits); codes < 2^bits, so the shifted
    # slots are disjoint and OR never carries.
    for j in range(1, per_byte):
        out |= groups[:, :, j] << (j * bits)
    return out


# An integer dtype as wide as the ``8 / bits`` one-byte slots of a byte, for bits 1, 2, 4.
_SLOTS_DTYPE = {8: torch.int64, 4: torch.int32, 2: torch.int16}


@functools.cache
def _slot_table(bits: int, device: torch.device) -> Tensor:
    """``(256,)``: entry ``b`` holds the ``8 / bits`` codes of byte ``b``, one per byte, in a
    single integer of that many bytes (only ever reinterpreted as bytes, never read as a number,
    so the host's byte order does not matter)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    codes = (torch.arange(256, dtype=torch.uint8)[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.contiguous().view(_SLOTS_DTYPE[8 // bits]).reshape(256).to(device)


def _unpack_slots(buf: Tensor, bits: int) -> Tensor:
    """Every code slot of each row (``8 / bits`` per byte, padding included): ``(R, nb * 8/bits)``.

    One table lookup per byte: on CPU several times faster than shifting each slot out.
    """
    rows, nbytes = buf.shape
    slots = _slot_table(bits, buf.device).index_select(0, buf.int().reshape(-1))
    return slots.view(torch.uint8).view(rows, nbytes * (8 // bits))


def unpack_bits_rows(buf: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits_rows`; padding bits are ignored (see :func:`padding_ok_rows`).

    Args:
        buf: ``(R, packed_nbytes(n, bits))`` uint8.
        bits: bits per code, one of 1, 2, 4, 8.
        n: codes per row, ``>= 0``.

    Returns:
        ``(R, n)`` uint8 codes on ``buf.device``.

    Raises:
        TypeError: ``buf`` is not uint8. ValueError: bad ``bits``/``n`` or row length.
    """
    nbytes = packed_nbytes(n, bits)
    _check_row_bytes(buf, nbytes, f"n={n} codes of {bits} bits")
    if bits == 8:
        return buf.clone()
    return _unpack_slots(buf, bits)[:, :n]


def pack_uint_rows(values: Tensor, width: int) -> Tensor:
    """Pack each row of ``values`` like :func:`pack_uint`, without checking the values.

    Sync-free. Values must lie in ``[0, 2^width)``; only their low ``width`` bits are written.

    Args:
        values: ``(R, n)`` integer tensor (bool, uint8, int8, int16, int32 or int64).
        width: bits per value, in ``[1, 32]``.

    Returns:
        ``(R, uint_nbytes(n, width))`` uint8 on ``values.device``; row ``r`` equals
        ``pack_uint(values[r], width)``.

    Raises:
        TypeError: not an integer tensor. ValueError: not 2-D, or ``width`` out of range.
    """
    check_int("width", width, 1, MAX_UINT_WIDTH)
    _check_rows("values", values, _CODE_DTYPES)
    rows, n = values.shape
    vals = values.to(torch.int64)
    # One uint8 per stream bit: column i*width + j of a row is bit j of value i.
    bit_matrix = torch.empty(rows, n, width, dtype=torch.uint8, device=values.device)
    for j in range(width):
        bit_matrix[:, :, j] = (vals >> j) & 1
    return pack_bits_rows(bit_matrix.view(rows, n * width), 1)


def unpack_uint_rows(buf: Tensor, width: int, n: int) -> Tensor:
    """Inverse of :func:`pack_uint_rows`; padding bits are ignored (see :func:`padding_ok_rows`).

    Args:
        buf: ``(R, uint_nbytes(n, width))`` uint8.
        width: bits per value, in ``[1, 32]``.
        n: values per row, ``>= 0``.

    Returns:
        ``(R, n)`` int64 values in ``[0, 2^width)`` on ``buf.device``.

    Raises:
        TypeError: ``buf`` is not uint8. ValueError: bad ``width``/``n`` or row length.
    """
    nbytes = uint_nbytes(n, width)
    _check_row_bytes(buf, nbytes, f"n={n} values of width {width}")
    rows = buf.shape[0]
    bit_matrix = _unpack_slots(buf, 1)[:, : n * width].reshape(rows, n, width)
    out = torch.zeros(rows, n, dtype=torch.int64, device=buf.device)
    for j in range(width):
        out |= bit_matrix[:, :, j].to(torch.int64) << j
    return out


def padding_ok_rows(buf: Tensor, nbits: int) -> Tensor:
    """Per row, whether the padding bits after the first ``nbits`` stream bits are all zero.

    Sync-free: the answer stays on the device as a bool per row.

    Args:
        buf: ``(R, ceil(nbits / 8))`` uint8.
        nbits: stream bits in use per row, ``>= 0``.

    Returns:
        ``(R,)`` bool on ``buf.device``: True where the last byte has no bit set at or above
        ``nbits % 8`` (always True when ``nbits`` is a multiple of 8).

    Raises:
        TypeError: ``buf`` is not uint8. ValueError: bad ``nbits`` or row length.
    """
    check_int("nbits", nbits, 0)
    _check_row_bytes(buf, _ceil_div(nbits, 8), f"{nbits} stream bits")
    used = nbits % 8
    if not used:
        return torch.ones(buf.shape[0], dtype=torch.bool, device=buf.device)
    return (buf[:, -1] >> used) == 0


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
    """Pack codes of ``bits`` bits each into bytes, least-significant bit first.

    Code ``i`` goes to bits ``[(i*bits) % 8, (i*bits) % 8 + bits)`` of byte ``(i*bits) // 8``;
    padding bits in the last byte are zero. Golden values: signs
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
    return pack_bits_rows(flat.to(torch.uint8).reshape(1, -1), bits).reshape(-1)


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
    return unpack_bits_rows(buf.reshape(1, -1), bits, n).reshape(-1)


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
    """Write unsigned integers as a fixed-width, LSB-first bit stream (the ``fixed`` index codec).

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
    flat = _check_codes("values", values, width)
    return pack_uint_rows(flat.reshape(1, -1), width).reshape(-1)


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
    return unpack_uint_rows(buf.reshape(1, -1), width, n).reshape(-1)


def _check_pack12_count(n: int) -> None:
    if n % 2:
        raise ValueError(f"idx must have an even number of elements for pack12, got {n}")


def pack12_pairs(idx: Tensor) -> Tensor:
    """templar's 12-bit index pair packing (``pack12``, parity with templar's ``compress.py``).

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
