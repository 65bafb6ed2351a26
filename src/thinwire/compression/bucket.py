"""Bucket codecs: many tensors, one payload, encoded and decoded on the tensors' device.

Optimizers flatten their parameters into buckets (as DDP and torchft do) and send one framed
payload per bucket per sync (:mod:`.wire`). A bucket codec binds a codec's settings to the
bucket's shapes, so the exact payload size, the envelope digest and every offset are known on
every rank from the shapes alone:

* :class:`DenseBucket` quantizes the concatenated bucket as one vector (blocks may span two
  tensors; the values are elementwise);
* :class:`SparseBucket` keeps each tensor's own chunk geometry (chunks never straddle two
  tensors), so selection and value statistics are per tensor, as in the reference optimizers.
  Body layout: for each tensor in order, its index stream then its value body.

Encoding needs no host value of the data; decoding a batch of P peers' frames returns the
decoded values and one status code per peer on device (:data:`.wire.STATUS_OK` ...), which the
caller pulls once per bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from thinwire._validate import check_type
from thinwire.compression._dispatch import resolve_backend
from thinwire.compression.aggregate import AGGREGATE_MODES
from thinwire.compression.dct import dct_basis, idct_tiles
from thinwire.compression.fused import (
    _index_mean_into,
    dct_topk,
    decode_accumulate,
    ef_quantize_pack,
)
from thinwire.compression.pipeline import DenseCodec, SparseCodec
from thinwire.compression.topk import topk_chunks_fast
from thinwire.compression.wire import STATUS_BODY, STATUS_OK, Envelope, layout_digest

__all__ = ["DenseBucket", "SparseBucket", "SparsePart", "make_bucket"]

# Output elements the CPU fold fills per block (1 MiB of float32, a core's L2 on the benchmark
# machine): 4096x4096, 4 peers, k=64 of 64x64: 38 ms in blocks vs 71 ms in one sweep. Other
# devices fold the whole tensor at once (one launch per op).
_FOLD_BLOCK = {"cpu": 1 << 18}


def _shapes(shapes: Sequence[Sequence[int] | torch.Size]) -> tuple[tuple[int, ...], ...]:
    out = tuple(tuple(int(d) for d in s) for s in shapes)
    if not out:
        raise ValueError("shapes must hold at least one shape, got none")
    return out


def _body_status(status: Tensor, body_ok: Tensor) -> Tensor:
    """A frame whose envelope is fine but whose body does not decode gets STATUS_BODY."""
    return torch.where((status == STATUS_OK) & ~body_ok, STATUS_BODY, status)


class DenseBucket:
    """A :class:`DenseCodec` over the concatenation of a bucket's tensors.

    Args:
        codec: the dense codec (its value format quantizes the flat vector).
        shapes: the bucket's tensor shapes, in order.
    """

    def __init__(self, codec: DenseCodec, shapes: Sequence[Sequence[int] | torch.Size]) -> None:
        check_type("codec", codec, DenseCodec)
        self.codec = codec
        self.shapes = _shapes(shapes)
        self.numel = sum(math.prod(s) for s in self.shapes)
        self.body_nbytes = codec.values.nbytes(self.numel)
        self.envelope = Envelope(layout_digest(codec.settings, self.shapes), self.body_nbytes)
        self.nbytes = self.envelope.nbytes

    def encode(
        self,
        flat: Tensor,
        contributes: Tensor | bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize the flat bucket ``(numel,)``; return ``(frame, deq, ok)`` on its device.

        ``deq`` is what every receiver decodes; ``ok`` is a device bool, False when the
        quantizer's side data or dequantized values are non-finite (the frame is then sent
        with flag 0 and an empty body).
        """
        body, deq, ok = self.codec.values.encode_tensor(flat.reshape(-1), generator)
        return self.envelope.seal(body, ok & contributes), deq, ok

    def encode_ef(
        self,
        residual: Tensor,
        flat: Tensor,
        contributes: Tensor | bool = True,
        *,
        decay: float = 1.0,
        scale: float = 1.0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Error feedback and quantization in one pass: ``(frame, new_residual, ok)``.

        Sends ``p = decay * residual + scale * flat`` quantized by :func:`ef_quantize_pack`
        (the fused kernel on CUDA) and returns ``new_residual = p - transmitted`` (EF-SGD,
        Karimireddy et al., ICML 2019, Alg. 2). When the quantizer's side data are not finite
        (``ok`` False, a device bool) the frame is sent with flag 0 and the caller keeps its
        old residual. The codec's value format must be in :data:`EF_FORMATS` with at most a
        ``block`` parameter (2-bit: its default bins and range).
        """
        v = self.codec.values
        packed, side, new = ef_quantize_pack(
            residual.reshape(-1),
            flat.reshape(-1),
            decay=decay,
            scale=scale,
            fmt=v.name,
            block=v.params.get("block"),
            checked=False,
        )
        ok = torch.isfinite(side).all()
        body = torch.cat([packed, side.reshape(-1).view(torch.uint8)])
        return self.envelope.seal(body, ok & contributes), new, ok

    def decode(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """``(P, nbytes)`` frames -> ``(values (P, numel) float32, status (P,))``."""
        bodies, status = self.envelope.open_rows(frames)
        vals, ok = self.codec.values.decode_rows(bodies, self.numel)
        return vals, _body_status(status, ok)


@dataclass(frozen=True)
class SparsePart:
    """One tensor's selection: ``idx``/``val`` are ``(N, k)`` (one peer) or ``(P, N, k)``."""

    idx: Tensor
    val: Tensor


class SparseBucket:
    """A :class:`SparseCodec` applied tensor by tensor, its outputs framed as one payload.

    Args:
        codec: the sparse codec (chunking, transform, top-k rule, values, index coding).
        shapes: the bucket's tensor shapes, in order.
    """

    def __init__(self, codec: SparseCodec, shapes: Sequence[Sequence[int] | torch.Size]) -> None:
        check_type("codec", codec, SparseCodec)
        self.codec = codec
        self.shapes = _shapes(shapes)
        self.geometries = [codec.geometry(s) for s in self.shapes]
        self.ks = [codec.k_for(g.chunk_len) if g.num_chunks else 0 for g in self.geometries]
        # (index bytes, value bytes) per tensor, and where each tensor's section starts.
        self.sections: list[tuple[int, int, int]] = []
        off = 0
        coder = codec._coder
        for g, k in zip(self.geometries, self.ks, strict=True):
            ib = coder.nbytes(g.num_chunks, k, g.chunk_len) if g.num_chunks else 0
            vb = codec.values.nbytes(g.num_chunks * k) if g.num_chunks else 0
            self.sections.append((off, ib, vb))
            off += ib + vb
        self.body_nbytes = off
        self.envelope = Envelope(layout_digest(codec.settings, self.shapes), self.body_nbytes)
        self.nbytes = self.envelope.nbytes

    # ------------------------------------------------------------------ encode
    def select(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k of tensor ``i`` (after the transform): ``(idx (N, k), raw values (N, k))``."""
        g, k, codec = self.geometries[i], self.ks[i], self.codec
        tiles = g.to_tiles(x.detach().to(torch.float32))
        if codec.transform == "dct":
            b1 = dct_basis(g.n1, torch.float32, tiles.device)
            b2 = dct_basis(g.n2, torch.float32, tiles.device)
            return dct_topk(tiles, b1, b2, k, checked=False, backend=codec.backend)
        return topk_chunks_fast(tiles.reshape(g.num_chunks, g.chunk_len), k)

    def encode(
        self,
        tensors: Sequence[Tensor],
        contributes: Tensor | bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, list[SparsePart], list[Tensor], Tensor]:
        """Encode the bucket's tensors (finite, float); return ``(frame, sent, raw, ok)``.

        ``sent`` are the selections as receivers decode them (dequantized values); ``raw`` the
        selected values before quantization (DeMo's Psyche variant subtracts those). ``ok`` is
        a device bool, False when a quantizer produced non-finite side data.
        """
        if len(tensors) != len(self.shapes):
            raise ValueError(f"tensors must hold {len(self.shapes)} tensors, got {len(tensors)}")
        device = tensors[0].device
        body = torch.empty(self.body_nbytes, dtype=torch.uint8, device=device)
        ok = torch.ones((), dtype=torch.bool, device=device)
        sent: list[SparsePart] = []
        raw: list[Tensor] = []
        coder, values = self.codec._coder, self.codec.values
        for i, x in enumerate(tensors):
            g, (off, ib, vb) = self.geometries[i], self.sections[i]
            if g.num_chunks == 0:
                empty = torch.zeros(0, 0, device=device)
                sent.append(SparsePart(empty.long(), empty))
                raw.append(empty)
                continue
            idx, val = self.select(i, x)
            body[off : off + ib] = coder.encode_trusted(idx, g.chunk_len)
            vbody, deq, vok = values.encode_tensor(val.reshape(-1), generator)
            body[off + ib : off + ib + vb] = vbody
            ok = ok & vok
            sent.append(SparsePart(idx, deq.reshape(idx.shape)))
            raw.append(val)
        return self.envelope.seal(body, ok & contributes), sent, raw, ok

    # ------------------------------------------------------------------ decode
    def decode(self, frames: Tensor) -> tuple[list[SparsePart], Tensor]:
        """``(P, nbytes)`` frames -> per tensor ``SparsePart`` of ``(P, N, k)``, status ``(P,)``."""
        bodies, status = self.envelope.open_rows(frames)
        P = frames.shape[0]
        ok = torch.ones(P, dtype=torch.bool, device=frames.device)
        parts: list[SparsePart] = []
        coder, values = self.codec._coder, self.codec.values
        for g, k, (off, ib, vb) in zip(self.geometries, self.ks, self.sections, strict=True):
            if g.num_chunks == 0:
                empty = torch.zeros(P, 0, 0, device=frames.device)
                parts.append(SparsePart(empty.long(), empty))
                continue
            idx, iok = coder.decode_rows(bodies[:, off : off + ib], g.num_chunks, k, g.chunk_len)
            val, vok = values.decode_rows(bodies[:, off + ib : off + ib + vb], g.num_chunks * k)
            ok = ok & iok & vok
            parts.append(SparsePart(idx, val.reshape(P, g.num_chunks, k)))
        return parts, _body_status(status, ok)

    # ------------------------------------------------------------------ dense views
    def densify(self, i: int, part: SparsePart) -> Tensor:
        """One peer's selection of tensor ``i`` back to a dense float32 tensor of its shape."""
        g = self.geometries[i]
        coeffs = torch.zeros(g.num_chunks, g.chunk_len, dtype=torch.float32, device=part.val.device)
        if g.num_chunks:
            coeffs.scatter_(1, part.idx, part.val.to(torch.float32))
        return self._inverse(i, coeffs)

    def _inverse(self, i: int, coeffs: Tensor) -> Tensor:
        g = self.geometries[i]
        tiles = coeffs.reshape(g.num_chunks, g.n1, g.n2)
        if self.codec.transform == "dct":
            tiles = idct_tiles(tiles)
        return g.from_tiles(tiles)

    def aggregate(
        self, parts: Sequence[SparsePart], present: Sequence[int], mode: str = "index_mean"
    ) -> list[Tensor]:
        """Fold the ``present`` peers' selections (rank order) into dense float32 tensors.

        ``index_mean`` averages each coordinate over the peers that selected it (the reference
        rule); ``global_mean`` divides the sum by the number of present peers. Peers are folded
        one after another in rank order, so every rank produces the same bits. On CUDA the fold
        is the ``decode_accumulate`` kernel; on the torch path the entries land directly in the
        tensor's own layout and the inverse DCT runs there, as block-diagonal products, so no
        tile-layout copy of the output is made.
        """
        if mode not in AGGREGATE_MODES:
            raise ValueError(f"mode must be in {set(AGGREGATE_MODES)}, got {mode!r}")
        out = []
        for i, part in enumerate(parts):
            g = self.geometries[i]
            if g.num_chunks == 0 or not present:
                out.append(torch.zeros(self.shapes[i], dtype=torch.float32, device=part.val.device))
            elif resolve_backend(self.codec.backend, part.idx) == "triton":
                acc = decode_accumulate(
                    [part.idx[p] for p in present],
                    [part.val[p] for p in present],
                    g.num_chunks,
                    g.chunk_len,
                    mode=mode,
                    checked=False,
                    backend=self.codec.backend,
                )
                out.append(self._inverse(i, acc))
            else:
                out.append(self._fold_in_place(i, part, present, mode))
        return out

    def _fold_in_place(self, i: int, part: SparsePart, present: Sequence[int], mode: str) -> Tensor:
        """The torch fold, written straight into tensor ``i``'s layout, then its inverse DCT.

        The output is filled one block of whole bands (``n1`` full rows, every chunk of a band
        of tiles) at a time: zeroed, then every entry of the block's chunks added and averaged
        while the block is in cache, so the dense tensor is swept once instead of once per pass.
        """
        g = self.geometries[i]
        dev = part.idx.device
        gx = g.grid[1]
        peers, k = len(present), part.idx.shape[-1]
        bands, band = g.batch * g.grid[0], g.n1 * g.cols  # band: elements of one band of tiles
        per_block = max(1, _FOLD_BLOCK.get(dev.type, bands * band) // band)  # bands per block
        # Chunk n is column n % gx of band n // gx; it starts (n // gx % per_block) * band +
        # (n % gx) * n2 into its block, and its entry j lies offs[j] further, at (j // n2, j % n2)
        # of the tile (a table of chunk_len entries, so one gather per entry).
        n = torch.arange(g.num_chunks, device=dev)
        start = (n // gx % per_block) * band + (n % gx) * g.n2
        j = torch.arange(g.chunk_len, device=dev)
        offs = (j // g.n2) * g.cols + j % g.n2
        sel = torch.tensor(list(present), device=dev)
        # Chunk-major (N, peers, k) order: a block's entries are contiguous, and within a slot
        # the peers still add in rank order.
        idx = part.idx.transpose(0, 1).index_select(1, sel)
        pos = torch.take(offs, idx).add_(start[:, None, None]).view(-1)
        vals = part.val.transpose(0, 1).index_select(1, sel).view(-1).to(torch.float32)
        flat = torch.empty(bands * band, dtype=torch.float32, device=dev)
        entries = gx * peers * k  # per band
        for b0 in range(0, bands, per_block):
            out = flat[b0 * band : (b0 + per_block) * band].zero_()
            e = slice(b0 * entries, (b0 + per_block) * entries)
            if mode == "index_mean":
                _index_mean_into(out, pos[e], vals[e], peers)
            else:
                out.index_add_(0, pos[e], vals[e]).div_(float(peers))
        if self.codec.transform == "dct":
            f1 = dct_basis(g.n1, torch.float32, dev)
            f2 = dct_basis(g.n2, torch.float32, dev)
            # X = (I (x) F1) T (I (x) F2)^T on the whole matrix: F1 on each band of n1 rows,
            # then F2^T on each n2-wide column block.
            rows = f1 @ flat.view(bands, g.n1, g.cols)
            flat = (rows.view(g.batch * g.rows, gx, g.n2) @ f2.mT).reshape(-1)
        return flat.view(self.shapes[i])


def make_bucket(
    codec: DenseCodec | SparseCodec, shapes: Sequence[Sequence[int] | torch.Size]
) -> DenseBucket | SparseBucket:
    """The bucket codec of ``codec`` for these shapes."""
    if isinstance(codec, SparseCodec):
        return SparseBucket(codec, shapes)
    return DenseBucket(codec, shapes)
