"""Tests for thinwire.compression.dct against the closed form, scipy and Psyche's golden vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.compression.chunk import ChunkGeometry
from thinwire.compression.dct import dct_basis, dct_chunks, dct_tiles, idct_chunks, idct_tiles

SIDES = [1, 2, 3, 4, 7, 8, 29, 64, 100]


def _basis_loops(n: int) -> list[list[float]]:
    """The DCT-II closed form of dct.py's docstring, element by element with math.cos."""
    out = []
    for j in range(n):
        row = []
        for b in range(n):
            c = math.sqrt(1.0 / n) if b == 0 else math.sqrt(2.0 / n)
            row.append(c * math.cos(math.pi * (2 * j + 1) * b / (2 * n)))
        out.append(row)
    return out


@pytest.mark.parametrize("n", SIDES)
def test_basis_matches_closed_form_fp64(n: int) -> None:
    f = dct_basis(n, torch.float64)
    # 1e-12: both sides are fp64 evaluations of the same formula.
    torch.testing.assert_close(
        f, torch.tensor(_basis_loops(n), dtype=torch.float64), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("n", [*SIDES, 1000])
def test_basis_matches_scipy_dct(n: int) -> None:
    f = dct_basis(n, torch.float64).numpy()
    eye = np.eye(n)
    # Row j of F is the DCT of the unit vector e_j, i.e. encoding a row vector x is x @ F = dct(x).
    np.testing.assert_allclose(
        f, scipy.fft.dct(eye, type=2, norm="ortho", axis=1), rtol=0, atol=1e-12
    )
    # The same matrix transposed: scipy with axis=0 transforms columns, giving F^T.
    np.testing.assert_allclose(
        f, scipy.fft.dct(eye, type=2, norm="ortho", axis=0).T, rtol=0, atol=1e-12
    )
    gen = np.random.default_rng(n)
    x = gen.standard_normal((3, n))
    np.testing.assert_allclose(x @ f, scipy.fft.dct(x, type=2, norm="ortho"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [*SIDES, 1000])
def test_basis_is_orthonormal(n: int) -> None:
    f = dct_basis(n, torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    # Length-n fp64 dot products of unit vectors: rounding error <= n * eps64 ~ 2.2e-13 at n=1000.
    tol = 1e-12
    torch.testing.assert_close(f @ f.T, eye, rtol=0, atol=tol)
    torch.testing.assert_close(f.T @ f, eye, rtol=0, atol=tol)
    if n <= 100:
        torch.testing.assert_close(torch.linalg.inv(f), f.T, rtol=0, atol=1e-10)


def test_basis_4x4_reference_values() -> None:
    f = dct_basis(4, torch.float64)
    expected = torch.tensor(
        [
            [0.5, 0.6533, 0.5, 0.2706],
            [0.5, 0.2706, -0.5, -0.6533],
            [0.5, -0.2706, -0.5, 0.6533],
            [0.5, -0.6533, 0.5, -0.2706],
        ],
        dtype=torch.float64,
    )
    # The expected values are given to 4 decimals.
    torch.testing.assert_close(f, expected, rtol=0, atol=1e-4)


def test_basis_cache_and_dtype() -> None:
    a = dct_basis(8)
    assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == (8, 8)
    assert dct_basis(8) is a
    assert dct_basis(8, torch.float32, "cpu") is a
    b = dct_basis(8, torch.float64)
    assert b is not a and b.dtype == torch.float64
    # The fp32 basis is the fp64 one cast once: equal to the rounded closed form.
    assert torch.equal(a, b.to(torch.float32))
    assert dct_basis(1, torch.float64).tolist() == [[1.0]]


@pytest.mark.parametrize(
    ("n", "dtype", "exc", "pattern"),
    [
        (0, torch.float32, ValueError, r"n must be in \[1, inf\), got 0"),
        (2.0, torch.float32, TypeError, r"n must be int"),
        (4, torch.int32, TypeError, r"dtype must be in"),
    ],
)
def test_basis_validation(n, dtype, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        dct_basis(n, dtype)


def test_spec_arange8_golden_vector() -> None:
    # Psyche's DCT test (distro.rs): 1-D arange(8) with s = 64 is one chunk of 8.
    g = ChunkGeometry.of((8,), 64)
    x = torch.arange(8, dtype=torch.float32)
    coeffs = dct_chunks(x, g)
    expected = torch.tensor([[9.8995, -6.4423, 0, -0.67345, 0, -0.2009, 0, -0.0507]])
    # The expected values carry 4-5 significant digits.
    torch.testing.assert_close(coeffs, expected, rtol=0, atol=1e-4)
    # Inverse: fp32 matmuls over 8 terms, error ~ 8 * eps32 * |x|max ~ 1e-5.
    torch.testing.assert_close(idct_chunks(coeffs, g), x, rtol=0, atol=1e-5)


def test_spec_eye4_round_trip() -> None:
    g = ChunkGeometry.of((4, 4), 64)
    x = torch.eye(4, dtype=torch.float64)
    coeffs = dct_chunks(x, g)
    # One 4x4 tile: T = F^T I F = I as well (orthonormal basis).
    torch.testing.assert_close(
        coeffs.reshape(4, 4), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(idct_chunks(coeffs, g), x, rtol=0, atol=1e-12)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(
    num=st.integers(0, 4),
    n1=st.sampled_from([1, 2, 3, 5, 8, 13]),
    n2=st.sampled_from([1, 2, 4, 7, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_tiles_vs_scipy_dctn_and_parseval(num: int, n1: int, n2: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num, n1, n2, generator=gen, dtype=torch.float64)
    t = dct_tiles(x)
    assert t.shape == x.shape and t.dtype == torch.float64
    ref = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(1, 2))
    # fp64 vs fp64 FFT-based DCT: both ~1e-15 relative; 1e-12 leaves room for n up to 16.
    np.testing.assert_allclose(t.numpy(), ref, rtol=0, atol=1e-12)
    # Parseval: an orthonormal transform preserves each tile's energy.
    torch.testing.assert_close(
        (t**2).sum(dim=(1, 2)), (x**2).sum(dim=(1, 2)), rtol=1e-12, atol=1e-12
    )
    back = idct_tiles(t)
    np.testing.assert_allclose(
        back.numpy(), scipy.fft.idctn(ref, type=2, norm="ortho", axes=(1, 2)), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


def test_one_d_geometry_is_dct_per_chunk() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, generator=gen, dtype=torch.float64)
    g = ChunkGeometry.of((100,), 64)  # split(100, 64) = 50 -> two chunks of 50
    c = dct_chunks(x, g)
    ref = scipy.fft.dct(x.numpy().reshape(2, 50), type=2, norm="ortho", axis=-1)
    np.testing.assert_allclose(c.numpy(), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(idct_chunks(c, g), x, rtol=0, atol=1e-12)


def test_chunks_2d_layout_matches_per_tile_scipy() -> None:
    # (6, 8) with s = 4: n1 = 3, n2 = 4; tile (ty, tx) is x[3ty:3ty+3, 4tx:4tx+4].
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    g = ChunkGeometry.of((6, 8), 4)
    c = dct_chunks(x, g)
    xn = x.numpy()
    for i, (ty, tx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        tile = xn[3 * ty : 3 * ty + 3, 4 * tx : 4 * tx + 4]
        ref = scipy.fft.dctn(tile, type=2, norm="ortho").reshape(-1)
        np.testing.assert_allclose(c[i].numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "shape", [(), (1,), (97,), (3, 5, 8), (2, 2, 6, 4), (0,), (0, 8), (2, 0, 3)]
)
def test_chunks_round_trip_any_shape(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = ChunkGeometry.of(shape, 4)
    c = dct_chunks(x, g)
    assert c.shape == (g.num_chunks, g.chunk_len)
    back = idct_chunks(c, g)
    assert back.shape == x.shape and back.dtype == torch.float64
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


def test_fp32_close_to_fp64_reference() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, 64, generator=gen, dtype=torch.float64)
    t32 = dct_tiles(x.float())
    assert t32.dtype == torch.float32
    # Two length-64 fp32 matmuls on unit-variance data: error ~ sqrt(64)*eps32*|x| per stage,
    # well below 1e-4 absolute (coefficients are O(1) to O(10)).
    torch.testing.assert_close(t32.double(), dct_tiles(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_upcast_to_fp32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 4, generator=gen).to(dtype)
    t = dct_tiles(x)
    assert t.dtype == torch.float32
    # Contract: the half input is upcast first, then the fp32 path runs unchanged.
    assert torch.equal(t, dct_tiles(x.float()))
    assert idct_tiles(x).dtype == torch.float32
    g = ChunkGeometry.of((8, 4), 8)
    assert idct_chunks(dct_chunks(x[0], g), g).dtype == torch.float32


def test_dct_validation() -> None:
    with pytest.raises(TypeError, match=r"tiles\.dtype must be in"):
        dct_tiles(torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"tiles\.shape must be \(N, n1, n2\), got \(2, 2\)"):
        dct_tiles(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"coeffs\.shape must be \(N, n1, n2\)"):
        idct_tiles(torch.zeros(2, 2, 2, 2))
    g = ChunkGeometry.of((4, 4), 2)
    with pytest.raises(ValueError, match=r"x\.shape must be \(4, 4\), got \(4, 3\)"):
        dct_chunks(torch.zeros(4, 3), g)
    with pytest.raises(ValueError, match=r"coeffs\.shape must be \(4, 4\), got \(16,\)"):
        idct_chunks(torch.zeros(16), g)
    with pytest.raises(TypeError, match=r"geom must be ChunkGeometry"):
        dct_chunks(torch.zeros(4, 4), (4, 4))  # type: ignore[arg-type]
