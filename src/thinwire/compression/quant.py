"""Value quantizers (pure-torch references): absmax int8/int4, SparseLoCo 2-bit centroids, scaled
sign, per-block fp8, FP4 E3M0 and plain fp16/bf16 casts, plus a registry with exact side-data sizes.

Every quantizer takes a float tensor ``x`` (float32, float16 or bfloat16; any shape, flattened in
row-major order to ``n = x.numel()`` elements; computation is float32) and returns a
:class:`QuantResult`: ``codes`` (uint8, one *unpacked* code per element in its low ``bits`` bits;
bit packing lives elsewhere), ``side`` (float32 1-D side data such as per-block scales) and
``bits``. The casts are the exception: their codes are the raw 16-bit values viewed as bytes, so
``codes`` has ``2 * n`` entries in host byte order (little-endian on every supported platform).
Each ``dequantize_*(codes, side, n, ...)`` returns a float32 tensor of shape ``(n,)``.

Blocked quantizers cut the flat tensor into ``ceil(n / block)`` blocks; the last block may be
short (conceptually zero-padded, which changes neither its absmax nor its codes). A block whose
scale is 0 (all zeros) decodes to exact zeros; no path divides by zero or emits NaN. Non-finite
inputs raise ``ValueError``. Stochastic rounding needs an explicit ``torch.Generator``.

Each public function is its checks plus a *core* that does the arithmetic without reading any
tensor value back to the host (no ``.item()``, ``int(t)``, ``nonzero()``), so it can run inside an
optimizer step on a GPU without stalling it. :data:`QUANTIZER_CORES` lists them by name:
``qcore(flat, **params)`` takes a flat float32 tensor assumed finite; ``dcore(codes, side, n,
**params)`` works on any leading batch shape (``codes (..., n)``, ``side (..., n_side)`` ->
``(..., n)``) and never raises on bad codes: an out-of-range code decodes to some value without
an out-of-bounds index, and the caller flags it with :func:`code_range` or a finiteness check.
For valid input the public functions return exactly the core's result.

Sources: the 2-bit centroid quantizer follows the SparseLoCo reference code (tplr-ai/SparseLoCo
``sparseloco.py``, templar ``compress.py``; SparseLoCo, Sarfi et al., arXiv:2508.15706v1); FP4 E3M0
follows Streaming DiLoCo (Douillard et al., arXiv:2501.18512v1 §2). Every bound quoted below is
tested in ``tests/compression/test_quant.py``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from thinwire._validate import check_choice, check_dtype, check_float, check_int, check_type

__all__ = [
    "QuantResult",
    "QUANTIZERS",
    "INPUT_DTYPES",
    "INT8_LEVELS",
    "INT4_LEVELS",
    "INT8_DEFAULT_BLOCK",
    "INT4_DEFAULT_BLOCK",
    "FP8_DEFAULT_BLOCK",
    "FP4_DEFAULT_BLOCK",
    "FP8_E4M3_MAX",
    "FP8_E5M2_MAX",
    "FP4_E3M0_LEVELS",
    "TWO_BIT_DEFAULT_BINS",
    "TWO_BIT_DEFAULT_RANGE_SIGMAS",
    "quantize_int8",
    "dequantize_int8",
    "quantize_int4",
    "dequantize_int4",
    "quantize_2bit_centroid",
    "dequantize_2bit_centroid",
    "quantize_sign",
    "dequantize_sign",
    "quantize_fp8",
    "dequantize_fp8",
    "quantize_fp4_e3m0",
    "dequantize_fp4_e3m0",
    "quantize_cast",
    "dequantize_cast",
    "side_len",
    "code_bits",
    "QUANTIZER_CORES",
    "code_range",
]

#: Accepted input dtypes; others raise ``TypeError`` listing these.
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Symmetric absmax int8: ``q in [-127, 127]``, ``scale = amax / 127`` (LLM.int8(), Dettmers et al.
#: 2022; -128 is unused so the grid is symmetric). Codes are offset binary ``q + 128`` (1..255).
INT8_LEVELS = 127
#: Symmetric absmax int4: ``q in [-7, 7]``, ``scale = amax / 7``; codes ``q + 8`` (1..15).
INT4_LEVELS = 7
#: Default block sizes: 256 for int8; 128 for int4, fp8 and FP4. Both are thinwire's choices
#: (Streaming DiLoCo does not state the block size of its FP4 scales).
INT8_DEFAULT_BLOCK = 256
INT4_DEFAULT_BLOCK = 128
FP8_DEFAULT_BLOCK = 128
FP4_DEFAULT_BLOCK = 128

#: Largest finite fp8 magnitudes (OCP 8-bit floating point specification, as ``torch.finfo``):
#: 448 for E4M3FN, 57344 for E5M2.
FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
FP8_E5M2_MAX = float(torch.finfo(torch.float8_e5m2).max)
_FP8 = {"e4m3": (torch.float8_e4m3fn, FP8_E4M3_MAX), "e5m2": (torch.float8_e5m2, FP8_E5M2_MAX)}

#: FP4 E3M0 (Streaming DiLoCo, arXiv:2501.18512v1 §2): sign bit + 3 exponent bits, no mantissa.
#: ``e3 = 0`` is zero; ``e3 in 1..7`` is ``scale * 2**(e3 - 7)``, so the block max maps to 1.
FP4_E3M0_LEVELS = tuple([0.0] + [2.0 ** (e3 - 7) for e3 in range(1, 8)])
#: Rounding thresholds on ``y = |x| / scale``: the midpoint between consecutive levels. ``e3`` is
#: the number of thresholds ``<= y``, so exact ties go to the larger magnitude.
_FP4_THRESHOLDS = tuple(
    (FP4_E3M0_LEVELS[j - 1] + FP4_E3M0_LEVELS[j]) / 2 for j in range(1, len(FP4_E3M0_LEVELS))
)

#: SparseLoCo quantizer defaults (tplr-ai/SparseLoCo 512M sweep; templar ``hparams.json``
#: ``quantization_bins=4``, ``quantization_range=6``).
TWO_BIT_DEFAULT_BINS = 4
TWO_BIT_DEFAULT_RANGE_SIGMAS = 6.0
#: Largest bin count: codes are stored one per uint8.
_MAX_BINS = 256


@dataclass(frozen=True)
class QuantResult:
    """Output of a quantizer.

    Attributes:
        codes: uint8, one unpacked code per element (``2 * n`` raw bytes for the 16-bit casts).
        side: float32 1-D side data (scales, centroid table); ``side_len`` gives its length.
        bits: bits per element on the wire (``code_bits``); 16 for the casts.
    """

    codes: Tensor
    side: Tensor
    bits: int


# --- Shared helpers --------------------------------------------------------------------------


def _prepare(x: Any) -> Tensor:
    """Validate ``x`` and return it flattened as float32 (a view-free copy is not promised)."""
    check_type("x", x, Tensor)
    check_dtype("x.dtype", x.dtype, INPUT_DTYPES)
    flat = x.reshape(-1).to(torch.float32)
    bad = int((~torch.isfinite(flat)).sum()) if flat.numel() else 0
    if bad:
        raise ValueError(f"x must be finite, got {bad} non-finite values")
    return flat


def _check_generator(stochastic: bool, generator: Any) -> None:
    check_type("stochastic", stochastic, bool)
    if generator is not None:
        check_type("generator", generator, torch.Generator)
    elif stochastic:
        raise ValueError("generator must be a torch.Generator when stochastic=True, got None")


def _n_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _to_blocks(flat: Tensor, block: int) -> Tensor:
    """Zero-pad ``flat`` to a multiple of ``block`` and view it as ``(n_blocks, block)``."""
    nb = _n_blocks(flat.numel(), block)
    pad = nb * block - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(nb, block)


def _block_scales(blocks: Tensor, fmax: float) -> tuple[Tensor, Tensor]:
    """Per-block ``scale = amax / fmax`` and a divisor that is 1 where the scale is 0."""
    scale = blocks.abs().amax(dim=1) / fmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, safe


def _check_payload(codes: Any, side: Any, n: Any, n_codes: int, n_side: int) -> None:
    check_type("codes", codes, Tensor)
    check_dtype("codes.dtype", codes.dtype, (torch.uint8,))
    check_type("side", side, Tensor)
    check_dtype("side.dtype", side.dtype, (torch.float32,))
    if codes.dim() != 1 or codes.numel() != n_codes:
        raise ValueError(
            f"codes must be 1-D with {n_codes} entries for n={n}, got shape {tuple(codes.shape)}"
        )
    if side.dim() != 1 or side.numel() != n_side:
        raise ValueError(
            f"side must be 1-D with {n_side} entries for n={n}, got shape {tuple(side.shape)}"
        )


def _check_code_range(codes: Tensor, lo: int, hi: int) -> None:
    if codes.numel():
        cmin, cmax = int(codes.min()), int(codes.max())
        if cmin < lo or cmax > hi:
            raise ValueError(f"codes must be in [{lo}, {hi}], got values in [{cmin}, {cmax}]")


def _per_element(side: Tensor, block: int, n: int) -> Tensor:
    """Side value of each element's block along the last dim: ``(..., n_blocks) -> (..., n)``."""
    owner = torch.arange(n, device=side.device) // block
    return side.index_select(-1, owner)


def _fp4_level_bits(e3: Tensor) -> Tensor:
    """``FP4_E3M0_LEVELS[e3]`` for int32 ``e3`` in ``[0, 7]``, built from float32 bit patterns.

    ``2**(e3 - 7)`` has biased exponent ``e3 + 120`` and a zero mantissa, so the values are exact
    and no host table has to be copied to the device (a blocking copy on CUDA).
    """
    return torch.where(e3 > 0, (e3 + 120) << 23, 0).view(torch.float32)


def _fp4_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """``FP4_E3M0_LEVELS`` (8,) and ``_FP4_THRESHOLDS`` (7,) as float32 on ``device``.

    The threshold between levels ``j - 1`` and ``j`` is ``2**-7`` for ``j = 1`` and
    ``1.5 * 2**(j - 8)`` otherwise (biased exponent ``j + 119``, mantissa bit 22 set).
    """
    e3 = torch.arange(8, dtype=torch.int32, device=device)
    levels = _fp4_level_bits(e3)
    j = e3[1:]
    thr = torch.where(j == 1, 120 << 23, ((j + 119) << 23) | (1 << 22)).view(torch.float32)
    return levels, thr


# --- Absmax integer quantizers (int8, int4) --------------------------------------------------


def _absmax_quantize(
    x: Tensor, block: int, levels: int, bits: int, stochastic: bool, generator: Any
) -> QuantResult:
    check_int("block", block, 1)
    _check_generator(stochastic, generator)
    return _absmax_qcore(_prepare(x), block, levels, bits, stochastic, generator)


def _absmax_qcore(
    flat: Tensor, block: int, levels: int, bits: int, stochastic: bool, generator: Any
) -> QuantResult:
    n = flat.numel()
    blocks = _to_blocks(flat, block)
    scale, safe = _block_scales(blocks, levels)
    # Clamp before rounding: fp32 division can land a hair above `levels`, and clamping first
    # keeps stochastic rounding inside the grid without biasing any interior value.
    y = (blocks / safe[:, None]).clamp(-levels, levels)
    if stochastic:
        u = torch.rand(y.shape, generator=generator, dtype=torch.float32, device=y.device)
        q = torch.floor(y + u).clamp(-levels, levels)
    else:
        q = torch.round(y)  # round half to even
    codes = (q + (levels + 1)).to(torch.uint8).reshape(-1)[:n]
    return QuantResult(codes=codes, side=scale, bits=bits)


def _absmax_dequantize(codes: Tensor, side: Tensor, n: int, block: int, levels: int) -> Tensor:
    check_int("n", n, 0)
    check_int("block", block, 1)
    _check_payload(codes, side, n, n, _n_blocks(n, block))
    _check_code_range(codes, 1, 2 * levels + 1)
    return _absmax_dcore(codes, side, n, block, levels)


def _absmax_dcore(codes: Tensor, side: Tensor, n: int, block: int, levels: int) -> Tensor:
    q = codes.to(torch.float32) - (levels + 1)
    return q * _per_element(side, block, n)


def _quantize_int8_core(
    flat: Tensor,
    *,
    block: int = INT8_DEFAULT_BLOCK,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantResult:
    return _absmax_qcore(flat, block, INT8_LEVELS, 8, stochastic, generator)


def _dequantize_int8_core(
    codes: Tensor,
    side: Tensor,
    n: int,
    *,
    block: int = INT8_DEFAULT_BLOCK,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    return _absmax_dcore(codes, side, n, block, INT8_LEVELS)


def _quantize_int4_core(
    flat: Tensor,
    *,
    block: int = INT4_DEFAULT_BLOCK,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantResult:
    return _absmax_qcore(flat, block, INT4_LEVELS, 4, stochastic, generator)


def _dequantize_int4_core(
    codes: Tensor,
    side: Tensor,
    n: int,
    *,
    block: int = INT4_DEFAULT_BLOCK,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    return _absmax_dcore(codes, side, n, block, INT4_LEVELS)


def quantize_int8(
    x: Tensor,
    *,
    block: int = INT8_DEFAULT_BLOCK,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantResult:
    """Symmetric absmax int8 per block.

    ``scale_b = amax_b / 127``; ``q = round_half_even(x / scale_b)`` in ``[-127, 127]``; code
    ``q + 128`` (offset binary, 1..255). Error bound (deterministic): ``|x - deq| <= scale_b / 2``
    plus float32 rounding (``<= 3 * 2**-24 * amax_b``) when ``scale_b`` is a normal float32; a
    block with ``amax_b < 127 * 2**-126`` loses relative precision but still decodes within
    ``amax_b``. Stochastic rounding (``floor(y + u)``, ``u ~ U[0, 1)``) is unbiased with
    ``|err| < scale_b``; it draws ``ceil(n/block) * block`` uniforms from ``generator``.

    Args:
        x: float32/float16/bfloat16 tensor, any shape (flattened).
        block: elements per scale, >= 1.
        stochastic: use stochastic rounding.
        generator: required when ``stochastic`` (unused otherwise).

    Returns:
        ``QuantResult(codes uint8 (n,), side float32 (ceil(n/block),) scales, bits=8)``.

    Raises:
        TypeError: wrong dtype. ValueError: bad block, non-finite ``x``, missing generator.
    """
    return _absmax_quantize(x, block, INT8_LEVELS, 8, stochastic, generator)


def dequantize_int8(
    codes: Tensor, side: Tensor, n: int, *, block: int = INT8_DEFAULT_BLOCK
) -> Tensor:
    """Inverse of :func:`quantize_int8`: ``(code - 128) * scale_b`` as float32 ``(n,)``."""
    return _absmax_dequantize(codes, side, n, block, INT8_LEVELS)


def quantize_int4(
    x: Tensor,
    *,
    block: int = INT4_DEFAULT_BLOCK,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantResult:
    """Symmetric absmax int4 per block: as :func:`quantize_int8` with 7 levels per side.

    ``scale_b = amax_b / 7``, ``q in [-7, 7]``, code ``q + 8`` (1..15), ``bits=4``. Same error
    bounds as int8 with this scale (fp32 slack ``<= 3 * 2**-24 * amax_b``).
    """
    return _absmax_quantize(x, block, INT4_LEVELS, 4, stochastic, generator)


def dequantize_int4(
    codes: Tensor, side: Tensor, n: int, *, block: int = INT4_DEFAULT_BLOCK
) -> Tensor:
    """Inverse of :func:`quantize_int4`: ``(code - 8) * scale_b`` as float32 ``(n,)``."""
    return _absmax_dequantize(codes, side, n, block, INT4_LEVELS)


# --- SparseLoCo 2-bit centroid quantizer -----------------------------------------------------


def _check_n_bins(n_bins: Any) -> int:
    check_int("n_bins", n_bins, 2, _MAX_BINS)
    if n_bins & (n_bins - 1):
        raise ValueError(f"n_bins must be a power of two in [2, {_MAX_BINS}], got {n_bins}")
    return n_bins


def quantize_2bit_centroid(
    x: Tensor,
    *,
    n_bins: int = TWO_BIT_DEFAULT_BINS,
    range_sigmas: float = TWO_BIT_DEFAULT_RANGE_SIGMAS,
) -> QuantResult:
    """SparseLoCo value quantizer (parity with tplr-ai/SparseLoCo and templar ``compress.py``).

    Over all ``n`` values: ``mu = mean(v)``, ``c = v - mu``, ``sigma = ||c||_2 / sqrt(n - 1)``
    (0 if ``n <= 1``), ``scale = range_sigmas * sigma / n_bins`` (1.0 if 0, NaN or inf),
    ``code = clamp(round_half_even(c / scale + n_bins // 2), 0, n_bins - 1)``, centroid table
    ``L[b] = mean(c[code == b])`` (0 for empty bins). ``n = 0`` gives ``mu = 0`` and ``L = 0``.

    Args:
        x: float32/float16/bfloat16 tensor, any shape (flattened).
        n_bins: number of bins, a power of two in [2, 256].
        range_sigmas: > 0.

    Returns:
        ``QuantResult(codes uint8 (n,), side float32 [mu, L_0..L_{n_bins-1}], bits=log2(n_bins))``.

    Raises:
        TypeError: wrong dtype. ValueError: bad ``n_bins``/``range_sigmas``, non-finite ``x``.
    """
    _check_n_bins(n_bins)
    check_float("range_sigmas", range_sigmas, 0.0, lo_open=True)
    return _quantize_2bit_core(_prepare(x), n_bins=n_bins, range_sigmas=range_sigmas)


def _quantize_2bit_core(
    v: Tensor,
    *,
    n_bins: int = TWO_BIT_DEFAULT_BINS,
    range_sigmas: float = TWO_BIT_DEFAULT_RANGE_SIGMAS,
) -> QuantResult:
    n = v.numel()
    bits = n_bins.bit_length() - 1
    if n == 0:
        side = torch.zeros(1 + n_bins, dtype=torch.float32, device=v.device)
        return QuantResult(
            codes=torch.empty(0, dtype=torch.uint8, device=v.device), side=side, bits=bits
        )
    mu = v.mean()
    c = v - mu
    sigma = c.norm() / math.sqrt(n - 1) if n > 1 else torch.zeros_like(mu)
    scale = range_sigmas * sigma / n_bins
    scale = torch.where(torch.isfinite(scale) & (scale != 0), scale, torch.ones_like(scale))
    q = torch.round(c / scale + n_bins // 2).clamp(0, n_bins - 1)
    codes = q.to(torch.uint8)
    idx = codes.long()
    sums = torch.zeros(n_bins, dtype=torch.float32, device=v.device).index_add_(0, idx, c)
    # Not torch.bincount: on CUDA it reads the max code back to size its output.
    counts = torch.zeros(n_bins, dtype=torch.int64, device=v.device)
    counts.index_add_(0, idx, torch.ones_like(idx))
    table = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    return QuantResult(codes=codes, side=torch.cat([mu.reshape(1), table]), bits=bits)


def dequantize_2bit_centroid(
    codes: Tensor, side: Tensor, n: int, *, n_bins: int = TWO_BIT_DEFAULT_BINS
) -> Tensor:
    """Inverse of :func:`quantize_2bit_centroid`: ``L[code] + mu`` as float32 ``(n,)``."""
    _check_n_bins(n_bins)
    check_int("n", n, 0)
    _check_payload(codes, side, n, n, 1 + n_bins)
    _check_code_range(codes, 0, n_bins - 1)
    return _dequantize_2bit_core(codes, side, n, n_bins=n_bins)


def _dequantize_2bit_core(
    codes: Tensor,
    side: Tensor,
    n: int,
    *,
    n_bins: int = TWO_BIT_DEFAULT_BINS,
    range_sigmas: float = TWO_BIT_DEFAULT_RANGE_SIGMAS,
) -> Tensor:
    # Clamped so a bad code gathers a real centroid instead of reading out of bounds.
    idx = codes.long().clamp(max=n_bins - 1)
    # mu is added to the n_bins centroids, not to every value: the same float sums, once each.
    return torch.gather(side[..., 1:] + side[..., :1], -1, idx)


# --- 1-bit sign ------------------------------------------------------------------------------


def _sign_blocks(n: int, block: int | None) -> tuple[int, int]:
    """(block length, number of blocks) of the sign scales; ``block=None`` is one block."""
    if block is None:
        return max(n, 1), (1 if n else 0)
    return block, _n_blocks(n, block)


def quantize_sign(x: Tensor, *, block: int | None = None, scale: bool = True) -> QuantResult:
    """1-bit sign with a mean-magnitude scale (scaled sign of EF-SignSGD, Karimireddy et al. 2019).

    ``code = signbit(x)`` (1 = negative; ``-0.0`` gives 1, ``+0.0`` gives 0);
    ``scale_b = mean(|x|)`` over the *real* elements of block ``b`` (a short last block divides
    by its own length); ``deq = -scale_b`` for code 1, ``+scale_b`` for code 0. ``block=None``
    uses one scale for the whole tensor. ``scale=False`` gives the unscaled ``±1`` of Psyche's
    1-bit DeMo variant, with empty side data; zero then decodes to ``+1`` (1 bit cannot hold 0).

    Args:
        x: float32/float16/bfloat16 tensor, any shape (flattened).
        block: elements per scale (>= 1), or None for one scale.
        scale: send per-block mean magnitudes; otherwise decode to ``±1``.

    Returns:
        ``QuantResult(codes uint8 (n,), side float32 scales (empty if not scale), bits=1)``.

    Raises:
        TypeError: wrong dtype. ValueError: bad block, non-finite ``x``.
    """
    if block is not None:
        check_int("block", block, 1)
    check_type("scale", scale, bool)
    return _quantize_sign_core(_prepare(x), block=block, scale=scale)


def _quantize_sign_core(
    flat: Tensor, *, block: int | None = None, scale: bool = True
) -> QuantResult:
    n = flat.numel()
    codes = torch.signbit(flat).to(torch.uint8)
    if not scale:
        return QuantResult(codes=codes, side=flat.new_zeros(0), bits=1)
    blen, nb = _sign_blocks(n, block)
    sums = _to_blocks(flat.abs(), blen).sum(dim=1)
    counts = (n - blen * torch.arange(nb, device=flat.device)).clamp(max=blen)
    return QuantResult(codes=codes, side=sums / counts.to(torch.float32), bits=1)


def dequantize_sign(
    codes: Tensor, side: Tensor, n: int, *, block: int | None = None, scale: bool = True
) -> Tensor:
    """Inverse of :func:`quantize_sign`: ``±scale_b`` (or ``±1``) as float32 ``(n,)``."""
    check_int("n", n, 0)
    if block is not None:
        check_int("block", block, 1)
    check_type("scale", scale, bool)
    blen, nb = _sign_blocks(n, block)
    _check_payload(codes, side, n, n, nb if scale else 0)
    _check_code_range(codes, 0, 1)
    return _dequantize_sign_core(codes, side, n, block=block, scale=scale)


def _dequantize_sign_core(
    codes: Tensor, side: Tensor, n: int, *, block: int | None = None, scale: bool = True
) -> Tensor:
    if scale:
        mag = _per_element(side, _sign_blocks(n, block)[0], n)
    else:
        mag = torch.ones(codes.shape, dtype=torch.float32, device=codes.device)
    return torch.where(codes.bool(), -mag, mag)


# --- FP8 (E4M3FN / E5M2) with per-block scale ------------------------------------------------


def quantize_fp8(x: Tensor, *, fmt: str = "e4m3", block: int = FP8_DEFAULT_BLOCK) -> QuantResult:
    """Per-block scaled fp8: ``scale_b = amax_b / FMAX``, codes = bits of ``(x / scale_b).to(fp8)``.

    ``fmt="e4m3"`` uses ``torch.float8_e4m3fn`` (FMAX 448), ``"e5m2"`` ``torch.float8_e5m2``
    (FMAX 57344). ``x / scale_b`` is computed in float32, clamped to ``[-FMAX, FMAX]`` (fp32
    division can exceed FMAX by an ulp; unclamped, E4M3FN would give NaN near 480 and E5M2 inf)
    and cast with torch's round-to-nearest-even. An all-zero block has scale 0 and codes 0.

    Args:
        x: float32/float16/bfloat16 tensor, any shape (flattened).
        fmt: "e4m3" or "e5m2".
        block: elements per scale, >= 1.

    Returns:
        ``QuantResult(codes uint8 fp8 bit patterns (n,), side float32 scales, bits=8)``.

    Raises:
        TypeError: wrong dtype. ValueError: bad fmt/block, non-finite ``x``.
    """
    check_choice("fmt", fmt, tuple(_FP8))
    check_int("block", block, 1)
    return _quantize_fp8_core(_prepare(x), fmt=fmt, block=block)


def _quantize_fp8_core(
    flat: Tensor, *, fmt: str = "e4m3", block: int = FP8_DEFAULT_BLOCK
) -> QuantResult:
    dtype, fmax = _FP8[fmt]
    n = flat.numel()
    blocks = _to_blocks(flat, block)
    scale, safe = _block_scales(blocks, fmax)
    y = (blocks / safe[:, None]).clamp(-fmax, fmax)
    codes = y.to(dtype).view(torch.uint8).reshape(-1)[:n]
    return QuantResult(codes=codes, side=scale, bits=8)


def dequantize_fp8(
    codes: Tensor, side: Tensor, n: int, *, fmt: str = "e4m3", block: int = FP8_DEFAULT_BLOCK
) -> Tensor:
    """Inverse of :func:`quantize_fp8`: ``fp8(code) * scale_b`` as float32 ``(n,)``.

    Raises:
        ValueError: a code is a NaN/inf bit pattern (never produced by the quantizer).
    """
    check_choice("fmt", fmt, tuple(_FP8))
    check_int("n", n, 0)
    check_int("block", block, 1)
    _check_payload(codes, side, n, n, _n_blocks(n, block))
    vals = codes.contiguous().view(_FP8[fmt][0]).to(torch.float32)
    bad = int((~torch.isfinite(vals)).sum()) if n else 0
    if bad:
        raise ValueError(f"codes must be finite {fmt} values, got {bad} NaN/inf bit patterns")
    return _dequantize_fp8_core(codes, side, n, fmt=fmt, block=block)


def _dequantize_fp8_core(
    codes: Tensor, side: Tensor, n: int, *, fmt: str = "e4m3", block: int = FP8_DEFAULT_BLOCK
) -> Tensor:
    # Out-of-range here means a NaN/inf bit pattern; it decodes to a non-finite value.
    vals = codes.contiguous().view(_FP8[fmt][0]).to(torch.float32)
    return vals * _per_element(side, block, n)


# --- FP4 E3M0 (signed powers of two) with per-block scale ------------------------------------


def quantize_fp4_e3m0(
    x: Tensor,
    *,
    block: int = FP4_DEFAULT_BLOCK,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantResult:
    """FP4 E3M0 (Streaming DiLoCo, arXiv:2501.18512v1 §2): sign + 3-bit exponent, fp32 block scale.

    ``scale_b = amax_b``; ``y = |x| / scale_b`` (float32, in ``[0, 1]``); code
    ``signbit(x) << 3 | e3`` where ``e3 = 0`` means 0 and ``e3 in 1..7`` means
    ``scale_b * 2**(e3 - 7)`` (magnitudes ``2**-6 .. 1``; 15 distinct values, code 8 is ``-0``).
    Deterministic rounding picks the level nearest to ``y`` in linear value, ties to the larger
    magnitude; ``y < 2**-7`` (half the smallest level) goes to 0. Bounds: relative error
    ``|x - deq| <= |x| / 3`` for ``|x| >= scale_b * 2**-6`` (worst at ``1.5 * 2**k``), absolute
    error ``<= scale_b * 2**-7`` below that (up to float32 rounding of ``y``). Stochastic
    rounding rounds up between adjacent levels ``lo <= y < hi`` with probability
    ``(y - lo) / (hi - lo)``: unbiased, ``|err| < scale_b * (hi - lo)``.

    Args:
        x: float32/float16/bfloat16 tensor, any shape (flattened).
        block: elements per scale, >= 1.
        stochastic: use stochastic rounding.
        generator: required when ``stochastic`` (unused otherwise).

    Returns:
        ``QuantResult(codes uint8 in [0, 15] (n,), side float32 scales, bits=4)``.

    Raises:
        TypeError: wrong dtype. ValueError: bad block, non-finite ``x``, missing generator.
    """
    check_int("block", block, 1)
    _check_generator(stochastic, generator)
    return _quantize_fp4_core(_prepare(x), block=block, stochastic=stochastic, generator=generator)


def _quantize_fp4_core(
    flat: Tensor,
    *,
    block: int = FP4_DEFAULT_BLOCK,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantResult:
    n = flat.numel()
    blocks = _to_blocks(flat, block)
    scale, safe = _block_scales(blocks, 1.0)
    y = (blocks.abs() / safe[:, None]).clamp(max=1.0).reshape(-1)[:n]
    levels, thresholds = _fp4_tables(flat.device)
    if stochastic:
        lo_idx = torch.bucketize(y, levels[1:], right=True)  # largest level <= y
        hi_idx = (lo_idx + 1).clamp(max=len(FP4_E3M0_LEVELS) - 1)
        lo, hi = levels[lo_idx], levels[hi_idx]
        gap = hi - lo
        p = torch.where(gap > 0, (y - lo) / torch.where(gap > 0, gap, 1.0), 0.0)
        u = torch.rand(y.shape, generator=generator, dtype=torch.float32, device=y.device)
        e3 = lo_idx + (u < p).long()
    else:
        e3 = torch.bucketize(y, thresholds, right=True)  # number of thresholds <= y
    codes = (torch.signbit(flat).long() << 3 | e3).to(torch.uint8)
    return QuantResult(codes=codes, side=scale, bits=4)


def dequantize_fp4_e3m0(
    codes: Tensor, side: Tensor, n: int, *, block: int = FP4_DEFAULT_BLOCK
) -> Tensor:
    """Inverse of :func:`quantize_fp4_e3m0`: ``±scale_b * 2**(e3 - 7)`` (0 for ``e3 = 0``)."""
    check_int("n", n, 0)
    check_int("block", block, 1)
    _check_payload(codes, side, n, n, _n_blocks(n, block))
    _check_code_range(codes, 0, 15)
    return _dequantize_fp4_core(codes, side, n, block=block)


def _dequantize_fp4_core(
    codes: Tensor,
    side: Tensor,
    n: int,
    *,
    block: int = FP4_DEFAULT_BLOCK,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    # Only the low 4 bits are read, so a code above 15 cannot index out of bounds.
    mag = _fp4_level_bits((codes & 7).to(torch.int32)) * _per_element(side, block, n)
    return torch.where((codes & 8).bool(), -mag, mag)


# --- 16-bit casts ----------------------------------------------------------------------------

_CAST_DTYPES = (torch.float16, torch.bfloat16)


def quantize_cast(x: Tensor, *, dtype: torch.dtype = torch.float16) -> QuantResult:
    """Round to float16 or bfloat16 (nearest even); codes are the raw bytes (``2 * n``, host order).

    Raises ``ValueError`` instead of silently producing inf: any ``|x| > finfo(dtype).max``
    (65504 for float16, about 3.39e38 for bfloat16) is rejected, even values that would round
    down to the max. Error: half an ulp of the target dtype (normal range).

    Returns:
        ``QuantResult(codes uint8 (2n,), side float32 (0,), bits=16)``.

    Raises:
        TypeError: wrong input dtype. ValueError: bad ``dtype``, non-finite or overflowing ``x``.
    """
    check_choice("dtype", dtype, _CAST_DTYPES)
    flat = _prepare(x)
    fmax = float(torch.finfo(dtype).max)
    if flat.numel():
        amax = float(flat.abs().max())
        if amax > fmax:
            raise ValueError(
                f"|x| must be in [0, {fmax}] to cast to {dtype} without overflow, got max |x| = "
                f"{amax}"
            )
    return _quantize_cast_core(flat, dtype=dtype)


def _quantize_cast_core(flat: Tensor, *, dtype: torch.dtype = torch.float16) -> QuantResult:
    # No overflow check here (it would read max |x| back); an overflow casts to inf, which a
    # finiteness check of the dequantized values catches.
    codes = flat.to(dtype).view(torch.uint8)
    return QuantResult(codes=codes, side=flat.new_zeros(0), bits=16)


def dequantize_cast(
    codes: Tensor, side: Tensor, n: int, *, dtype: torch.dtype = torch.float16
) -> Tensor:
    """Inverse of :func:`quantize_cast`: reinterpret ``2n`` bytes as ``dtype``, return float32."""
    check_choice("dtype", dtype, _CAST_DTYPES)
    check_int("n", n, 0)
    _check_payload(codes, side, n, 2 * n, 0)
    vals = _dequantize_cast_core(codes, side, n, dtype=dtype)
    bad = int((~torch.isfinite(vals)).sum()) if n else 0
    if bad:
        raise ValueError(f"codes must be finite {dtype} values, got {bad} NaN/inf bit patterns")
    return vals


def _dequantize_cast_core(
    codes: Tensor, side: Tensor, n: int, *, dtype: torch.dtype = torch.float16
) -> Tensor:
    if codes.numel() == 0:
        # An empty (possibly stride-0) buffer cannot be viewed as a 2-byte dtype.
        return torch.zeros(*codes.shape[:-1], n, dtype=torch.float32, device=codes.device)
    # view(dtype) needs unit stride along the last dim and even strides and storage offset; a
    # slice of a larger buffer (even one that counts as contiguous) may have neither.
    if codes.stride(-1) != 1 or any(st % 2 for st in (codes.storage_offset(), *codes.stride())):
        codes = codes.clone(memory_format=torch.contiguous_format)
    return codes.view(dtype).to(torch.float32)


# --- Registry and exact sizes ----------------------------------------------------------------

#: name -> (quantize, dequantize). Keyword parameters of the quantizer (e.g. ``block``) are passed
#: to both; ``side_len``/``code_bits`` accept the same keywords.
QUANTIZERS: dict[str, tuple[Callable[..., QuantResult], Callable[..., Tensor]]] = {
    "int8": (quantize_int8, dequantize_int8),
    "int4": (quantize_int4, dequantize_int4),
    "2bit": (quantize_2bit_centroid, dequantize_2bit_centroid),
    "sign": (quantize_sign, dequantize_sign),
    "fp8_e4m3": (
        functools.partial(quantize_fp8, fmt="e4m3"),
        functools.partial(dequantize_fp8, fmt="e4m3"),
    ),
    "fp8_e5m2": (
        functools.partial(quantize_fp8, fmt="e5m2"),
        functools.partial(dequantize_fp8, fmt="e5m2"),
    ),
    "fp4_e3m0": (quantize_fp4_e3m0, dequantize_fp4_e3m0),
    "fp16": (
        functools.partial(quantize_cast, dtype=torch.float16),
        functools.partial(dequantize_cast, dtype=torch.float16),
    ),
    "bf16": (
        functools.partial(quantize_cast, dtype=torch.bfloat16),
        functools.partial(dequantize_cast, dtype=torch.bfloat16),
    ),
}


#: name -> (qcore, dcore): the sync-free cores of :data:`QUANTIZERS`, same names and keywords.
#:
#: ``qcore(flat, **params) -> QuantResult`` takes a 1-D float32 tensor that the caller knows is
#: finite and does no validation (for fp16/bf16 no overflow check either: an overflow casts to
#: inf). ``dcore(codes, side, n, **params) -> Tensor`` takes uint8 ``codes (..., n)`` (``2n`` for
#: the casts), float32 ``side (..., side_len)`` and returns float32 ``(..., n)``, one decode per
#: leading index (e.g. ``R`` peers' payloads at once); it accepts the quantizer's keywords
#: (rounding ones are ignored) and never raises on bad codes: codes outside :func:`code_range`
#: decode to arbitrary values without out-of-bounds reads, fp8/fp16/bf16 NaN or inf patterns to
#: non-finite values. For valid input both equal the public functions bit for bit.
QUANTIZER_CORES: dict[str, tuple[Callable[..., QuantResult], Callable[..., Tensor]]] = {
    "int8": (_quantize_int8_core, _dequantize_int8_core),
    "int4": (_quantize_int4_core, _dequantize_int4_core),
    "2bit": (_quantize_2bit_core, _dequantize_2bit_core),
    "sign": (_quantize_sign_core, _dequantize_sign_core),
    "fp8_e4m3": (
        functools.partial(_quantize_fp8_core, fmt="e4m3"),
        functools.partial(_dequantize_fp8_core, fmt="e4m3"),
    ),
    "fp8_e5m2": (
        functools.partial(_quantize_fp8_core, fmt="e5m2"),
        functools.partial(_dequantize_fp8_core, fmt="e5m2"),
    ),
    "fp4_e3m0": (_quantize_fp4_core, _dequantize_fp4_core),
    "fp16": (
        functools.partial(_quantize_cast_core, dtype=torch.float16),
        functools.partial(_dequantize_cast_core, dtype=torch.float16),
    ),
    "bf16": (
        functools.partial(_quantize_cast_core, dtype=torch.bfloat16),
        functools.partial(_dequantize_cast_core, dtype=torch.bfloat16),
    ),
}


def _params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Merge ``params`` over the quantizer's keyword defaults (taken from its signature)."""
    check_choice("name", name, tuple(QUANTIZERS))
    fn = QUANTIZERS[name][0]
    fixed = fn.keywords if isinstance(fn, functools.partial) else {}
    defaults = {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in fixed
    }
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise TypeError(f"params must be in {sorted(defaults)} for {name!r}, got {unknown}")
    return {**defaults, **params}


def side_len(name: str, n: int, **params: Any) -> int:
    """Exact number of float32 side values that quantizer ``name`` emits for ``n`` elements.

    Args:
        name: a key of :data:`QUANTIZERS`.
        n: element count, >= 0.
        **params: the quantizer's keyword parameters (defaults apply).

    Returns:
        ``ceil(n / block)`` for int8/int4/fp8/fp4; ``1 + n_bins`` for 2bit (also at ``n = 0``);
        for sign ``ceil(n / block)``, or ``min(n, 1)`` when ``block=None``, or 0 when
        ``scale=False``; 0 for fp16/bf16.

    Raises:
        ValueError: unknown name or invalid parameter value. TypeError: unknown parameter.
    """
    p = _params(name, params)
    check_int("n", n, 0)
    if name == "2bit":
        return 1 + _check_n_bins(p["n_bins"])
    if name == "sign":
        if p["block"] is not None:
            check_int("block", p["block"], 1)
        return _sign_blocks(n, p["block"])[1] if p["scale"] else 0
    if name in ("fp16", "bf16"):
        return 0
    return _n_blocks(n, check_int("block", p["block"], 1))


def code_bits(name: str, **params: Any) -> int:
    """Bits per element on the wire for quantizer ``name``.

    8 for int8 and fp8, 4 for int4 and fp4_e3m0, ``log2(n_bins)`` for 2bit (2 by default), 1 for
    sign, 16 for fp16/bf16 (whose ``codes`` hold 2 bytes per element).

    Raises:
        ValueError: unknown name or invalid ``n_bins``. TypeError: unknown parameter.
    """
    p = _params(name, params)
    if name == "2bit":
        return _check_n_bins(p["n_bins"]).bit_length() - 1
    return {
        "int8": 8,
        "int4": 4,
        "sign": 1,
        "fp8_e4m3": 8,
        "fp8_e5m2": 8,
        "fp4_e3m0": 4,
        "fp16": 16,
        "bf16": 16,
    }[name]


def code_range(name: str, **params: Any) -> tuple[int, int] | None:
    """Closed range ``(lo, hi)`` of the codes quantizer ``name`` can emit, or None.

    None means every code that fits the wire width is valid or, for fp8/fp16/bf16, that an
    invalid (NaN/inf) pattern is found by checking the decoded values for finiteness instead.
    ``(1, 255)`` for int8, ``(1, 15)`` for int4, ``(0, n_bins - 1)`` for 2bit, ``(0, 1)`` for
    sign, ``(0, 15)`` for fp4_e3m0. A pure function of the settings: no tensor is read.

    Raises:
        ValueError: unknown name or invalid ``n_bins``. TypeError: unknown parameter.
    """
    p = _params(name, params)
    if name == "int8":
        return 1, 2 * INT8_LEVELS + 1
    if name == "int4":
        return 1, 2 * INT4_LEVELS + 1
    if name == "2bit":
        return 0, _check_n_bins(p["n_bins"]) - 1
    if name == "sign":
        return 0, 1
    if name == "fp4_e3m0":
        return 0, 15
    return None
