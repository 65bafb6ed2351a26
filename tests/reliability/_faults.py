"""Fault-injection harness for the reliability tests (issue 9) and ``benchmarks/faults.py``.

:class:`FaultyComm` wraps a REAL communicator (in-process, gloo or hivemind) and changes only what
*this* rank does or sends: it dies (``os._exit`` right after issuing its part of a collective),
stalls, corrupts or truncates its outgoing bytes, poisons them with NaN, scales or sign-flips its
update, or sends nothing. The engine underneath is untouched, so every peer still talks to a real
engine: this is fault injection, not a mock. A :class:`Tap` records, for every wrapped rank, what
it put on the wire and what the collective returned, so tests check the wire itself.

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

from thinwire.compression import Codec, pack_bundle, unpack_bundle
from thinwire.compression.bundle import BUNDLE_MAGIC
from thinwire.compression.payload import pack_payload, unpack_payload

__all__ = [
    "KINDS",
    "Fault",
    "FaultyComm",
    "Regression",
    "Sent",
    "Tap",
    "run_threads",
    "finite_payload",
]

# What one rank can do wrong (issue 9, "What to build" item 4).
KINDS = ("kill", "stall", "corrupt", "truncate", "nan", "scale", "sign_flip", "drop")
# 0xFF bytes are NaN as float32, as each fp16/bf16 half and as fp8 e4m3 (all exponent bits set,
# mantissa non-zero), so they poison any value format's codes or float32 side data.
_NAN_BYTES = b"\xff\xff\xff\xff"


@dataclass(frozen=True)
class Fault:
    """One misbehaviour of the wrapped rank.

    Attributes:
        kind: one of :data:`KINDS`.
        at: indices of this rank's collectives it hits (0-based count of ``all_reduce`` and
            ``all_gather_bytes`` calls); None hits every one.
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


def finite_payload(codec: Codec, data: bytes) -> bool:
    """True when ``data`` (a payload or a bundle; empty = no contribution) decodes to finite values.

    A payload a codec refuses to decode counts as not finite: nothing a receiver could use.
    """
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
            ``sign_flip`` on byte payloads (decode, transform, re-encode).
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

    def _record(self, op: str, tag: str, index: int, data: Any, clean: Any) -> Sent | None:
        if self.tap is None:
            return None
        return self.tap.add(Sent(self.who, op, tag, index, self.round, data, clean))

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
        codec: Any = None,
        async_op: bool = False,
        tag: str = "",
        **kw: Any,
    ) -> Any:
        """The engine's all_reduce of ``t`` after this rank's faults altered it (in place)."""
        index, hits = self._start()
        clean = t.detach().clone()
        self._alter_tensor(t, hits)
        rec = self._record("all_reduce", tag, index, t.detach().clone(), clean)
        h = self.inner.all_reduce(t, op, codec=codec, async_op=True, tag=tag, **self._kw(kw))
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


def _poison(part: bytes) -> bytes:
    """``part`` re-enveloped (valid CRC) with its last four body bytes set to NaN patterns."""
    header, body = unpack_payload(part)
    if len(body) < 4:
        return part
    body = body[:-4] + _NAN_BYTES
    return pack_payload(header.codec_id, header.dtype, header.shape, header.settings, body)


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
