"""Tests for thinwire.compression.index_coding.

Oracles: a pure-Python Elias–Fano writer built from the textbook gap-unary definition (Vigna,
WSDM 2013, §3: low halves in L bits, then for each value ``h_i - h_{i-1}`` zeros and a one), a
pure-Python fixed-width writer, a hand-encoded golden chunk, ``math.comb`` for the subset bound,
and the entropy floors ``log2 C(4096, k) / k`` worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.compression.bitpack import pack12_pairs
from thinwire.compression.index_coding import (
    INDEX_CODERS,
    EliasFanoIndexCoder,
    FixedIndexCoder,
    IndexCodingError,
    log2_binom,
)

EF = EliasFanoIndexCoder()
FIXED = FixedIndexCoder()
CODERS = [FIXED, EF]

# (N, C, k) edge cases named in the brief: C=1, k=C, k=1, prime C, the production 64x64 tile.
EDGE_CASES = [
    (3, 1, 1),
    (4, 2, 2),
    (5, 97, 97),
    (5, 97, 1),
    (4, 4093, 17),
    (6, 4096, 64),
    (2, 4096, 4096),
    (0, 4096, 64),
    (3, 64, 32),
    (7, 5, 3),
]


# ----------------------------------------------------------------------------- pure-Python oracles


def bits_to_bytes(bits: list[int]) -> list[int]:
    out = [0] * ((len(bits) + 7) // 8)
    for s, b in enumerate(bits):
        if b:
            out[s // 8] |= 1 << (s % 8)
    return out


def ef_low_bits(k: int, C: int) -> int:
    """floor(log2(C / k)): the largest L with k * 2^L <= C."""
    L = 0
    while k * 2 ** (L + 1) <= C:
        L += 1
    return L


def ef_high_len(k: int, C: int) -> int:
    return k + (C - 1) // 2 ** ef_low_bits(k, C) + 1


def ef_reference_chunk(row: list[int], C: int) -> list[int]:
    """Textbook Elias–Fano bits of one sorted chunk: L-bit low parts, then unary-coded gaps."""
    k = len(row)
    L = ef_low_bits(k, C)
    bits = []
    for x in row:
        low = x % 2**L
        bits += [(low >> j) & 1 for j in range(L)]
    high, prev = [], 0
    for x in row:
        h = x // 2**L
        high += [0] * (h - prev) + [1]
        prev = h
    high += [0] * (ef_high_len(k, C) - len(high))
    return bits + high


def ef_reference(idx: torch.Tensor, C: int) -> list[int]:
    bits = []
    for row in idx.tolist():
        bits += ef_reference_chunk(row, C)
    return bits_to_bytes(bits)


def fixed_reference(idx: torch.Tensor, C: int) -> list[int]:
    width = math.ceil(math.log2(C)) if C > 1 else 0
    bits = []
    for x in idx.reshape(-1).tolist():
        bits += [(x >> j) & 1 for j in range(width)]
    return bits_to_bytes(bits)


def reference_chunk_bits(coder, k: int, C: int) -> int:
    if isinstance(coder, FixedIndexCoder):
        return k * (math.ceil(math.log2(C)) if C > 1 else 0)
    return k * ef_low_bits(k, C) + ef_high_len(k, C)


def random_sets(N: int, C: int, k: int, seed: int) -> torch.Tensor:
    """N uniformly random sorted k-subsets of range(C)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, C, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values


@st.composite
def geometries(draw):
    C = draw(st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 3, 97, 127, 4093, 4096])))
    k = draw(st.one_of(st.integers(1, min(C, 160)), st.just(C if C <= 512 else 1)))
    N = draw(st.integers(0, 5))
    return N, C, k


# ----------------------------------------------------------------------------- golden and oracle


def test_elias_fano_golden_chunk():
    # C=16, k=3, x=[2,5,13]: L = floor(log2(16/3)) = 2; lows 2,1,1 -> bits 0,1 | 1,0 | 1,0;
    # highs 0,1,3 -> ones at 0+0, 1+1, 3+2 of a 3+3+1 = 7-bit vector -> stream bits 6, 8, 11.
    # Byte 0 = bits {1,2,4,6} = 0x56, byte 1 = bits {8,11} -> 0x09; 13 bits, 3 zero padding bits.
    buf = EF.encode(torch.tensor([[2, 5, 13]]), 16)
    assert buf.tolist() == [0x56, 0x09]
    assert EF.decode(buf, 1, 3, 16).tolist() == [[2, 5, 13]]


def test_fixed_golden_matches_pack12_at_4096():
    # At C=4096 the 12-bit LSB-first stream is templar's pack12 layout.
    idx = torch.tensor([[0x123, 0xABC], [0, 4095]])
    assert FIXED.encode(idx, 4096).tolist() == pack12_pairs(idx).tolist()
    assert FIXED.encode(torch.tensor([[0x123, 0xABC]]), 4096).tolist() == [0x23, 0xC1, 0xAB]


@settings(deadline=None, max_examples=60, derandomize=True)
@given(geo=geometries(), seed=st.integers(0, 2**31 - 1))
def test_encode_matches_reference_and_round_trips(geo, seed):
    N, C, k = geo
    idx = random_sets(N, C, k, seed)
    for coder, ref in ((EF, ef_reference), (FIXED, fixed_reference)):
        buf = coder.encode(idx, C)
        assert buf.dtype == torch.uint8 and buf.dim() == 1
        assert buf.tolist() == ref(idx, C)
        assert buf.numel() == coder.nbytes(N, k, C)
        assert buf.numel() == math.ceil(N * reference_chunk_bits(coder, k, C) / 8)
        out = coder.decode(buf, N, k, C)
        assert out.dtype == torch.int64 and out.shape == (N, k)
        assert torch.equal(out, idx)


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
@pytest.mark.parametrize("N,C,k", EDGE_CASES)
def test_edge_geometries(coder, N, C, k):
    idx = random_sets(N, C, k, seed=N * 7919 + C * 31 + k)
    buf = coder.encode(idx, C)
    expected = ef_reference(idx, C) if coder is EF else fixed_reference(idx, C)
    assert buf.tolist() == expected
    assert buf.numel() == coder.nbytes(N, k, C)
    assert torch.equal(coder.decode(buf, N, k, C), idx)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_encode_accepts_integer_dtypes(dtype):
    idx = torch.tensor([[1, 4, 9], [0, 2, 200]])
    for coder in CODERS:
        assert torch.equal(coder.encode(idx.to(dtype), 256), coder.encode(idx, 256))


def test_fixed_c1_is_empty():
    # C=1: the only set is {0}; ceil(log2 1) = 0 bits per index.
    buf = FIXED.encode(torch.zeros(4, 1, dtype=torch.int64), 1)
    assert buf.numel() == 0 == FIXED.nbytes(4, 1, 1)
    assert FIXED.decode(buf, 4, 1, 1).tolist() == [[0]] * 4


# ----------------------------------------------------------------------------- sizes and bounds


def test_log2_binom_against_math_comb():
    for n in range(0, 61):
        for k in range(0, n + 1):
            assert log2_binom(n, k) == pytest.approx(math.log2(math.comb(n, k)), abs=1e-9)
    for k in (1, 32, 64, 128, 2048):
        # float64 lgamma terms near 3e4 cancel; measured worst case over k is ~2e-13 relative.
        assert log2_binom(4096, k) == pytest.approx(math.log2(math.comb(4096, k)), rel=1e-12)
    with pytest.raises(ValueError, match="k must be in"):
        log2_binom(4, 5)


@pytest.mark.parametrize(
    "k,floor_spec,ef_bits",
    # Entropy floors rounded to 2 decimals; EF bits by hand from k*L + k + (4095>>L) + 1:
    # k=32: L=7, 224+32+32 = 288; k=64: L=6, 384+64+64 = 512; k=128: L=5, 640+128+128 = 896.
    [(32, 8.32, 288 / 32), (64, 7.36, 512 / 64), (128, 6.38, 896 / 128)],
)
def test_bits_per_index_vs_entropy_floor(k, floor_spec, ef_bits):
    floor = log2_binom(4096, k) / k
    assert floor == pytest.approx(floor_spec, abs=0.005)
    assert EF.bits_per_index(k, 4096) == ef_bits
    assert FIXED.bits_per_index(k, 4096) == 12.0
    assert EF.bits_per_index(k, 4096) <= 1.10 * floor
    if k == 64:
        assert FIXED.bits_per_index(k, 4096) / floor == pytest.approx(1.63, abs=0.005)


def test_nbytes_formula_over_grid():
    for C in (1, 2, 3, 7, 64, 97, 100, 4096):
        for k in sorted({1, min(2, C), max(1, C // 3), C}):
            assert EF.layout(k, C) == (ef_low_bits(k, C), ef_high_len(k, C))
            for coder in CODERS:
                bits = reference_chunk_bits(coder, k, C)
                assert coder.bits_per_index(k, C) == bits / k
                for N in (0, 1, 3, 8):
                    assert coder.nbytes(N, k, C) == math.ceil(N * bits / 8)


def test_registry():
    assert set(INDEX_CODERS) == {"fixed", "entropy"}
    assert isinstance(INDEX_CODERS["fixed"], FixedIndexCoder)
    assert isinstance(INDEX_CODERS["entropy"], EliasFanoIndexCoder)
    for key, coder in INDEX_CODERS.items():
        assert coder.name == key


# ----------------------------------------------------------------------------- malformed input


def test_every_high_bit_flip_is_rejected():
    # One flip changes a high vector's popcount from k to k +- 1, which decode must reject.
    N, C, k = 3, 100, 7
    idx = random_sets(N, C, k, seed=5)
    buf = EF.encode(idx, C)
    L, high_len = EF.layout(k, C)
    chunk = k * L + high_len
    for c in range(N):
        for j in range(high_len):
            s = c * chunk + k * L + j
            bad = buf.clone()
            bad[s // 8] ^= 1 << (s % 8)
            with pytest.raises(IndexCodingError, match="set bits"):
                EF.decode(bad, N, k, C)


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
def test_any_bit_flip_raises_or_is_a_valid_code(coder):
    # A low-part flip (EF) or a field flip (fixed) may yield another valid index set; then the
    # buffer must be that set's exact encoding (the codes are bijections), never garbage.
    N, C, k = 2, 100, 9
    idx = random_sets(N, C, k, seed=11)
    buf = coder.encode(idx, C)
    outcomes = {"raised": 0, "valid": 0}
    for s in range(8 * buf.numel()):
        bad = buf.clone()
        bad[s // 8] ^= 1 << (s % 8)
        try:
            out = coder.decode(bad, N, k, C)
        except IndexCodingError:
            outcomes["raised"] += 1
            continue
        outcomes["valid"] += 1
        assert out.shape == (N, k)
        assert bool((out >= 0).all()) and bool((out < C).all())
        assert bool((out[:, 1:] > out[:, :-1]).all())
        assert not torch.equal(out, idx)
        assert torch.equal(coder.encode(out, C), bad)
    assert outcomes["raised"] > 0 and outcomes["valid"] > 0


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
def test_truncated_or_extended_buffer_is_rejected(coder):
    N, C, k = 4, 4096, 64
    buf = coder.encode(random_sets(N, C, k, seed=3), C)
    for bad in (buf[:-1], buf[:0], torch.cat([buf, torch.zeros(1, dtype=torch.uint8)])):
        with pytest.raises(IndexCodingError, match="exactly"):
            coder.decode(bad, N, k, C)
    with pytest.raises(IndexCodingError, match="1-D"):
        coder.decode(buf.view(1, -1), N, k, C)


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
def test_nonzero_padding_is_rejected(coder):
    N, C, k = 1, 16, 3  # EF: 13 bits; fixed: 12 bits -> both leave padding in the last byte
    buf = coder.encode(torch.tensor([[2, 5, 13]]), C).clone()
    buf[-1] |= 0x80
    with pytest.raises(IndexCodingError, match="padding"):
        coder.decode(buf, N, k, C)


def test_elias_fano_value_beyond_universe_is_rejected():
    # k set bits, but the last one at the end of the vector gives h = ((C-1)>>L) + 1, so x >= C.
    C, k = 16, 3
    L, high_len = EF.layout(k, C)
    lows = [0, 1, 2]
    bits = [(v >> j) & 1 for v in lows for j in range(L)]
    high = [1, 1] + [0] * (high_len - 3) + [1]
    buf = torch.tensor(bits_to_bytes(bits + high), dtype=torch.uint8)
    with pytest.raises(IndexCodingError, match=">= C"):
        EF.decode(buf, 1, k, C)


def test_elias_fano_decreasing_lows_are_rejected():
    # Two values share high part 0 but their low parts decrease: x = 3 then 1.
    C, k = 16, 3
    L, high_len = EF.layout(k, C)
    lows = [3, 1, 0]
    bits = [(v >> j) & 1 for v in lows for j in range(L)]
    high = [1, 1, 0, 1] + [0] * (high_len - 4)
    buf = torch.tensor(bits_to_bytes(bits + high), dtype=torch.uint8)
    with pytest.raises(IndexCodingError, match="strictly increasing"):
        EF.decode(buf, 1, k, C)


def test_fixed_out_of_range_and_unsorted_are_rejected():
    C, k = 5, 2  # width 3 can express 5..7, which are >= C
    buf = torch.tensor(bits_to_bytes([1, 0, 0, 1, 1, 1]), dtype=torch.uint8)  # [1, 7]
    with pytest.raises(IndexCodingError, match=">= C"):
        FIXED.decode(buf, 1, k, C)
    buf = torch.tensor(bits_to_bytes([0, 1, 0, 1, 0, 0]), dtype=torch.uint8)  # [2, 1]
    with pytest.raises(IndexCodingError, match="strictly increasing"):
        FIXED.decode(buf, 1, k, C)


def test_index_coding_error_is_value_error():
    assert issubclass(IndexCodingError, ValueError)


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "idx,C,match",
    [
        (torch.tensor([1, 2, 3]), 8, "idx must have shape"),
        (torch.zeros(2, 0, dtype=torch.int64), 8, "idx must have shape"),
        (torch.tensor([[0, 1, 2]]), 2, "idx must have shape"),
        (torch.tensor([[0, 8]]), 8, r"idx must be in \[0, 7\]"),
        (torch.tensor([[-1, 3]]), 8, r"idx must be in \[0, 7\]"),
        (torch.tensor([[0, 1], [3, 3]]), 8, "idx rows must be strictly increasing.*row 1"),
        (torch.tensor([[5, 2]]), 8, "idx rows must be strictly increasing"),
        (torch.tensor([[0]]), 0, "C must be in"),
    ],
)
def test_encode_validation(coder, idx, C, match):
    with pytest.raises(ValueError, match=match):
        coder.encode(idx, C)


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
def test_encode_rejects_non_integer(coder):
    with pytest.raises(TypeError, match="idx.dtype"):
        coder.encode(torch.tensor([[0.0, 1.0]]), 8)
    with pytest.raises(TypeError, match="idx must be Tensor"):
        coder.encode([[0, 1]], 8)


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
def test_decode_and_nbytes_validation(coder):
    empty = torch.zeros(0, dtype=torch.uint8)
    with pytest.raises(ValueError, match="k must be in"):
        coder.decode(empty, 1, 9, 8)
    with pytest.raises(ValueError, match="N must be in"):
        coder.nbytes(-1, 1, 8)
    with pytest.raises(ValueError, match="k must be in"):
        coder.bits_per_index(0, 8)
    with pytest.raises(TypeError, match="buf.dtype"):
        coder.decode(torch.zeros(1, dtype=torch.int64), 1, 1, 8)


# ----------------------------------------------------------------------------- batched, sync-free


def buffer_bits(buf: list[int]) -> list[int]:
    return [(byte >> j) & 1 for byte in buf for j in range(8)]


def reference_decode(coder, buf: list[int], N: int, k: int, C: int) -> list[list[int]] | None:
    """Pure-Python decoder from the layout definitions: the index sets, or None if invalid."""
    bits = buffer_bits(buf)
    chunk = reference_chunk_bits(coder, k, C)
    if any(bits[N * chunk :]):
        return None  # nonzero padding
    rows = []
    for c in range(N):
        cb = bits[c * chunk : (c + 1) * chunk]
        if isinstance(coder, FixedIndexCoder):
            width = chunk // k
            row = [sum(cb[i * width + j] << j for j in range(width)) for i in range(k)]
        else:
            L = ef_low_bits(k, C)
            lows = [sum(cb[i * L + j] << j for j in range(L)) for i in range(k)]
            ones = [p for p, b in enumerate(cb[k * L :]) if b]
            if len(ones) != k:
                return None
            row = [((p - i) << L) | lows[i] for i, p in enumerate(ones)]
        if any(x >= C for x in row) or any(b <= a for a, b in zip(row, row[1:], strict=False)):
            return None
        rows.append(row)
    return rows


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
@pytest.mark.parametrize("N,C,k", EDGE_CASES)
def test_encode_trusted_equals_reference(coder, N, C, k):
    idx = random_sets(N, C, k, seed=N * 31 + C + k)
    buf = coder.encode_trusted(idx, C)
    ref = fixed_reference(idx, C) if coder is FIXED else ef_reference(idx, C)
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.tolist() == ref


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
@pytest.mark.parametrize("N,C,k", EDGE_CASES)
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_decode_rows_of_valid_buffers(coder, N, C, k, rows):
    sets = [random_sets(N, C, k, seed=100 * r + N + C + k) for r in range(rows)]
    bufs = [
        torch.tensor(fixed_reference(s, C) if coder is FIXED else ef_reference(s, C)) for s in sets
    ]
    stacked = (
        torch.stack(bufs).to(torch.uint8)
        if rows
        else torch.zeros(0, coder.nbytes(N, k, C), dtype=torch.uint8)
    )
    idx, ok = coder.decode_rows(stacked, N, k, C)
    assert idx.dtype == torch.int64 and idx.shape == (rows, N, k)
    assert ok.dtype == torch.bool and ok.shape == (rows,) and ok.tolist() == [True] * rows
    for r in range(rows):
        assert torch.equal(idx[r], sets[r])


def _check_flags(coder, bufs: torch.Tensor, N: int, k: int, C: int) -> list[bool]:
    """decode_rows against the pure-Python decoder, row by row; returns the ok flags."""
    idx, ok = coder.decode_rows(bufs, N, k, C)
    assert idx.shape == (bufs.shape[0], N, k) and ok.shape == (bufs.shape[0],)
    assert bool((idx >= 0).all()) and bool((idx < C).all())  # safe to scatter even when not ok
    for r in range(bufs.shape[0]):
        ref = reference_decode(coder, bufs[r].tolist(), N, k, C)
        assert bool(ok[r]) == (ref is not None)
        if ref is not None:
            assert idx[r].tolist() == ref
    return ok.tolist()


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
@pytest.mark.parametrize("N,C,k", [(2, 100, 9), (3, 16, 3), (2, 97, 40)])
def test_decode_rows_every_bit_flip_matches_reference(coder, N, C, k):
    # All single-bit flips at once, one per row: flags and indices as the pure-Python decoder.
    buf = coder.encode(random_sets(N, C, k, seed=C + k), C)
    nbits = 8 * buf.numel()
    bad = buf.repeat(nbits, 1)
    s = torch.arange(nbits)
    bad[s, s // 8] ^= (1 << (s % 8)).to(torch.uint8)
    flags = _check_flags(coder, bad, N, k, C)
    assert not all(flags)


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
def test_decode_rows_random_bytes_match_reference(coder):
    N, C, k = 2, 24, 5
    g = torch.Generator().manual_seed(17)
    bufs = torch.randint(0, 256, (300, coder.nbytes(N, k, C)), generator=g, dtype=torch.uint8)
    bufs[:100] = coder.encode(random_sets(N, C, k, seed=4), C)  # some valid rows
    _check_flags(coder, bufs, N, k, C)


def test_decode_rows_flags_each_corruption_only_in_its_row():
    C, k, N = 16, 3, 1
    L, high_len = EF.layout(k, C)
    assert (L, high_len) == (2, 7)  # 13 bits per chunk, 3 padding bits
    good = [2, 5, 13]

    def ef_buf(lows: list[int], high: list[int]) -> list[int]:
        assert len(high) == high_len
        return bits_to_bytes([(v >> j) & 1 for v in lows for j in range(L)] + high)

    rows = [
        ef_reference(torch.tensor([good]), C),  # valid
        ef_buf([2, 1, 1], [1, 1, 1, 1, 0, 0, 0]),  # 4 ones: too many
        ef_buf([2, 1, 1], [1, 0, 0, 0, 0, 0, 0]),  # 1 one: too few
        ef_buf([3, 1, 1], [1, 1, 0, 0, 0, 1, 0]),  # h = 0, 0, 3: x = [3, 1, 13], decreasing
        ef_buf([0, 1, 2], [1, 1, 0, 0, 0, 0, 1]),  # last h = 4: x = 18 >= C
    ]
    pad = list(rows[0])
    pad[-1] |= 0x80  # padding bit (13 bits used of 16)
    rows.append(pad)
    bufs = torch.tensor(rows, dtype=torch.uint8)
    idx, ok = EF.decode_rows(bufs, N, k, C)
    assert ok.tolist() == [True, False, False, False, False, False]
    assert idx[0].tolist() == [good]
    assert bool((idx >= 0).all()) and bool((idx < C).all())
    for r in range(1, len(rows)):  # the raising decoder rejects the same buffers
        with pytest.raises(IndexCodingError):
            EF.decode(bufs[r], N, k, C)

    fixed_rows = [
        FIXED.encode(torch.tensor([[1, 4, 9]]), 10).tolist(),
        fixed_reference(torch.tensor([[4, 1, 9]]), 10),  # not increasing
        fixed_reference(torch.tensor([[1, 4, 12]]), 10),  # >= C (width 4 holds up to 15)
        fixed_reference(torch.tensor([[1, 4, 4]]), 10),  # repeated index
    ]
    idx, ok = FIXED.decode_rows(torch.tensor(fixed_rows, dtype=torch.uint8), 1, 3, 10)
    assert ok.tolist() == [True, False, False, False]
    assert idx[0].tolist() == [[1, 4, 9]] and int(idx.max()) <= 9


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.name)
def test_row_methods_validate_shapes(coder):
    with pytest.raises(ValueError, match=r"shape \(R, 2\)"):
        coder.decode_rows(torch.zeros(2, 3, dtype=torch.uint8), 1, 3, 16)
    with pytest.raises(ValueError, match=r"shape \(R, 2\)"):
        coder.decode_rows(torch.zeros(2, dtype=torch.uint8), 1, 3, 16)
    with pytest.raises(TypeError, match="buf.dtype"):
        coder.decode_rows(torch.zeros(1, 2, dtype=torch.int32), 1, 3, 16)
    with pytest.raises(ValueError, match="k must be in"):
        coder.decode_rows(torch.zeros(1, 2, dtype=torch.uint8), 1, 17, 16)
    with pytest.raises(ValueError, match="shape"):
        coder.encode_trusted(torch.zeros(3, dtype=torch.int64), 16)
