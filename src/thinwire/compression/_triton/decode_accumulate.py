"""Triton kernel of :func:`thinwire.compression.fused.decode_accumulate` and its launcher.

One program per chunk walks the peers in list order: for each peer
it gathers ``acc[idx]`` (and ``count[idx]``), waits at a barrier until every thread of the
program has loaded, stores ``acc[idx] + val`` (``count + 1``) and waits again before the next
peer. Within a peer the indices of a chunk are distinct, so no two lanes write one slot; across
peers the barriers fix the order of the float32 additions to the reference's peer order, so the
result is bit-identical to :func:`thinwire.compression.aggregate_sparse`'s fold whatever the
thread scheduling. Plain loads and stores are used rather than float atomics, which flush
subnormal results to zero on NVIDIA GPUs (PTX ISA, ``atom.add.f32``) and would break that
identity. A last loop over the chunk divides in place (``index_mean``: by the count where it is
positive; ``global_mean``: by the number of peers).

Memory traffic per chunk: ``chunk_len`` floats zeroed by the launcher (and ``chunk_len`` int32
counts for ``index_mean``), per peer ``k`` indices and values read plus ``k`` gathered
read-modify-writes, then one read and one write of the chunk (plus the counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from thinwire.compression._triton._common import LAUNCH_OPTIONS
from thinwire.compression.fused import _check_decode_args

__all__ = ["decode_accumulate_triton"]

#: Elements of a chunk normalised per loop step (power of two). Fixed, not tuned: re-choose from
#: benchmarks/kernels.py on a GPU.
NORMALIZE_TILE = 4096


@triton.jit
def _decode_accumulate_kernel(
    idx_ptr,  # (num_chunks, K) int64: all peers' indices side by side
    val_ptr,  # (num_chunks, K) float32
    koff_ptr,  # (n_peers + 1,) int32: peer p owns columns [koff[p], koff[p + 1])
    acc_ptr,  # (num_chunks, chunk_len) float32, zeros on entry, the result on exit
    cnt_ptr,  # (num_chunks, chunk_len) int32 zeros (index_mean only)
    n_peers,
    k_total,
    chunk_len,
    n_peers_f,
    INDEX_MEAN: tl.constexpr,
    KB: tl.constexpr,
    LB: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, KB)
    row = acc_ptr + chunk * chunk_len
    cnt_row = cnt_ptr + chunk * chunk_len
    for peer in range(n_peers):
        lo = tl.load(koff_ptr + peer)
        hi = tl.load(koff_ptr + peer + 1)
        cols = lo + lane
        m = cols < hi
        i = tl.load(idx_ptr + chunk * k_total + cols, mask=m, other=0)
        v = tl.load(val_ptr + chunk * k_total + cols, mask=m, other=0.0)  # 0: identity of +
        a = tl.load(row + i, mask=m, other=0.0)
        if INDEX_MEAN:
            n = tl.load(cnt_row + i, mask=m, other=0)
        tl.debug_barrier()  # every lane has read before any lane writes
        tl.store(row + i, a + v, mask=m)
        if INDEX_MEAN:
            tl.store(cnt_row + i, n + 1, mask=m)
        tl.debug_barrier()  # this peer's writes land before the next peer reads
    for start in range(0, chunk_len, LB):
        offs = start + tl.arange(0, LB)
        m = offs < chunk_len
        a = tl.load(row + offs, mask=m, other=0.0)
        if INDEX_MEAN:
            n = tl.load(cnt_row + offs, mask=m, other=0)
            out = tl.where(n > 0, tl.div_rn(a, tl.maximum(n, 1).to(tl.float32)), a)
        else:
            out = tl.div_rn(a, n_peers_f)
        tl.store(row + offs, out, mask=m)


def decode_accumulate_triton(
    idx_list: Sequence[Tensor],
    val_list: Sequence[Tensor],
    num_chunks: int,
    chunk_len: int,
    *,
    mode: str = "index_mean",
    checked: bool = True,
) -> Tensor:
    """Triton launcher of :func:`thinwire.compression.fused.decode_accumulate` (same contract).

    The peers' payloads are concatenated along ``k`` into one ``(num_chunks, sum k_p)`` index
    and value buffer (a copy of the sparse payloads, about ``12 * sum k_p`` bytes per chunk),
    because a Triton program cannot follow a list of pointers.
    """
    ks = _check_decode_args(idx_list, val_list, num_chunks, chunk_len, mode, checked)
    device = idx_list[0].device
    acc = torch.zeros(num_chunks, chunk_len, dtype=torch.float32, device=device)
    if num_chunks == 0:
        return acc
    idx = torch.cat(list(idx_list), dim=1).contiguous()
    val = torch.cat([v.to(torch.float32) for v in val_list], dim=1).contiguous()
    koff = torch.tensor([0, *ks], dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    index_mean = mode == "index_mean"
    cnt = torch.zeros_like(acc, dtype=torch.int32) if index_mean else acc
    _decode_accumulate_kernel[(num_chunks,)](
        idx, val, koff, acc, cnt, len(ks), idx.shape[1], chunk_len, float(len(ks)),
        INDEX_MEAN=index_mean, KB=triton.next_power_of_2(max(max(ks), 1)),
        LB=min(NORMALIZE_TILE, triton.next_power_of_2(chunk_len)), **LAUNCH_OPTIONS,
    )  # fmt: skip
    return acc
