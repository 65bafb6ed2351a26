"""Fused compression hot paths: public dispatching ops and their pure-torch references.

Three ops, each in the three-function form (public op with ``backend=``, reference
``<op>_torch`` composed from the existing references, Triton launcher ``<op>_triton`` in
:mod:`thinwire.compression._triton`, one signature):

* :func:`ef_quantize_pack`: error-feedback update, quantize (int8 / int4 / 2-bit centroid / sign /
  FP4 E3M0), LSB-first bit packing and subtraction of the dequantized value, in one call
  (SparseLoCo's error-buffer update and subtraction, arXiv:2508.15706v1, Alg. 1);
* :func:`dct_topk`: chunked DCT with a given basis fused with per-chunk top-k (DeMo's compressor,
  arXiv:2411.19870v1, Alg. 1);
* :func:`decode_accumulate`: many peers' sparse ``(idx, val)`` folded into a dense float32 tensor
  in a fixed peer order, bit-identical to :func:`thinwire.compression.aggregate_sparse`.

The references define every detail the kernels reproduce (rounding, tie-break, padding, the order
of float additions); ``tests/compression/test_kernels.py`` checks the kernels against them under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from thinwire._validate import check_choice, check_dtype, check_float, check_int, check_type
from thinwire.compression._dispatch import dispatch, register
from thinwire.compression.bitpack import pack_bits, pack_bits_rows
from thinwire.compression.error_feedback import (
    BUFFER_DTYPE,
    error_feedback_subtract,
    error_feedback_update,
)
from thinwire.compression.quant import (
    FP4_DEFAULT_BLOCK,
    INPUT_DTYPES,
    INT4_DEFAULT_BLOCK,
    INT8_DEFAULT_BLOCK,
    QUANTIZER_CORES,
    QUANTIZERS,
    code_bits,
)
from thinwire.compression.topk import topk_chunks, topk_chunks_fast

#: How several peers' values at one coordinate combine (see :mod:`thinwire.compression.aggregate`):
#: the mean over the peers that selected it (reference parity) or the sum over all peers / P.
AGGREGATE_MODES = ("index_mean", "global_mean")

__all__ = [
    "AGGREGATE_MODES",
    "EF_FORMATS",
    "EF_FORMAT_BITS",
    "dct_topk",
    "dct_topk_torch",
    "decode_accumulate",
    "decode_accumulate_torch",
    "ef_quantize_pack",
    "ef_quantize_pack_torch",
]

#: Value formats of :func:`ef_quantize_pack` (keys of :data:`thinwire.compression.QUANTIZERS`).
EF_FORMATS = ("int8", "int4", "2bit", "sign", "fp4_e3m0")
#: Bits per packed code, from the quantizers' ``code_bits`` (8, 4, 2, 1, 4; 2-bit has 4 bins).
EF_FORMAT_BITS = {fmt: code_bits(fmt) for fmt in EF_FORMATS}
#: ``block=None`` picks the quantizer's own default; for sign that is one scale for the whole
#: tensor, and 2-bit has no blocks (one mean and centroid table per tensor).
_DEFAULT_BLOCK: dict[str, int | None] = {
    "int8": INT8_DEFAULT_BLOCK,
    "int4": INT4_DEFAULT_BLOCK,
    "fp4_e3m0": FP4_DEFAULT_BLOCK,
    "sign": None,
    "2bit": None,
}
#: Basis dtype of :func:`dct_topk`: the transform is computed in float32.
_BASIS_DTYPES = (torch.float32,)


# --- Argument checks shared by references and launchers --------------------------------------


def _check_ef_args(
    residual: Any, inp: Any, decay: Any, scale: Any, fmt: Any, block: Any
) -> tuple[float, float, int | None]:
    """Validate :func:`ef_quantize_pack` arguments; return ``(decay, scale, block)`` resolved."""
    check_type("residual", residual, Tensor)
    check_dtype("residual.dtype", residual.dtype, (BUFFER_DTYPE,))
    check_type("inp", inp, Tensor)
    check_dtype("inp.dtype", inp.dtype, INPUT_DTYPES)
    if inp.shape != residual.shape:
        raise ValueError(
            f"inp must have shape {tuple(residual.shape)} (as residual), got {tuple(inp.shape)}"
        )
    if inp.device != residual.device:
        raise ValueError(f"inp must be on {residual.device} (as residual), got {inp.device}")
    decay = check_float("decay", decay, 0.0, 1.0)
    scale = check_float("scale", scale)
    check_choice("fmt", fmt, EF_FORMATS)
    if fmt == "2bit" and block is not None:
        raise ValueError(f"block must be None for fmt='2bit' (no blocks), got {block!r}")
    if block is None:
        return decay, scale, _DEFAULT_BLOCK[fmt]
    return decay, scale, check_int("block", block, 1)


def _check_dct_topk_args(x_tiles: Any, basis1: Any, basis2: Any, k: Any) -> None:
    check_type("x_tiles", x_tiles, Tensor)
    check_dtype("x_tiles.dtype", x_tiles.dtype, INPUT_DTYPES)
    if x_tiles.ndim != 3:
        raise ValueError(f"x_tiles.shape must be (N, n1, n2), got {tuple(x_tiles.shape)}")
    _, n1, n2 = x_tiles.shape
    for name, basis, n in (("basis1", basis1, n1), ("basis2", basis2, n2)):
        check_type(name, basis, Tensor)
        check_dtype(f"{name}.dtype", basis.dtype, _BASIS_DTYPES)
        if tuple(basis.shape) != (n, n):
            raise ValueError(f"{name}.shape must be {(n, n)}, got {tuple(basis.shape)}")
        if basis.device != x_tiles.device:
            raise ValueError(f"{name} must be on {x_tiles.device} (as x_tiles), got {basis.device}")
    check_int("k", k, 1, n1 * n2)


def _check_decode_args(
    idx_list: Any, val_list: Any, num_chunks: Any, chunk_len: Any, mode: Any, checked: bool = True
) -> list[int]:
    """Validate :func:`decode_accumulate` arguments; return each peer's ``k``."""
    check_type("idx_list", idx_list, (list, tuple))
    check_type("val_list", val_list, (list, tuple))
    check_int("num_chunks", num_chunks, 0)
    check_int("chunk_len", chunk_len, 1)
    check_choice("mode", mode, AGGREGATE_MODES)
    if not idx_list:
        raise ValueError("idx_list must hold at least one peer, got an empty list")
    if len(val_list) != len(idx_list):
        raise ValueError(f"val_list must hold {len(idx_list)} tensors, got {len(val_list)}")
    device = None
    ks = []
    for p, (idx, val) in enumerate(zip(idx_list, val_list, strict=True)):
        check_type(f"idx_list[{p}]", idx, Tensor)
        check_type(f"val_list[{p}]", val, Tensor)
        check_dtype(f"idx_list[{p}].dtype", idx.dtype, (torch.int64,))
        check_dtype(f"val_list[{p}].dtype", val.dtype, INPUT_DTYPES)
        if idx.ndim != 2 or idx.shape[0] != num_chunks:
            raise ValueError(
                f"idx_list[{p}].shape must be ({num_chunks}, k), got {tuple(idx.shape)}"
            )
        if val.shape != idx.shape:
            raise ValueError(f"val_list[{p}].shape must be {tuple(idx.shape)}, got {val.shape}")
        device = idx.device if device is None else device
        if idx.device != device or val.device != device:
            raise ValueError(f"peer {p} tensors must be on {device}, got {idx.device}/{val.device}")
        if checked and idx.numel():  # reads two values back from the device
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= chunk_len:
                raise ValueError(
                    f"idx_list[{p}] must be in [0, {chunk_len - 1}], got {lo if lo < 0 else hi}"
                )
        ks.append(idx.shape[1])
    return ks


# --- References -------------------------------------------------------------------------------


def ef_quantize_pack_torch(
    residual: Tensor,
    inp: Tensor,
    *,
    decay: float,
    scale: float = 1.0,
    fmt: str,
    block: int | None = None,
    checked: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`ef_quantize_pack`, composed from the toolkit's references.

    ``p = decay * residual + scale * inp`` through :func:`error_feedback_update` with the input
    pre-scaled, so each product is rounded to float32 on its own before the one rounded add (the
    kernel disables multiply-add contraction to match bit for bit); then the quantizer of
    ``fmt``, LSB-first packing, its dequantizer and :func:`error_feedback_subtract`. Unchecked,
    it runs the quantizers' sync-free cores (``quant.QUANTIZER_CORES``): no value is read back.
    """
    decay, scale, block = _check_ef_args(residual, inp, decay, scale, fmt, block)
    p = residual.reshape(-1).clone()  # (n,) float32; the caller's buffer is left untouched
    error_feedback_update(p, inp.reshape(-1).to(torch.float32) * scale, decay=decay)
    params = {} if fmt == "2bit" else {"block": block}
    if checked:
        quantize, dequantize = QUANTIZERS[fmt]
        q = quantize(p, **params)
        packed = pack_bits(q.codes, q.bits)
        deq = dequantize(q.codes, q.side, p.numel(), **params)
    else:
        qcore, dcore = QUANTIZER_CORES[fmt]
        q = qcore(p, **params)
        packed = pack_bits_rows(q.codes.reshape(1, -1), q.bits).reshape(-1)
        deq = dcore(q.codes, q.side, p.numel(), **params)
    error_feedback_subtract(p, deq)
    return packed, q.side, p.view(residual.shape)


def dct_topk_torch(
    x_tiles: Tensor, basis1: Tensor, basis2: Tensor, k: int, *, checked: bool = True
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`dct_topk`: ``basis1^T X basis2`` per tile, then :func:`topk_chunks`."""
    _check_dct_topk_args(x_tiles, basis1, basis2, k)
    n_tiles, n1, n2 = x_tiles.shape
    coeffs = basis1.mT @ x_tiles.to(torch.float32) @ basis2  # (N, n1, n2)
    select = topk_chunks if checked else topk_chunks_fast
    return select(coeffs.reshape(n_tiles, n1 * n2), k)


def _flat_positions(idx_list: Sequence[Tensor], chunk_len: int) -> Tensor:
    """Row-major positions ``c * chunk_len + idx`` of every peer's entries, peers in rank order."""
    rows = idx_list[0].shape[0]
    base = torch.arange(rows, device=idx_list[0].device).mul_(chunk_len).unsqueeze(1)
    return torch.cat([(idx + base).reshape(-1) for idx in idx_list])


def _index_mean_into(out: Tensor, pos: Tensor, val: Tensor, peers: int) -> Tensor:
    """``out[pos]`` = mean of the values landing on each position, summed in list order.

    ``out`` is a zeroed float32 vector. The sum is one ``index_add_`` (entries in order, so a
    slot adds its peers' values in rank order, as a per-peer scatter-add fold does) and the
    division touches only the selected slots: no dense count or divide pass over ``out``.
    """
    out.index_add_(0, pos, val.to(torch.float32))
    # A slot's count is at most the number of peers: int8 up to 127 of them, else int32.
    dtype = torch.int8 if peers <= 127 else torch.int32
    count = torch.zeros(out.numel(), dtype=dtype, device=out.device)
    count.index_add_(0, pos, torch.ones((), dtype=dtype, device=out.device).expand_as(pos))
    # index_select, not out[pos]: the advanced-indexing gather is several times slower on CPU.
    mean = out.index_select(0, pos) / count.index_select(0, pos)
    return out.index_copy_(0, pos, mean)


def decode_accumulate_torch(
    idx_list: Sequence[Tensor],
    val_list: Sequence[Tensor],
    num_chunks: int,
    chunk_len: int,
    *,
    mode: str = "index_mean",
    checked: bool = True,
) -> Tensor:
    """Reference of :func:`decode_accumulate`: :func:`aggregate_sparse`'s fold, peer by peer."""
    _check_decode_args(idx_list, val_list, num_chunks, chunk_len, mode, checked)
    device = idx_list[0].device
    acc = torch.zeros(num_chunks, chunk_len, dtype=torch.float32, device=device)
    if mode == "index_mean":
        pos = _flat_positions(idx_list, chunk_len)
        vals = torch.cat([v.reshape(-1) for v in val_list])
        _index_mean_into(acc.view(-1), pos, vals, len(idx_list))
        return acc
    for idx, val in zip(idx_list, val_list, strict=True):
        acc.scatter_add_(1, idx, val.to(torch.float32))
    return acc / float(len(idx_list))


# --- Public ops ------------------------------------------------------------------------------

register(
    "ef_quantize_pack",
    ef_quantize_pack_torch,
    "thinwire.compression._triton.ef_quantize_pack:ef_quantize_pack_triton",
)
register("dct_topk", dct_topk_torch, "thinwire.compression._triton.dct_topk:dct_topk_triton")
register(
    "decode_accumulate",
    decode_accumulate_torch,
    "thinwire.compression._triton.decode_accumulate:decode_accumulate_triton",
)


def ef_quantize_pack(
    residual: Tensor,
    inp: Tensor,
    *,
    decay: float,
    scale: float = 1.0,
    fmt: str,
    block: int | None = None,
    checked: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Error-feedback update, quantize, pack and subtract in one pass.

    ``p = decay * residual + scale * inp`` (float32; each product rounded before the add);
    ``q = QUANTIZERS[fmt](p)`` with the reference quantizers' exact rounding rules; codes packed
    LSB-first (:func:`pack_bits`); ``residual' = p - dequantize(q)`` (EF-SGD, Karimireddy et al.
    2019), so ``p == dequantize(q) + residual'`` up to one float32 rounding.

    Shapes and dtypes: ``residual`` float32, any shape, ``n = numel``; ``inp`` float32, float16
    or bfloat16 of the same shape (fp32 compute). Outputs: ``packed`` uint8 of
    ``ceil(n * bits / 8)`` bytes (``bits`` from :data:`EF_FORMAT_BITS`: 8, 4, 2, 1, 4); ``side``
    float32 of ``side_len(fmt, n, block=...)`` values (per-block scales; ``[mu, L_0..L_3]`` for
    2-bit); the new residual, float32 in ``residual``'s shape (a new tensor: ``residual`` is not
    modified). Blocks as in the quantizers: the last block may be short (zero-padded, which changes
    neither its absmax nor its codes). Strided inputs are copied to contiguous memory by the
    kernel launcher. ``n = 0`` gives empty outputs (2-bit: a zero side table).

    Args:
        residual: error-feedback buffer ``e`` (float32).
        inp: what is added to it (gradient or pseudo-gradient, ``Delta`` in SparseLoCo's Alg. 1).
        decay: multiplier of the old residual, ``beta`` in [0, 1].
        scale: multiplier of ``inp``, ``alpha``, finite (default 1).
        fmt: ``"int8"``, ``"int4"``, ``"2bit"`` (4 centroid bins, 6 sigmas), ``"sign"`` (scaled)
            or ``"fp4_e3m0"``.
        block: elements per scale, >= 1; None picks the quantizer default (256 for int8, 128
            for int4 and FP4, one scale per tensor for sign); must be None for 2bit.
        checked: raise on a non-finite ``p`` (reads a count back from the device). The
            optimizers pass False and check their inputs once per bucket instead; unchecked,
            a non-finite ``p`` gives non-finite side data, which the caller can test on device.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (``thinwire.compression._dispatch``).

    Returns:
        ``(packed, side, new_residual)``. Integer outputs equal the reference exactly on both
        backends; ``side`` and the residual too for int8/int4/FP4, while sign scales and the 2-bit
        centroid table are float sums whose order differs (a few ulps).

    Raises:
        TypeError: wrong tensor or dtype. ValueError: shape/device mismatch, bad decay, scale,
        fmt or block, non-finite ``p``, or a backend the dispatch rule rejects.
    """
    return dispatch(
        "ef_quantize_pack",
        backend,
        residual,
        inp,
        decay=decay,
        scale=scale,
        fmt=fmt,
        block=block,
        checked=checked,
    )


def dct_topk(
    x_tiles: Tensor,
    basis1: Tensor,
    basis2: Tensor,
    k: int,
    *,
    checked: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Chunked DCT fused with per-chunk top-k (DeMo's compressor).

    ``T = basis1^T X basis2`` for every tile ``X`` (float32 compute; ``basis`` is normally
    :func:`dct_basis` ``(n)``), flattened row-major (index ``r * n2 + c``), then the ``k``
    largest ``|T|`` with ties to the lower index, returned in ascending index order
    (:func:`topk_chunks`'s contract). The kernel computes the two products with IEEE float32
    ``tl.dot`` in a different summation order, so coefficients agree to float32 rounding and
    indices agree exactly unless two magnitudes straddling the k-th place are within that
    rounding; given identical coefficients (e.g. identity bases) selection is exact, ties
    included.

    Args:
        x_tiles: ``(N, n1, n2)`` float32/float16/bfloat16 tiles (``ChunkGeometry.to_tiles``).
            Strided input is copied to contiguous memory by the kernel launcher.
        basis1: ``(n1, n1)`` float32 on the same device.
        basis2: ``(n2, n2)`` float32 on the same device.
        k: entries kept per tile, in ``[1, n1 * n2]``.
        checked: raise on non-finite coefficients (reads a count back from the device). The
            optimizers pass False: they check their whole bucket for finiteness once, and the
            step then runs without a host round trip. Unchecked, non-finite input gives an
            unspecified selection.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``. The kernel handles tile sides up to
            64, the default chunk side (one tile per program), and raises beyond.

    Returns:
        ``(idx, val)``: ``(N, k)`` int64 strictly ascending per row, ``(N, k)`` float32.

    Raises:
        TypeError: wrong tensor or dtype. ValueError: bad shapes, devices or ``k``, non-finite
        coefficients, or (kernel only) a tile side above 64.
    """
    return dispatch("dct_topk", backend, x_tiles, basis1, basis2, k, checked=checked)


def decode_accumulate(
    idx_list: Sequence[Tensor],
    val_list: Sequence[Tensor],
    num_chunks: int,
    chunk_len: int,
    *,
    mode: str = "index_mean",
    checked: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Fold many peers' sparse payloads into a dense float32 tensor, bit-identically.

    Peers are folded in list (rank) order: per peer ``acc[c, idx] += val`` and
    ``count[c, idx] += 1`` in float32, then ``index_mean`` divides by the count where it is
    positive and ``global_mean`` divides by the number of peers: the operations, in the order, of
    :func:`aggregate_sparse`'s fold (without its inverse transform), so both backends give the
    same bits. The kernel runs one program per chunk and walks the peers in order.

    Args:
        idx_list: a list or tuple of one ``(num_chunks, k_p)`` int64 tensor per peer, indices in
            ``[0, chunk_len)`` and unique within each row (as :func:`topk_chunks` emits them;
            with duplicates the result is unspecified).
        val_list: matching ``(num_chunks, k_p)`` float32/float16/bfloat16 dequantized values.
        num_chunks: rows of the output, >= 0.
        chunk_len: columns of the output, >= 1.
        mode: ``"index_mean"`` (default; as the DeMo, Psyche, SparseLoCo and templar code) or
            ``"global_mean"``.
        checked: check every index against ``[0, chunk_len)`` (reads two values back from the
            device per peer). The optimizers pass False: their decoders already clamp and flag
            out-of-range indices on device.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(num_chunks, chunk_len)`` float32 (chunk layout; ``ChunkGeometry.from_chunks`` and the
        inverse DCT are the caller's).

    Raises:
        TypeError: wrong tensor or dtype. ValueError: no peer, mismatched shapes or devices, an
        index out of range, bad mode.
    """
    return dispatch(
        "decode_accumulate",
        backend,
        idx_list,
        val_list,
        num_chunks,
        chunk_len,
        mode=mode,
        checked=checked,
    )
