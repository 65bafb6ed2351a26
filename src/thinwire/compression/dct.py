"""Chunked orthonormal DCT-II / DCT-III: DeMo's transform (arXiv:2411.19870v1, Alg. 1).

Holds :func:`dct_basis` (the cached basis matrix ``F_n``), :func:`dct_tiles` / :func:`idct_tiles`
(the 2-D transform of every tile in a ``(N, n1, n2)`` batch) and the conveniences
:func:`dct_chunks` / :func:`idct_chunks`, which go through a :class:`ChunkGeometry`.

Basis: ``F_n[j, b] = c_b * cos(pi * (2j + 1) * b / (2n))`` with ``c_0 = sqrt(1/n)`` and
``c_b = sqrt(2/n)`` for ``b > 0``; row ``j`` is the spatial position, column ``b`` the frequency.
Encoding a row vector is ``x @ F_n`` (= ``scipy.fft.dct(x, type=2, norm="ortho")``), a tile is
``T = F_{n1}^T X F_{n2}``, and the inverse is ``X = F_{n1} T F_{n2}^T`` because ``F_n`` is
orthogonal. This is the reference implementation; bloc97/DeMo and Psyche use the same
matrices but build them from an fp32 FFT, where thinwire uses the fp64 closed form.
"""

from __future__ import annotations

import math

import torch

from thinwire._validate import check_dtype, check_int, check_type
from thinwire.compression.chunk import ChunkGeometry

__all__ = ["dct_basis", "dct_chunks", "dct_tiles", "idct_chunks", "idct_tiles"]

#: Input dtypes accepted by the transforms; fp16/bf16 are computed and returned in fp32
#: (fp32 compute, bf16 inputs accepted).
_TILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# One basis per (n, dtype, device). Only this module writes it; entries are immutable
# by contract, and the key space is tiny (a handful of chunk sides per model).
_BASIS_CACHE: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _basis_fp64(n: int) -> torch.Tensor:
    """``F_n`` in float64 from the closed form, on CPU."""
    j = torch.arange(n, dtype=torch.int64).unsqueeze(1)
    b = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    # cos(pi * m / (2n)) has period 4n in the integer m = (2j+1) b; reducing m modulo 4n in exact
    # integer arithmetic keeps the float argument below 2*pi, so cos is accurate to ~1 ulp even for
    # large n (an unreduced argument of ~pi*n loses ~log2(n) bits).
    m = ((2 * j + 1) * b) % (4 * n)
    f = torch.cos(m.to(torch.float64) * (math.pi / (2 * n)))
    scale = torch.full((1, n), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0, 0] = math.sqrt(1.0 / n)
    return f * scale


def dct_basis(
    n: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Orthonormal DCT-II basis ``F_n``, cached per ``(n, dtype, device)``.

    Built in float64 from the closed form and cast once to ``dtype``. The returned tensor is the
    cached object itself: it must not be modified in place (clone it first).

    Args:
        n: transform length, ``>= 1``; ``F_1 = [[1]]``.
        dtype: floating dtype of the result (default: ``torch.float32``).
        device: device of the result (default: CPU).

    Returns:
        ``(n, n)`` tensor with ``F[j, b] = c_b * cos(pi * (2j + 1) * b / (2n))``.

    Raises:
        TypeError: if ``n`` is not an int or ``dtype`` is not a supported float dtype.
        ValueError: if ``n < 1``.
    """
    check_int("n", n, 1)
    check_dtype("dtype", dtype, _TILE_DTYPES)
    dev = torch.device("cpu") if device is None else torch.device(device)
    key = (n, dtype, dev)
    basis = _BASIS_CACHE.get(key)
    if basis is None:
        basis = _basis_fp64(n).to(device=dev, dtype=dtype)
        _BASIS_CACHE[key] = basis
    return basis


def _compute_dtype(t: torch.Tensor, name: str) -> torch.dtype:
    check_type(name, t, torch.Tensor)
    check_dtype(f"{name}.dtype", t.dtype, _TILE_DTYPES)
    if t.ndim != 3:
        raise ValueError(f"{name}.shape must be (N, n1, n2), got {tuple(t.shape)}")
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def dct_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Forward 2-D DCT-II of each tile: ``T = F_{n1}^T X F_{n2}``.

    For 1-D geometries ``n1 = 1`` and ``F_1 = [[1]]``, so this is the 1-D DCT of each chunk.

    Args:
        tiles: ``(N, n1, n2)``; float16, bfloat16, float32 or float64.

    Returns:
        ``(N, n1, n2)`` coefficients; float64 for float64 input, float32 otherwise (half inputs
        are upcast to float32 before the transform).

    Raises:
        TypeError: if ``tiles`` is not a tensor of a supported dtype.
        ValueError: if ``tiles`` is not 3-D.
    """
    cdtype = _compute_dtype(tiles, "tiles")
    x = tiles.to(cdtype)
    f1 = dct_basis(tiles.shape[1], cdtype, tiles.device)
    f2 = dct_basis(tiles.shape[2], cdtype, tiles.device)
    return f1.mT @ x @ f2


def idct_tiles(coeffs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct_tiles` (DCT-III): ``X = F_{n1} T F_{n2}^T``.

    Args:
        coeffs: ``(N, n1, n2)`` coefficients; float16, bfloat16, float32 or float64.

    Returns:
        ``(N, n1, n2)`` tiles; float64 for float64 input, float32 otherwise.

    Raises:
        TypeError: if ``coeffs`` is not a tensor of a supported dtype.
        ValueError: if ``coeffs`` is not 3-D.
    """
    cdtype = _compute_dtype(coeffs, "coeffs")
    t = coeffs.to(cdtype)
    f1 = dct_basis(coeffs.shape[1], cdtype, coeffs.device)
    f2 = dct_basis(coeffs.shape[2], cdtype, coeffs.device)
    return f1 @ t @ f2.mT


def dct_chunks(x: torch.Tensor, geom: ChunkGeometry) -> torch.Tensor:
    """Tile ``x`` with ``geom`` and DCT each tile; coefficients flattened per tile.

    Args:
        x: tensor of shape ``geom.shape``; float16, bfloat16, float32 or float64.
        geom: the chunk geometry (:class:`ChunkGeometry`).

    Returns:
        ``(geom.num_chunks, geom.chunk_len)`` coefficients, flat index
        ``freq_row * n2 + freq_col``; float64 for float64 input, float32 otherwise.

    Raises:
        TypeError: on a non-tensor input or unsupported dtype.
        ValueError: if ``x.shape != geom.shape``.
    """
    check_type("geom", geom, ChunkGeometry)
    return dct_tiles(geom.to_tiles(x)).reshape(geom.num_chunks, geom.chunk_len)


def idct_chunks(coeffs: torch.Tensor, geom: ChunkGeometry) -> torch.Tensor:
    """Inverse of :func:`dct_chunks`: inverse DCT of each chunk, then untile.

    Args:
        coeffs: ``(geom.num_chunks, geom.chunk_len)`` coefficients; float16, bfloat16, float32
            or float64.
        geom: the chunk geometry (:class:`ChunkGeometry`).

    Returns:
        Tensor of shape ``geom.shape``; float64 for float64 input, float32 otherwise.

    Raises:
        TypeError: on a non-tensor input or unsupported dtype.
        ValueError: if ``coeffs.shape != (geom.num_chunks, geom.chunk_len)``.
    """
    check_type("geom", geom, ChunkGeometry)
    check_type("coeffs", coeffs, torch.Tensor)
    expected = (geom.num_chunks, geom.chunk_len)
    if tuple(coeffs.shape) != expected:
        raise ValueError(f"coeffs.shape must be {expected}, got {tuple(coeffs.shape)}")
    tiles = idct_tiles(coeffs.reshape(geom.num_chunks, geom.n1, geom.n2))
    return geom.from_tiles(tiles)
