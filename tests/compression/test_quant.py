"""Tests for thinwire.compression.quant against float64 loop references, brute-force
nearest-value oracles over each format's full table, closed-form error bounds and a golden
vector of the 2-bit centroid quantizer computed by hand from its rules (tplr-ai/SparseLoCo).
"""

from __future__ import annotations

import inspect
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.compression import quant as Q

U32 = 2.0**-24  # float32 unit roundoff
SIZES = [0, 1, 2, 15, 16, 17, 131, 257, 1000]  # 0, 1, block-1/block/block+1 (block=16), primes


def _f32(v: float) -> float:
    """Round a float64 to the nearest float32 (C cast: round to nearest even)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _data(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
    return x.to(dtype)


def _block_amax(xs: list[float], block: int) -> list[float]:
    """Per-element absmax of the element's block (plain loop)."""
    out = []
    for i in range(len(xs)):
        b0 = (i // block) * block
        out.append(max(abs(v) for v in xs[b0 : b0 + block]))
    return out


# --------------------------------------------------------------------------- absmax int8 / int4

ABSMAX = [
    (Q.quantize_int8, Q.dequantize_int8, 127, 8),
    (Q.quantize_int4, Q.dequantize_int4, 7, 4),
]


def _ref_absmax(xs: list[float], block: int, levels: int) -> tuple[list[float], list[int]]:
    """Float64 reference: scale = fp32(amax / levels), q = round_half_even(x / scale)."""
    scales = [_f32(a / levels) for a in _block_amax(xs, block)]
    qs = [
        0 if s == 0 else max(-levels, min(levels, round(v / s)))
        for v, s in zip(xs, scales, strict=True)
    ]
    return scales, qs


@pytest.mark.parametrize(("qfn", "dqfn", "levels", "bits"), ABSMAX)
@pytest.mark.parametrize("n", SIZES)
def test_absmax_matches_reference_and_bound(qfn, dqfn, levels, bits, n) -> None:
    block = 16
    x = _data(n, seed=n)
    r = qfn(x, block=block)
    xs = x.tolist()
    scales, qs = _ref_absmax(xs, block, levels)
    assert r.bits == bits and r.codes.dtype == torch.uint8 and r.codes.shape == (n,)
    assert torch.equal(r.side, torch.tensor(scales[::block], dtype=torch.float32))
    got = (r.codes.long() - (levels + 1)).tolist()
    for v, s, q_ref, q in zip(xs, scales, qs, got, strict=True):
        if q != q_ref:  # only allowed at a rounding tie blurred by fp32 division (|y| <= levels)
            assert abs(q - q_ref) == 1 and abs(abs(v / s) % 1 - 0.5) < 2 * levels * U32
    deq = dqfn(r.codes, r.side, n, block=block)
    assert deq.dtype == torch.float32 and deq.shape == (n,)
    # |x - deq| <= scale/2, plus fp32 rounding of x/scale and q*scale (each <= U32 * amax).
    amax = _block_amax(xs, block)
    for v, d, s, a in zip(xs, deq.tolist(), scales, amax, strict=True):
        assert abs(v - d) <= s / 2 + 3 * U32 * a


@pytest.mark.parametrize(("qfn", "dqfn", "levels", "bits"), ABSMAX)
def test_absmax_exact_ties_round_half_even(qfn, dqfn, levels, bits) -> None:
    # amax = levels -> scale = 1 exactly, so y = x and the ties are exact.
    x = torch.tensor([float(levels), 0.5, 1.5, 2.5, -0.5, -2.5, -float(levels)])
    r = qfn(x, block=7)
    assert r.side.tolist() == [1.0]
    assert (r.codes.long() - (levels + 1)).tolist() == [levels, 0, 2, 2, 0, -2, -levels]


# --------------------------------------------------------------------------- zero / tiny blocks


@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp4_e3m0", "sign"])
def test_all_zero_blocks_give_zero_scale_and_exact_zeros(name) -> None:
    qfn, dqfn = Q.QUANTIZERS[name]
    x = torch.cat([torch.zeros(16), _data(16, 7), torch.zeros(5)])
    r = qfn(x, block=16)
    assert r.side[0] == 0 and r.side[2] == 0 and r.side[1] > 0
    deq = dqfn(r.codes, r.side, x.numel(), block=16)
    assert not torch.isnan(deq).any()
    assert torch.equal(deq[:16], torch.zeros(16)) and torch.equal(deq[32:], torch.zeros(5))


def test_2bit_constant_input_decodes_exactly() -> None:
    # sigma = 0 -> scale falls back to 1.0; c = 0 -> code n_bins//2, L = [0, 0, 0, 0].
    x = torch.full((9,), 3.5)
    r = Q.quantize_2bit_centroid(x)
    assert r.codes.tolist() == [2] * 9 and r.side.tolist() == [3.5, 0.0, 0.0, 0.0, 0.0]
    assert torch.equal(Q.dequantize_2bit_centroid(r.codes, r.side, 9), x)


@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp4_e3m0"])
def test_subnormal_block_never_nan(name) -> None:
    qfn, dqfn = Q.QUANTIZERS[name]
    x = torch.tensor([1e-45, -3e-45, 2e-40, 0.0])  # float32 subnormals: scale may underflow
    r = qfn(x, block=4)
    deq = dqfn(r.codes, r.side, 4, block=4)
    assert torch.isfinite(deq).all()
    assert (x - deq).abs().max() <= x.abs().max()  # documented fallback bound: within amax


# --------------------------------------------------------------------------- stochastic rounding

R = 20000  # repeats; 5-sigma bound per element with sigma <= gap / (2 sqrt(R))


def _int_gap(x: torch.Tensor, block: int, levels: int) -> torch.Tensor:
    return torch.tensor(
        [_f32(a / levels) for a in _block_amax(x.tolist(), block)], dtype=torch.float64
    )


def _fp4_gap(x: torch.Tensor, block: int) -> torch.Tensor:
    lv = Q.FP4_E3M0_LEVELS
    out = []
    for v, a in zip(x.tolist(), _block_amax(x.tolist(), block), strict=True):
        y = abs(v) / a
        j = max(i for i in range(len(lv)) if lv[i] <= y)
        out.append(a * (lv[min(j + 1, len(lv) - 1)] - lv[j]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", ["int8", "int4", "fp4_e3m0"])
def test_stochastic_rounding_is_unbiased(name) -> None:
    qfn, dqfn = Q.QUANTIZERS[name]
    block, m = 16, 64
    x = _data(m, 11)
    gap = {
        "int8": lambda: _int_gap(x, block, 127),
        "int4": lambda: _int_gap(x, block, 7),
        "fp4_e3m0": lambda: _fp4_gap(x, block),
    }[name]()
    tiled = x.repeat(R)  # block divides m: every copy sees the same blocks and scales
    r = qfn(tiled, block=block, stochastic=True, generator=torch.Generator().manual_seed(0))
    deq = dqfn(r.codes, r.side, tiled.numel(), block=block).double().reshape(R, m)
    err = deq - x.double()
    assert (err.abs() < gap * (1 + 4 * U32) + 1e-30).all()  # one grid step, fp32 slack
    bound = 5 * gap / (2 * math.sqrt(R)) + 4 * U32 * x.double().abs()
    assert (err.mean(0).abs() <= bound).all()
    # Pooled over all R*m independent samples, error in grid steps has variance <= 1/4.
    pooled = torch.where(gap > 0, err / gap.clamp(min=1e-300), 0.0).mean()  # gap 0: err is 0
    assert pooled.abs() <= 5 / (2 * math.sqrt(R * m)) + 8 * U32
    # Not secretly deterministic: elements strictly between grid points take both neighbours.
    assert (deq.std(0) > 0).sum() >= m // 2


def test_stochastic_needs_generator() -> None:
    for fn in (Q.quantize_int8, Q.quantize_int4, Q.quantize_fp4_e3m0):
        with pytest.raises(ValueError, match="generator must be a torch.Generator"):
            fn(torch.ones(4), stochastic=True)


def test_stochastic_is_reproducible_from_seed() -> None:
    x = _data(500, 12)
    a = Q.quantize_int4(x, stochastic=True, generator=torch.Generator().manual_seed(3))
    b = Q.quantize_int4(x, stochastic=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.codes, b.codes)


# --------------------------------------------------------------------------- 2-bit (SparseLoCo)


def test_2bit_golden_vector_spec_7_8() -> None:
    v = torch.tensor([-3, -2, -1, -0.2, 0.1, 0.9, 1.5, 2.5, 3, 4])
    r = Q.quantize_2bit_centroid(v)
    assert r.bits == 2 and r.codes.tolist() == [1, 1, 2, 2, 2, 2, 2, 3, 3, 3]
    torch.testing.assert_close(
        r.side, torch.tensor([0.58, 0.0, -3.08, -0.32, 2.58667]), rtol=0, atol=1e-4
    )
    deq = Q.dequantize_2bit_centroid(r.codes, r.side, 10)
    expected = torch.tensor([-2.5, -2.5] + [0.26] * 5 + [3.16667] * 3)
    torch.testing.assert_close(deq, expected, rtol=0, atol=1e-4)


def _ref_2bit(xs: list[float], n_bins: int, range_sigmas: float):
    n = len(xs)
    mu = sum(xs) / n
    c = [v - mu for v in xs]
    sigma = math.sqrt(sum(t * t for t in c) / (n - 1)) if n > 1 else 0.0
    scale = range_sigmas * sigma / n_bins
    if scale == 0 or not math.isfinite(scale):
        scale = 1.0
    ys = [t / scale + n_bins // 2 for t in c]
    codes = [max(0, min(n_bins - 1, round(y))) for y in ys]
    table = []
    for b in range(n_bins):
        members = [t for t, k in zip(c, codes, strict=True) if k == b]
        table.append(sum(members) / len(members) if members else 0.0)
    return mu, codes, table, ys


@pytest.mark.parametrize(
    ("n", "n_bins", "range_sigmas"),
    [(1, 4, 6.0), (2, 4, 6.0), (500, 4, 6.0), (333, 8, 3.0), (700, 256, 6.0)],
)
def test_2bit_matches_float64_reference(n, n_bins, range_sigmas) -> None:
    x = _data(n, 20 + n) + 0.3
    r = Q.quantize_2bit_centroid(x, n_bins=n_bins, range_sigmas=range_sigmas)
    mu, codes, table, ys = _ref_2bit(x.tolist(), n_bins, range_sigmas)
    # No reference value lies within fp32 noise of a rounding tie, so codes must match exactly.
    assert all(abs(y % 1 - 0.5) > 1e-4 for y in ys)
    assert r.codes.tolist() == codes and r.bits == int(math.log2(n_bins))
    scale_c = max(abs(t) for t in table) + abs(mu) + 1e-30
    # fp32 sums of n terms: relative error <= n * U32 of the magnitudes involved.
    tol = 4 * n * U32 * (scale_c + max(abs(v) for v in x.tolist()))
    torch.testing.assert_close(
        r.side.double(), torch.tensor([mu] + table, dtype=torch.float64), rtol=0, atol=tol
    )


def test_2bit_empty() -> None:
    r = Q.quantize_2bit_centroid(torch.zeros(0), n_bins=8)
    assert r.codes.numel() == 0 and r.side.tolist() == [0.0] * 9
    assert Q.dequantize_2bit_centroid(r.codes, r.side, 0, n_bins=8).shape == (0,)


# --------------------------------------------------------------------------- sign


@pytest.mark.parametrize("block", [None, 1, 16, 100])
@pytest.mark.parametrize("n", SIZES)
def test_sign_matches_reference(n, block) -> None:
    x = _data(n, 30 + n)
    if n:
        x[0] = -0.0
    r = Q.quantize_sign(x, block=block)
    xs = x.tolist()
    assert r.codes.tolist() == [1 if math.copysign(1.0, v) < 0 else 0 for v in xs]
    blen = n if block is None else block
    means = [
        sum(abs(v) for v in xs[i : i + blen]) / len(xs[i : i + blen])
        for i in range(0, n, max(blen, 1))
    ]
    assert r.side.numel() == Q.side_len("sign", n, block=block) == len(means)
    # fp32 sum of <= blen terms: relative error <= blen * U32.
    torch.testing.assert_close(
        r.side.double(), torch.tensor(means, dtype=torch.float64), rtol=(blen + 2) * U32, atol=0
    )
    deq = Q.dequantize_sign(r.codes, r.side, n, block=block)
    expected = [
        (-1 if c else 1) * r.side[i // max(blen, 1)].item() for i, c in enumerate(r.codes.tolist())
    ]
    assert deq.tolist() == expected
    unscaled = Q.quantize_sign(x, block=block, scale=False)
    assert unscaled.side.numel() == 0 and torch.equal(unscaled.codes, r.codes)
    ones = Q.dequantize_sign(unscaled.codes, unscaled.side, n, block=block, scale=False)
    assert ones.tolist() == [-1.0 if c else 1.0 for c in r.codes.tolist()]


# --------------------------------------------------------------------------- fp8


def _fp8_table(fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, magnitudes) of every finite non-negative fp8 value, decoded from the bit layout."""
    m_bits, bias = (3, 7) if fmt == "e4m3" else (2, 15)
    codes, vals = [], []
    for code in range(128):
        e, m = code >> m_bits, code & ((1 << m_bits) - 1)
        if (fmt == "e4m3" and code == 0x7F) or (fmt == "e5m2" and e == 31):
            continue  # NaN (E4M3FN) / inf and NaN (E5M2)
        frac = m / 2**m_bits
        vals.append(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
        codes.append(code)
    return torch.tensor(codes), torch.tensor(vals, dtype=torch.float64)


def _nearest_fp8(y: torch.Tensor, fmt: str) -> torch.Tensor:
    """Brute-force nearest representable magnitude, ties to the even code; sign from signbit."""
    codes, vals = _fp8_table(fmt)
    d = (y.double().abs()[:, None] - vals[None, :]).abs()
    cand = d == d.min(dim=1, keepdim=True).values
    even = cand & (codes % 2 == 0)[None, :]
    idx = torch.where(even.any(1), even.float().argmax(1), cand.float().argmax(1))
    return codes[idx] | (torch.signbit(y).long() << 7)


def _scaled(x: torch.Tensor, block: int, fmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element fp32 scale (loop) and y = x / scale as the quantizer defines it."""
    s = torch.tensor([_f32(a / fmax) for a in _block_amax(x.tolist(), block)], dtype=torch.float32)
    return s, (x / torch.where(s > 0, s, 1.0)).clamp(-fmax, fmax)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("n", SIZES)
def test_fp8_matches_brute_force_and_torch_cast(fmt, n) -> None:
    fmax = Q.FP8_E4M3_MAX if fmt == "e4m3" else Q.FP8_E5M2_MAX
    dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    g = torch.Generator().manual_seed(41 + n)  # wide dynamic range: fp8 subnormals too
    x = _data(n, 40 + n) * 2.0 ** torch.randint(-24, 8, (n,), generator=g)
    r = Q.quantize_fp8(x, fmt=fmt, block=16)
    s, y = _scaled(x, 16, fmax)
    assert torch.equal(r.side, s[::16])
    assert r.codes.long().tolist() == _nearest_fp8(y, fmt).tolist()
    assert torch.equal(r.codes, y.to(dtype).view(torch.uint8))
    deq = Q.dequantize_fp8(r.codes, r.side, n, fmt=fmt, block=16)
    assert torch.equal(deq, y.to(dtype).float() * s)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_exact_ties(fmt) -> None:
    fmax = Q.FP8_E4M3_MAX if fmt == "e4m3" else Q.FP8_E5M2_MAX
    tiny = 2.0**-10 if fmt == "e4m3" else 2.0**-17  # half the smallest subnormal
    # scale = 1 exactly; 1 + 2^-4 (e4m3) / 1 + 2^-3 (e5m2) is the midpoint of 1 and its successor.
    mid = 1 + (2.0**-4 if fmt == "e4m3" else 2.0**-3)
    x = torch.tensor([fmax, mid, -mid, tiny, 3 * tiny])
    r = Q.quantize_fp8(x, fmt=fmt, block=5)
    deq = Q.dequantize_fp8(r.codes, r.side, 5, fmt=fmt, block=5)
    assert deq.tolist() == [fmax, 1.0, -1.0, 0.0, 4 * tiny]  # ties to even mantissa


# --------------------------------------------------------------------------- fp4 E3M0


def _nearest_fp4(xs: list[float], block: int) -> list[float]:
    """Brute force over the 15 values {0, ±amax*2^j, j=-6..0}; ties to the larger magnitude."""
    out = []
    for v, a in zip(xs, _block_amax(xs, block), strict=True):
        cands = [0.0] + [sgn * a * 2.0**j for j in range(-6, 1) for sgn in (1, -1)]
        best = min(cands, key=lambda c: (abs(v - c), -abs(c)))
        out.append(math.copysign(best, v) if best == 0 else best)
    return out


@pytest.mark.parametrize("n", SIZES)
def test_fp4_values_and_nearest(n) -> None:
    g = torch.Generator().manual_seed(51 + n)  # wide range: every exponent and the zero level
    x = _data(n, 50 + n) * 2.0 ** torch.randint(-10, 3, (n,), generator=g)
    r = Q.quantize_fp4_e3m0(x, block=16)
    assert r.bits == 4 and all(0 <= c <= 15 for c in r.codes.tolist())
    deq = Q.dequantize_fp4_e3m0(r.codes, r.side, n, block=16).tolist()
    xs = x.tolist()
    amax = _block_amax(xs, 16)
    assert r.side.tolist() == amax[::16]
    for v, d, ref, a in zip(xs, deq, _nearest_fp4(xs, 16), amax, strict=True):
        assert d == 0 or any(abs(d) == a * 2.0**j for j in range(-6, 1))
        if d != ref:  # only where fp32 y = |x|/amax sits within rounding of a threshold
            y = abs(v) / a
            thr = [2.0**-7] + [1.5 * 2.0**k for k in range(-6, 0)]
            assert min(abs(y - t) / t for t in thr) < 4 * U32
        if abs(v) >= a * 2.0**-6:
            assert abs(v - d) <= abs(v) / 3 * (1 + 4 * U32)
        else:
            assert abs(v - d) <= a * 2.0**-7 * (1 + 4 * U32)


def test_fp4_exact_ties_go_up() -> None:
    x = torch.tensor([1.0, 0.75, -0.375, 2.0**-7, 0.99 * 2.0**-7, 3 * 2.0**-8, -0.0])
    r = Q.quantize_fp4_e3m0(x, block=7)
    deq = Q.dequantize_fp4_e3m0(r.codes, r.side, 7, block=7).tolist()
    assert deq == [1.0, 1.0, -0.5, 2.0**-6, 0.0, 2.0**-6, 0.0]
    assert r.codes.tolist() == [7, 7, 8 | 6, 1, 0, 1, 8]


# --------------------------------------------------------------------------- casts


def _bf16_oracle(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 -> bf16 by bit arithmetic (nearest even), returned as the 16-bit patterns."""
    bits = x.numpy().view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return torch.from_numpy(rounded.astype(np.uint16).view(np.uint8).copy())


@pytest.mark.parametrize("n", SIZES)
def test_casts_match_independent_rounding(n) -> None:
    x = _data(n, 60 + n)
    r16 = Q.quantize_cast(x, dtype=torch.float16)
    assert r16.bits == 16 and r16.side.numel() == 0 and r16.codes.numel() == 2 * n
    assert r16.codes.numpy().tobytes() == x.numpy().astype(np.float16).tobytes()
    d16 = Q.dequantize_cast(r16.codes, r16.side, n, dtype=torch.float16)
    assert torch.equal(d16, torch.from_numpy(x.numpy().astype(np.float16).astype(np.float32)))
    rb = Q.quantize_cast(x, dtype=torch.bfloat16)
    assert torch.equal(rb.codes, _bf16_oracle(x))
    db = Q.dequantize_cast(rb.codes, rb.side, n, dtype=torch.bfloat16)
    # bf16 keeps 8 significant bits: unit roundoff 2^-8 (normal range).
    assert ((db - x).abs() <= x.abs() * 2.0**-8).all()
    # A 16-bit input round-trips bit-exactly.
    h = x.half()
    assert torch.equal(Q.dequantize_cast(Q.quantize_cast(h).codes, r16.side, n), h.float())


def test_cast_overflow_raises() -> None:
    Q.quantize_cast(torch.tensor([65504.0, -65504.0]))  # exactly the max: fine
    with pytest.raises(
        ValueError, match=r"\|x\| must be in \[0, 65504.0\].*got max \|x\| = 65505.0"
    ):
        Q.quantize_cast(torch.tensor([1.0, -65505.0]))
    with pytest.raises(ValueError, match="to cast to torch.bfloat16"):
        Q.quantize_cast(torch.tensor([3.4e38]), dtype=torch.bfloat16)


# --------------------------------------------------------------------------- dtypes & validation


@pytest.mark.parametrize("name", sorted(Q.QUANTIZERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_equal_float32_upcast(name, dtype) -> None:
    qfn = Q.QUANTIZERS[name][0]
    x = _data(300, 70).to(dtype)
    a, b = qfn(x), qfn(x.float())
    assert torch.equal(a.codes, b.codes) and torch.equal(a.side, b.side)


@pytest.mark.parametrize("name", sorted(Q.QUANTIZERS))
def test_input_validation(name) -> None:
    qfn = Q.QUANTIZERS[name][0]
    with pytest.raises(
        TypeError,
        match=r"x.dtype must be in \{torch.float32, torch.float16, "
        r"torch.bfloat16\}, got torch.int64",
    ):
        qfn(torch.arange(4))
    with pytest.raises(TypeError, match="x must be Tensor"):
        qfn([1.0, 2.0])
    bad = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    with pytest.raises(ValueError, match="x must be finite, got 2 non-finite values"):
        qfn(bad)


def test_parameter_validation_messages() -> None:
    for fn in (
        Q.quantize_int8,
        Q.quantize_int4,
        Q.quantize_fp8,
        Q.quantize_fp4_e3m0,
        Q.quantize_sign,
    ):
        with pytest.raises(ValueError, match=r"block must be in \[1, inf\), got 0"):
            fn(torch.ones(3), block=0)
    with pytest.raises(ValueError, match=r"n_bins must be a power of two in \[2, 256\], got 3"):
        Q.quantize_2bit_centroid(torch.ones(3), n_bins=3)
    with pytest.raises(ValueError, match=r"n_bins must be in \[2, 256\], got 512"):
        Q.quantize_2bit_centroid(torch.ones(3), n_bins=512)
    with pytest.raises(ValueError, match=r"range_sigmas must be in \(0.0, inf\), got 0"):
        Q.quantize_2bit_centroid(torch.ones(3), range_sigmas=0)
    with pytest.raises(ValueError, match=r"fmt must be in \{'e4m3', 'e5m2'\}, got 'e3m4'"):
        Q.quantize_fp8(torch.ones(3), fmt="e3m4")
    with pytest.raises(ValueError, match="dtype must be in"):
        Q.quantize_cast(torch.ones(3), dtype=torch.float32)


def test_dequantize_validation() -> None:
    r = Q.quantize_int4(torch.ones(10), block=4)
    with pytest.raises(ValueError, match="codes must be 1-D with 9 entries for n=9"):
        Q.dequantize_int4(r.codes, r.side, 9, block=4)
    with pytest.raises(ValueError, match="side must be 1-D with 5 entries for n=10"):
        Q.dequantize_int4(r.codes, r.side, 10, block=2)
    with pytest.raises(ValueError, match=r"codes must be in \[1, 15\], got values in \[15, 16\]"):
        Q.dequantize_int4(
            torch.cat([r.codes[:9], torch.tensor([16], dtype=torch.uint8)]), r.side, 10, block=4
        )
    with pytest.raises(ValueError, match="codes must be finite e4m3 values, got 1"):
        Q.dequantize_fp8(torch.tensor([0x7F, 1], dtype=torch.uint8), torch.ones(1), 2)
    with pytest.raises(TypeError, match=r"codes.dtype must be in \{torch.uint8\}"):
        Q.dequantize_int8(r.codes.long(), r.side, 10, block=4)


# --------------------------------------------------------------------------- registry & sizes

REGISTRY_CASES = [
    ("int8", {}),
    ("int8", {"block": 32}),
    ("int4", {}),
    ("2bit", {}),
    ("2bit", {"n_bins": 16}),
    ("sign", {}),
    ("sign", {"block": 10}),
    ("sign", {"scale": False}),
    ("fp8_e4m3", {"block": 7}),
    ("fp8_e5m2", {}),
    ("fp4_e3m0", {}),
    ("fp16", {}),
    ("bf16", {}),
]
EXPECTED_BITS = {
    "int8": 8,
    "int4": 4,
    "2bit": 2,
    "sign": 1,
    "fp8_e4m3": 8,
    "fp8_e5m2": 8,
    "fp4_e3m0": 4,
    "fp16": 16,
    "bf16": 16,
}


@pytest.mark.parametrize(("name", "params"), REGISTRY_CASES)
@pytest.mark.parametrize("n", [0, 1, 129, 300])
def test_registry_sizes_are_exact(name, params, n) -> None:
    qfn, dqfn = Q.QUANTIZERS[name]
    r = qfn(_data(n, 80 + n), **params)
    deq_params = {k: v for k, v in params.items() if k in ("block", "n_bins", "scale")}
    deq = dqfn(r.codes, r.side, n, **deq_params)
    assert deq.shape == (n,) and deq.dtype == torch.float32
    assert r.side.dtype == torch.float32 and r.side.numel() == Q.side_len(name, n, **params)
    assert r.bits == Q.code_bits(name, **params)
    expected_bits = 4 if params.get("n_bins") == 16 else EXPECTED_BITS[name]
    assert r.bits == expected_bits
    assert r.codes.numel() == (2 * n if r.bits == 16 else n)
    if n and r.bits < 16:
        assert int(r.codes.max()) < 2**r.bits


def test_side_len_closed_form() -> None:
    assert (
        Q.side_len("int8", 257) == 2 and Q.side_len("int8", 256) == 1 and Q.side_len("int8", 0) == 0
    )
    assert Q.side_len("int4", 129) == 2 and Q.side_len("fp4_e3m0", 1, block=1) == 1
    assert Q.side_len("2bit", 0) == 5 and Q.side_len("2bit", 10, n_bins=8) == 9
    assert Q.side_len("sign", 0) == 0 and Q.side_len("sign", 5) == 1
    assert Q.side_len("sign", 5, scale=False) == 0 and Q.side_len("fp16", 9) == 0
    with pytest.raises(TypeError, match="params must be in"):
        Q.side_len("int8", 10, n_bins=4)
    with pytest.raises(ValueError, match="name must be in"):
        Q.side_len("int3", 10)
    with pytest.raises(ValueError, match=r"block must be in \[1, inf\), got 0"):
        Q.side_len("fp8_e4m3", 10, block=0)
    with pytest.raises(ValueError, match=r"n must be in \[0, inf\), got -1"):
        Q.side_len("int8", -1)
    assert Q.code_bits("2bit", n_bins=256) == 8


# --------------------------------------------------------------------------- properties


@settings(deadline=None, max_examples=50, derandomize=True)
@given(
    name=st.sampled_from(["int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp4_e3m0", "sign"]),
    n=st.integers(0, 400),
    block=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_error_bounds(name, n, block, dtype, seed) -> None:
    qfn, dqfn = Q.QUANTIZERS[name]
    x = _data(n, seed, dtype)
    if n > 2:
        x[n // 2] = 0.0
    r = qfn(x, block=block)
    assert r.side.numel() == Q.side_len(name, n, block=block) and r.codes.shape == (n,)
    deq = dqfn(r.codes, r.side, n, block=block).double()
    xd = x.double()
    a = torch.tensor(_block_amax(xd.tolist(), block), dtype=torch.float64)
    err = (xd - deq).abs()
    if name in ("int8", "int4"):
        s = a / (127 if name == "int8" else 7)
        assert (err <= s / 2 + 3 * U32 * a).all()
    elif name.startswith("fp8"):
        m, emin, fmax = (3, -6, Q.FP8_E4M3_MAX) if name == "fp8_e4m3" else (2, -14, Q.FP8_E5M2_MAX)
        s = a / fmax  # half-ulp relative bound for normals, half the subnormal step below
        assert (err <= xd.abs() * 2.0 ** -(m + 1) + s * 2.0 ** (emin - m - 1) + 4 * U32 * a).all()
    elif name == "fp4_e3m0":
        big = xd.abs() >= a * 2.0**-6
        assert (err[big] <= xd.abs()[big] / 3 * (1 + 4 * U32)).all()
        assert (err[~big] <= a[~big] * 2.0**-7 * (1 + 4 * U32)).all()
    else:
        assert r.codes.tolist() == [int(math.copysign(1.0, v) < 0) for v in xd.tolist()]
        xs = xd.tolist()
        means = [
            sum(abs(v) for v in xs[i : i + block]) / len(xs[i : i + block])
            for i in range(0, n, block)
        ]
        # fp32 sum of <= block terms: relative error <= block * U32.
        torch.testing.assert_close(
            r.side.double(),
            torch.tensor(means, dtype=torch.float64),
            rtol=(block + 2) * U32,
            atol=0,
        )
        mags = r.side.double().repeat_interleave(block)[:n]
        assert torch.equal(deq, torch.where(r.codes.bool(), -mags, mags))


# --------------------------------------------------------------------------- sync-free cores

CORE_CASES = [
    *REGISTRY_CASES,
    ("int8", {"block": 16, "stochastic": True}),
    ("int4", {"block": 16, "stochastic": True}),
    ("2bit", {"n_bins": 8}),
    ("fp4_e3m0", {"block": 16}),
    ("fp4_e3m0", {"block": 16, "stochastic": True}),
]
CORE_IDS = [f"{name}-{params}" for name, params in CORE_CASES]


def _quantize_public(name: str, params: dict, x: torch.Tensor, seed: int) -> Q.QuantResult:
    kw = dict(params)
    if params.get("stochastic"):
        kw["generator"] = torch.Generator().manual_seed(seed)
    return Q.QUANTIZERS[name][0](x, **kw)


def _dequantize_public(name: str, params: dict, codes, side, n) -> torch.Tensor:
    fn = Q.QUANTIZERS[name][1]
    keys = inspect.signature(fn).parameters
    return fn(codes, side, n, **{k: v for k, v in params.items() if k in keys})


@pytest.mark.parametrize(("name", "params"), CORE_CASES, ids=CORE_IDS)
@pytest.mark.parametrize("n", SIZES)
def test_qcore_equals_public_quantizer(name, params, n) -> None:
    x = _data(n, 900 + n)
    ref = _quantize_public(name, params, x, seed=n)
    qcore = Q.QUANTIZER_CORES[name][0]
    kw = dict(params)
    if params.get("stochastic"):
        kw["generator"] = torch.Generator().manual_seed(n)  # same stream as the public call
    got = qcore(x.reshape(-1).to(torch.float32), **kw)
    assert got.bits == ref.bits
    assert got.codes.dtype == torch.uint8 and torch.equal(got.codes, ref.codes)
    assert got.side.dtype == torch.float32 and torch.equal(got.side, ref.side)


@pytest.mark.parametrize(("name", "params"), CORE_CASES, ids=CORE_IDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_dcore_rows_equal_public_dequantizer_per_row(name, params, n, rows) -> None:
    results = [_quantize_public(name, params, _data(n, 1000 * r + n), seed=r) for r in range(rows)]
    width = 2 * n if name in ("fp16", "bf16") else n
    n_side = Q.side_len(name, n, **params)
    codes = torch.zeros(rows, width, dtype=torch.uint8)
    side = torch.zeros(rows, n_side, dtype=torch.float32)
    for r, res in enumerate(results):
        codes[r], side[r] = res.codes, res.side
    out = Q.QUANTIZER_CORES[name][1](codes, side, n, **params)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    for r, res in enumerate(results):
        assert torch.equal(out[r], _dequantize_public(name, params, res.codes, res.side, n))


@pytest.mark.parametrize(("name", "params"), CORE_CASES, ids=CORE_IDS)
def test_code_range_bounds_emitted_codes_and_public_check(name, params) -> None:
    rng = Q.code_range(name, **params)
    if name in ("fp8_e4m3", "fp8_e5m2", "fp16", "bf16"):
        assert rng is None  # invalid patterns show up as non-finite decoded values instead
        return
    lo, hi = rng
    res = _quantize_public(name, params, _data(1000, 7), seed=7)
    assert lo <= int(res.codes.min()) and int(res.codes.max()) <= hi
    n_side = Q.side_len(name, 1, **params)
    side = torch.ones(n_side, dtype=torch.float32)
    for code in (lo, hi):  # accepted by the checked dequantizer
        _dequantize_public(name, params, torch.tensor([code], dtype=torch.uint8), side, 1)
    for code in (lo - 1, hi + 1):
        if 0 <= code <= 255:
            with pytest.raises(ValueError, match="codes must be in"):
                bad = torch.tensor([code], dtype=torch.uint8)
                _dequantize_public(name, params, bad, side, 1)


@pytest.mark.parametrize(("name", "params"), CORE_CASES, ids=CORE_IDS)
def test_dcore_never_raises_on_any_code(name, params) -> None:
    # Every byte value as a code, with every side value 0.5: the core decodes each one without an
    # out-of-bounds read, and inside code_range it equals the checked dequantizer of that code.
    n = 256
    codes = torch.arange(256, dtype=torch.uint8).reshape(1, n)
    if name in ("fp16", "bf16"):
        codes = torch.stack([codes[0], codes[0]], dim=1).reshape(1, 2 * n)
    side = torch.full((1, Q.side_len(name, n, **params)), 0.5, dtype=torch.float32)
    out = Q.QUANTIZER_CORES[name][1](codes, side, n, **params)
    assert out.shape == (1, n) and out.dtype == torch.float32
    rng = Q.code_range(name, **params)
    if rng is None:
        return
    assert torch.isfinite(out).all()  # out-of-range codes are flagged by range, not by NaN
    side1 = torch.full((Q.side_len(name, 1, **params),), 0.5, dtype=torch.float32)
    for code in range(rng[0], rng[1] + 1):
        one = torch.tensor([code], dtype=torch.uint8)
        assert torch.equal(out[0, code : code + 1], _dequantize_public(name, params, one, side1, 1))


def test_fp4_device_tables_equal_constants() -> None:
    levels, thresholds = Q._fp4_tables(torch.device("cpu"))
    assert levels.dtype == torch.float32 and levels.tolist() == list(Q.FP4_E3M0_LEVELS)
    assert thresholds.dtype == torch.float32 and thresholds.tolist() == list(Q._FP4_THRESHOLDS)
