"""Fault-injection harness for the reliability tests and ``benchmarks/faults.py``.

:class:`FaultyComm` wraps a REAL communicator (in-process, gloo or hivemind) and changes only what
*this* rank does or sends: it dies (``os._exit`` right after issuing its part of a collective),
stalls, corrupts or truncates its outgoing bytes, poisons them with NaN, scales or sign-flips its
update, or sends nothing. The engine underneath is untouched, so every peer still talks to a real
engine: this is fault injection, not a mock. A :class:`Tap` records, for every wrapped rank, what
it put on the wire and what the collective returned, so tests check the wire itself.

Optimizers send one frame per bucket through ``all_gather_into_tensor`` (a uint8 tensor: the
codec's body, then a CRC32 keyed with the wire version, the contribution flag and the digest of
the codec settings and bucket shapes; :mod:`thinwire.compression.wire`). The harness finds the
bucket codec of a clean frame among the layouts the optimizers of this process built (the frame's
own CRC names it, see :func:`bucket_of_frame`) and applies each fault to the frame:

* ``corrupt``: flip 1-8 bits anywhere in the frame (``arg``: how many); the CRC no longer
  matches, receivers drop the frame;
* ``truncate``: the frame arrives cut short: every byte from a random cut point on (at or before
  its last non-zero byte, so the frame does change) reads as zero, CRC included, as in a
  zero-filled receive buffer; the CRC no longer matches, receivers drop it. (A frame's size is
  fixed by the shapes and its length is not on the wire, so a shorter frame cannot be sent.)
* ``nan``: the body's last four bytes become ``0xFF`` (NaN in every float format, see
  :data:`_NAN_BYTES`) and the frame is RE-SEALED with a valid CRC, so only the receiver's value
  check can catch it;
* ``scale`` / ``sign_flip``: decode the frame with its bucket codec, scale the update, and send
  what an honest encoder sends for it (``bucket.encode``; sparse: the decoded selection is
  densified, scaled and re-selected, as the per-tensor path did);
* ``drop``: a valid frame with flag 0 and an all-zero body: "no contribution this round";
* ``kill`` / ``stall``: as for every collective.

``nan``, ``scale``, ``sign_flip`` and ``drop`` leave a frame that already carries flag 0 (its
sender contributes nothing) as it is; ``corrupt`` and ``truncate`` damage its bytes all the same.
A non-uint8 tensor gathered the same way (the all-reduce path's fallback gather of float32
vectors) is altered as ``all_reduce`` alters its tensor.

Membership faults (join late, leave and rejoin) are engine calls the tests make themselves
(``close()`` and a fresh ``HivemindCommunicator.create``); :class:`FaultyComm` carries the round id
hivemind needs so that a rejoined peer is matched into the right round.

Also here: :class:`Regression`, the small teacher-student task every scenario trains (cheap, with a
known loss floor: the noise variance), and :func:`run_threads`, which plays the ranks of an
in-process group and turns a hang into a test failure.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from thinwire.compression import (
    STATUS_EMPTY,
    STATUS_OK,
    Codec,
    DenseBucket,
    SparseBucket,
    SparsePart,
    pack_bundle,
    unpack_bundle,
)
from thinwire.compression.bundle import BUNDLE_MAGIC
from thinwire.compression.payload import pack_payload, unpack_payload

__all__ = [
    "KINDS",
    "Fault",
    "FaultyComm",
    "Regression",
    "Sent",
    "Tap",
    "bucket_of_frame",
    "frame_status",
    "is_empty_frame",
    "run_threads",
    "finite_payload",
]

# What one rank can do wrong.
KINDS = ("kill", "stall", "corrupt", "truncate", "nan", "scale", "sign_flip", "drop")
# 0xFF bytes are NaN as float32, as each fp16/bf16 half and as fp8 e4m3 (all exponent bits set,
# mantissa non-zero), so they poison any value format's codes or float32 side data.
_NAN_BYTES = b"\xff\xff\xff\xff"


@dataclass(frozen=True)
class Fault:
    """One misbehaviour of the wrapped rank.

    Attributes:
        kind: one of :data:`KINDS`.
        at: indices of this rank's collectives it hits (0-based count of ``all_reduce``,
            ``all_gather_bytes`` and ``all_gather_into_tensor`` calls); None hits every one.
        arg: ``stall`` seconds, ``scale`` factor, ``kill`` exit code, ``corrupt`` bit flips
            (0: a random 1-8).
    """

    kind: str
    at: frozenset[int] | None = None
    arg: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be in {KINDS}, got {self.kind!r}")

    def hits(self, index: int) -> bool:
        return self.at is None or index in self.at


@dataclass
class Sent:
    """One collective of one rank as it crossed the wire.

    ``clean`` is what the optimizer handed to the communicator, ``data`` what the fault left of
    it (identical without a fault); ``result``/``group``/``error`` are filled when it completes.
    ``bucket`` is the bucket codec of a gathered frame (None for anything else); ``reduce_op``
    the operation of an ``all_reduce`` (``"mean"``, ``"sum"``; None for anything else).
    """

    who: str
    op: str
    tag: str
    index: int
    round: int | None
    data: torch.Tensor | bytes
    clean: torch.Tensor | bytes
    result: Any = None
    group: tuple[str, ...] = ()
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    bucket: DenseBucket | SparseBucket | None = None
    reduce_op: str | None = None


class Tap:
    """Thread-safe record of every wrapped rank's outgoing collectives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[Sent] = []

    def add(self, rec: Sent) -> Sent:
        with self._lock:
            self.records.append(rec)
        return rec

    def of(self, who: str) -> list[Sent]:
        with self._lock:
            return [r for r in self.records if r.who == who]


def _as_bytes(payload: Any) -> bytes:
    if isinstance(payload, torch.Tensor):
        return payload.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
    return bytes(payload)


def _parts(data: bytes) -> tuple[list[bytes], bool]:
    """The payloads in ``data`` (a bundle's parts, or ``data`` itself) and whether it was a bundle."""
    if data[:4] == BUNDLE_MAGIC:
        return unpack_bundle(data), True
    return [data], False


def _join(parts: list[bytes], bundled: bool) -> bytes:
    return pack_bundle(parts) if bundled else parts[0]


def bucket_of_frame(
    frame: torch.Tensor, codec: Codec | None = None
) -> DenseBucket | SparseBucket | None:
    """The bucket codec whose envelope opens ``frame`` (a clean frame), or None.

    Candidates are the bucket codecs the optimizers of this process built (the reducers' cache,
    which is how a receiving rank knows the layout too), of ``codec``'s settings if given. The
    frame's keyed CRC32 covers the settings and shapes, so only its own layout opens it (a
    collision is a 2**-32 event).
    """
    if frame.dtype != torch.uint8 or frame.dim() != 1:
        return None
    from thinwire.optim import _reduce

    for _ in range(5):  # another rank's thread may touch the cache: copy it, retry if it moved
        try:
            candidates = list(_reduce._bucket_cache.values())
            break
        except RuntimeError:
            time.sleep(0.001)
    else:
        return None
    for b in reversed(candidates):  # most recently used first
        if b.nbytes != frame.numel():
            continue
        if codec is not None and (
            type(b.codec) is not type(codec) or b.codec.settings != codec.settings
        ):
            continue
        _, status = b.envelope.open_rows(frame.detach().reshape(1, -1))
        if int(status[0]) in (STATUS_OK, STATUS_EMPTY):
            return b
    return None


def frame_status(bucket: DenseBucket | SparseBucket, frame: torch.Tensor) -> tuple[int, bool]:
    """What every receiver makes of ``frame``: its status code and whether its values are finite.

    ``finite`` is True for a frame with no contribution (nothing to apply) and for an accepted
    frame whose decoded values are all finite; a dropped frame is not finite (nothing usable).
    """
    out, status = bucket.decode(frame.detach().reshape(1, -1))
    code = int(status[0])
    if code == STATUS_EMPTY:
        return code, True
    if code != STATUS_OK:
        return code, False
    if isinstance(bucket, DenseBucket):
        return code, bool(torch.isfinite(out).all())
    return code, all(bool(torch.isfinite(p.val).all()) for p in out)


def is_empty_frame(bucket: DenseBucket | SparseBucket | None, frame: Any) -> bool:
    """A full-size frame that says "no contribution": flag 0 (its CRC opens under the flag-0
    key) and an all-zero body."""
    if bucket is None or not isinstance(frame, torch.Tensor) or frame.dtype != torch.uint8:
        return False
    if frame.numel() != bucket.nbytes:
        return False
    _, status = bucket.envelope.open_rows(frame.detach().reshape(1, -1))
    return int(status[0]) == STATUS_EMPTY and not bool(frame[: bucket.body_nbytes].any())


def finite_payload(
    codec: Codec | None, data: Any, bucket: DenseBucket | SparseBucket | None = None
) -> bool:
    """True when ``data`` decodes to finite values (or carries no contribution).

    ``data`` is a gathered frame (uint8 tensor; decoded with ``bucket``, or the bucket codec of
    this process that opens it) or a per-tensor payload or bundle in bytes (empty = no
    contribution; decoded with ``codec``). A message a receiver refuses (bad CRC, body that does
    not decode, non-finite values) counts as not finite: nothing a receiver could use.
    """
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            return bool(torch.isfinite(data).all())
        if bucket is None:
            bucket = bucket_of_frame(data, codec)
        return bucket is not None and frame_status(bucket, data)[1]
    if not data:
        return True
    try:
        parts, _ = _parts(data)
        return all(bool(torch.isfinite(codec.decode(p)).all()) for p in parts)
    except ValueError:  # PayloadError included: non-finite values are refused by decode
        return False


class FaultyComm:
    """A real communicator whose rank misbehaves as ``faults`` say; everything else is delegated.

    Args:
        inner: the real communicator of this rank.
        faults: what goes wrong, and when.
        tap: where to record outgoing collectives (None: no record).
        codec: the codec of the payloads this rank gathers; needed by ``scale`` and
            ``sign_flip`` on byte payloads (decode, transform, re-encode). Frames need none:
            their bucket codec is found from the frame (:func:`bucket_of_frame`).
        who: label of this rank in the tap (default ``f"rank{inner.rank}"``; hivemind: peer id).
        seed: seed of the bit positions ``corrupt``/``truncate`` pick.

    ``round`` (attribute): when set, passed as ``round=`` to the engine (hivemind round ids).
    """

    def __init__(
        self,
        inner: Any,
        faults: Iterable[Fault] = (),
        *,
        tap: Tap | None = None,
        codec: Codec | None = None,
        who: str | None = None,
        seed: int = 0,
    ) -> None:
        self.inner = inner
        self.faults = list(faults)
        self.tap = tap
        self.codec = codec
        self.who = (
            who if who is not None else str(getattr(inner, "peer_id", "") or f"rank{inner.rank}")
        )
        self.round: int | None = None
        self.ops = 0
        self._rng = random.Random(seed)

    def __getattr__(self, name: str) -> Any:  # rank, world_size, ledger, peers, close, ...
        return getattr(self.__dict__["inner"], name)

    # ----------------------------------------------------------------------- fault mechanics
    def _start(self) -> tuple[int, list[Fault]]:
        index, self.ops = self.ops, self.ops + 1
        hits = [f for f in self.faults if f.hits(index)]
        for f in hits:
            if f.kind == "stall":
                time.sleep(f.arg)
        return index, hits

    def _kill_if(self, hits: list[Fault]) -> None:
        # Called right after this rank issued its part: peers are mid-collective when it dies.
        for f in hits:
            if f.kind == "kill":
                os._exit(int(f.arg) or 17)

    def _alter_tensor(self, t: torch.Tensor, hits: list[Fault]) -> None:
        flat = t.detach().view(-1)
        with torch.no_grad():
            for f in hits:
                if f.kind == "nan":
                    flat[:: max(1, flat.numel() // 3)] = float("nan")
                elif f.kind == "scale":
                    flat.mul_(f.arg)
                elif f.kind == "sign_flip":
                    flat.neg_()
                elif f.kind == "drop":  # a dense ring cannot skip a rank: it sends zeros instead
                    flat.zero_()
                elif f.kind in ("corrupt", "truncate"):  # no framing to cut: flip bits in place
                    raw = flat.view(torch.uint8)
                    for _ in range(int(f.arg) or self._rng.randint(1, 8)):
                        raw[self._rng.randrange(raw.numel())] ^= 1 << self._rng.randrange(8)

    def _alter_bytes(self, data: bytes, hits: list[Fault]) -> bytes:
        for f in hits:
            if not data or f.kind in ("stall", "kill"):
                continue
            if f.kind == "drop":
                data = b""
            elif f.kind == "truncate":
                data = data[: self._rng.randrange(len(data))]
            elif f.kind == "corrupt":
                buf = bytearray(data)
                for _ in range(int(f.arg) or self._rng.randint(1, 8)):
                    buf[self._rng.randrange(len(buf))] ^= 1 << self._rng.randrange(8)
                data = bytes(buf)
            elif f.kind == "nan":
                parts, bundled = _parts(data)
                data = _join([_poison(p) for p in parts], bundled)
            else:  # scale / sign_flip: what an honest encoder would send for the altered update
                if self.codec is None:
                    raise ValueError(f"fault {f.kind!r} on byte payloads needs codec=")
                factor = f.arg if f.kind == "scale" else -1.0
                parts, bundled = _parts(data)
                data = _join(
                    [self.codec.encode(self.codec.decode(p) * factor) for p in parts], bundled
                )
        return data

    def _record(
        self, op: str, tag: str, index: int, data: Any, clean: Any, bucket: Any = None
    ) -> Sent | None:
        if self.tap is None:
            return None
        return self.tap.add(Sent(self.who, op, tag, index, self.round, data, clean, bucket=bucket))

    def _flip_bits(self, raw: torch.Tensor, n: int) -> None:
        """Flip ``n`` random bits of the uint8 tensor ``raw`` in place; it always changes."""
        before = raw.clone()
        for _ in range(n):
            raw[self._rng.randrange(raw.numel())] ^= 1 << self._rng.randrange(8)
        if torch.equal(raw, before):  # two flips of one bit cancelled out: flip one more
            raw[self._rng.randrange(raw.numel())] ^= 1 << self._rng.randrange(8)

    def _alter_frame(
        self, frame: torch.Tensor, hits: list[Fault], bucket: DenseBucket | SparseBucket | None
    ) -> torch.Tensor:
        """``frame`` (a copy) as the faults leave it; see the module docstring for each kind."""
        for f in hits:
            if f.kind in ("stall", "kill") or frame.numel() == 0:
                continue
            if f.kind == "corrupt":
                self._flip_bits(frame, int(f.arg) or self._rng.randint(1, 8))
                continue
            if f.kind == "truncate":
                nonzero = frame.nonzero()
                if nonzero.numel():
                    frame[self._rng.randrange(int(nonzero[-1]) + 1) :] = 0
                continue
            if bucket is None:
                raise ValueError(
                    f"fault {f.kind!r} on a frame needs its bucket codec, and no bucket codec "
                    "of this process opens it"
                )
            _, status = bucket.envelope.open_rows(frame.reshape(1, -1))
            if int(status[0]) != STATUS_OK:  # no contribution (or already damaged): left as is
                continue
            body = frame[: bucket.body_nbytes].clone()
            if f.kind == "drop":
                frame = bucket.envelope.seal(torch.zeros_like(body), False)
            elif f.kind == "nan":
                if body.numel() >= 4:
                    body[-4:] = torch.tensor(list(_NAN_BYTES), dtype=torch.uint8)
                frame = bucket.envelope.seal(body, True)
            else:  # scale / sign_flip: what an honest encoder would send for the altered update
                factor = f.arg if f.kind == "scale" else -1.0
                frame = _rescaled(bucket, frame, factor)
        return frame

    def _finish(self, handle: Any, rec: Sent | None, async_op: bool) -> Any:
        if rec is not None:

            def done(h: Any) -> None:
                try:
                    value = h.wait()
                    rec.result = (
                        value.detach().clone() if isinstance(value, torch.Tensor) else value
                    )
                    rec.group = tuple(h.group)
                except BaseException as exc:  # recorded; wait() raises it to the caller too
                    rec.error = exc
                rec.done.set()

            handle.add_done_callback(done)
        return handle if async_op else handle.wait()

    def _kw(self, kw: dict[str, Any]) -> dict[str, Any]:
        if self.round is not None:
            kw.setdefault("round", self.round)
        return kw

    # --------------------------------------------------------------------------- the wire
    def all_reduce(
        self,
        t: torch.Tensor,
        op: str = "mean",
        *,
        async_op: bool = False,
        tag: str = "",
        **kw: Any,
    ) -> Any:
        """The engine's all_reduce of ``t`` after this rank's faults altered it (in place)."""
        index, hits = self._start()
        clean = t.detach().clone()
        self._alter_tensor(t, hits)
        rec = self._record("all_reduce", tag, index, t.detach().clone(), clean)
        if rec is not None:
            rec.reduce_op = op
        h = self.inner.all_reduce(t, op, async_op=True, tag=tag, **self._kw(kw))
        self._kill_if(hits)
        return self._finish(h, rec, async_op)

    def all_gather_bytes(
        self,
        payload: Any,
        *,
        algorithm: str = "auto",
        async_op: bool = False,
        tag: str = "",
        **kw: Any,
    ) -> Any:
        """The engine's all_gather_bytes of this rank's payload after its faults altered it."""
        index, hits = self._start()
        clean = _as_bytes(payload)
        data = self._alter_bytes(clean, hits)
        rec = self._record("all_gather_bytes", tag, index, data, clean)
        h = self.inner.all_gather_bytes(
            data, algorithm=algorithm, async_op=True, tag=tag, **self._kw(kw)
        )
        self._kill_if(hits)
        return self._finish(h, rec, async_op)

    def all_gather_into_tensor(
        self, t: torch.Tensor, *, async_op: bool = False, tag: str = "", **kw: Any
    ) -> Any:
        """The engine's all_gather_into_tensor of this rank's frame after its faults altered it.

        A uint8 frame is altered as the module docstring says (on a copy: the caller's frame is
        left as it was); any other tensor as :meth:`all_reduce` alters its tensor.
        """
        index, hits = self._start()
        clean = t.detach().clone()
        bucket = None
        if t.dtype == torch.uint8 and t.dim() == 1:
            needs = {"nan", "scale", "sign_flip", "drop"}
            if self.tap is not None or any(f.kind in needs for f in hits):
                bucket = bucket_of_frame(clean)
            data = self._alter_frame(clean.clone(), hits, bucket)
        else:
            data = clean.clone()
            self._alter_tensor(data, hits)
        rec = self._record("all_gather_into_tensor", tag, index, data.clone(), clean, bucket)
        h = self.inner.all_gather_into_tensor(data, async_op=True, tag=tag, **self._kw(kw))
        self._kill_if(hits)
        return self._finish(h, rec, async_op)


def _poison(part: bytes) -> bytes:
    """``part`` re-enveloped (valid CRC) with its last four body bytes set to NaN patterns."""
    header, body = unpack_payload(part)
    if len(body) < 4:
        return part
    body = body[:-4] + _NAN_BYTES
    return pack_payload(header.codec_id, header.dtype, header.shape, header.settings, body)


def _rescaled(
    bucket: DenseBucket | SparseBucket, frame: torch.Tensor, factor: float
) -> torch.Tensor:
    """The frame an honest encoder sends for ``factor`` times ``frame``'s decoded update."""
    out, _ = bucket.decode(frame.reshape(1, -1))
    if isinstance(bucket, DenseBucket):
        new, _, _ = bucket.encode(out[0] * factor)
        return new
    dense = []
    for i, (p, shape) in enumerate(zip(out, bucket.shapes, strict=True)):
        if bucket.geometries[i].num_chunks == 0:
            dense.append(torch.zeros(shape, dtype=torch.float32, device=frame.device))
        else:
            dense.append(bucket.densify(i, SparsePart(p.idx[0], p.val[0])).reshape(shape) * factor)
    new, _, _, _ = bucket.encode(dense)
    return new


# ------------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class Regression:
    """Teacher-student linear regression: ``y = W x + b + noise * N(0, 1)``.

    Every worker draws its batch of step ``s`` from a generator keyed by (seed, worker, s), so a
    run is reproducible whatever the engine or the interleaving of threads, and a resumed run sees
    the same data. The loss floor (mean squared error of the teacher) is ``noise ** 2``.
    """

    d_in: int = 32
    d_out: int = 8
    noise: float = 0.1
    batch: int = 16
    seed: int = 0

    def _gen(self, *key: int) -> torch.Generator:
        digest = hashlib.sha256(struct.pack("<4q", self.seed, *key)).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**62)

    def teacher(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._gen(-1, -1, -1)
        W = torch.randn(self.d_out, self.d_in, generator=g) / self.d_in**0.5
        return W, 0.1 * torch.randn(self.d_out, generator=g)

    def data(self, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        W, b = self.teacher()
        g = self._gen(worker, step, 0)
        x = torch.randn(self.batch, self.d_in, generator=g)
        return x, x @ W.T + b + self.noise * torch.randn(self.batch, self.d_out, generator=g)

    def eval_set(self, n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        W, b = self.teacher()
        g = self._gen(-2, -2, -2)
        x = torch.randn(n, self.d_in, generator=g)
        return x, x @ W.T + b + self.noise * torch.randn(n, self.d_out, generator=g)

    def model(self) -> nn.Linear:
        """The student, initialised from the task seed (identical in every thread and process)."""
        m = nn.Linear(self.d_in, self.d_out)
        g = self._gen(-3, -3, -3)
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
            m.bias.zero_()
        return m

    def step(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        worker: int,
        step: int,
        poison: bool = False,
    ) -> None:
        """One optimizer step on worker ``worker``'s batch ``step``; ``poison`` makes every grad NaN."""
        x, y = self.data(worker, step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if poison:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        opt.step()

    def eval_loss(self, model: nn.Module) -> float:
        x, y = self.eval_set()
        with torch.no_grad():
            return float(F.mse_loss(model(x).double(), y.double()))


def run_threads(fns: list[Callable[[], Any]], timeout: float = 120.0) -> list[Any]:
    """Run one call per rank concurrently; each result or the exception it raised, in order.

    Raises:
        AssertionError: a rank still runs after ``timeout`` seconds (a hang).
    """
    out: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        try:
            out[i] = fns[i]()
        except BaseException as exc:  # returned to the test, which asserts on it
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for i, t in enumerate(threads):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise AssertionError(f"rank {i} still running after {timeout:.0f} s: a hang")
    return out
