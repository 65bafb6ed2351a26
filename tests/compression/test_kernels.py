"""Triton kernels of thinwire.compression.fused against their pure-torch references.

On CPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
before anything imports thinwire); on a CUDA machine the same tests run the compiled kernels.
Integer outputs (packed codes, indices) must match exactly; float outputs exactly where both paths
do the same float32 operations in the same order, else within a bound derived from float32
rounding. The references themselves are checked against independent float64 / numpy oracles.
Sizes: 0, 1, block - 1, block, block + 1, a prime, a few thousand, a strided
view; they stay small because the interpreter runs programs one at a time.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.compression import aggregate_sparse, dct_basis, pack_bits, quant
from thinwire.compression.aggregate import SparseMessage
from thinwire.compression.chunk import ChunkGeometry
from thinwire.compression.fused import (
    EF_FORMAT_BITS,
    dct_topk,
    dct_topk_torch,
    decode_accumulate,
    decode_accumulate_torch,
    ef_quantize_pack,
    ef_quantize_pack_torch,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U32 = 2.0**-24  # float32 unit roundoff
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _randn(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    return x.to(dtype).to(DEVICE)


# --- ef_quantize_pack ------------------------------------------------------------------------

# (fmt, block, sizes): sizes cover 0, 1, block-1, block, block+1, a prime, a few thousand.
_EF_CASES = [
    ("int8", 16, [0, 1, 15, 16, 17, 1031, 5000]),
    ("int8", None, [255, 256, 257]),
    ("int4", 16, [1, 15, 16, 17, 1031]),
    ("int4", 7, [6, 7, 8, 131]),  # odd block: codes straddle bytes (separate pack kernel)
    ("fp4_e3m0", 16, [0, 1, 15, 16, 17, 1031]),
    ("fp4_e3m0", 5000, [4999, 5000, 5001, 9001]),  # block > FUSED_MAX_BLOCK: split path
    ("sign", 16, [1, 15, 16, 17, 1031]),
    ("sign", 5, [4, 5, 6, 131]),
    ("sign", None, [0, 1, 7, 8, 9, 1031, 5003]),  # one scale; 5003 > TILE: split path
    ("2bit", None, [0, 1, 2, 3, 4, 5, 1031, 5003]),
]
_EF_PARAMS = [(f, b, n) for f, b, ns in _EF_CASES for n in ns]


def _float_sum_slack(terms: torch.Tensor) -> float:
    """Bound on how far two float32 summation orders of ``terms`` can differ (float64).

    Any order of a recursive/pairwise float32 sum of ``m`` terms errs by at most
    ``(m - 1) * u * sum|t|`` (Higham, Accuracy and Stability, eq. 4.4); two orders differ by twice.
    """
    m = terms.numel()
    return 2 * max(m - 1, 1) * U32 * float(terms.double().abs().sum())


def _check_ef(a, b, fmt: str, block, p: torch.Tensor) -> None:
    packed_a, side_a, res_a = a
    packed_b, side_b, res_b = b
    assert packed_b.dtype == torch.uint8 and torch.equal(packed_a, packed_b)
    assert side_b.dtype == torch.float32 and side_b.shape == side_a.shape
    assert res_b.dtype == torch.float32 and res_b.shape == res_a.shape
    if fmt in ("int8", "int4", "fp4_e3m0"):
        # Same float32 operations in the same order on both paths: bit-identical.
        assert torch.equal(side_a, side_b)
        assert torch.equal(res_a, res_b)
        return
    flat = p.reshape(-1).double().cpu()
    n = flat.numel()
    if fmt == "sign":
        blen = max(n, 1) if block is None else block
        slack = [_float_sum_slack(flat[i : i + blen]) / min(blen, n - i) for i in range(0, n, blen)]
        tol = torch.tensor(slack, dtype=torch.float64)
        # side = mean |p|: the sums round in different orders; e' = p -/+ side moves by the same.
        assert torch.all((side_a.double().cpu() - side_b.double().cpu()).abs() <= tol + 1e-45)
        per_elem = tol.repeat_interleave(blen)[:n] + 2 * U32 * flat.abs()
        diff = (res_a.reshape(-1).double() - res_b.reshape(-1).double()).abs().cpu()
        assert torch.all(diff <= per_elem)
        return
    # 2bit: mu and the codes are identical (same torch reductions); each centroid is a float sum
    # over its bin, so the table and e' = p - (L[code] + mu) differ by that bin's sum slack.
    assert side_a[0] == side_b[0]
    codes = quant.quantize_2bit_centroid(p).codes.long().cpu()
    c = flat - float(side_a[0])
    tol = torch.zeros(quant.TWO_BIT_DEFAULT_BINS, dtype=torch.float64)
    for j in range(tol.numel()):
        in_bin = codes == j
        if in_bin.any():
            tol[j] = _float_sum_slack(c[in_bin]) / int(in_bin.sum()) + 2 * U32 * float(
                c[in_bin].abs().max()
            )
    assert torch.all((side_a[1:].double().cpu() - side_b[1:].double().cpu()).abs() <= tol)
    diff = (res_a.reshape(-1).double() - res_b.reshape(-1).double()).abs().cpu()
    assert torch.all(diff <= tol[codes] + 2 * U32 * flat.abs() + 1e-45)


def _ef_inputs(n: int, seed: int):
    return _randn(n, seed), _randn(n, seed + 1)


@pytest.mark.parametrize(("fmt", "block", "n"), _EF_PARAMS)
def test_ef_quantize_pack_kernel_matches_reference(fmt: str, block, n: int) -> None:
    residual, inp = _ef_inputs(n, seed=n)
    kw = {"decay": 0.9, "scale": 0.37, "fmt": fmt, "block": block}
    a = ef_quantize_pack(residual, inp, backend="torch", **kw)
    b = ef_quantize_pack(residual, inp, backend="triton", **kw)
    p = residual * 0.9 + (inp * 0.37)
    _check_ef(a, b, fmt, block, p)
    assert b[0].numel() == math.ceil(n * EF_FORMAT_BITS[fmt] / 8)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(
    fmt=st.sampled_from(["int8", "int4", "2bit", "sign", "fp4_e3m0"]),
    n=st.integers(0, 600),
    block=st.one_of(st.none(), st.integers(1, 70)),
    decay=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    scale=st.floats(-4.0, 4.0, allow_nan=False, width=32),
    seed=st.integers(0, 2**16),
)
def test_ef_quantize_pack_kernel_property(fmt, n, block, decay, scale, seed) -> None:
    block = None if fmt == "2bit" else block
    residual, inp = _ef_inputs(n, seed)
    kw = {"decay": decay, "scale": scale, "fmt": fmt, "block": block}
    a = ef_quantize_pack(residual, inp, backend="torch", **kw)
    b = ef_quantize_pack(residual, inp, backend="triton", **kw)
    _check_ef(a, b, fmt, block, residual * decay + inp * scale)


@pytest.mark.parametrize("fmt", ["int8", "int4", "2bit", "sign", "fp4_e3m0"])
def test_ef_quantize_pack_kernel_strided_and_shaped(fmt: str) -> None:
    residual = _randn((40, 30), 7)[::2]  # (20, 30), row stride 60
    inp = _randn((30, 80), 8, torch.float16).mT[::4]  # (20, 30), strides (4, 80)
    assert not residual.is_contiguous() and not inp.is_contiguous()
    block = None if fmt in ("2bit", "sign") else 32
    kw = {"decay": 1.0, "scale": 0.5, "fmt": fmt, "block": block}
    r_copy = residual.clone()
    a = ef_quantize_pack(residual, inp, backend="torch", **kw)
    b = ef_quantize_pack(residual, inp, backend="triton", **kw)
    assert torch.equal(residual, r_copy)  # the input buffer is not modified
    assert b[2].shape == (20, 30)
    _check_ef(a, b, fmt, block, residual + inp.float() * 0.5)


def test_ef_quantize_pack_zero_blocks_and_ties() -> None:
    # All-zero blocks (scale 0 -> codes of 0, no NaN), exact .5 ties (half to even) and -0.0.
    residual = torch.zeros(64, device=DEVICE)
    residual[16:32] = -0.0  # -0.0 * decay + -0.0 keeps p = -0.0 there (sign bit set)
    inp = torch.tensor([0.0] * 16 + [-0.0] * 16 + [0.5, 1.5, 2.5, -0.5, -2.5, 127.0] * 5 + [1, 1])
    inp = inp.to(DEVICE)
    for fmt in ("int8", "int4", "fp4_e3m0", "sign"):
        kw = {"decay": 0.5, "scale": 1.0, "fmt": fmt, "block": 16}
        a = ef_quantize_pack(residual, inp, backend="torch", **kw)
        b = ef_quantize_pack(residual, inp, backend="triton", **kw)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
            assert not torch.isnan(y.float()).any()
        if fmt == "sign":  # codes 0 for +0.0, 1 for -0.0: bytes 0x00 0x00 0xff 0xff
            assert b[0][:4].tolist() == [0, 0, 255, 255]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_ef_quantize_pack_nonfinite_raises_on_both_backends() -> None:
    residual = torch.full((40,), 3e38, device=DEVICE)
    inp = torch.full((40,), 3e38, device=DEVICE)  # finite inputs whose sum overflows
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"x must be finite, got 40 non-finite values"):
            ef_quantize_pack(residual, inp, decay=1.0, fmt="int8", backend=backend)


def test_ef_quantize_pack_reference_against_numpy_oracle() -> None:
    # Independent oracle: numpy float32 with each product rounded, closed-form int8 coding.
    n, block = 45, 16
    residual, inp = _ef_inputs(n, 3)
    packed, side, res = ef_quantize_pack_torch(residual, inp, decay=0.75, scale=-1.25, fmt="int8")
    r, x = residual.cpu().numpy(), inp.cpu().numpy()
    p = r * np.float32(0.75) + x * np.float32(-1.25)
    amax = np.abs(p).max()  # one block: default 256 > n
    s = amax / np.float32(127)
    q = np.clip(np.round(p / s), -127, 127)  # numpy rounds half to even
    assert np.array_equal(packed.cpu().numpy(), (q + 128).astype(np.uint8))
    assert side.item() == s
    assert np.array_equal(res.cpu().numpy(), p - q.astype(np.float32) * s)
    packed2, _, _ = ef_quantize_pack_torch(residual, inp, decay=0.75, fmt="sign", block=block)
    signs = torch.from_numpy(np.signbit(r * np.float32(0.75) + x))
    assert torch.equal(packed2.cpu(), pack_bits(signs, 1))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "2bit", "sign", "fp4_e3m0"])
def test_ef_quantize_pack_bf16_input_on_gpu(fmt: str) -> None:
    residual, inp = _randn(3001, 1), _randn(3001, 2, torch.bfloat16)
    kw = {"decay": 0.9, "scale": 0.1, "fmt": fmt}
    a = ef_quantize_pack(residual, inp, backend="torch", **kw)
    b = ef_quantize_pack(residual, inp, backend="triton", **kw)
    _check_ef(a, b, fmt, None, residual * 0.9 + inp.float() * 0.1)


# --- dct_topk --------------------------------------------------------------------------------

# (N, n1, n2, k): sides 1, 15, 16, 17, primes; 64 x 64 = 4096 per tile; N = 0, 1, prime, many.
_DCT_CASES = [
    (0, 4, 4, 3),
    (1, 1, 1, 1),
    (3, 1, 15, 4),
    (2, 1, 16, 16),
    (3, 1, 17, 1),
    (7, 13, 11, 20),
    (2, 16, 16, 37),
    (1, 17, 3, 51),
    (2, 64, 64, 64),
    (61, 1, 8, 2),
]


def _dct_oracle_bound(x: torch.Tensor) -> torch.Tensor:
    """|F1|^T |X| |F2| (float64): scale of the float32 rounding of each coefficient."""
    n1, n2 = x.shape[1:]
    f1 = dct_basis(n1, torch.float64).abs()
    f2 = dct_basis(n2, torch.float64).abs()
    return f1.mT @ x.double().abs().cpu() @ f2


@pytest.mark.parametrize(("n_tiles", "n1", "n2", "k"), _DCT_CASES)
def test_dct_topk_kernel_matches_reference(n_tiles: int, n1: int, n2: int, k: int) -> None:
    x = _randn((n_tiles, n1, n2), n1 * 100 + n2)
    b1, b2 = dct_basis(n1, device=DEVICE), dct_basis(n2, device=DEVICE)
    idx_a, val_a = dct_topk(x, b1, b2, k, backend="torch")
    idx_b, val_b = dct_topk(x, b1, b2, k, backend="triton")
    assert idx_b.dtype == torch.int64 and val_b.dtype == torch.float32
    assert idx_b.shape == val_b.shape == (n_tiles, k)
    # Seeded data has no near-tie at the k-th place, so the selections agree exactly.
    assert torch.equal(idx_a, idx_b)
    # Each coefficient is a two-stage float32 product: error <= (n1 + n2) u |F1|^T|X||F2| per
    # path (Higham eq. 3.5), doubled for the two paths.
    bound = _dct_oracle_bound(x).reshape(n_tiles, n1 * n2).gather(1, idx_a.cpu())
    diff = (val_a.double() - val_b.double()).abs().cpu()
    assert torch.all(diff <= 2 * (n1 + n2) * U32 * bound + 1e-45)


@pytest.mark.parametrize(("n1", "n2", "k"), [(1, 16, 5), (4, 8, 9), (8, 8, 32), (5, 7, 35)])
def test_dct_topk_kernel_ties_exact_with_identity_basis(n1: int, n2: int, k: int) -> None:
    # Identity bases make the products exact, so the selection itself is compared, with many
    # equal magnitudes (small integers, both signs, zeros) straddling the k-th place.
    g = torch.Generator().manual_seed(n1 * n2 + k)
    x = torch.randint(-3, 4, (6, n1, n2), generator=g).float().to(DEVICE)
    x[0] = 0.0
    x[1] = -0.0
    e1, e2 = torch.eye(n1, device=DEVICE), torch.eye(n2, device=DEVICE)
    a = dct_topk(x, e1, e2, k, backend="torch")
    b = dct_topk(x, e1, e2, k, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@settings(deadline=None, max_examples=30, derandomize=True)
@given(n1=st.integers(1, 20), n2=st.integers(1, 20), data=st.data(), seed=st.integers(0, 2**16))
def test_dct_topk_kernel_property_identity_basis(n1, n2, data, seed) -> None:
    # Exact products (identity bases) on data with many ties: the whole selection must match.
    k = data.draw(st.integers(1, n1 * n2))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (3, n1, n2), generator=g).float().to(DEVICE) / 4
    e1, e2 = torch.eye(n1, device=DEVICE), torch.eye(n2, device=DEVICE)
    a = dct_topk(x, e1, e2, k, backend="torch")
    b = dct_topk(x, e1, e2, k, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_dct_topk_kernel_strided_half_input() -> None:
    base = _randn((16, 6, 32), 5, torch.float16)
    x = base.transpose(1, 2)[::2, :16, :]  # (8, 16, 6), not contiguous
    assert not x.is_contiguous()
    b1, b2 = dct_basis(16, device=DEVICE), dct_basis(6, device=DEVICE)
    idx_a, val_a = dct_topk(x, b1, b2, 10, backend="torch")
    idx_b, val_b = dct_topk(x, b1, b2, 10, backend="triton")
    assert torch.equal(idx_a, idx_b)
    bound = _dct_oracle_bound(x).reshape(8, 96).gather(1, idx_a.cpu())
    assert torch.all((val_a - val_b).abs().double().cpu() <= 2 * 22 * U32 * bound + 1e-45)


def test_dct_topk_reference_against_scipy_and_brute_force() -> None:
    x = _randn((3, 6, 10), 11)
    idx, val = dct_topk_torch(x, dct_basis(6, device=DEVICE), dct_basis(10, device=DEVICE), 7)
    for t in range(3):
        coef = scipy.fft.dctn(x[t].double().cpu().numpy(), type=2, norm="ortho").reshape(-1)
        order = sorted(range(60), key=lambda i: (-abs(coef[i]), i))  # ties: lower index
        assert idx[t].tolist() == sorted(order[:7])
        np.testing.assert_allclose(val[t].cpu().numpy(), coef[idx[t].cpu().numpy()], rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_dct_topk_errors() -> None:
    x = torch.zeros(2, 4, 4, device=DEVICE)
    x[1, 0, 0] = float("inf")
    e = torch.eye(4, device=DEVICE)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"chunks must be finite"):
            dct_topk(x, e, e, 2, backend=backend)
        with pytest.raises(ValueError, match=r"k must be in \[1, 16\]"):
            dct_topk(x, e, e, 17, backend=backend)
    big = torch.zeros(1, 65, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"x_tiles sides must be in \[1, 64\]"):
        dct_topk(
            big, torch.eye(65, device=DEVICE), torch.eye(2, device=DEVICE), 1, backend="triton"
        )


# --- decode_accumulate -----------------------------------------------------------------------


def _payloads(ks: list[int], n: int, length: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rows = [[torch.randperm(length, generator=g)[:k].sort().values for _ in range(n)] for k in ks]
    idx = [
        (torch.stack(r) if r else torch.empty(0, k, dtype=torch.int64)).to(DEVICE)
        for r, k in zip(rows, ks, strict=True)
    ]
    val = [(torch.randn(n, k, generator=g) * 3).to(dtype).to(DEVICE) for k in ks]
    return idx, val


# (ks per peer, num_chunks, chunk_len): lengths 1, 15, 16, 17, a prime, a few thousand.
_DECODE_CASES = [
    ([1], 1, 1),
    ([3, 3, 3], 5, 15),
    ([16, 16], 3, 16),
    ([2, 17, 5], 2, 17),
    ([4, 0, 4], 7, 131),
    ([64, 64, 64, 7], 3, 4099),
    ([2, 2], 0, 8),
]


@pytest.mark.parametrize("mode", ["index_mean", "global_mean"])
@pytest.mark.parametrize(("ks", "num_chunks", "chunk_len"), _DECODE_CASES)
def test_decode_accumulate_kernel_bit_identical(ks, num_chunks, chunk_len, mode) -> None:
    idx, val = _payloads(ks, num_chunks, chunk_len, seed=sum(ks) + chunk_len)
    a = decode_accumulate(idx, val, num_chunks, chunk_len, mode=mode, backend="torch")
    b = decode_accumulate(idx, val, num_chunks, chunk_len, mode=mode, backend="triton")
    assert b.dtype == torch.float32 and b.shape == (num_chunks, chunk_len)
    assert torch.equal(a, b)


def test_decode_accumulate_kernel_strided_half_values() -> None:
    idx, val = _payloads([6, 6, 6], 4, 40, seed=3, dtype=torch.float16)
    wide = [torch.cat([v, v], dim=1)[:, ::2] for v in val]  # non-contiguous views of the values
    cols = [i.mT.contiguous().mT for i in idx]  # same indices, column-major storage
    assert not wide[0].is_contiguous() and not cols[0].is_contiguous()
    a = decode_accumulate(cols, wide, 4, 40, backend="torch")
    b = decode_accumulate(cols, wide, 4, 40, backend="triton")
    assert torch.equal(a, b)


def test_decode_accumulate_reference_equals_aggregate_sparse_and_loops() -> None:
    geom = ChunkGeometry.of((6, 16), target=4)  # 6 tiles of 4 x 4
    idx, val = _payloads([3, 5, 3], geom.num_chunks, geom.chunk_len, seed=9)
    msgs = [SparseMessage(geom, "none", i, v) for i, v in zip(idx, val, strict=True)]
    for mode in ("index_mean", "global_mean"):
        out = decode_accumulate_torch(idx, val, geom.num_chunks, geom.chunk_len, mode=mode)
        assert torch.equal(geom.from_chunks(out), aggregate_sparse(msgs, mode=mode))
        # Float64 plain loops: per slot, the mean over selecting peers (or over all peers).
        ref = np.zeros((geom.num_chunks, geom.chunk_len))
        cnt = np.zeros_like(ref)
        for i, v in zip(idx, val, strict=True):
            for c in range(geom.num_chunks):
                for j, x in zip(i[c].tolist(), v[c].tolist(), strict=True):
                    ref[c, j] += x
                    cnt[c, j] += 1
        ref = np.where(cnt > 0, ref / np.maximum(cnt, 1), 0) if mode == "index_mean" else ref / 3
        # Three float32 additions and one division: 4 roundings of the largest partial sum.
        np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=0, atol=4 * U32 * 3 * 9 * 3)


def test_decode_accumulate_errors() -> None:
    idx, val = _payloads([2], 2, 8, seed=1)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"idx_list\[0\] must be in \[0, 3\]"):
            decode_accumulate(idx, val, 2, 4, backend=backend)
        with pytest.raises(ValueError, match=r"at least one peer"):
            decode_accumulate([], [], 2, 8, backend=backend)
        with pytest.raises(ValueError, match=r"mode must be in"):
            decode_accumulate(idx, val, 2, 8, mode="sum", backend=backend)


# --- The kernels compile for a GPU -----------------------------------------------------------

_COMPILE_CHECK = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from thinwire.compression import quant
    from thinwire.compression._triton import dct_topk as D, decode_accumulate as A
    from thinwire.compression._triton import ef_quantize_pack as E
    from thinwire.compression._triton._common import LAUNCH_OPTIONS

    F, I = "*fp32", "i32"
    q = {"THR": quant._FP4_THRESHOLDS, "LV": quant.FP4_E3M0_LEVELS}
    jobs = [
        (E._ef_fused_kernel, "res inp out side packed bad n n_blocks block nbytes decay scale",
         [F, "*bf16", F, F, "*u8", "*i32", I, I, I, I, "fp32", "fp32"],
         dict(FMT=1, LEVELS=1, BITS=4, PACKED=True, ROWS=32, BP=128, **q)),
        (E._ef_update_kernel, "res inp out partial bad n block n_chunks decay scale",
         [F, F, F, F, "*i32", "i64", "i64", I, "fp32", "fp32"], dict(STAT=1, CHUNK=4096)),
        (E._ef_code_kernel, "out side packed n block n_chunks nbytes",
         [F, F, "*u8", I, I, I, I], dict(FMT=0, LEVELS=127, BITS=8, PACKED=False, CHUNK=4096, **q)),
        (E._pack_kernel, "codes packed n nbytes", ["*u8", "*u8", I, I], dict(BITS=1, BYTES=4096)),
        (E._two_bit_kernel, "out stats side packed sums counts n nbytes",
         [F, F, F, "*u8", F, "*i32", I, I], dict(NB=4, BITS=2, SUBTRACT=False, BLOCK=4096)),
        (D._dct_topk_kernel, "x f1t f2 idx val bad n1 n2 k",
         ["*bf16", F, F, "*i64", F, "*i32", I, I, I], dict(P1=64, P2=64, RADIX_BITS=31)),
        (A._decode_accumulate_kernel, "idx val koff acc cnt n_peers k_total chunk_len n_peers_f",
         ["*i64", F, "*i32", F, "*i32", I, I, I, "fp32"], dict(INDEX_MEAN=True, KB=64, LB=4096)),
    ]
    for fn, names, types, consts in jobs:
        params = list(fn.arg_names)
        sig = dict(zip(params, types)) | {c: "constexpr" for c in consts}
        assert [p.split("_ptr")[0] for p in params[: len(types)]] == names.split(), fn
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options=LAUNCH_OPTIONS)
        ptx = k.asm["ptx"]
        # No multiply-add contraction where the references round every product.
        assert fn is D._dct_topk_kernel or "fma.rn" not in ptx, fn
    print("compiled", len(jobs))
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    # The interpreter accepts programs the GPU compiler rejects (dot shapes, layouts), so every
    # kernel is also compiled to a cubin for sm_90 (H100) with triton's bundled ptxas; this needs
    # no GPU. A fresh process, because @triton.jit is interpreted once TRITON_INTERPRET is set.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True, env=env, timeout=280
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip() == "compiled 7"
