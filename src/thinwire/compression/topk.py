"""Per-chunk top-k selection and its scatter inverse (DeMo, arXiv:2411.19870v1, Alg. 1).

Holds :func:`topk_chunks` (the ``k`` largest-magnitude entries of each chunk, with a defined order
and tie-break), :func:`scatter_chunks` (place kept values back into zeros) and
:func:`k_for_chunk` (SparseLoCo's per-chunk ``k`` rule, as the tplr-ai/SparseLoCo code has it).

All references (bloc97/DeMo, tplr-ai/SparseLoCo, templar) call
``torch.topk(x.abs(), k, sorted=False)``, whose tie order and output order are unspecified and
differ between CPU and CUDA. thinwire defines both **[ours]**: among equal magnitudes the lower
index wins, and the kept indices of each chunk are returned in ascending order. A kernel must
reproduce this exactly; parity tests against the references compare index *sets*.

Each selection comes in three forms with one signature: :func:`topk_chunks_reference` (a full
stable sort of every row: slow, obviously right, the oracle of the tests), :func:`topk_chunks_fast`
(the same output bit for bit, without validation and without reading any tensor back to the
host, for the optimizer step on a GPU) and :func:`topk_chunks` (validation, then the fast path).
:func:`scatter_chunks` and :func:`scatter_chunks_fast` pair the same way.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from thinwire._validate import check_dtype, check_int, check_type
from thinwire.compression.chunk import DEFAULT_TARGET

__all__ = [
    "k_for_chunk",
    "scatter_chunks",
    "scatter_chunks_fast",
    "topk_chunks",
    "topk_chunks_fast",
    "topk_chunks_reference",
]

#: Value dtypes accepted by top-k: fp32 and bf16 inputs, plus fp16/fp64.
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Elements of the int64 ranking key that :func:`topk_chunks_fast` builds at a time, per device
#: type. On CPU a 2 MiB block stays in cache and is reused, which measured faster than one key for
#: the whole tensor (whose fresh pages cost more to fault in than the top-k costs to run); on an
#: accelerator the block only bounds the workspace (512 MiB), so most buckets take one pass.
_KEY_BLOCK_ELEMS = {"cpu": 1 << 18}
_KEY_BLOCK_ELEMS_DEFAULT = 1 << 26

#: Per element size in bytes: the same-size signed integer dtype, and the mask of the magnitude
#: bits (all but the sign: 15 of a float16/bfloat16, 31 of a float32, 63 of a float64). For
#: non-negative IEEE floats the bit pattern read as an integer is monotone in the value, and
#: ``-0.0`` maps to the same pattern as ``0.0``.
_MAG_BITS = {
    2: (torch.int16, 0x7FFF),
    4: (torch.int32, 0x7FFFFFFF),
    8: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}


def _check_2d(name: str, t: torch.Tensor) -> None:
    check_type(name, t, torch.Tensor)
    if t.ndim != 2:
        raise ValueError(f"{name}.shape must be (N, C), got {tuple(t.shape)}")


def topk_chunks(chunks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` entries of largest ``|value|`` in each chunk.

    Order is defined **[ours]**: entries are ranked by descending magnitude with ties broken by
    lower index (a stable sort), the first ``k`` are kept, and their indices are returned sorted
    ascending. ``-0.0`` and ``0.0`` have equal magnitude.

    This is the validating entry point: it checks its arguments (the finiteness check reads one
    count back to the host), then runs :func:`topk_chunks_fast`.

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
            NaN must never reach a peer).
    """
    _check_topk_args(chunks, k)
    return topk_chunks_fast(chunks, k)


def _check_topk_args(chunks: torch.Tensor, k: int) -> None:
    _check_2d("chunks", chunks)
    check_dtype("chunks.dtype", chunks.dtype, _VALUE_DTYPES)
    check_int("k", k, 1, chunks.shape[1])
    bad = int((~torch.isfinite(chunks)).sum())
    if bad:
        raise ValueError(f"chunks must be finite, got {bad} non-finite values")


def topk_chunks_reference(chunks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`topk_chunks`: a full stable sort of every row (validates like it).

    Slow (it sorts all ``C`` entries to keep ``k``) and plainly right, so the tests hold
    :func:`topk_chunks_fast` to it bit for bit.
    """
    _check_topk_args(chunks, k)
    # Stable descending sort: equal magnitudes keep their original (ascending-index) order, so
    # the lowest index wins every tie, including ties that straddle the k-th place.
    order = torch.sort(chunks.abs(), dim=1, descending=True, stable=True).indices
    idx = torch.sort(order[:, :k], dim=1).values
    return idx, chunks.gather(1, idx)


def topk_chunks_fast(chunks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_chunks` without validation and without a host synchronisation.

    Returns exactly what :func:`topk_chunks` returns (same indices, values, dtypes and order),
    but checks nothing and never reads a tensor's data back to the host, so it can run inside an
    optimizer step on a GPU without stalling the stream. Output shapes depend only on the input
    shape and ``k``.

    Precondition (unchecked): ``chunks`` is a 2-D float16, bfloat16, float32 or float64 tensor of
    finite values with fewer than ``2**32`` columns, and ``1 <= k <= C``. Outside it the result
    is unspecified (NaN ranks above every number on the float16/bfloat16/float32 path).

    How: for float16, bfloat16 and float32 input, each entry gets the int64 key
    ``(bits(|x|) << 32) | (C - 1 - i)``, ``bits`` being the magnitude's own bit pattern.
    Non-negative float bit patterns order like their values, and the low word makes every key in
    a row distinct, with the lower index larger on equal magnitudes, so one ``torch.topk`` on the
    keys selects exactly the stable-sort winners; only the ``k`` kept indices are then sorted.
    The keys are built a block of rows at a time into one reused buffer. float64 magnitudes need
    all 63 bits, so that path selects the magnitude threshold with one ``torch.topk`` and picks
    the lowest-index entries at the threshold with a second one (see
    :func:`_topk_rows_two_pass`).

    Args:
        chunks: ``(N, C)`` chunk values.
        k: entries kept per chunk.

    Returns:
        ``(idx, val)`` as :func:`topk_chunks`.
    """
    if chunks.dtype == torch.float64:
        idx = _topk_rows_two_pass(chunks, k)
    else:
        idx = _topk_rows_keyed(chunks, k)
    idx = torch.sort(idx, dim=1).values
    return idx, chunks.gather(1, idx)


def _topk_rows_keyed(chunks: torch.Tensor, k: int) -> torch.Tensor:
    """Kept indices per row (unordered) of a float16/bfloat16/float32 ``(N, C)`` tensor."""
    n, c = chunks.shape
    device = chunks.device
    # A same-size integer view (any strides are fine); no float conversion pass is needed.
    int_dtype, mag = _MAG_BITS[chunks.element_size()]
    bits = chunks.view(int_dtype)
    rev = torch.arange(c - 1, -1, -1, device=device, dtype=torch.int64)  # lower index ranks higher
    budget = _KEY_BLOCK_ELEMS.get(device.type, _KEY_BLOCK_ELEMS_DEFAULT)
    rows = max(1, min(n, budget // c))
    key = torch.empty(rows, c, dtype=torch.int64, device=device)
    top = torch.empty(n, k, dtype=torch.int64, device=device)
    pos = torch.empty(n, k, dtype=torch.int64, device=device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        kb = key[: stop - start]
        kb.copy_(bits[start:stop])  # sign-extends; the mask below clears the sign and high word
        kb.bitwise_and_(mag).bitwise_left_shift_(32).bitwise_or_(rev)
        torch.topk(kb, k, dim=1, sorted=False, out=(top[start:stop], pos[start:stop]))
    return pos


def _topk_rows_two_pass(chunks: torch.Tensor, k: int) -> torch.Tensor:
    """Kept indices per row (unordered) of any float ``(N, C)`` tensor, in two top-k passes.

    Pass 1 ranks the magnitudes (as their bit patterns, an exact integer order) and yields the
    row's ``k``-th largest magnitude ``t``; the ``n_gt`` kept entries above ``t`` are right
    whatever ``torch.topk`` did with ties. Pass 2 scores the entries equal to ``t`` by
    ``C - 1 - i`` (others ``-1``) and takes the ``k`` best in sorted order, so its first
    ``k - n_gt`` are the lowest-index ties. Both sets merge into ``k`` slots without any
    data-dependent shape.
    """
    n, c = chunks.shape
    device = chunks.device
    int_dtype, mask = _MAG_BITS[chunks.element_size()]
    mag = chunks.view(int_dtype).bitwise_and(mask)
    val1, pos1 = torch.topk(mag, k, dim=1, sorted=False)
    t = val1.amin(dim=1, keepdim=True)
    above = val1 > t
    n_ties = k - above.sum(dim=1, keepdim=True)  # >= 1: the k-th entry itself equals t
    rev = torch.arange(c - 1, -1, -1, device=device, dtype=torch.int64)
    score = torch.where(mag == t, rev, -1)
    tie_pos = (c - 1) - torch.topk(score, k, dim=1, sorted=True).values
    take_tie = torch.arange(k, device=device) < n_ties
    # c sorts after every real index, so the k real candidates come first.
    cand = torch.cat((torch.where(above, pos1, c), torch.where(take_tie, tie_pos, c)), dim=1)
    return torch.sort(cand, dim=1).values[:, :k]


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
    return scatter_chunks_fast(idx, val, chunk_len)


def scatter_chunks_fast(idx: torch.Tensor, val: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """:func:`scatter_chunks` without validation and without a host synchronisation.

    Precondition (unchecked): ``idx`` is ``(N, k)`` int64 with entries in ``[0, chunk_len)``,
    ``val`` has ``idx``'s shape and device. Returns what :func:`scatter_chunks` returns.
    """
    out = torch.zeros(idx.shape[0], chunk_len, dtype=val.dtype, device=val.device)
    return out.scatter_(1, idx, val)


def k_for_chunk(chunk_len: int, topk: int, target: int = DEFAULT_TARGET) -> int:
    """Entries kept per chunk under SparseLoCo's rule (tplr-ai/SparseLoCo ``sparseloco.py``).

    ``k = max(1, round(chunk_len * topk / target**2))``, so a 1-D chunk of 64 elements keeps the
    same density as a 4096-element tile. ``round`` is Python's round-half-to-even, computed
    exactly on the rational ``chunk_len * topk / target**2`` (``0.5 -> 0 -> 1``,
    ``1.5 -> 2``, ``2.5 -> 2``). The result is clamped to ``chunk_len``; with ``topk`` limited to
    ``target**2`` that clamp never binds.

    Args:
        chunk_len: elements per chunk, ``>= 1``.
        topk: entries kept per full ``target x target`` tile (tplr-ai/SparseLoCo ``top_k``;
            templar uses 64 of 4096), in ``[1, target**2]``.
        target: chunk side ``s`` (default: 64, as DeMo and SparseLoCo), ``>= 1``.

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
