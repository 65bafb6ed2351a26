"""How optimizers average a list of tensors across workers: one Reducer per codec family.

Every reducer runs the same four stages over buckets of tensors: encode -> exchange -> decode ->
aggregate. The tensors are cut into buckets (``bucket_cap_mb``, as DDP's ``bucket_cap_mb``), and
each bucket crosses the wire once:

* :class:`AllReduceReducer` (no codec) — the bucket is flattened and ring all-reduced (SUM, then
  divide locally): ``2(M-1) ceil(N/M) 4`` bytes per worker. A ring sum cannot say whose
  contribution was bad, so when the sum is non-finite or beyond ``float32 max / M`` (or the
  contributor count is not a whole number in ``[0, M]``), every rank -- all see the same sum --
  all-gathers the float32 vectors of that bucket once (``(M-1) 4 N`` more bytes), drops the
  peers whose vector is bad and averages the rest in rank order;
* :class:`DenseReducer` (fp16, int8, int4, FP4, ...) — each worker quantizes the flat bucket,
  frames are all-gathered into one ``(M, W)`` uint8 tensor and every worker decodes all of them
  and averages in float32 in rank order: ``(M-1) W`` bytes per worker, ``W`` = body + 16;
* :class:`SparseReducer` (chunk -> DCT -> top-k -> quantize) — each tensor keeps its own chunk
  geometry inside the bucket, and every worker folds all peers' selections in rank order
  (``index_mean`` or ``global_mean``).

Payloads are uint8 tensors on the tensors' device and nothing in encode or exchange reads a
value back to the host; each bucket's frames yield one status per peer, pulled once when the
result is needed (a handful of integers, never the payload). Every worker decodes the same
bytes in the same order, so the result is bit-identical everywhere, and the caller learns
exactly what it transmitted (error feedback subtracts that). A worker may contribute nothing
(non-finite input, ``"skip"`` policy): its frame carries flag 0 (gathered paths) or weight 0
appended to the vector (all-reduce path, ``weighted=True``), and means divide by the number of
contributors. A frame or vector that fails its checks is dropped with a logged reason naming the
peer, and counted in :attr:`Reducer.dropped`; it is never half-applied.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from thinwire.collectives import Communicator, Handle, OpRecord
from thinwire.compression import (
    EF_FORMATS,
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_REASONS,
    Codec,
    DenseBucket,
    DenseCodec,
    SparseBucket,
    SparseCodec,
    SparsePart,
    clip_scales,
    error_feedback_subtract,
    error_feedback_update,
    make_bucket,
    robust_mean,
)
from thinwire.optim._state import local

__all__: list[str] = []

logger = logging.getLogger(__name__)

#: Default bucket size: DDP's ``bucket_cap_mb`` default (25 MiB of float32 values).
DEFAULT_BUCKET_CAP_MB = 25.0
_F32_MAX = torch.finfo(torch.float32).max
_BUCKET_CACHE_SIZE = 256
_bucket_cache: OrderedDict[tuple, DenseBucket | SparseBucket] = OrderedDict()


def bucket_of(codec: Codec, shapes: tuple[tuple[int, ...], ...]) -> DenseBucket | SparseBucket:
    """The (cached) bucket codec of ``codec`` for ``shapes``."""
    key = (type(codec).__name__, codec.settings, getattr(codec, "backend", ""), shapes)
    b = _bucket_cache.get(key)
    if b is None:
        b = make_bucket(codec, shapes)  # type: ignore[arg-type]
        _bucket_cache[key] = b
        if len(_bucket_cache) > _BUCKET_CACHE_SIZE:
            _bucket_cache.popitem(last=False)
    else:
        _bucket_cache.move_to_end(key)
    return b


def split_buckets(tensors: list[torch.Tensor], cap_mb: float) -> list[slice]:
    """Consecutive slices of ``tensors`` of at most ``cap_mb`` MiB of float32 each (>= 1 tensor)."""
    cap = max(1, int(cap_mb * 2**20 / 4))
    out, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        n = t.numel()
        if i > start and size + n > cap:
            out.append(slice(start, i))
            start, size = i, 0
        size += n
    if tensors:
        out.append(slice(start, len(tensors)))
    return out


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])


def _split(vec: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, off = [], 0
    for t in like:
        out.append(vec[off : off + t.numel()].reshape(t.shape))
        off += t.numel()
    return out


@dataclass
class _Part:
    """One bucket in flight: its slice of the tensors and what finishing it needs."""

    sl: slice
    handle: Handle | None
    bucket: DenseBucket | SparseBucket | None = None
    local: tuple[list[torch.Tensor], float] | None = None


@dataclass
class _EF:
    """Error-feedback settings of one reduction (see :meth:`Reducer.start`)."""

    residuals: list[torch.Tensor]
    decay: float
    scale: float
    subtract: str

    def inputs(self, sl: slice, ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """``p = decay * residual + scale * tensor`` for this bucket, out of place."""
        return [
            error_feedback_update(r.clone(), t, decay=self.decay, scale=self.scale)
            for r, t in zip(self.residuals[sl], ts, strict=True)
        ]

    def keep(self, sl: slice, ps: list[torch.Tensor], taken: list[torch.Tensor]) -> None:
        """``residual <- p - taken`` in place (the optimizer's state keeps its tensors)."""
        for r, p, t in zip(self.residuals[sl], ps, taken, strict=True):
            r.copy_(error_feedback_subtract(p, t.to(p.dtype)))


@dataclass
class PendingReduce:
    """An issued reduction; ``result()`` waits for it once and caches the mean."""

    reducer: Reducer
    like: list[torch.Tensor]
    parts: list[_Part] = field(default_factory=list)
    _value: tuple[list[torch.Tensor], float] | None = field(default=None, repr=False)

    def done(self) -> bool:
        return self._value is not None or all(
            p.handle is None or p.handle.done() for p in self.parts
        )

    def result(self) -> tuple[list[torch.Tensor], float]:
        """The averaged tensors and the number (or total weight) of contributors (0: nobody).

        With several buckets the weight is the smallest over them (a bucket nobody could
        deliver has weight 0, and the caller then skips the whole step).
        """
        if self._value is None:
            outs: list[torch.Tensor] = []
            weight = math.inf
            for part in self.parts:
                vals, w = part.local if part.local is not None else self.reducer.finish(part)
                outs.extend(vals)
                weight = min(weight, w)
            self._value = (outs, 0.0 if weight == math.inf else weight)
        return self._value


class Reducer:
    """encode -> exchange -> decode -> aggregate, bucket by bucket, for one codec family.

    Args:
        comm: the communicator, or None for a single worker.
        robust: aggregation rule (:data:`thinwire.compression.ROBUST_RULES`).
        trim: for ``robust="trimmed_mean"``, peers dropped at each end (default None:
            ``floor(0.25 * P)``); it must satisfy ``1 <= trim < P / 2`` for the group's size
            ``P``, else ``ValueError``. A round in which fewer peers are present than that needs
            (some skipped) is skipped with a warning rather than averaged untrimmed.
        weighted: carry contributor counts (needed when any worker may skip a round).
        bucket_cap_mb: largest bucket, MiB of float32 values.

    Attributes:
        dropped: ``Counter`` of peer rank -> buckets whose contribution from that peer was
            dropped (bad frame, non-finite or overflowing vector), summed over all reductions.
    """

    def __init__(
        self,
        comm: Communicator | None,
        *,
        robust: str = "mean",
        trim: int | None = None,
        weighted: bool = False,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    ) -> None:
        if comm is not None or trim is not None:
            # The rule's own check at the group's size (a single worker: the setting alone).
            P = comm.world_size if comm is not None else 2 * int(trim) + 1  # type: ignore[arg-type]
            robust_mean([torch.zeros(1)] * P, robust, trim=trim)
        self.comm = comm
        self.robust = robust
        self.trim = trim
        self.weighted = weighted
        self.bucket_cap_mb = bucket_cap_mb
        self.dropped: Counter[int] = Counter()

    def start(
        self,
        tensors: list[torch.Tensor],
        *,
        residuals: list[torch.Tensor] | None = None,
        decay: float = 1.0,
        scale: float = 1.0,
        subtract: str = "sent",
        contribute: bool = True,
        async_op: bool = False,
        tag: str = "",
    ) -> PendingReduce:
        """Issue the mean of ``tensors`` over workers (they are not modified).

        With ``residuals`` (error feedback, Karimireddy et al. 2019, arXiv:1901.09847 §3) each
        worker sends ``p = decay * residual + scale * tensor`` and keeps
        ``residual <- p - transmitted`` in place (``subtract="raw"``: minus the selected values
        before quantization, DeMo's Psyche variant). A worker that does not contribute leaves
        its residuals as they are. This is the one place error feedback is applied.

        With ``async_op=True`` leave ``tensors`` unchanged until ``result()``: a round whose
        all-reduced sum turns out bad re-reads them for its fallback gather.

        Sharded (DTensor) ``tensors`` and ``residuals`` are reduced as their local shards (the
        residuals are updated in place through them) and the means are plain local shards: the
        communicator's group pairs this rank with the ranks holding the same shard.

        Collective: every rank must call this, in the same order, with the same ``tag``.
        """
        pend = PendingReduce(self, [local(t) for t in tensors])
        ef = None
        if residuals is not None and contribute:
            ef = _EF([local(r) for r in residuals], decay, scale, subtract)
        for sl in split_buckets(pend.like, self.bucket_cap_mb):
            pend.parts.append(self._start_bucket(pend.like[sl], sl, ef, contribute, tag))
        if not async_op:
            pend.result()
        return pend

    def _start_bucket(
        self, ts: list[torch.Tensor], sl: slice, ef: _EF | None, contribute: bool, tag: str
    ) -> _Part:
        raise NotImplementedError

    def finish(self, part: _Part) -> tuple[list[torch.Tensor], float]:
        """Wait for one bucket's exchange and aggregate it."""
        raise NotImplementedError

    # -- shared by the gathered reducers -------------------------------------------------
    def _exchange(self, frame: torch.Tensor, tag: str) -> Handle | None:
        if self.comm is None:
            return None
        return self.comm.all_gather_into_tensor(frame, async_op=True, tag=tag)

    def _frames(self, part: _Part, own: torch.Tensor | None) -> torch.Tensor:
        if part.handle is None:
            assert own is not None  # internal invariant: a local bucket keeps its frame
            return own[None]
        return part.handle.wait()

    def _drop(self, rank: int, tag: str, what: str, reason: str) -> None:
        """Log and count one peer's dropped contribution to one bucket.

        Counted in :attr:`dropped` and in the communicator's ledger: a ``"drop"`` record of
        zero bytes under the bucket's tag, ``src`` = the dropped peer's rank, so a report of the
        ledger shows who was dropped where.
        """
        self.dropped[rank] += 1
        logger.warning("dropping the %s of peer %d (%s): %s", what, rank, tag, reason)
        if self.comm is not None:
            self.comm.ledger.add(
                OpRecord("drop", "none", self.comm.engine, tag=tag, P=self.comm.world_size,
                         rank=self.comm.rank, src=rank)
            )  # fmt: skip

    def _present(self, status: torch.Tensor, tag: str) -> list[int]:
        """Pull the per-peer status once; log and drop bad frames; return contributing ranks."""
        codes = status.tolist()  # one small read per bucket: P integers
        present = []
        for rank, code in enumerate(codes):
            if code == STATUS_OK:
                present.append(rank)
            elif code != STATUS_EMPTY:
                self._drop(rank, tag, "payload", STATUS_REASONS[code])
        return present


class AllReduceReducer(Reducer):
    """No codec: the flat float32 bucket is ring all-reduced (SUM, then divided locally).

    A peer whose vector holds a non-finite value, or one above ``float32 max / P`` in magnitude
    (where the float32 sum of P contributions can overflow, depending on the others' values and
    on the order a ring adds them, which differs per chunk), is dropped: such a value is either
    a bug or an attack, and a mean that keeps it (even one accumulated in float64) is a finite
    1e38-sized step that honest ranks would apply and then fail on. The sum reveals it unless
    other peers' values of the same size cancel it; then every rank takes one all-gather of the
    bucket (see the module docstring), so the common round stays a ring all-reduce. Smaller
    finite garbage is not caught: the plain mean tolerates no hostile peer (use a robust rule).
    """

    def _start_bucket(self, ts, sl, ef, contribute, tag):
        if ef is not None:
            ts = ef.inputs(sl, ts)
            for r in ef.residuals[sl]:  # sent exactly: nothing is held back
                r.zero_()
        if not contribute:
            ts = [torch.zeros_like(t) for t in ts]
        if self.comm is None:
            sent = [t.detach().clone() for t in ts]
            return _Part(sl, None, local=(sent, 1.0 if contribute else 0.0))
        vec = self._vector(ts, contribute)
        handle = self.comm.all_reduce(vec, "sum", async_op=True, tag=tag)
        part = _Part(sl, handle)
        part.like = ts  # type: ignore[attr-defined]
        part.contribute = contribute  # type: ignore[attr-defined]
        part.tag = tag  # type: ignore[attr-defined]
        return part

    def _vector(self, ts: list[torch.Tensor], contribute: bool) -> torch.Tensor:
        """The flat float32 vector this rank sends, with its weight appended if ``weighted``."""
        parts = [t.detach().reshape(-1) for t in ts]
        if self.weighted:
            ref = parts[0] if parts else torch.zeros(0)
            parts.append(torch.full((1,), float(contribute), dtype=ref.dtype, device=ref.device))
        return torch.cat(parts)

    def finish(self, part):
        like = part.like  # type: ignore[attr-defined]
        out = part.handle.wait()
        P = self.comm.world_size
        bound = _F32_MAX / P
        s = out[:-1] if self.weighted else out
        # |s| <= bound is False for NaN and inf too: one check covers both.
        checks = [(s.abs() <= bound).all()]
        if self.weighted:
            count = out[-1]
            checks.append((count >= 0) & (count <= P) & (count == count.round()))
            checks.append(count)
        # One read per bucket: whether the sum is sound (and the contributor count).
        got = torch.stack([c.to(torch.float64) for c in checks]).tolist()
        if not all(got[:2] if self.weighted else got):
            return self._fallback(part, bound)
        if not self.weighted:
            return _split(s.div_(P), like), float(P)
        total = got[2]
        if total <= 0:
            return _split(torch.zeros_like(s), like), 0.0
        return _split(s / count.clamp_min(torch.finfo(out.dtype).tiny), like), total

    def _fallback(self, part: _Part, bound: float) -> tuple[list[torch.Tensor], float]:
        """Gather every rank's vector of this bucket, drop the bad ones, average the rest.

        Collective: every rank calls this for the same bucket, since all see the same sum.
        """
        like, tag = part.like, part.tag  # type: ignore[attr-defined]
        logger.info(
            "the all-reduced sum of %s is non-finite or beyond float32 max / P; gathering "
            "every peer's vector to find the bad one",
            tag,
        )
        vec = self._vector(like, part.contribute)  # type: ignore[attr-defined]
        assert self.comm is not None  # internal invariant: only ring rounds take a fallback
        rows = self.comm.all_gather_into_tensor(vec, tag=f"{tag}/fallback")  # (P, n [+ 1])
        assert isinstance(rows, torch.Tensor)  # internal invariant: a blocking call's result
        vals = rows[:, :-1] if self.weighted else rows
        flags = rows[:, -1] if self.weighted else torch.ones_like(rows[:, 0])
        finite = torch.isfinite(vals).all(dim=1)
        bounded = (vals.abs() <= bound).all(dim=1)
        info = torch.stack([finite.double(), bounded.double(), flags.double()]).T.tolist()  # 1 read
        used: list[int] = []
        before = sum(self.dropped.values())
        for rank, (fin, bnd, flag) in enumerate(info):
            if flag not in (0.0, 1.0):
                self._drop(rank, tag, "vector", f"its contributor weight is {flag!r}, not 0 or 1")
            elif not fin:
                self._drop(rank, tag, "vector", "it holds non-finite values")
            elif not bnd:
                self._drop(
                    rank,
                    tag,
                    "vector",
                    f"it holds values above float32 max / P = {bound:.4g} in magnitude, where "
                    "the float32 sum of the peers' vectors can overflow",
                )
            elif flag == 1.0:
                used.append(rank)
        if sum(self.dropped.values()) == before:
            logger.warning(
                "the all-reduced sum of %s was unsound, yet every peer's gathered vector is "
                "sound (honest values near float32 max / P, or a peer sent the ring other values "
                "than it gathered); averaging the gathered vectors",
                tag,
            )
        if not used:
            return _split(torch.zeros_like(vals[0]), like), 0.0
        acc = vals[used[0]].clone()  # rank order, as the in-place ring sum folds
        for r in used[1:]:
            acc += vals[r]
        n = len(used)
        if self.weighted:
            mean = acc / torch.tensor(float(n), dtype=acc.dtype, device=acc.device)
        else:
            mean = acc.div_(n)
        return _split(mean, like), float(n)


class DenseReducer(Reducer):
    """A dense codec: each worker's quantized bucket is gathered; all decode and average."""

    def __init__(self, comm, codec: DenseCodec, **kw: Any) -> None:
        super().__init__(comm, **kw)
        self.codec = codec

    def _start_bucket(self, ts, sl, ef, contribute, tag):
        bucket = bucket_of(self.codec, tuple(tuple(t.shape) for t in ts))
        assert isinstance(bucket, DenseBucket)  # internal invariant: bucket_of follows the codec
        fused = ef is not None and self._fusable(ef, sl)
        if fused:
            frame = self._fused_ef(bucket, ef, sl, ts, contribute)
        else:
            if ef is not None:
                ts = ef.inputs(sl, ts)
            frame, deq, ok = bucket.encode(_flat(ts), contribute)
            if ef is not None:
                # A bucket the quantizer could not represent (non-finite side data) is not
                # sent; its residual keeps everything.
                sent = [torch.where(ok, d, 0.0) for d in _split(deq, ts)]
                ef.keep(sl, ts, sent)
        part = _Part(sl, self._exchange(frame, tag), bucket)
        part.own = frame  # type: ignore[attr-defined]
        part.like = ts  # type: ignore[attr-defined]
        part.tag = tag  # type: ignore[attr-defined]
        return part

    def _fusable(self, ef: _EF, sl: slice) -> bool:
        """Whether :func:`ef_quantize_pack` (a Triton kernel on CUDA) can do this bucket's EF."""
        v = self.codec.values
        allowed = {"block"} if v.name != "2bit" else set()
        if v.name == "2bit":
            default = {"n_bins": 4, "range_sigmas": 6.0}
            if any(v.params.get(k, d) != d for k, d in default.items()):
                return False
            allowed = set(default)
        return (
            v.name in EF_FORMATS
            and set(v.params) <= allowed
            and all(r.dtype == torch.float32 for r in ef.residuals[sl])
        )

    def _fused_ef(self, bucket, ef, sl, ts, contribute) -> torch.Tensor:
        frame, new, ok = bucket.encode_ef(
            _flat(ef.residuals[sl]), _flat(ts), contribute, decay=ef.decay, scale=ef.scale
        )
        for r, nr in zip(ef.residuals[sl], _split(new, ts), strict=True):
            r.copy_(torch.where(ok, nr, r))
        return frame

    def finish(self, part):
        bucket, like = part.bucket, part.like  # type: ignore[attr-defined]
        vals, status = bucket.decode(self._frames(part, part.own))  # type: ignore[attr-defined]
        present = self._present(status, part.tag)  # type: ignore[attr-defined]
        if not present:
            return [torch.zeros_like(t, dtype=torch.float32) for t in like], 0.0
        try:
            mean = robust_mean([vals[r] for r in present], self.robust, trim=self.trim)
        except ValueError as exc:
            # Settings and shapes were checked at construction; what is left is a trimmed mean
            # with too few peers present this round: skip it, never average untrimmed.
            logger.warning("%s: round skipped: %s", part.tag, exc)  # type: ignore[attr-defined]
            return [torch.zeros_like(t, dtype=torch.float32) for t in like], 0.0
        return _split(mean, like), float(len(present))


class SparseReducer(Reducer):
    """A sparse codec: per-tensor selections gathered in one frame; all fold them in rank order."""

    def __init__(self, comm, codec: SparseCodec, *, aggregate: str = "index_mean", **kw) -> None:
        super().__init__(comm, **kw)
        if self.robust not in ("mean", "clip"):
            raise ValueError(
                f"robust must be in {{'mean', 'clip'}} for sparse codecs, got {self.robust!r}"
            )
        self.codec = codec
        self.aggregate = aggregate

    def _start_bucket(self, ts, sl, ef, contribute, tag):
        bucket = bucket_of(self.codec, tuple(tuple(t.shape) for t in ts))
        assert isinstance(bucket, SparseBucket)  # internal invariant: bucket_of follows the codec
        if ef is not None:
            ts = ef.inputs(sl, ts)
        frame, parts, raws, ok = bucket.encode(ts, contribute)
        if ef is not None:
            if ef.subtract == "raw" and self.codec.values.name != "fp32":
                parts = [SparsePart(p.idx, r) for p, r in zip(parts, raws, strict=True)]
            taken = [
                torch.where(ok, bucket.densify(i, p).reshape(t.shape), 0.0)
                for i, (p, t) in enumerate(zip(parts, ts, strict=True))
            ]
            ef.keep(sl, ts, taken)
        part = _Part(sl, self._exchange(frame, tag), bucket)
        part.own = frame  # type: ignore[attr-defined]
        part.tag = tag  # type: ignore[attr-defined]
        return part

    def finish(self, part):
        bucket = part.bucket
        assert isinstance(bucket, SparseBucket)  # internal invariant
        parts, status = bucket.decode(self._frames(part, part.own))  # type: ignore[attr-defined]
        present = self._present(status, part.tag)  # type: ignore[attr-defined]
        if present and self.robust == "clip":
            parts = _clip_sparse(parts, present)
        out = bucket.aggregate(parts, present, self.aggregate)
        return out, float(len(present))


def _clip_sparse(parts: list, present: list[int]) -> list:
    """Scale each present peer's whole selection to at most the middle norm of all of theirs.

    The cap is :func:`~thinwire.compression.clip_scales`' default: the middle norm for an odd
    number of present peers, the mean of the two middle norms for an even number (so one
    all-zero peer out of two halves the other instead of zeroing it).

    With an orthonormal transform the norm of a peer's values is the norm of its decoded
    update, so clipping the values clips the update.
    """

    sq = sum(p.val.double().pow(2).flatten(1).sum(1) for p in parts)  # (P,)
    norms = sq.sqrt().tolist()  # one read: P norms
    scales = clip_scales([norms[r] for r in present])
    factor = torch.ones(len(norms), dtype=torch.float32, device=parts[0].val.device)
    for r, s in zip(present, scales, strict=True):
        factor[r] = s
    return [SparsePart(p.idx, p.val * factor.view(-1, *([1] * (p.val.ndim - 1)))) for p in parts]


def make_reducer(
    comm: Communicator | None,
    codec: Codec | None,
    *,
    robust: str = "mean",
    trim: int | None = None,
    weighted: bool = False,
    aggregate: str = "index_mean",
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
) -> Reducer:
    """The reducer of ``codec``'s family: the one place that maps a codec to its reduction.

    Robust rules other than ``"mean"`` need every peer's vector, so without a codec they gather
    float32 frames instead of ring all-reducing. ``trim`` is the trimmed mean's count of peers
    dropped at each end (see :class:`Reducer`).

    Raises:
        ValueError: ``trim`` with another rule, or a trimmed mean that cannot trim at the
            group's size (effective trim 0, or ``2 * trim >= P``).
    """
    kw = dict(robust=robust, trim=trim, weighted=weighted, bucket_cap_mb=bucket_cap_mb)
    if isinstance(codec, SparseCodec):
        return SparseReducer(comm, codec, aggregate=aggregate, **kw)
    if codec is None and robust != "mean" and comm is not None:
        codec = DenseCodec("fp32")
    if codec is None:
        return AllReduceReducer(comm, **kw)
    if not isinstance(codec, DenseCodec):
        raise TypeError(f"codec must be a DenseCodec or SparseCodec, got {type(codec).__name__}")
    return DenseReducer(comm, codec, **kw)
