"""Per-chunk top-k selection and its scatter inverse (spec ``demo_sparseloco.md`` §1.3).

Holds :func:`topk_chunks` (the ``k`` largest-magnitude entries of each chunk, with a defined order
and tie-break), :func:`scatter_chunks` (place kept values back into zeros) and
:func:`k_for_chunk` (SparseLoCo's per-chunk ``k`` rule, spec §3.2 step 4).

All references (A1 bloc97/DeMo, A5 tplr SparseLoCo, A6 templar) call
``torch.topk(x.abs(), k, sorted=False)``, whose tie order and output order are unspecified and
differ between CPU and CUDA. thinwire defines both **[ours]**: among equal magnitudes the lower
index wins, and the kept indices of each chunk are returned in ascending order. A kernel must
reproduce this exactly; parity tests against the references compare index *sets*.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from thinwire._validate import check_dtype, check_int, check_type
from thinwire.compression.chunk import DEFAULT_TARGET

__all__ = ["k_for_chunk", "scatter_chunks", "topk_chunks"]

#: Value dtypes accepted by top-k (STYLE.md §4: fp32 and bf16 inputs, plus fp16/fp64).
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_2d(name: str, t: torch.Tensor) -> None:
    check_type(name, t, torch.Tensor)
    if t.ndim != 2:
        raise ValueError(f"{name}.shape must be (N, C), got {tuple(t.shape)}")


def topk_chunks(chunks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` entries of largest ``|value|`` in each chunk (spec §1.3).

    Order is defined **[ours]**: entries are ranked by descending magnitude with ties broken by
    lower index (a stable sort), the first ``k`` are kept, and their indices are returned sorted
    ascending. ``-0.0`` and ``0.0`` have equal magnitude.

    Args:
        chunks: ``(N, C)`` chunk values (``C = chunk_len``); float16, bfloat16, float32 or
            float64, all finite.
        k: entries kept per chunk, in ``[1, C]``.

    Returns:
        ``(idx, val)``: ``idx`` is ``(N, k)`` int64, strictly ascending along each row; ``val`` is
        ``(N, k)``, the signed values ``chunks.gather(1, idx)``, in the dtype of ``chunks``.

    Raises:
        TypeError: if ``chunks`` is not a tensor of a supported dtype, or ``k`` is not an int.
        ValueError: if ``chunks`` is not 2-D, ``k`` is outside ``[1, C]``, or ``chunks`` holds a
            NaN or infinity (a magnitude ranking of non-finite values has no useful meaning, and a
            NaN must never reach a peer; STYLE.md §3).
    """
    _check_2d("chunks", chunks)
    check_dtype("chunks.dtype", chunks.dtype, _VALUE_DTYPES)
    check_int("k", k, 1, chunks.shape[1])
    bad = int((~torch.isfinite(chunks)).sum())
    if bad:
        raise ValueError(f"chunks must be finite, got {bad} non-finite values")
    # Stable descending sort: equal magnitudes keep their original (ascending-index) order, so
    # the lowest index wins every tie, including ties that straddle the k-th place.
    order = torch.sort(chunks.abs(), dim=1, descending=True, stable=True).indices
    idx = torch.sort(order[:, :k], dim=1).values
    return idx, chunks.gather(1, idx)


def scatter_chunks(idx: torch.Tensor, val: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Place kept values back into zero chunks: the inverse of :func:`topk_chunks` on kept entries.

    Args:
        idx: ``(N, k)`` int64 positions in ``[0, chunk_len)``, unique within each row (as
            :func:`topk_chunks` emits them; with duplicates, which value lands is unspecified).
        val: ``(N, k)`` values, any dtype; same device as ``idx``.
        chunk_len: elements per chunk, ``>= 1``.

    Returns:
        ``(N, chunk_len)`` in ``val.dtype``: ``out[n, idx[n, i]] = val[n, i]``, zero elsewhere.

    Raises:
        TypeError: if ``idx``/``val`` are not tensors, ``idx`` is not int64, or ``chunk_len`` is
            not an int.
        ValueError: on a shape mismatch or an index outside ``[0, chunk_len)``.
    """
    _check_2d("idx", idx)
    check_type("val", val, torch.Tensor)
    check_dtype("idx.dtype", idx.dtype, (torch.int64,))
    check_int("chunk_len", chunk_len, 1)
    if val.shape != idx.shape:
        raise ValueError(f"val.shape must be {tuple(idx.shape)}, got {tuple(val.shape)}")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= chunk_len:
            bad = lo if lo < 0 else hi
            raise ValueError(f"idx must be in [0, {chunk_len - 1}], got {bad}")
    out = torch.zeros(idx.shape[0], chunk_len, dtype=val.dtype, device=val.device)
    return out.scatter_(1, idx, val)


def k_for_chunk(chunk_len: int, topk: int, target: int = DEFAULT_TARGET) -> int:
    """Entries kept per chunk under SparseLoCo's rule (spec §3.2 step 4, A5).

    ``k = max(1, round(chunk_len * topk / target**2))``, so a 1-D chunk of 64 elements keeps the
    same density as a 4096-element tile. ``round`` is Python's round-half-to-even, computed
    exactly on the rational ``chunk_len * topk / target**2`` (``0.5 -> 0 -> 1``,
    ``1.5 -> 2``, ``2.5 -> 2``). The result is clamped to ``chunk_len``; with ``topk`` limited to
    ``target**2`` that clamp never binds.

    Args:
        chunk_len: elements per chunk, ``>= 1``.
        topk: entries kept per full ``target x target`` tile (A5 ``top_k``; A6 uses 64 of 4096),
            in ``[1, target**2]``.
        target: chunk side ``s`` (default: 64, spec §1.1), ``>= 1``.

    Returns:
        ``k`` in ``[1, chunk_len]``.

    Raises:
        TypeError: if an argument is not an int.
        ValueError: if an argument is out of range.
    """
    check_int("chunk_len", chunk_len, 1)
    check_int("target", target, 1)
    check_int("topk", topk, 1, target * target)
    k = round(Fraction(chunk_len * topk, target * target))
    return min(chunk_len, max(1, k))
