"""The communicator protocol, its handles, the byte ledger and the error hierarchy.

Every engine (``torch.distributed``, hivemind, in-process) implements :class:`Communicator`; every
optimizer and the RL layer talk only to it. Bytes are counted by the algorithm each op uses, as
application payload (not TCP frames; ``docs/design.md``, "Byte formulas"), so a test can check the
ledger against closed forms and a report can trust it.

This module holds types only; the byte formulas live in :mod:`thinwire.collectives.accounting`.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

import torch

__all__ = [
    "CommError",
    "CommTimeout",
    "PeerLost",
    "GroupTooSmall",
    "AllPeersLeft",
    "RoundMismatch",
    "OrderMismatch",
    "PeerInfo",
    "OpRecord",
    "ByteLedger",
    "Handle",
    "Communicator",
    "ReduceOpName",
    "RoundStart",
    "STEP_COUNTERS",
    "StateGetter",
    "StateSetter",
]

T = TypeVar("T")
ReduceOpName = Literal["mean", "sum"]


class CommError(RuntimeError):
    """Base class of every communication failure raised by a thinwire communicator."""


class CommTimeout(CommError):
    """An op did not complete within the communicator's timeout."""


class PeerLost(CommError):
    """A peer disappeared (process died, connection closed) during an op."""


class GroupTooSmall(CommError):
    """No group of the required size formed within the timeout (hivemind matchmaking)."""


class AllPeersLeft(CommError):
    """Every other member of an elastic run left, and the communicator was told to stop then
    (hivemind ``alone="raise"``). Optimizers let it through instead of discarding the round."""


class RoundMismatch(CommError):
    """Peers matched for one op disagree on the round id or tag; local tensors are untouched."""


class OrderMismatch(CommError):
    """Ranks issued collectives in different orders (detected by ``debug_checks=True``)."""


@dataclass(frozen=True)
class PeerInfo:
    """One member of the communicator's group as this rank last saw it."""

    rank: int
    peer_id: str
    address: str = ""
    alive: bool = True


@dataclass
class OpRecord:
    """What one collective moved, from this rank's point of view (payload bytes as counted by
    :mod:`thinwire.collectives.accounting`).

    ``sent``/``recv`` are payload bytes as the algorithm defines them (padding, codec headers,
    scales, indices and 8-byte length headers included); ``control_*`` are bytes thinwire itself
    sends for coordination (debug signatures, virtual-clock issue times). ``sizes`` are the
    per-rank payload lengths (bytes) where they differ by rank, so the WAN model can time a
    ``direct`` phase; ``numel``/``itemsize`` describe a dense tensor op.
    """

    op: str
    algorithm: str
    engine: str
    tag: str = ""
    step: int = 0
    P: int = 1
    rank: int = 0
    payload_bytes: int = 0
    sent: int = 0
    recv: int = 0
    control_sent: int = 0
    control_recv: int = 0
    numel: int = 0
    itemsize: int = 0
    sizes: tuple[int, ...] = ()
    src: int = 0
    t_real_s: float = 0.0
    t_model_s: float = 0.0


class ByteLedger:
    """Per-rank record of every op, with totals per tag and per training step.

    Thread-safe: async ops complete on background threads. ``mark_step(k)`` stamps later records
    with step ``k`` so reports can give bytes per step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[OpRecord] = []
        self.step = 0

    def add(self, record: OpRecord) -> OpRecord:
        """Append ``record`` (stamped with the current step) and return it."""
        with self._lock:
            record.step = self.step
            self.records.append(record)
        return record

    def mark_step(self, step: int) -> None:
        """Stamp every later record with training step ``step``."""
        self.step = int(step)

    def totals(self, tag: str | None = None) -> dict[str, int]:
        """Sum of sent/recv/control bytes over all records, or those whose tag starts with ``tag``."""
        out = {"sent": 0, "recv": 0, "control_sent": 0, "control_recv": 0, "ops": 0}
        with self._lock:
            for r in self.records:
                if tag is not None and not r.tag.startswith(tag):
                    continue
                out["sent"] += r.sent
                out["recv"] += r.recv
                out["control_sent"] += r.control_sent
                out["control_recv"] += r.control_recv
                out["ops"] += 1
        return out

    def by_tag(self) -> dict[str, dict[str, int]]:
        """Totals keyed by exact tag."""
        acc: dict[str, dict[str, int]] = defaultdict(
            lambda: {"sent": 0, "recv": 0, "control_sent": 0, "control_recv": 0, "ops": 0}
        )
        with self._lock:
            for r in self.records:
                d = acc[r.tag]
                d["sent"] += r.sent
                d["recv"] += r.recv
                d["control_sent"] += r.control_sent
                d["control_recv"] += r.control_recv
                d["ops"] += 1
        return dict(acc)

    def per_step(self) -> dict[int, dict[str, int]]:
        """Payload totals keyed by training step."""
        acc: dict[int, dict[str, int]] = defaultdict(lambda: {"sent": 0, "recv": 0})
        with self._lock:
            for r in self.records:
                acc[r.step]["sent"] += r.sent
                acc[r.step]["recv"] += r.recv
        return dict(acc)

    def reset(self) -> None:
        """Forget every record (the step counter is kept)."""
        with self._lock:
            self.records.clear()


class Handle(Generic[T]):
    """Result of a collective issued with ``async_op=True`` (and, completed, of a blocking one).

    ``wait()`` runs the op's post-processing (divide for mean, unpad, reshape) exactly once and
    caches the value; a second ``wait()`` returns the same object. An exception raised by the op
    is re-raised by every ``wait()``. ``group``/``missing`` name the peers that took part and
    those that did not (hivemind); ``t_done_virtual`` is set by the WAN wrapper.
    """

    def __init__(
        self,
        record: OpRecord,
        wait_fn: Callable[[float | None], T],
        done_fn: Callable[[], bool] | None = None,
        group: tuple[str, ...] = (),
        missing: tuple[str, ...] = (),
    ) -> None:
        self.record = record
        self.group = group
        self.missing = missing
        self.t_done_virtual: float | None = None
        self._wait_fn: Callable[[float | None], T] | None = wait_fn
        self._done_fn = done_fn
        self._lock = threading.Lock()
        self._finished = False
        self._value: T | None = None
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[Handle[T]], None]] = []

    @classmethod
    def completed(cls, record: OpRecord, value: T, **kw: Any) -> Handle[T]:
        """A handle that is already done with ``value``."""
        h: Handle[T] = cls(record, lambda _t: value, lambda: True, **kw)
        h.wait()
        return h

    def wait(self, timeout: float | None = None) -> T:
        """Block until the op completes; return its value or raise its error."""
        with self._lock:
            if not self._finished:
                try:
                    assert self._wait_fn is not None  # internal invariant: unfinished
                    self._value = self._wait_fn(timeout)
                except BaseException as exc:  # re-raised below and on every later wait()
                    self._exc = exc
                self._finished = True
                # Drop the engine's work objects: a finished handle kept alive (in a reference
                # cycle, or by the caller) must not keep a process group's work until
                # interpreter shutdown, where gloo aborts the process when it is freed.
                self._wait_fn = self._done_fn = None
                callbacks, self._callbacks = self._callbacks, []
            else:
                callbacks = []
        for cb in callbacks:
            cb(self)
        if self._exc is not None:
            raise self._exc
        return self._value  # type: ignore[return-value]

    def done(self) -> bool:
        """True once the op has completed (successfully or not); never blocks."""
        if self._finished:
            return True
        return bool(self._done_fn()) if self._done_fn is not None else False

    def exception(self) -> BaseException | None:
        """The op's error after ``wait()``, else None."""
        return self._exc

    def add_done_callback(self, fn: Callable[[Handle[T]], None]) -> None:
        """Call ``fn(handle)`` when ``wait()`` completes (at once if it already has)."""
        with self._lock:
            if not self._finished:
                self._callbacks.append(fn)
                return
        fn(self)


#: Name of the state entry that holds a worker's step counters (an int64 tensor). Two workers at
#: the same round may read their counters some steps apart, so state digests leave it out.
STEP_COUNTERS = "step counters"

#: Returns the global training state a worker hands to a peer that joins or heals: named tensors
#: (θ_g, the outer optimizer's state, step counters), read at the moment of the call.
StateGetter = Callable[[], dict[str, torch.Tensor]]
#: Loads such a state received from a live peer; raises ``ValueError`` for one that does not fit
#: (other names, shapes or dtypes, non-finite values), so the engine can try another peer.
StateSetter = Callable[[dict[str, torch.Tensor]], None]


@dataclass(frozen=True)
class RoundStart:
    """What :meth:`Communicator.begin_round` decided for this worker's sync round.

    Attributes:
        take_part: run this round's collectives. False: this worker's global state was just
            replaced by a live peer's (it joined late or missed rounds); it skips this round and
            contributes from the next one, from the state it received.
        contribute: send this worker's own update. False: take part with weight 0 (a replica
            that healed at the start of this round holds no update of its own for it).
        healed: the global state was loaded from a live peer during this call.
    """

    take_part: bool = True
    contribute: bool = True
    healed: bool = False


@runtime_checkable
class Communicator(Protocol):
    """One API over every engine. Collective: every rank must call each op, in the
    same order and with the same ``tag``."""

    rank: int
    world_size: int
    engine: str
    epoch: int
    ledger: ByteLedger

    def peers(self) -> list[PeerInfo]: ...

    def all_reduce(
        self,
        t: torch.Tensor,
        op: ReduceOpName = "mean",
        *,
        async_op: bool = False,
        tag: str = "",
    ) -> Handle[torch.Tensor] | torch.Tensor: ...

    def all_gather_bytes(
        self,
        payload: bytes | memoryview | torch.Tensor,
        *,
        algorithm: str = "auto",
        async_op: bool = False,
        tag: str = "",
    ) -> Handle[list[bytes | None]] | list[bytes | None]: ...

    def all_gather_into_tensor(
        self, t: torch.Tensor, *, async_op: bool = False, tag: str = ""
    ) -> Handle[torch.Tensor] | torch.Tensor:
        """Gather one equal-shape tensor per rank into a new ``(P, *t.shape)`` tensor.

        Every rank passes a tensor of the same shape and dtype (typically a 1-D uint8 payload
        whose size every rank knows from parameter shapes), so no length is exchanged. Row ``j``
        of the result is rank ``j``'s tensor; the result lives on ``t.device``.
        """
        ...

    def broadcast(
        self, t: torch.Tensor, src: int = 0, *, async_op: bool = False, tag: str = ""
    ) -> Handle[torch.Tensor] | torch.Tensor: ...

    def broadcast_bytes(
        self, payload: bytes | None, src: int = 0, *, async_op: bool = False, tag: str = ""
    ) -> Handle[bytes] | bytes: ...

    def control_max(self, values: list[float], *, tag: str = "") -> list[float]:
        """Element-wise MAX of a few float64 values across ranks, counted as control bytes.

        Used by the WAN wrapper's virtual clock (``docs/design.md``, "The WAN model") to agree on
        issue times.
        """
        ...

    def barrier(self, timeout: float | None = None) -> None: ...

    def close(self) -> None: ...

    # ------------------------------------------------------------- rounds and membership
    # An optimizer calls these around every sync, so that an engine whose membership changes
    # (hivemind, torchft) can hand state to joiners and discard a round that failed. On an
    # engine with static membership they cost nothing: every round is taken part in and kept.

    #: True when peers may join, leave or fail between rounds without failing the run: a round
    #: that fails raises :class:`CommError` (or :meth:`end_round` returns False) and is
    #: discarded by the optimizer, which goes on with the next one.
    elastic: bool

    def attach_state(self, get_state: StateGetter, set_state: StateSetter) -> None:
        """Register how this worker's global state is read (to serve peers) and replaced.

        Called by the optimizer that uses this communicator when it is built; an elastic engine
        serves ``get_state()`` to peers that join or heal and calls ``set_state`` with a live
        peer's state when this worker is behind. A communicator serves one optimizer's state:
        a later call (an optimizer built again) replaces the earlier functions.
        """
        ...

    def agree_initial_state(self, mode: str = "broadcast", *, tag: str = "") -> None:
        """Make every worker start from the same global state (at the optimizer's construction).

        ``"broadcast"``: every worker takes rank 0's state (as DDP broadcasts rank 0's
        parameters); ``"check"``: compare a digest per tensor and raise ``ValueError`` naming
        the first tensor that differs; ``"off"``: nothing. Bytes go to the ledger under
        ``tag``. Collective: every worker must call this.
        """
        ...

    def begin_round(self, round: int) -> RoundStart:
        """Start sync round ``round`` (the optimizer's count of completed syncs).

        An elastic engine forms the round's group here and, when this worker is behind its
        peers, replaces its state with a live peer's (through the attached ``set_state``)
        before it contributes. Collective: every member calls it once per sync.
        """
        ...

    def after_round(self, round: int) -> None:
        """The optimizer applied (or discarded) its round: its global state now reflects
        ``round`` completed syncs. An elastic engine snapshots the attached state here, so that
        a peer joining during the next round receives a consistent one."""
        ...

    def end_round(self, ok: bool) -> bool:
        """Whether the round may be applied; ``ok`` says whether it completed on this worker.

        Returns ``ok`` on engines whose failures raise; an engine with a commit protocol
        (torchft's ``should_commit``) returns True only if every member of the round completed
        it. False: the optimizer discards the round (θ_g stays, local progress of the round is
        dropped).
        """
        ...
