"""Deterministic aggregation of several peers' sparse payloads into one dense update.

Every reference implementation (bloc97/DeMo, Psyche, tplr-ai/SparseLoCo, templar) concatenates all
workers' (index, value) pairs and takes a ``scatter_reduce(mean)``, i.e. the mean over the workers
that *selected* a coordinate (``mode="index_mean"``, the default, parity with them).
``mode="global_mean"`` divides by the number of participating peers instead (the SparseLoCo
paper's summary formula) **[ours]**.

Determinism: peers are folded in list (rank) order, one ``scatter_add_`` per peer in float32.
Within one peer the indices of a chunk are distinct, so no two writes of one call touch the same
slot and the result cannot depend on thread scheduling; the fold order is fixed. Every replica
therefore turns the same payloads into the same bits, whatever order they arrived in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from thinwire._validate import check_choice
from thinwire.compression.chunk import ChunkGeometry
from thinwire.compression.dct import idct_tiles
from thinwire.compression.fused import AGGREGATE_MODES, decode_accumulate

__all__ = ["SparseMessage", "aggregate_sparse", "densify", "AGGREGATE_MODES"]


@dataclass(frozen=True)
class SparseMessage:
    """One peer's decoded sparse payload, before any inverse transform.

    Attributes:
        geometry: chunk geometry of the encoded tensor.
        transform: ``"dct"`` if values are DCT coefficients, ``"none"`` if they are raw entries.
        idx: ``(num_chunks, k)`` int64, ascending within each chunk.
        val: ``(num_chunks, k)`` float32 dequantized values.
    """

    geometry: ChunkGeometry
    transform: str
    idx: torch.Tensor
    val: torch.Tensor


def _inverse(coeffs: torch.Tensor, geometry: ChunkGeometry, transform: str) -> torch.Tensor:
    """Chunk-layout coefficients ``(N, C)`` -> dense tensor of the original shape."""
    tiles = coeffs.reshape(geometry.num_chunks, geometry.n1, geometry.n2)
    if transform == "dct":
        tiles = idct_tiles(tiles)
    return geometry.from_tiles(tiles)


def densify(message: SparseMessage) -> torch.Tensor:
    """One message back to a dense float32 tensor (scatter into zeros, inverse transform)."""
    g = message.geometry
    coeffs = torch.zeros(g.num_chunks, g.chunk_len, dtype=torch.float32, device=message.val.device)
    if g.num_chunks:
        coeffs.scatter_(1, message.idx, message.val.to(torch.float32))
    return _inverse(coeffs, g, message.transform)


def aggregate_sparse(
    messages: Sequence[SparseMessage | None] | Mapping[int, SparseMessage | None],
    *,
    mode: str = "index_mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Fold several peers' messages into one dense float32 tensor, bit-identically on every rank.

    Args:
        messages: one message per peer, in rank order (a list) or keyed by rank (a mapping, folded
            in ascending rank order). ``None`` entries (peers that did not deliver) are skipped and
            do not count in ``global_mean``'s denominator.
        mode: ``"index_mean"`` (mean over the peers that selected each coordinate; unselected
            coordinates are 0) or ``"global_mean"`` (sum over peers / number of peers).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the fold (``_dispatch`` rule).

    Returns:
        The aggregate, inverse-transformed, in the encoded tensor's shape.

    Raises:
        ValueError: no message, or messages of different geometry or transform.
    """
    check_choice("mode", mode, AGGREGATE_MODES)
    if isinstance(messages, Mapping):
        ordered = [messages[r] for r in sorted(messages)]
    else:
        ordered = list(messages)
    present = [m for m in ordered if m is not None]
    if not present:
        raise ValueError("messages must hold at least one non-None message, got none")
    first = present[0]
    g = first.geometry
    for m in present[1:]:
        if m.geometry != g or m.transform != first.transform:
            raise ValueError(
                f"messages must share geometry and transform, got {m.geometry}/{m.transform} "
                f"and {g}/{first.transform}"
            )
    if g.num_chunks == 0:
        acc = torch.zeros(0, g.chunk_len, dtype=torch.float32, device=first.val.device)
    else:
        # The fold itself (rank order, fp32 scatter-add of values and counts) is the
        # decode_accumulate op: a Triton kernel on CUDA, its torch reference elsewhere.
        acc = decode_accumulate(
            [m.idx for m in present],
            [m.val for m in present],
            g.num_chunks,
            g.chunk_len,
            mode=mode,
            backend=backend,
        )
    return _inverse(acc, g, first.transform)
