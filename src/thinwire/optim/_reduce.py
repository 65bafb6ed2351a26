"""How optimizers average a list of tensors across workers: dense, quantized or sparse.

One function serves every optimizer (STYLE.md §3, "one implementation per concept"):

* no codec — the tensors are flattened into one vector and ring all-reduced (SUM, then divide
  locally; ``collectives_wan_bench.md`` §2.3): ``2(M-1) ceil(N/M) 4`` bytes per worker;
* a dense codec (fp16, int8, int4, FP4, ...) — each worker encodes the flat vector once, payloads
  are all-gathered and every worker decodes them and averages in float32 in rank order:
  ``(M-1)(8 + wire_bytes(N))`` bytes per worker (``specs/diloco.md`` §3, all-gather row);
* a sparse codec (chunk -> DCT -> top-k -> quantize) — each tensor is encoded with its own chunk
  geometry, the payloads travel as one bundle, and every worker folds all peers' messages with
  :func:`thinwire.compression.aggregate_sparse` (``specs/demo_sparseloco.md`` §1.4).

Every worker decodes the same bytes in the same order, so the result is bit-identical everywhere,
and the caller learns exactly what it transmitted (error feedback subtracts that). A worker may
contribute nothing (non-finite input, ``"skip"`` policy): it sends an empty payload (gathered
paths) or weight 0 appended to the vector (dense path, ``weighted=True``), and means divide by the
number of contributors. A payload that fails to decode is dropped with a logged reason naming the
peer; it is never half-applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from thinwire.collectives import Communicator, Handle
from thinwire.compression import (
    Codec,
    DenseCodec,
    PayloadError,
    SparseCodec,
    SparseMessage,
    aggregate_sparse,
    clip_scales,
    densify,
    pack_bundle,
    robust_mean,
    unpack_bundle,
)

__all__: list[str] = []

logger = logging.getLogger(__name__)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def _split(vec: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, off = [], 0
    for t in like:
        out.append(vec[off : off + t.numel()].reshape(t.shape))
        off += t.numel()
    return out


@dataclass
class Contribution:
    """What this worker put on the wire, decoded as every receiver decodes it.

    ``sent`` is the transmitted value (dequantized); ``unquantized`` is, for sparse codecs, the
    selected components before value quantization (DeMo's Psyche variant subtracts these).
    """

    sent: list[torch.Tensor]
    unquantized: list[torch.Tensor]


@dataclass
class PendingReduce:
    """An issued reduction; ``result()`` waits for it once and caches the mean."""

    like: list[torch.Tensor]
    codec: Codec | None
    weighted: bool
    aggregate: str
    world: int = 1
    robust: str = "mean"
    handle: Handle | None = None
    _value: tuple[list[torch.Tensor], float] | None = field(default=None, repr=False)

    def done(self) -> bool:
        return self._value is not None or self.handle is None or self.handle.done()

    def result(self) -> tuple[list[torch.Tensor], float]:
        """The averaged tensors and the number (or total weight) of contributors (0: nobody)."""
        if self._value is not None:
            return self._value
        if self.handle is None:
            raise RuntimeError("internal error: a local reduction has no value")
        out = self.handle.wait()
        if self.codec is None:
            if self.weighted:
                total = float(out[-1])
                vec = out[:-1] / total if total > 0 else torch.zeros_like(out[:-1])
            else:
                total, vec = float(self.world), out
            if not bool(torch.isfinite(vec).all()):
                # A ring sum cannot say whose contribution was bad; skip the round everywhere.
                logger.warning(
                    "the all-reduced vector is non-finite: some peer sent non-finite values; round skipped"
                )
                vec, total = torch.zeros_like(vec), 0.0
            self._value = (_split(vec, self.like), total)
        elif isinstance(self.codec, SparseCodec):
            self._value = self._sparse(out)
        else:
            self._value = self._dense_codec(out)
        return self._value

    def _payloads(self, out: list[bytes | None], count: int) -> list[list[bytes] | None]:
        peers: list[list[bytes] | None] = []
        for rank, blob in enumerate(out):
            if blob is None or len(blob) == 0:
                peers.append(None)
                continue
            try:
                peers.append(unpack_bundle(blob, count))
            except PayloadError as exc:
                logger.warning("dropping the payload of peer %d: %s", rank, exc)
                peers.append(None)
        return peers

    def _dense_codec(self, out: list[bytes | None]) -> tuple[list[torch.Tensor], float]:
        n = sum(t.numel() for t in self.like)
        decoded = []
        for rank, blob in enumerate(out):  # rank order: the same fold on every worker
            if blob is None or len(blob) == 0:
                continue
            try:
                decoded.append(self.codec.decode(blob, n))  # type: ignore[union-attr]
            except PayloadError as exc:
                logger.warning("dropping the payload of peer %d: %s", rank, exc)
        if not decoded:
            return _split(torch.zeros(n, dtype=torch.float32), self.like), 0.0
        return _split(robust_mean(decoded, self.robust), self.like), float(len(decoded))

    def _sparse(self, out: list[bytes | None]) -> tuple[list[torch.Tensor], float]:
        codec = self.codec
        assert isinstance(codec, SparseCodec)  # internal invariant: chosen by the caller
        decoded: list[list[SparseMessage] | None] = []
        for rank, parts in enumerate(self._payloads(out, len(self.like))):
            if parts is None:
                decoded.append(None)
                continue
            try:
                msgs = [
                    codec.decode_sparse(pl, t.numel())
                    for pl, t in zip(parts, self.like, strict=True)
                ]
                for m, t in zip(msgs, self.like, strict=True):
                    if m.geometry != codec.geometry(tuple(t.shape)):
                        raise PayloadError(
                            f"payload shape {m.geometry.shape} must be {tuple(t.shape)}"
                        )
            except PayloadError as exc:
                logger.warning("dropping the payload of peer %d: %s", rank, exc)
                decoded.append(None)
                continue
            decoded.append(msgs)
        present = [d for d in decoded if d is not None]
        if self.robust == "clip" and present:
            # Clip each peer's whole contribution to the median norm (orthonormal DCT: the norm
            # of the values is the norm of the decoded update), then aggregate as usual.
            norms = [
                float(sum(float(m.val.double().pow(2).sum()) for m in msgs)) ** 0.5
                for msgs in present
            ]
            present = [
                [SparseMessage(m.geometry, m.transform, m.idx, m.val * scale) for m in msgs]
                if scale != 1.0
                else msgs
                for msgs, scale in zip(present, clip_scales(norms), strict=True)
            ]
        if not present:
            return [torch.zeros(t.shape, dtype=torch.float32) for t in self.like], 0.0
        result = []
        for i, t in enumerate(self.like):
            agg = aggregate_sparse(
                [d[i] for d in present], mode=self.aggregate, backend=codec.backend
            )
            result.append(agg.reshape(t.shape))
        return result, float(len(present))


def start_reduce(
    comm: Communicator | None,
    tensors: list[torch.Tensor],
    *,
    codec: Codec | None,
    contribute: bool = True,
    weighted: bool = False,
    aggregate: str = "index_mean",
    async_op: bool = False,
    tag: str = "",
    robust: str = "mean",
) -> tuple[PendingReduce, Contribution]:
    """Issue the mean of ``tensors`` over workers.

    Collective: every rank must call this, in the same order, with the same ``tag``.

    Args:
        comm: the communicator, or None for a single worker.
        tensors: float tensors (any shapes); they are not modified.
        codec: None (dense fp32/fp64 all-reduce), a dense codec or a :class:`SparseCodec`.
        contribute: False sends nothing from this worker (weight 0).
        weighted: dense path only: carry the contributor count (needed when any worker may skip).
        aggregate: sparse path: ``"index_mean"`` or ``"global_mean"``.
        async_op: return before the collective completes.
        tag: ledger tag.
        robust: aggregation rule (:data:`thinwire.compression.ROBUST_RULES`). Anything but
            ``"mean"`` needs every peer's contribution, so dense vectors travel as gathered fp32
            payloads instead of a ring all-reduce; sparse codecs accept ``"mean"`` and ``"clip"``.

    Returns:
        The pending reduction and this worker's contribution as receivers decode it.
    """
    # Only "no communicator" is local: a one-rank torch group makes every op a local copy by
    # itself (spec §2.1 rule 4), and an elastic engine's world_size is only a snapshot.
    single = comm is None
    if isinstance(codec, SparseCodec) and robust not in ("mean", "clip"):
        raise ValueError(f"robust must be in {{'mean', 'clip'}} for sparse codecs, got {robust!r}")
    if codec is None and robust != "mean" and not single:
        codec = DenseCodec("fp32")  # robust rules need each peer's vector, not a ring sum
    pend = PendingReduce(
        list(tensors), codec, weighted, aggregate, 1 if single else comm.world_size, robust
    )
    zeros = [torch.zeros(t.shape, dtype=torch.float32) for t in tensors]
    if codec is None:
        sent = (
            [t.detach().clone() for t in tensors]
            if contribute
            else [torch.zeros_like(t) for t in tensors]
        )
        contrib = Contribution(sent, sent)
        if single:
            pend._value = (
                sent if contribute else [torch.zeros_like(t) for t in tensors],
                1.0 if contribute else 0.0,
            )
            return pend, contrib
        vec = _flat(sent)
        if weighted:
            vec = torch.cat([vec, torch.full((1,), 1.0 if contribute else 0.0, dtype=vec.dtype)])
            handle = comm.all_reduce(vec, "sum", async_op=True, tag=tag)
        else:
            handle = comm.all_reduce(vec, "mean", async_op=True, tag=tag)
    else:
        if not contribute:
            blob, contrib = b"", Contribution(zeros, zeros)
        elif isinstance(codec, SparseCodec):
            encs = [codec.encode_sparse(t.detach().to(torch.float32)) for t in tensors]
            blob = pack_bundle([e.payload for e in encs])
            sent = [densify(e.message).reshape(t.shape) for e, t in zip(encs, tensors, strict=True)]
            raw = [
                densify(
                    SparseMessage(e.message.geometry, e.message.transform, e.message.idx, e.raw_val)
                ).reshape(t.shape)
                for e, t in zip(encs, tensors, strict=True)
            ]
            contrib = Contribution(sent, raw)
        else:
            # One dense payload needs no bundle: its header already delimits it.
            blob, dec = codec.roundtrip(_flat(tensors).to(torch.float32))
            sent = _split(dec.reshape(-1), tensors)
            contrib = Contribution(sent, sent)
        if single:
            pend._value = (contrib.sent if contribute else zeros, 1.0 if contribute else 0.0)
            return pend, contrib
        handle = comm.all_gather_bytes(blob, async_op=True, tag=tag)
    pend.handle = handle
    if not async_op:
        pend.result()
    return pend, contrib
