"""Tests for thinwire.compression.bitpack against golden bytes (worked by hand) and a pure-Python
bit-by-bit writer written from the layout rule in the module docstring."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.compression.bitpack import (
    pack12_pairs,
    pack_bits,
    pack_bits_rows,
    pack_uint,
    pack_uint_rows,
    packed_nbytes,
    padding_ok_rows,
    uint_nbytes,
    unpack12_pairs,
    unpack_bits,
    unpack_bits_rows,
    unpack_uint,
    unpack_uint_rows,
)

ODD_LENGTHS = [0, 1, 3, 7, 8, 9, 13, 101]
UINT_WIDTHS = [*range(1, 17), 32]


def ref_pack(values: list[int], width: int) -> list[int]:
    """Bit-by-bit LSB-first writer: bit j of value i is stream bit i*width + j, stream bit s is
    bit s % 8 of byte s // 8; unused bits of the last byte stay 0."""
    out = [0] * ((len(values) * width + 7) // 8)
    for i, v in enumerate(values):
        for j in range(width):
            if (v >> j) & 1:
                s = i * width + j
                out[s // 8] |= 1 << (s % 8)
    return out


def random_values(n: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << width, (n,), generator=g, dtype=torch.int64)


def as_bytes(buf: torch.Tensor) -> list[int]:
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    return buf.tolist()


# ----------------------------------------------------------------------------- golden vectors


def test_golden_signs():
    # LSB-first, 0b01110110.
    assert as_bytes(pack_bits(torch.tensor([0, 1, 1, 0, 1, 1, 1, 0]), 1)) == [0x76]
    assert as_bytes(pack_bits(torch.tensor([0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool), 1)) == [
        0x76
    ]


def test_golden_two_bit_codes():
    # 1 | 3<<2 | 0<<4 | 2<<6 = 0x8d.
    assert as_bytes(pack_bits(torch.tensor([1, 3, 0, 2], dtype=torch.uint8), 2)) == [0x8D]


def test_thirteen_signs_take_two_bytes_with_zero_padding():
    buf = pack_bits(torch.ones(13, dtype=torch.uint8), 1)
    # 13 ones: a full byte, then the low 5 bits of the second byte; the top 3 bits are padding.
    assert as_bytes(buf) == [0xFF, 0x1F]
    assert packed_nbytes(13, 1) == 2


def test_golden_pack12():
    # templar's pair layout: (0xABC, 0x123) -> bc 3a 12.
    buf = pack12_pairs(torch.tensor([0xABC, 0x123]))
    assert as_bytes(buf) == [0xBC, 0x3A, 0x12]
    assert unpack12_pairs(buf, 2).tolist() == [0xABC, 0x123]


def test_pack12_all_4096_indices():
    # Round trip on every 12-bit index, bytes checked against templar's formula.
    idx = torch.arange(4096)
    buf = pack12_pairs(idx)
    expected = []
    for a, b in zip(range(0, 4096, 2), range(1, 4096, 2), strict=True):
        expected += [a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4]
    assert as_bytes(buf) == expected
    assert torch.equal(unpack12_pairs(buf, 4096), idx)
    assert torch.equal(pack_uint(idx, 12), buf)


# ----------------------------------------------------------------------------- reference writer


@pytest.mark.parametrize("width", UINT_WIDTHS)
@pytest.mark.parametrize("n", ODD_LENGTHS)
def test_pack_uint_matches_reference_and_round_trips(width, n):
    vals = random_values(n, width, seed=1000 * width + n)
    if n:
        vals[0] = (1 << width) - 1  # the extreme value must survive
    buf = pack_uint(vals, width)
    assert as_bytes(buf) == ref_pack(vals.tolist(), width)
    assert buf.numel() == uint_nbytes(n, width) == math.ceil(n * width / 8)
    used = (n * width) % 8
    if used:
        assert int(buf[-1]) >> used == 0  # padding bits are zero
    out = unpack_uint(buf, width, n)
    assert out.dtype == torch.int64
    assert torch.equal(out, vals)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", ODD_LENGTHS)
def test_pack_bits_matches_pack_uint_and_reference(bits, n):
    codes = random_values(n, bits, seed=7 * bits + n).to(torch.uint8)
    buf = pack_bits(codes, bits)
    assert as_bytes(buf) == ref_pack(codes.tolist(), bits)
    assert torch.equal(buf, pack_uint(codes, bits))
    assert buf.numel() == packed_nbytes(n, bits)
    out = unpack_bits(buf, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


@settings(deadline=None, max_examples=50, derandomize=True)
@given(
    width=st.sampled_from(UINT_WIDTHS),
    n=st.integers(0, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_uint_round_trip_property(width, n, seed):
    vals = random_values(n, width, seed)
    buf = pack_uint(vals, width)
    assert as_bytes(buf) == ref_pack(vals.tolist(), width)
    assert torch.equal(unpack_uint(buf, width, n), vals)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(
    bits=st.sampled_from([1, 2, 4, 8]),
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_bits_any_shape_flattens_row_major(bits, shape, seed):
    n = math.prod(shape)
    codes = random_values(n, bits, seed).view(shape)
    buf = pack_bits(codes, bits)
    assert as_bytes(buf) == ref_pack(codes.reshape(-1).tolist(), bits)
    assert torch.equal(unpack_bits(buf, bits, n).view(shape).to(torch.int64), codes)


def test_width_32_extremes():
    vals = torch.tensor([0, 2**32 - 1, 1, 2**31, 12345678])
    buf = pack_uint(vals, 32)
    assert as_bytes(buf) == ref_pack(vals.tolist(), 32)
    assert torch.equal(unpack_uint(buf, 32, 5), vals)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int16, torch.int32, torch.int64])
def test_accepted_code_dtypes(dtype):
    codes = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=dtype)
    assert as_bytes(pack_bits(codes, 1)) == ref_pack([1, 0, 1, 1, 0, 0, 0, 1, 1], 1)


def test_empty_inputs():
    for bits in (1, 2, 4, 8):
        buf = pack_bits(torch.zeros(0, dtype=torch.uint8), bits)
        assert buf.numel() == 0 and buf.dtype == torch.uint8
        assert unpack_bits(buf, bits, 0).numel() == 0
    assert pack_uint(torch.zeros(0, dtype=torch.int64), 13).numel() == 0
    assert unpack_uint(torch.zeros(0, dtype=torch.uint8), 13, 0).numel() == 0
    assert pack12_pairs(torch.zeros(0, dtype=torch.int64)).numel() == 0


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bits,bad", [(1, 2), (2, 4), (4, 16), (8, 256), (2, -1)])
def test_pack_bits_rejects_out_of_range_codes(bits, bad):
    with pytest.raises(ValueError, match=r"codes must be in \[0, 2\^bits - 1\]"):
        pack_bits(torch.tensor([0, bad]), bits)


@pytest.mark.parametrize("bits", [0, 3, 5, 16])
def test_pack_bits_rejects_bad_width(bits):
    with pytest.raises(ValueError, match="bits must be in"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits must be in"):
        packed_nbytes(4, bits)


def test_pack_rejects_non_integer_tensors():
    with pytest.raises(TypeError, match="codes.dtype"):
        pack_bits(torch.zeros(4), 1)
    with pytest.raises(TypeError, match="values.dtype"):
        pack_uint(torch.zeros(4, dtype=torch.float64), 12)
    with pytest.raises(TypeError, match="codes must be Tensor"):
        pack_bits([0, 1], 1)


@pytest.mark.parametrize("width", [0, 33])
def test_pack_uint_rejects_bad_width(width):
    with pytest.raises(ValueError, match="width must be in"):
        pack_uint(torch.zeros(4, dtype=torch.int64), width)


def test_pack_uint_rejects_out_of_range_values():
    with pytest.raises(ValueError, match=r"values must be in \[0, 2\^bits - 1\] = \[0, 4095\]"):
        pack_uint(torch.tensor([4096]), 12)
    with pytest.raises(ValueError, match="values must be in"):
        pack_uint(torch.tensor([-1]), 12)


def test_unpack_rejects_wrong_length():
    buf = pack_bits(torch.ones(13, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="exactly 2 bytes"):
        unpack_bits(buf[:1], 1, 13)
    with pytest.raises(ValueError, match="exactly 2 bytes"):
        unpack_bits(torch.cat([buf, buf[:1]]), 1, 13)
    ubuf = pack_uint(torch.arange(5), 12)
    with pytest.raises(ValueError, match="exactly 8 bytes"):
        unpack_uint(ubuf[:-1], 12, 5)
    with pytest.raises(ValueError, match="exactly 3 bytes"):
        unpack12_pairs(torch.zeros(4, dtype=torch.uint8), 2)


def test_unpack_rejects_nonzero_padding():
    buf = pack_bits(torch.ones(13, dtype=torch.uint8), 1).clone()
    buf[-1] |= 1 << 7  # bit 15 is padding for 13 codes
    with pytest.raises(ValueError, match="padding bits must be zero"):
        unpack_bits(buf, 1, 13)
    ubuf = pack_uint(torch.arange(5), 12).clone()  # 60 bits: top 4 bits of byte 7 are padding
    ubuf[-1] |= 1 << 4
    with pytest.raises(ValueError, match="padding bits must be zero"):
        unpack_uint(ubuf, 12, 5)


def test_unpack_rejects_bad_buffer_type_and_shape():
    with pytest.raises(TypeError, match="buf.dtype"):
        unpack_bits(torch.zeros(1, dtype=torch.int32), 1, 8)
    with pytest.raises(ValueError, match="1-D"):
        unpack_bits(torch.zeros(1, 1, dtype=torch.uint8), 1, 8)
    with pytest.raises(ValueError, match="n must be in"):
        unpack_uint(torch.zeros(0, dtype=torch.uint8), 3, -1)


def test_pack12_validation():
    with pytest.raises(ValueError, match="even number"):
        pack12_pairs(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"idx must be in \[0, 2\^bits - 1\] = \[0, 4095\]"):
        pack12_pairs(torch.tensor([1, 4096]))
    with pytest.raises(ValueError, match="even number"):
        unpack12_pairs(torch.zeros(3, dtype=torch.uint8), 3)


def test_nbytes_formulas():
    for n in range(0, 40):
        for width in UINT_WIDTHS:
            assert uint_nbytes(n, width) == math.ceil(n * width / 8)
        for bits in (1, 2, 4, 8):
            assert packed_nbytes(n, bits) == math.ceil(n * bits / 8)


# ----------------------------------------------------------------------------- batched row ops

ROW_COUNTS = [0, 1, 3]


def random_rows(rows: int, n: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << width, (rows, n), generator=g, dtype=torch.int64)


@pytest.mark.parametrize("rows", ROW_COUNTS)
@pytest.mark.parametrize("n", ODD_LENGTHS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_rows_matches_reference_per_row(rows, n, bits):
    codes = random_rows(rows, n, bits, seed=rows * 1000 + n * 10 + bits).to(torch.uint8)
    packed = pack_bits_rows(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_nbytes(n, bits))
    for r in range(rows):
        assert packed[r].tolist() == ref_pack(codes[r].tolist(), bits)
    unpacked = unpack_bits_rows(packed, bits, n)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked, codes)
    assert padding_ok_rows(packed, n * bits).tolist() == [True] * rows


@pytest.mark.parametrize("rows", ROW_COUNTS)
@pytest.mark.parametrize("n", ODD_LENGTHS)
@pytest.mark.parametrize("width", UINT_WIDTHS)
def test_pack_uint_rows_matches_reference_per_row(rows, n, width):
    values = random_rows(rows, n, width, seed=rows * 1000 + n * 40 + width)
    packed = pack_uint_rows(values, width)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, uint_nbytes(n, width))
    for r in range(rows):
        assert packed[r].tolist() == ref_pack(values[r].tolist(), width)
    unpacked = unpack_uint_rows(packed, width, n)
    assert unpacked.dtype == torch.int64 and torch.equal(unpacked, values)


def test_pack_bits_rows_masks_high_bits():
    # Only the low `bits` of each code are written, so a bad code cannot spill into its neighbour.
    codes = torch.tensor([[0xFF, 0x00, 0x01, 0x02]], dtype=torch.uint8)
    assert pack_bits_rows(codes, 2)[0].tolist() == ref_pack([3, 0, 1, 2], 2)


@pytest.mark.parametrize("nbits", [1, 5, 7, 8, 13, 16, 60])
def test_padding_ok_rows_flags_each_padding_bit(nbits):
    nbytes = math.ceil(nbits / 8)
    base = torch.zeros(1, nbytes, dtype=torch.uint8)
    base[0, :] = 0xFF
    if nbits % 8:
        base[0, -1] = (1 << (nbits % 8)) - 1  # every stream bit set, padding clear
    rows = [base[0].clone()]
    for bit in range(nbits, nbytes * 8):  # one row per padding bit, that bit set
        row = base[0].clone()
        row[bit // 8] |= 1 << (bit % 8)
        rows.append(row)
    ok = padding_ok_rows(torch.stack(rows), nbits)
    assert ok.dtype == torch.bool
    assert ok.tolist() == [True] + [False] * (nbytes * 8 - nbits)


def test_unpack_rows_ignore_padding_and_agree_with_checked_unpack():
    codes = torch.ones(1, 13, dtype=torch.uint8)
    buf = pack_bits_rows(codes, 1)
    dirty = buf.clone()
    dirty[0, -1] |= 1 << 7  # bit 15 is padding for 13 codes
    assert torch.equal(unpack_bits_rows(dirty, 1, 13), codes)
    assert padding_ok_rows(torch.cat([buf, dirty]), 13).tolist() == [True, False]
    with pytest.raises(ValueError, match="padding bits must be zero"):
        unpack_bits(dirty[0], 1, 13)


def test_row_ops_validate_shapes():
    with pytest.raises(ValueError, match="2-D"):
        pack_bits_rows(torch.zeros(4, dtype=torch.uint8), 1)
    with pytest.raises(TypeError, match="codes.dtype"):
        pack_bits_rows(torch.zeros(1, 4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="bits must be in"):
        pack_bits_rows(torch.zeros(1, 4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="exactly 2 bytes"):
        unpack_bits_rows(torch.zeros(1, 3, dtype=torch.uint8), 1, 13)
    with pytest.raises(ValueError, match="width must be in"):
        pack_uint_rows(torch.zeros(1, 4, dtype=torch.int64), 33)
    with pytest.raises(ValueError, match="exactly 8 bytes"):
        unpack_uint_rows(torch.zeros(2, 7, dtype=torch.uint8), 12, 5)
    with pytest.raises(ValueError, match="exactly 2 bytes"):
        padding_ok_rows(torch.zeros(2, 1, dtype=torch.uint8), 13)
