"""Triton kernels of :func:`thinwire.compression.fused.ef_quantize_pack` and their launcher.

Three ways through, chosen by the launcher from ``fmt`` and ``block``:

* **fused** (int8 / int4 / FP4 / sign with ``block <= FUSED_MAX_BLOCK``): one kernel. Each
  program owns whole quantization blocks, so it can take the block absmax (or mean magnitude)
  in registers, then quantize, pack and subtract. Memory traffic per element: read ``e`` (4 B)
  and ``x`` (4 B, 2 B for half inputs), write ``e'`` (4 B) and ``bits / 8`` B of codes, plus
  4 B of scale per block: the minimum for this op.
* **split** (sign with one scale per tensor, or blocks longer than ``FUSED_MAX_BLOCK``):
  ``_ef_update_kernel`` writes ``p`` and per-chunk partial statistics, torch reduces the few
  partials per block (max is exact; the sign scale's sum rounds in another order than the
  reference's, a few ulps), then ``_ef_code_kernel`` quantizes, packs and subtracts in place.
  Traffic: 12 B (update) + 8 B (code pass) per element.
* **2-bit** (SparseLoCo centroids): ``_ef_update_kernel``; the per-tensor mean and
  norm with the reference's own torch reductions (a Triton tree reduction rounds differently and
  would move codes that sit on a bin boundary, so the codes would no longer equal the
  reference's exactly); ``_two_bit_kernel`` (codes, packing, per-program bin sums and counts,
  reduced by torch in a fixed order); ``_two_bit_kernel`` again to subtract ``L[code] + mu``.

Quantizer constants (levels, FP4 thresholds and magnitudes, 2-bit bins) come from
:mod:`thinwire.compression.quant` as ``tl.constexpr`` arguments; there is no second copy. All
arithmetic reproduces the references operation by operation: ``tl.div_rn`` (IEEE division; plain
``/`` may lower to an approximate division), magic-number rounding half to even, and no FMA
contraction (``LAUNCH_OPTIONS``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from thinwire.compression import quant
from thinwire.compression._triton._common import (
    LAUNCH_OPTIONS,
    check_finite_flags,
    count_nonfinite,
    pack_lsb_first,
    round_half_even,
    signbit,
)
from thinwire.compression.bitpack import packed_nbytes
from thinwire.compression.fused import EF_FORMAT_BITS, _check_ef_args

__all__ = ["FUSED_MAX_BLOCK", "ef_quantize_pack_triton"]

# Format selectors (constexpr): which quantizer `_encode` applies.
FMT_INT: tl.constexpr = tl.constexpr(0)
FMT_FP4: tl.constexpr = tl.constexpr(1)
FMT_SIGN: tl.constexpr = tl.constexpr(2)
_FMT_CODE = {"int8": 0, "int4": 0, "fp4_e3m0": 1, "sign": 2}
_INT_LEVELS = {"int8": quant.INT8_LEVELS, "int4": quant.INT4_LEVELS}

# Statistic of the split path's first pass (constexpr).
STAT_AMAX: tl.constexpr = tl.constexpr(0)
STAT_SUM_ABS: tl.constexpr = tl.constexpr(1)
STAT_NONE: tl.constexpr = tl.constexpr(2)

#: Longest block the fused kernel holds in registers (one program, padded to a power of two).
#: Fixed, not tuned (see ``_common.NUM_WARPS``): re-choose from benchmarks/kernels.py on a GPU.
FUSED_MAX_BLOCK = 4096
#: Elements per program of the fused kernel (whole blocks: ``max(1, TILE // padded_block)``),
#: of the split kernels' chunks and of the 2-bit passes. Fixed, not tuned (as above).
TILE = 4096


@triton.jit
def _encode(p, s, FMT: tl.constexpr, LEVELS: tl.constexpr, THR: tl.constexpr, LV: tl.constexpr):
    """Codes (int32) and dequantized values of ``p`` given the side value ``s`` (broadcast).

    int (``quant._absmax_quantize``): ``q = rne(clamp(p / safe, -L, L))``, code ``q + L + 1``,
    ``deq = q * s``. FP4 (``quant.quantize_fp4_e3m0``): ``e3`` = number of thresholds ``<=
    min(|p| / safe, 1)``, code ``sign << 3 | e3``, ``deq = ±LV[e3] * s``. Sign
    (``quant.quantize_sign``): code ``signbit(p)``, ``deq = ±s``. ``safe`` is ``s`` with 0
    replaced by 1, as in ``quant._block_scales``.
    """
    if FMT == FMT_INT:
        safe = tl.where(s > 0, s, 1.0)
        y = tl.clamp(tl.div_rn(p, safe), -LEVELS, LEVELS)
        q = round_half_even(y)
        code = (q + (LEVELS + 1)).to(tl.int32)
        deq = q * s
    elif FMT == FMT_FP4:
        safe = tl.where(s > 0, s, 1.0)
        neg = signbit(p)
        y = tl.minimum(tl.div_rn(tl.abs(p), safe), 1.0)
        e3 = tl.zeros(y.shape, tl.int32)
        for j in tl.static_range(len(THR)):
            e3 += (y >= THR[j]).to(tl.int32)
        mag = tl.zeros(y.shape, tl.float32)
        for j in tl.static_range(len(LV)):
            mag = tl.where(e3 == j, LV[j], mag)
        mag = mag * s
        deq = tl.where(neg, -mag, mag)
        code = e3 | (neg.to(tl.int32) << 3)
    else:
        neg = signbit(p)
        code = neg.to(tl.int32)
        deq = tl.where(neg, -s, s)
    return code, deq


@triton.jit
def _ef_fused_kernel(
    res_ptr,  # (n,) float32 residual e
    inp_ptr,  # (n,) float32/16 input x
    out_ptr,  # (n,) float32 new residual e' = p - deq
    side_ptr,  # (n_blocks,) float32 scales
    packed_ptr,  # (nbytes,) uint8, or (n,) uint8 unpacked codes when not PACKED
    bad_ptr,  # (programs,) int32 non-finite counts
    n,
    n_blocks,
    block,
    nbytes,
    decay,
    scale,
    FMT: tl.constexpr,
    LEVELS: tl.constexpr,
    THR: tl.constexpr,
    LV: tl.constexpr,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    ROWS: tl.constexpr,
    BP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) block numbers
    cols = tl.arange(0, BP)  # (BP,) position in block, padded to a power of two
    offs = rows[:, None] * block + cols[None, :]  # (ROWS, BP)
    mask = (cols[None, :] < block) & (offs < n)
    # Masked lanes load 0: p = 0 there, the identity of both the absmax and the |p| sum.
    e = tl.load(res_ptr + offs, mask=mask, other=0.0)
    x = tl.load(inp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = e * decay + x * scale  # two roundings, then one (no FMA: LAUNCH_OPTIONS)
    tl.store(bad_ptr + pid, count_nonfinite(p, mask))
    if FMT == FMT_SIGN:
        count = tl.maximum(tl.minimum(n - rows * block, block), 1).to(tl.float32)
        s = tl.div_rn(tl.sum(tl.abs(p), axis=1), count)  # mean |p| over the real elements
    elif FMT == FMT_INT:
        s = tl.div_rn(tl.max(tl.abs(p), axis=1), LEVELS + 0.0)  # amax / LEVELS
    else:
        s = tl.max(tl.abs(p), axis=1)  # FP4: amax / 1.0
    tl.store(side_ptr + rows, s, mask=rows < n_blocks)
    code, deq = _encode(p, s[:, None], FMT, LEVELS, THR, LV)
    tl.store(out_ptr + offs, p - deq, mask=mask)
    code = tl.where(mask, code, 0)  # padding codes must be 0 (zero padding bits)
    if PACKED:
        PER_BYTE: tl.constexpr = 8 // BITS
        byte = pack_lsb_first(code, ROWS, BP, BITS)  # (ROWS, BP // PER_BYTE)
        jb = tl.arange(0, BP // PER_BYTE)
        boffs = rows[:, None] * (block // PER_BYTE) + jb[None, :]
        bmask = (jb[None, :] * PER_BYTE < block) & (boffs < nbytes) & (rows[:, None] < n_blocks)
        tl.store(packed_ptr + boffs, byte, mask=bmask)
    else:
        tl.store(packed_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _ef_update_kernel(
    res_ptr,
    inp_ptr,
    out_ptr,  # (n,) float32 p
    partial_ptr,  # (programs,) float32 per-chunk statistic (unused for STAT_NONE)
    bad_ptr,
    n,
    block,  # row length (the quantization block, or n)
    n_chunks,  # chunks per row
    decay,
    scale,
    STAT: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    cols = (pid % n_chunks) * CHUNK + tl.arange(0, CHUNK)
    offs = row * block + cols
    mask = (cols < block) & (offs < n)
    e = tl.load(res_ptr + offs, mask=mask, other=0.0)
    x = tl.load(inp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = e * decay + x * scale
    tl.store(out_ptr + offs, p, mask=mask)
    tl.store(bad_ptr + pid, count_nonfinite(p, mask))
    if STAT == STAT_AMAX:
        tl.store(partial_ptr + pid, tl.max(tl.abs(p), axis=0))
    elif STAT == STAT_SUM_ABS:
        tl.store(partial_ptr + pid, tl.sum(tl.abs(p), axis=0))


@triton.jit
def _ef_code_kernel(
    out_ptr,  # (n,) float32: p on entry, e' = p - deq on exit (each lane rewrites its own)
    side_ptr,
    packed_ptr,
    n,
    block,
    n_chunks,
    nbytes,
    FMT: tl.constexpr,
    LEVELS: tl.constexpr,
    THR: tl.constexpr,
    LV: tl.constexpr,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    chunk = pid % n_chunks
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    offs = row * block + cols
    mask = (cols < block) & (offs < n)
    p = tl.load(out_ptr + offs, mask=mask, other=0.0)
    s = tl.load(side_ptr + row)
    code, deq = _encode(p, s, FMT, LEVELS, THR, LV)
    tl.store(out_ptr + offs, p - deq, mask=mask)
    code = tl.where(mask, code, 0)
    if PACKED:
        PER_BYTE: tl.constexpr = 8 // BITS
        byte = tl.reshape(pack_lsb_first(code[None, :], 1, CHUNK, BITS), (CHUNK // PER_BYTE,))
        jb = tl.arange(0, CHUNK // PER_BYTE)
        boffs = row * (block // PER_BYTE) + chunk * (CHUNK // PER_BYTE) + jb
        bmask = (chunk * CHUNK + jb * PER_BYTE < block) & (boffs < nbytes)
        tl.store(packed_ptr + boffs, byte, mask=bmask)
    else:
        tl.store(packed_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _pack_kernel(codes_ptr, packed_ptr, n, nbytes, BITS: tl.constexpr, BYTES: tl.constexpr):
    """Flat LSB-first packing of unpacked codes (blocks not a multiple of 8 / BITS)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    pid = tl.program_id(0).to(tl.int64)
    b = pid * BYTES + tl.arange(0, BYTES)
    offs = b[:, None] * PER_BYTE + tl.arange(0, PER_BYTE)[None, :]
    codes = tl.load(codes_ptr + offs, mask=offs < n, other=0)
    byte = tl.reshape(pack_lsb_first(codes, BYTES, PER_BYTE, BITS), (BYTES,))
    tl.store(packed_ptr + b, byte, mask=b < nbytes)


@triton.jit
def _two_bit_codes(p, mu, sc, NB: tl.constexpr):
    """``quant.quantize_2bit_centroid``'s codes: ``clamp(rne((p - mu) / sc + NB // 2), 0, NB-1)``.

    ``y`` is clamped to ``[-1, NB]`` before rounding: that changes no clamped result and keeps the
    magic-number rounding in range when ``sc`` fell back to 1.
    """
    c = p - mu
    y = tl.clamp(tl.div_rn(c, sc) + (NB // 2), -1.0, NB + 0.0)
    q = tl.clamp(round_half_even(y), 0.0, NB - 1.0)
    return c, q.to(tl.int32)


@triton.jit
def _two_bit_kernel(
    out_ptr,  # (n,) float32: p; rewritten to e' in the SUBTRACT pass
    stats_ptr,  # (2,) float32 [mu, scale]
    side_ptr,  # (1 + NB,) float32 [mu, L_0..] (SUBTRACT pass)
    packed_ptr,
    sums_ptr,  # (programs, NB) float32 partial bin sums of c (code pass)
    counts_ptr,  # (programs, NB) int32 partial bin counts (code pass)
    n,
    nbytes,
    NB: tl.constexpr,
    BITS: tl.constexpr,
    SUBTRACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(out_ptr + offs, mask=mask, other=0.0)
    mu = tl.load(stats_ptr)
    sc = tl.load(stats_ptr + 1)
    c, code = _two_bit_codes(p, mu, sc, NB)
    if SUBTRACT:
        # Gather by loaded code: L[code] + mu, as quant.dequantize_2bit_centroid.
        level = tl.load(side_ptr + 1 + code, mask=mask, other=0.0)
        tl.store(out_ptr + offs, p - (level + mu), mask=mask)
    else:
        code = tl.where(mask, code, 0)
        PER_BYTE: tl.constexpr = 8 // BITS
        byte = tl.reshape(pack_lsb_first(code[None, :], 1, BLOCK, BITS), (BLOCK // PER_BYTE,))
        b = pid * (BLOCK // PER_BYTE) + tl.arange(0, BLOCK // PER_BYTE)
        tl.store(packed_ptr + b, byte, mask=b < nbytes)
        for j in tl.static_range(NB):
            in_bin = mask & (code == j)
            tl.store(sums_ptr + pid * NB + j, tl.sum(tl.where(in_bin, c, 0.0), axis=0))
            tl.store(counts_ptr + pid * NB + j, tl.sum(in_bin.to(tl.int32), axis=0))


def _grid1(programs: int) -> tuple[int]:
    return (programs,)


def _blocked(
    res: Tensor,
    x: Tensor,
    out: Tensor,
    decay: float,
    scale: float,
    fmt: str,
    block: int | None,
    checked: bool,
) -> tuple[Tensor, Tensor]:
    """int8 / int4 / FP4 / sign: fused or split path; writes ``out``, returns ``(packed, side)``."""
    n = res.numel()
    bits = EF_FORMAT_BITS[fmt]
    nbytes = packed_nbytes(n, bits)
    row = n if block is None else block  # sign with block=None: one row, one scale
    n_blocks = quant.side_len(fmt, n, block=block)
    # Pack in the quantizing kernel when every block starts on a byte boundary.
    packed_inline = n_blocks <= 1 or row % (8 // bits) == 0
    packed = torch.empty(nbytes, dtype=torch.uint8, device=res.device)
    # Blocks that straddle bytes write unpacked codes first (1 B/element more), then
    # `_pack_kernel` packs them.
    codes = packed if packed_inline else torch.empty(n, dtype=torch.uint8, device=res.device)
    side = torch.empty(n_blocks, dtype=torch.float32, device=res.device)
    consts = {
        "FMT": _FMT_CODE[fmt],
        "LEVELS": _INT_LEVELS.get(fmt, 1),
        "THR": quant._FP4_THRESHOLDS,
        "LV": quant.FP4_E3M0_LEVELS,
        "BITS": bits,
        "PACKED": packed_inline,
    }
    if row <= FUSED_MAX_BLOCK:
        bp = max(triton.next_power_of_2(row), 8 // bits)  # at least one whole byte of codes
        rows = max(1, TILE // bp)
        programs = triton.cdiv(n_blocks, rows)
        bad = torch.empty(programs, dtype=torch.int32, device=res.device)
        _ef_fused_kernel[_grid1(programs)](
            res, x, out, side, codes, bad, n, n_blocks, row, nbytes, decay, scale,
            ROWS=rows, BP=bp, **consts, **LAUNCH_OPTIONS,
        )  # fmt: skip
        if checked:
            check_finite_flags(bad, "x")
    else:
        chunk = min(TILE, triton.next_power_of_2(row))
        n_chunks = triton.cdiv(row, chunk)
        programs = n_blocks * n_chunks
        partial = torch.empty(programs, dtype=torch.float32, device=res.device)
        bad = torch.empty(programs, dtype=torch.int32, device=res.device)
        stat = STAT_SUM_ABS.value if fmt == "sign" else STAT_AMAX.value
        _ef_update_kernel[_grid1(programs)](
            res, x, out, partial, bad, n, row, n_chunks, decay, scale,
            STAT=stat, CHUNK=chunk, **LAUNCH_OPTIONS,
        )  # fmt: skip
        if checked:
            check_finite_flags(bad, "x")
        partial = partial.view(n_blocks, n_chunks)
        if fmt == "sign":
            # quant.quantize_sign: block sums / real element counts (float32).
            counts = (n - row * torch.arange(n_blocks, device=res.device)).clamp(max=row)
            side.copy_(partial.sum(dim=1) / counts.to(torch.float32))
        else:
            # quant._block_scales: amax / fmax (the max is exact in any order).
            side.copy_(partial.amax(dim=1) / _INT_LEVELS.get(fmt, 1.0))
        _ef_code_kernel[_grid1(programs)](
            out, side, codes, n, row, n_chunks, nbytes, CHUNK=chunk, **consts, **LAUNCH_OPTIONS
        )
    if not packed_inline:
        _pack_kernel[_grid1(triton.cdiv(nbytes, TILE))](
            codes, packed, n, nbytes, BITS=bits, BYTES=TILE, **LAUNCH_OPTIONS
        )
    return packed, side


def _two_bit(
    res: Tensor, x: Tensor, out: Tensor, decay: float, scale: float, checked: bool
) -> tuple[Tensor, Tensor]:
    """SparseLoCo 2-bit centroids: update, torch stats, codes + bins, subtract."""
    n = res.numel()
    n_bins = quant.TWO_BIT_DEFAULT_BINS
    bits = EF_FORMAT_BITS["2bit"]
    nbytes = packed_nbytes(n, bits)
    programs = triton.cdiv(n, TILE)
    bad = torch.empty(programs, dtype=torch.int32, device=res.device)
    _ef_update_kernel[_grid1(programs)](
        res, x, out, bad, bad, n, n, programs, decay, scale,
        STAT=STAT_NONE.value, CHUNK=TILE, **LAUNCH_OPTIONS,
    )  # fmt: skip
    if checked:
        check_finite_flags(bad, "x")
    # The reference's statistics, with its torch reductions (see the module docstring).
    mu = out.mean()
    sigma = (out - mu).norm() / math.sqrt(n - 1) if n > 1 else torch.zeros_like(mu)
    sc = quant.TWO_BIT_DEFAULT_RANGE_SIGMAS * sigma / n_bins
    sc = torch.where(torch.isfinite(sc) & (sc != 0), sc, torch.ones_like(mu))  # no host read
    stats = torch.stack([mu, sc])
    packed = torch.empty(nbytes, dtype=torch.uint8, device=res.device)
    sums = torch.empty(programs, n_bins, dtype=torch.float32, device=res.device)
    counts = torch.empty(programs, n_bins, dtype=torch.int32, device=res.device)
    _two_bit_kernel[_grid1(programs)](
        out, stats, stats, packed, sums, counts, n, nbytes,
        NB=n_bins, BITS=bits, SUBTRACT=False, BLOCK=TILE, **LAUNCH_OPTIONS,
    )  # fmt: skip
    # Bin means as the reference's `where(counts > 0, sums / counts.clamp(min=1), 0)`; the
    # partial sums are added in program order (deterministic; a few ulps from index_add_).
    total = sums.sum(dim=0)
    count = counts.sum(dim=0)
    table = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    side = torch.cat([mu.reshape(1), table])
    _two_bit_kernel[_grid1(programs)](
        out, stats, side, packed, sums, counts, n, nbytes,
        NB=n_bins, BITS=bits, SUBTRACT=True, BLOCK=TILE, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return packed, side


def ef_quantize_pack_triton(
    residual: Tensor,
    inp: Tensor,
    *,
    decay: float,
    scale: float = 1.0,
    fmt: str,
    block: int | None = None,
    checked: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton launcher of :func:`thinwire.compression.fused.ef_quantize_pack` (same contract).

    Strided ``residual`` or ``inp`` is copied to contiguous memory first (one extra read and
    write of that tensor); contiguous inputs are used in place.
    """
    decay, scale, block = _check_ef_args(residual, inp, decay, scale, fmt, block)
    n = residual.numel()
    res = residual.contiguous().view(-1)
    x = inp.contiguous().view(-1)
    out = torch.empty_like(res)
    if n == 0:
        params = {} if fmt == "2bit" else {"block": block}
        side = torch.zeros(quant.side_len(fmt, 0, **params), dtype=torch.float32, device=res.device)
        packed = torch.empty(0, dtype=torch.uint8, device=res.device)
    elif fmt == "2bit":
        packed, side = _two_bit(res, x, out, decay, scale, checked)
    else:
        packed, side = _blocked(res, x, out, decay, scale, fmt, block, checked)
    return packed, side, out.view(residual.shape)
