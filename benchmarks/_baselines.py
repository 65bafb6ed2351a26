"""Reference-style baseline compressors for ``benchmarks/codecs.py`` (written here, not vendored).

Two compressors, each written from its paper's algorithm in the shape the public reference code
has (per-shape basis tables built up front, ``einops`` tiling, ``einsum`` transforms, unsorted
``torch.topk``), so the benchmark measures thinwire against what a user of the reference would
run, not against a strawman:

* :class:`DeMoDCT` + :class:`DeMoTopK`: DeMo (Peng, Quesnelle, Kingma, arXiv:2411.19870v1,
  Algorithm 1 and §3): tiles of ``s x s`` (largest divisor of each dim ``<= s``), orthonormal
  DCT-II by matrix products, per-tile ``torch.topk(|x|, k, sorted=False)``; the payload is int64
  indices plus float32 values; receivers scatter every peer's entries with an index mean
  (``scatter_reduce(..., "mean", include_self=False)``) and apply the inverse DCT.
  :class:`DeMoStep` is one optimizer step in that style.
* :class:`TemplarTopK`: SparseLoCo as run by templar (Sarfi et al., arXiv:2508.15706v1 §3): no
  transform, the same tiling, per-tile top-k, indices packed 12 bits each (two in three bytes),
  values quantized to 4 centroid bins over ±3σ (one ``uint8`` per 2-bit code, as templar ships
  them), decode = unpack, dequantize, index-mean scatter.

Nothing here imports thinwire; the benchmark compares index sets, wire bytes and time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import einops
import torch
from torch import Tensor

__all__ = [
    "DeMoDCT",
    "DeMoPayload",
    "DeMoStep",
    "DeMoTopK",
    "TemplarPayload",
    "TemplarTopK",
    "largest_divisor",
    "pack_12bit",
    "unpack_12bit",
]


def largest_divisor(n: int, target: int) -> int:
    """The largest divisor of ``n`` that is ``<= target`` (``n`` itself when ``n <= target``)."""
    if n <= target:
        return n
    return max(d for d in range(1, target + 1) if n % d == 0)


def _dct_ii(n: int) -> Tensor:
    """Orthonormal DCT-II as a matrix ``F`` with ``coeffs = x @ F`` (columns are frequencies).

    ``F[i, f] = sqrt(2 / n) * cos(pi * (2 i + 1) * f / (2 n))``, column 0 scaled by
    ``1 / sqrt(2)``; ``F`` is orthogonal, so the inverse is ``coeffs @ F.T``. Built in float64,
    returned in float32.
    """
    i = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    f = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    m = torch.cos(math.pi * (2 * i + 1) * f / (2 * n)) * math.sqrt(2.0 / n)
    m[:, 0] /= math.sqrt(2.0)
    return m.to(torch.float32)


# --- DeMo ------------------------------------------------------------------------------------


class DeMoDCT:
    """Tile-wise 2-D DCT with bases precomputed for every dimension of the given shapes.

    Args:
        shapes: the 2-D parameter shapes the transform will see.
        target_chunk: requested tile side ``s`` (DeMo: 64).
        device: where the bases live.
    """

    def __init__(
        self,
        shapes: Iterable[Sequence[int]],
        target_chunk: int = 64,
        device: torch.device | str = "cpu",
    ) -> None:
        self.side: dict[int, int] = {}
        self.fwd: dict[int, Tensor] = {}
        self.inv: dict[int, Tensor] = {}
        for shape in shapes:
            for dim in shape:
                s = largest_divisor(int(dim), target_chunk)
                self.side[int(dim)] = s
                if s not in self.fwd:
                    f = _dct_ii(s).to(device)
                    self.fwd[s] = f
                    self.inv[s] = f.T.contiguous()

    def encode(self, x: Tensor) -> Tensor:
        """``(R, C)`` -> DCT coefficients of each tile, ``(R/n1, C/n2, n1, n2)``."""
        n1, n2 = self.side[x.shape[0]], self.side[x.shape[1]]
        tiles = einops.rearrange(x, "(y h) (x w) -> y x h w", h=n1, w=n2)
        return torch.einsum("yxhw,hb,wd->yxbd", tiles, self.fwd[n1], self.fwd[n2])

    def decode(self, coeffs: Tensor) -> Tensor:
        """Inverse of :meth:`encode`: ``(R/n1, C/n2, n1, n2)`` coefficients -> ``(R, C)``."""
        n1, n2 = coeffs.shape[-2:]
        tiles = torch.einsum("yxbd,bh,dw->yxhw", coeffs, self.inv[n1], self.inv[n2])
        return einops.rearrange(tiles, "y x h w -> (y h) (x w)")


@dataclass
class DeMoPayload:
    """What one DeMo worker sends for one tensor: int64 indices and float32 values per tile."""

    idx: Tensor  # (R/n1, C/n2, k) int64
    val: Tensor  # (R/n1, C/n2, k) float32
    tile: tuple[int, int, int, int]  # coefficient layout (R/n1, C/n2, n1, n2)

    @property
    def nbytes(self) -> int:
        return self.idx.numel() * self.idx.element_size() + self.val.numel() * 4


class DeMoTopK:
    """DeMo's per-tile top-k of DCT coefficients and its (batched) inverse."""

    def __init__(self, k: int) -> None:
        self.k = k

    def compress(self, coeffs: Tensor) -> DeMoPayload:
        flat = einops.rearrange(coeffs, "y x h w -> y x (h w)")
        k = min(self.k, flat.shape[-1])
        idx = torch.topk(flat.abs(), k, dim=-1, largest=True, sorted=False).indices
        val = torch.gather(flat, -1, idx)
        return DeMoPayload(idx, val, tuple(coeffs.shape))

    def decompress(self, payload: DeMoPayload) -> Tensor:
        return self.batch_decompress([payload])

    def batch_decompress(self, payloads: Sequence[DeMoPayload]) -> Tensor:
        """Index mean over peers: every coordinate averages the peers that sent it."""
        gy, gx, n1, n2 = payloads[0].tile
        idx = torch.cat([p.idx for p in payloads], dim=-1)
        val = torch.cat([p.val for p in payloads], dim=-1)
        out = torch.zeros(gy, gx, n1 * n2, dtype=val.dtype, device=val.device)
        out.scatter_reduce_(-1, idx, val, reduce="mean", include_self=False)
        return einops.rearrange(out, "y x (h w) -> y x h w", h=n1)


class DeMoStep:
    """One DeMo step per parameter, single worker, as Algorithm 1 of arXiv:2411.19870v1 reads.

    ``delta <- beta delta + lr g``; ``(i, v) = topk(DCT(delta))``; ``delta -= IDCT(scatter(i, v))``;
    ``U = IDCT(index-mean over workers of scatter)`` (the one worker here); ``p -= lr sign(U)``.
    """

    def __init__(
        self, params: Sequence[Tensor], lr: float, beta: float = 0.999, k: int = 32, chunk: int = 64
    ) -> None:
        self.params = list(params)
        self.lr, self.beta = lr, beta
        self.transform = DeMoDCT([p.shape for p in self.params], chunk, self.params[0].device)
        self.compress = DeMoTopK(k)
        self.delta = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for p, delta in zip(self.params, self.delta, strict=True):
            delta.mul_(self.beta).add_(p.grad, alpha=self.lr)
            payload = self.compress.compress(self.transform.encode(delta))
            delta.sub_(self.transform.decode(self.compress.decompress(payload)))
            gathered = [payload]  # all_gather of (idx, val) over the workers: one worker here
            update = self.transform.decode(self.compress.batch_decompress(gathered))
            p.add_(update.sign(), alpha=-self.lr)


# --- templar / SparseLoCo --------------------------------------------------------------------


def pack_12bit(idx: Tensor) -> Tensor:
    """Pack integers in ``[0, 4096)`` two per three bytes (an odd count is padded with a 0).

    For a pair ``(a, b)``: byte 0 = low 8 bits of ``a``; byte 1 = high 4 bits of ``a`` in its
    low nibble and low 4 bits of ``b`` in its high nibble; byte 2 = high 8 bits of ``b``.
    """
    flat = idx.reshape(-1).to(torch.int32)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    a, b = flat[0::2], flat[1::2]
    out = torch.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], dim=1)
    return out.reshape(-1).to(torch.uint8)


def unpack_12bit(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_12bit`: the first ``count`` integers, as int64."""
    t = packed.reshape(-1, 3).to(torch.int64)
    a = t[:, 0] | ((t[:, 1] & 0xF) << 8)
    b = (t[:, 1] >> 4) | (t[:, 2] << 4)
    return torch.stack([a, b], dim=1).reshape(-1)[:count]


@dataclass
class TemplarPayload:
    """One worker's tensor: packed indices, one uint8 per 2-bit code, shift and centroid table."""

    idx_packed: Tensor  # uint8, 3 bytes per pair of indices
    codes: Tensor  # (gy, gx, k) uint8
    shift: Tensor  # () float32 mean of the kept values
    lookup: Tensor  # (n_bins,) float32 centroid of each bin (centered)
    tile: tuple[int, int, int, int]  # (R/n1, C/n2, n1, n2)

    @property
    def nbytes(self) -> int:
        # indices + codes + shift, scale and the centroid table as float32 scalars
        return self.idx_packed.numel() + self.codes.numel() + 4 * (2 + self.lookup.numel())


class TemplarTopK:
    """SparseLoCo's compressor as templar runs it: tile, top-k, 12-bit indices, 2-bit centroids.

    Args:
        shapes: 2-D shapes seen (sides precomputed per dimension).
        k: entries kept per tile.
        target_chunk: tile side ``s`` (64).
        n_bins: quantizer bins (4 = 2 bits).
        range_sigmas: total width of the bin grid in standard deviations (6 = ±3σ).
    """

    def __init__(
        self,
        shapes: Iterable[Sequence[int]],
        k: int,
        target_chunk: int = 64,
        n_bins: int = 4,
        range_sigmas: float = 6.0,
    ) -> None:
        self.side = {
            int(d): largest_divisor(int(d), target_chunk) for shape in shapes for d in shape
        }
        self.k, self.n_bins, self.range_sigmas = k, n_bins, range_sigmas

    def tiles(self, x: Tensor) -> Tensor:
        n1, n2 = self.side[x.shape[0]], self.side[x.shape[1]]
        return einops.rearrange(x, "(y h) (x w) -> y x (h w)", h=n1, w=n2)

    def untile(self, flat: Tensor, tile: tuple[int, int, int, int]) -> Tensor:
        return einops.rearrange(flat, "y x (h w) -> (y h) (x w)", h=tile[2], w=tile[3])

    def _quantize(self, val: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shift = val.mean()
        centered = val - shift
        n = centered.numel()
        sigma = centered.norm() / math.sqrt(n - 1) if n > 1 else torch.zeros_like(shift)
        scale = self.range_sigmas * sigma / self.n_bins
        if not math.isfinite(float(scale)) or float(scale) == 0.0:
            scale = torch.ones_like(shift)
        codes = (centered / scale + self.n_bins // 2).round().clamp(0, self.n_bins - 1)
        codes = codes.to(torch.uint8)
        bins = codes.reshape(-1).long()
        sums = torch.zeros(self.n_bins, device=val.device).scatter_add_(
            0, bins, centered.reshape(-1)
        )
        counts = torch.zeros(self.n_bins, device=val.device).scatter_add_(
            0, bins, torch.ones_like(centered.reshape(-1))
        )
        lookup = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        return codes, shift, lookup

    def compress(self, x: Tensor) -> TemplarPayload:
        flat = self.tiles(x)
        gy, gx, n = flat.shape
        k = min(self.k, n)
        idx = torch.topk(flat.abs(), k, dim=-1, largest=True, sorted=False).indices
        val = torch.gather(flat, -1, idx)
        codes, shift, lookup = self._quantize(val)
        n1, n2 = self.side[x.shape[0]], self.side[x.shape[1]]
        return TemplarPayload(pack_12bit(idx), codes, shift, lookup, (gy, gx, n1, n2))

    def unpack(self, payload: TemplarPayload) -> tuple[Tensor, Tensor]:
        """``(idx (gy, gx, k) int64, dequantized values (gy, gx, k) float32)``."""
        shape = payload.codes.shape
        idx = unpack_12bit(payload.idx_packed, payload.codes.numel()).reshape(shape)
        val = payload.lookup[payload.codes.long()] + payload.shift
        return idx, val

    def batch_decompress(self, payloads: Sequence[TemplarPayload]) -> Tensor:
        """Unpack and dequantize every peer, index-mean scatter, back to the tensor's shape."""
        pairs = [self.unpack(p) for p in payloads]
        idx = torch.cat([i for i, _ in pairs], dim=-1)
        val = torch.cat([v for _, v in pairs], dim=-1)
        gy, gx, n1, n2 = payloads[0].tile
        out = torch.zeros(gy, gx, n1 * n2, dtype=torch.float32, device=val.device)
        out.scatter_reduce_(-1, idx, val, reduce="mean", include_self=False)
        return self.untile(out, payloads[0].tile)
