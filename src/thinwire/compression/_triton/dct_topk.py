"""Triton kernel of :func:`thinwire.compression.fused.dct_topk` and its launcher.

One program per tile: load the ``n1 x n2`` tile into
a ``P1 x P2`` register block (sides padded to powers of two, at least 16 because ``tl.dot`` needs
every dimension >= 16 on the GPU; padding lanes load 0), compute ``T = F1^T X F2`` with two IEEE
float32 ``tl.dot`` against bases zero-padded by the launcher (so padded rows and columns of ``T``
are exactly 0 and never selected), then select the top ``k`` of ``|T|`` without sorting:

1. radix select on the float bits: ``|T|`` viewed as int32 orders like the magnitude (padding
   lanes are -1, below every real value); 31 passes of "how many bit patterns are >= candidate"
   fix the k-th largest pattern ``thr`` one bit at a time;
2. every lane with bits ``> thr`` is kept, and the ties at ``thr`` are kept lowest index first
   (an inclusive prefix count of the ties), which is :func:`topk_chunks`' tie-break;
3. kept lanes are compacted by a prefix count into ascending index order, the reference's output
   order, and written with their signed values.

Memory traffic per tile: read ``n1 * n2`` inputs (and the bases, which stay in cache), write ``k``
int64 indices and ``k`` float32 values; nothing else touches memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from thinwire.compression._triton._common import (
    LAUNCH_OPTIONS,
    check_finite_flags,
    count_nonfinite,
)
from thinwire.compression.fused import _check_dct_topk_args

__all__ = ["MAX_TILE_SIDE", "MIN_DOT_SIDE", "dct_topk_triton"]

#: ``tl.dot`` requires M, N, K >= 16 on NVIDIA GPUs (Triton's dot verifier); smaller sides
#: (1-D chunks have ``n1 = 1``) are zero-padded to 16.
MIN_DOT_SIDE = 16
#: Largest tile side one program holds: the default chunk side (64). Measured by compiling
#: for sm_90 with this machine's triton 3.9 (no GPU needed): a 64 x 64 tile compiles in ~3 s and
#: stages 48 KB of shared memory; 128 x 128 took ~10 minutes in ptxas and 192 KB, so larger tiles
#: need a tiled (looped) variant, which is not written.
MAX_TILE_SIDE = 64
#: Bits of a non-negative float32 below the sign bit: the radix select scans bits 30..0.
_MAGNITUDE_BITS = 31


@triton.jit
def _dct_topk_kernel(
    x_ptr,  # (N, n1, n2) tiles, contiguous
    f1t_ptr,  # (P1, P1) float32: basis1^T zero-padded
    f2_ptr,  # (P2, P2) float32: basis2 zero-padded
    idx_ptr,  # (N, k) int64 out
    val_ptr,  # (N, k) float32 out
    bad_ptr,  # (N,) int32 non-finite coefficient counts
    n1,
    n2,
    k,
    P1: tl.constexpr,
    P2: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, P1)
    c = tl.arange(0, P2)
    valid = (r[:, None] < n1) & (c[None, :] < n2)  # (P1, P2)
    x = tl.load(x_ptr + tile * n1 * n2 + r[:, None] * n2 + c[None, :], mask=valid, other=0.0)
    f1t = tl.load(f1t_ptr + r[:, None] * P1 + r[None, :])
    f2 = tl.load(f2_ptr + c[:, None] * P2 + c[None, :])
    # (F1^T X) F2 as dct_tiles evaluates it; "ieee" keeps float32 (no TF32) on the GPU.
    coef = tl.dot(tl.dot(f1t, x.to(tl.float32), input_precision="ieee"), f2, input_precision="ieee")
    tl.store(bad_ptr + tile, count_nonfinite(coef, valid))
    # Flatten row-major: the order of r * P2 + c is the order of the tile index r * n2 + c.
    mag = tl.reshape(tl.where(valid, tl.abs(coef).to(tl.int32, bitcast=True), -1), (P1 * P2,))
    flat_idx = tl.reshape(r[:, None] * n2 + c[None, :], (P1 * P2,)).to(tl.int64)
    values = tl.reshape(coef, (P1 * P2,))
    # Radix select: the largest pattern thr with count(mag >= thr) >= k is the k-th largest.
    thr = 0
    for b in range(RADIX_BITS - 1, -1, -1):
        cand = thr | (1 << b)
        n_ge = tl.sum((mag >= cand).to(tl.int32), axis=0)
        thr = tl.where(n_ge >= k, cand, thr)
    above = mag > thr
    ties = mag == thr
    need = k - tl.sum(above.to(tl.int32), axis=0)  # in [1, count(ties)]
    keep = above | (ties & (tl.cumsum(ties.to(tl.int32), axis=0) <= need))
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1  # ascending index order
    tl.store(idx_ptr + tile * k + pos, flat_idx, mask=keep)
    tl.store(val_ptr + tile * k + pos, values, mask=keep)


def _padded(basis: Tensor, side: int) -> Tensor:
    out = torch.zeros(side, side, dtype=torch.float32, device=basis.device)
    out[: basis.shape[0], : basis.shape[1]] = basis
    return out


def dct_topk_triton(
    x_tiles: Tensor, basis1: Tensor, basis2: Tensor, k: int, *, checked: bool = True
) -> tuple[Tensor, Tensor]:
    """Triton launcher of :func:`thinwire.compression.fused.dct_topk` (same contract).

    Strided ``x_tiles`` is copied to contiguous memory first; the bases are copied into
    zero-padded ``P x P`` buffers (at most 64 x 64 floats each) on every call.

    Raises:
        ValueError: as the reference, and for a tile side above :data:`MAX_TILE_SIDE`.
    """
    _check_dct_topk_args(x_tiles, basis1, basis2, k)
    n_tiles, n1, n2 = x_tiles.shape
    if max(n1, n2) > MAX_TILE_SIDE:
        raise ValueError(
            f"x_tiles sides must be in [1, {MAX_TILE_SIDE}] for the Triton kernel, got "
            f"({n1}, {n2}); use backend='torch' for larger chunks"
        )
    device = x_tiles.device
    idx = torch.empty(n_tiles, k, dtype=torch.int64, device=device)
    val = torch.empty(n_tiles, k, dtype=torch.float32, device=device)
    if n_tiles == 0:
        return idx, val
    p1 = max(MIN_DOT_SIDE, triton.next_power_of_2(n1))
    p2 = max(MIN_DOT_SIDE, triton.next_power_of_2(n2))
    bad = torch.empty(n_tiles, dtype=torch.int32, device=device)
    _dct_topk_kernel[(n_tiles,)](
        x_tiles.contiguous(), _padded(basis1.mT, p1), _padded(basis2, p2), idx, val, bad,
        n1, n2, k, P1=p1, P2=p2, RADIX_BITS=_MAGNITUDE_BITS, **LAUNCH_OPTIONS,
    )  # fmt: skip
    if checked:
        check_finite_flags(bad, "chunks")
    return idx, val
