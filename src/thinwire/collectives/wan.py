"""WAN simulation: the clock wrapper :class:`WanCommunicator` plus the model it uses.

The model is described in ``docs/design.md``, "The WAN model". This module re-exports the
configuration, presets and closed-form model from :mod:`thinwire.collectives._wan_model` and adds
:class:`WanCommunicator`, which wraps any :class:`~thinwire.collectives.base.Communicator` and
either advances a per-rank simulated clock (``mode="virtual"``) or withholds each op's completion by
its modelled duration (``mode="sleep"``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from thinwire._validate import check_float, check_int, check_type
from thinwire.collectives._rounds import AttachedState, agree_by_collectives
from thinwire.collectives._wan_model import (
    PRESETS,
    NodeLink,
    Preset,
    WanConfig,
    WanModel,
    halving_doubling_time,
    parameter_server_time,
    ring_rs_or_ag_time,
    suggest_timeout,
)
from thinwire.collectives.base import (
    ByteLedger,
    Communicator,
    Handle,
    PeerInfo,
    StateGetter,
    StateSetter,
)

__all__ = [
    "NodeLink",
    "Preset",
    "PRESETS",
    "WanConfig",
    "WanModel",
    "WanCommunicator",
    "suggest_timeout",
    "ring_rs_or_ag_time",
    "halving_doubling_time",
    "parameter_server_time",
]

logger = logging.getLogger(__name__)

_CLOCK_TAG = "wan/clock"  # tag of the issue-time MAX exchange (control bytes)


@dataclass(eq=False)
class _Entry:
    """One op on this rank's modelled network channel (FIFO)."""

    inner: Handle[Any]
    op_seq: int
    issue: float  # virtual: max issue time over ranks
    outer: Handle[Any] | None = None
    t_done: float | None = None  # virtual: simulated s; sleep: time.perf_counter() deadline
    failed: bool = False
    t_real_done: float | None = None  # sleep mode: when the real op finished
    watcher: threading.Thread | None = None


class WanCommunicator(AttachedState):
    """Any communicator, seen through a simulated WAN (``docs/design.md``, "The WAN model").

    **virtual** (default): nothing sleeps. The rank keeps ``clock`` (simulated seconds). Between
    calls the wrapper adds measured compute time (``time.perf_counter`` since the previous call
    returned) times ``config.compute_slowdown[rank]``, and once per training step (see
    :meth:`mark_step`) the straggler delay. Each op exchanges issue times with a float64 MAX
    (``inner.control_max``, control bytes under tag ``"wan/clock"``), starts at
    ``max(max issue, done time of this rank's previous op)`` and completes at
    ``start + T_model`` (:class:`WanModel`). ``wait()`` sets ``clock = max(clock, t_done)`` and adds
    the part not hidden behind compute to ``exposed_comm_s``, so async ops plus compute model
    overlap (Streaming DiLoCo) without threads.

    **sleep**: the real op runs, then ``wait()`` returns no earlier than
    ``max(t_real_done, previous op's release) + T_model * time_scale`` (the FIFO channel; for
    non-overlapping ops this is ``t_real_done + T_model * time_scale``). ``clock`` is
    wall seconds since construction.

    ``T_model`` is computed as soon as the op's record carries what the model needs (at issue
    on the torch and in-process engines, whose length exchanges block; when the op completes on
    hivemind, which learns its group then) and stored in ``record.t_model_s`` and
    ``handle.t_done_virtual``. A failed op costs 0 s. The straggler delay of a step is added at
    the first op after :meth:`mark_step`. ``barrier()`` moves every clock to the latest one (its
    own latency is not modelled); ``control_max`` is passed through unmodelled. Other
    attributes (``timeout_s``, ...) are read through from ``inner``. The first op whose
    ``suggest_timeout(T_model)`` exceeds ``inner.timeout_s`` logs a warning (``docs/design.md``,
    "Failures and timeouts").

    Args:
        inner: the real communicator (gloo, NCCL, hivemind or in-process).
        config: WAN description; its size (if any) must be >= ``inner.world_size`` (a preset
            without ``world_size`` fits any group; larger groups rebuild the model).
        measure_compute: add measured wall time between calls to the clock; False = only
            :meth:`advance` moves it (deterministic tests and benchmarks with modelled compute).

    Attributes:
        exposed_comm_s: modelled communication time not overlapped by compute (s).
        comm_s: total modelled communication time (s; sleep mode: scaled by ``time_scale``).
        compute_s: compute time added to the clock, slowdown included (s).
        straggler_s: straggler delay added to the clock (s).
    """

    def __init__(
        self, inner: Communicator, config: WanConfig, *, measure_compute: bool = True
    ) -> None:
        self.inner = inner
        self.config = check_type("config", config, WanConfig)
        self.measure_compute = check_type("measure_compute", measure_compute, bool)
        size = config.size()
        if size is not None and size < inner.world_size:
            raise ValueError(
                f"config size must be in [{inner.world_size}, inf) (inner.world_size), got {size}"
            )
        self.model = WanModel(config, size or inner.world_size)
        # hivemind fills P, sizes and shares only when the op completes (group formed then)
        self._late = inner.engine == "hivemind"
        self._slow = config.compute_slowdown.get(inner.rank, 1.0)
        self._virtual = config.mode == "virtual"
        self._lock = threading.RLock()
        self._queue: deque[_Entry] = deque()
        self._op_seq = 0
        self._chan = 0.0 if self._virtual else -float("inf")
        self._clock = 0.0
        self._t0 = time.perf_counter()
        self._last_return = self._t0
        self._step = inner.ledger.step
        self._straggler_pending = True
        self._warned = False
        self.exposed_comm_s = 0.0
        self.comm_s = 0.0
        self.compute_s = 0.0
        self.straggler_s = 0.0
        mm = None
        if inner.engine == "hivemind":
            mm = getattr(inner, "matchmaking_time", getattr(inner, "matchmaking_s", None))
        self._engine_mm = float(mm) if mm is not None else 0.0

    # ---- delegated protocol attributes ---------------------------------------------------
    @property
    def rank(self) -> int:
        """Rank of this process (from ``inner``)."""
        return self.inner.rank

    @property
    def world_size(self) -> int:
        """Number of ranks (from ``inner``)."""
        return self.inner.world_size

    @property
    def engine(self) -> str:
        """Engine name of ``inner``."""
        return self.inner.engine

    @property
    def epoch(self) -> int:
        """Membership epoch of ``inner``."""
        return self.inner.epoch

    @property
    def ledger(self) -> ByteLedger:
        """Byte ledger of ``inner`` (the wrapper adds ``t_model_s`` to its records)."""
        return self.inner.ledger

    @property
    def clock(self) -> float:
        """Simulated seconds (virtual) or wall seconds since construction (sleep)."""
        return self._clock if self._virtual else time.perf_counter() - self._t0

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set during __init__
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ---- rounds: forwarded, except that a static group's start-state agreement runs through
    # this wrapper, so its broadcast is timed and counted like any op.
    def attach_state(self, get_state: StateGetter, set_state: StateSetter) -> None:
        """Kept here (weakly) for the start-state agreement, and given to ``inner``."""
        super().attach_state(get_state, set_state)
        self.inner.attach_state(get_state, set_state)

    def agree_initial_state(self, mode: str = "broadcast", *, tag: str = "") -> None:
        """An elastic engine's own protocol; on a static group, the collectives through this
        wrapper (:func:`~thinwire.collectives._rounds.agree_by_collectives`)."""
        if self.inner.elastic:
            self.inner.agree_initial_state(mode, tag=tag)
            return
        agree_by_collectives(self, self._state_fns, mode, tag)

    def peers(self) -> list[PeerInfo]:
        """Peers of ``inner``."""
        return self.inner.peers()

    # ---- compute accounting --------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Add ``seconds`` of modelled compute (times this rank's ``compute_slowdown``).

        Virtual mode moves the clock; sleep mode sleeps ``seconds * slowdown * time_scale``.
        """
        s = check_float("seconds", seconds, 0) * self._slow
        if self._virtual:
            self._clock += s
        else:
            t0 = time.perf_counter()
            time.sleep(s * self.config.time_scale)
            self._last_return += time.perf_counter() - t0  # already counted, not measured again
        self.compute_s += s

    def mark_step(self, step: int) -> None:
        """Start training step ``step``: stamps later ledger records and draws its straggler delay."""
        self._step = check_int("step", step, 0)
        self.inner.ledger.mark_step(step)
        self._straggler_pending = True

    def _begin(self) -> None:
        """Account compute since the last return, and a pending straggler delay."""
        now = time.perf_counter()
        dt = now - self._last_return if self.measure_compute else 0.0
        extra = 0.0
        if self._straggler_pending:
            self._straggler_pending = False
            extra = self.model.straggler_delay(self._step, self.inner.rank)
            self.straggler_s += extra
        if self._virtual:
            self._clock += dt * self._slow + extra
            self.compute_s += dt * self._slow
        else:  # slow ranks and stragglers really wait
            pause = max(0.0, dt * (self._slow - 1.0)) + extra * self.config.time_scale
            if pause > 0:
                time.sleep(pause)
            self.compute_s += dt + pause

    def _end(self) -> None:
        self._last_return = time.perf_counter()

    # ---- channel -------------------------------------------------------------------------
    def _resolve(self, e: _Entry) -> None:
        rec = e.inner.record
        if rec.P > self.model.world_size and self.config.size() is None:
            self.model = WanModel(self.config, rec.P)  # a preset fits any group size
        if e.failed:
            t = 0.0  # the op raised; its error reaches the caller through wait()
        else:
            t = self.model.op_time(rec, e.op_seq, matchmaking_s=self._engine_mm)
        rec.t_model_s = t
        if self._virtual:
            e.t_done = max(e.issue, self._chan) + t
            self.comm_s += t
        else:
            e.t_done = max(e.t_real_done, self._chan) + t * self.config.time_scale  # type: ignore[type-var]
            self.comm_s += t * self.config.time_scale
        self._chan = e.t_done
        if e.outer is not None and self._virtual:
            e.outer.t_done_virtual = e.t_done
        limit = getattr(self.inner, "timeout_s", None)
        if not self._warned and limit is not None and suggest_timeout(t) > limit:
            self._warned = True
            need = suggest_timeout(t)
            logger.warning(
                "op %s/%s is modelled at %.1f s; a real WAN link like this needs timeout_s >= "
                "%.2f s (3 x op time + 30 s), the communicator has %.2f s",
                rec.op, rec.algorithm, t, need, limit,
            )  # fmt: skip

    def _ready(self, e: _Entry) -> bool:
        if self._virtual:
            return not self._late and self.model.is_complete(e.inner.record)
        return e.t_real_done is not None

    def _drain(self, upto: _Entry | None = None, timeout: float | None = None) -> None:
        """Resolve queued ops in issue order; without ``upto`` stop at the first one not ready."""
        with self._lock:
            while self._queue:
                e = self._queue[0]
                if not self._ready(e):
                    if upto is None:
                        return
                    if e.watcher is not None:
                        e.watcher.join()
                    else:  # sizes become known when the (collective) op completes
                        try:
                            e.inner.wait(timeout)
                        except BaseException:  # kept in the inner handle, raised by its wait()
                            e.failed = True
                self._queue.popleft()
                self._resolve(e)
                if e is upto:
                    return

    # ---- ops -----------------------------------------------------------------------------
    def _run(self, issue: Callable[[], Handle[Any]], async_op: bool) -> Any:
        self._begin()
        try:
            t_issue = 0.0
            if self._virtual:
                t_issue = float(self.inner.control_max([self._clock], tag=_CLOCK_TAG)[0])
            inner = issue()
        finally:
            self._end()
        e = _Entry(inner, self._op_seq, t_issue)
        self._op_seq += 1
        if not self._virtual:
            e.watcher = threading.Thread(target=self._watch, args=(e,), daemon=True)
            e.watcher.start()
        outer: Handle[Any] = Handle(
            inner.record,
            lambda timeout: self._wait(e, timeout),
            lambda: self._done(e),
            group=inner.group,
            missing=inner.missing,
        )
        e.outer = outer
        with self._lock:
            self._queue.append(e)
            self._drain()
        return outer if async_op else outer.wait()

    @staticmethod
    def _watch(e: _Entry) -> None:
        try:
            e.inner.wait()
        except BaseException:  # kept in the inner handle, raised by its wait()
            e.failed = True
        e.t_real_done = time.perf_counter()

    def _done(self, e: _Entry) -> bool:
        if self._virtual:
            return e.inner.done()
        self._drain()
        return e.t_done is not None and time.perf_counter() >= e.t_done

    def _wait(self, e: _Entry, timeout: float | None) -> Any:
        self._begin()
        entered = time.perf_counter()
        try:
            try:
                value = e.inner.wait(timeout)
            except BaseException:
                e.failed = True
                self._drain(upto=e, timeout=timeout)
                raise
            self._drain(upto=e, timeout=timeout)
            if e.outer is not None:  # hivemind learns the group only when the op completes
                e.outer.group, e.outer.missing = e.inner.group, e.inner.missing
            if self._virtual:
                before = self._clock
                self._clock = max(before, e.t_done)  # type: ignore[type-var]
                self.exposed_comm_s += max(0.0, e.t_done - before)  # type: ignore[operator]
            else:
                rest = e.t_done - time.perf_counter()  # type: ignore[operator]
                if rest > 0:
                    time.sleep(rest)
                self.exposed_comm_s += time.perf_counter() - entered
            return value
        finally:
            self._end()

    def all_reduce(
        self,
        t: torch.Tensor,
        op: str = "mean",
        *,
        async_op: bool = False,
        tag: str = "",
    ) -> Handle[torch.Tensor] | torch.Tensor:
        """``inner.all_reduce`` with modelled timing (same arguments and result)."""
        return self._run(lambda: self.inner.all_reduce(t, op, async_op=True, tag=tag), async_op)

    def all_gather_bytes(
        self,
        payload: bytes | memoryview | torch.Tensor,
        *,
        algorithm: str = "auto",
        async_op: bool = False,
        tag: str = "",
    ) -> Handle[list[bytes | None]] | list[bytes | None]:
        """``inner.all_gather_bytes`` with modelled timing."""
        return self._run(
            lambda: self.inner.all_gather_bytes(
                payload, algorithm=algorithm, async_op=True, tag=tag
            ),
            async_op,
        )

    def all_gather_into_tensor(
        self, t: torch.Tensor, *, async_op: bool = False, tag: str = ""
    ) -> Handle[torch.Tensor] | torch.Tensor:
        """``inner.all_gather_into_tensor`` with modelled timing."""
        return self._run(
            lambda: self.inner.all_gather_into_tensor(t, async_op=True, tag=tag), async_op
        )

    def broadcast(
        self, t: torch.Tensor, src: int = 0, *, async_op: bool = False, tag: str = ""
    ) -> Handle[torch.Tensor] | torch.Tensor:
        """``inner.broadcast`` with modelled timing."""
        return self._run(lambda: self.inner.broadcast(t, src, async_op=True, tag=tag), async_op)

    def broadcast_bytes(
        self, payload: bytes | None, src: int = 0, *, async_op: bool = False, tag: str = ""
    ) -> Handle[bytes] | bytes:
        """``inner.broadcast_bytes`` with modelled timing."""
        return self._run(
            lambda: self.inner.broadcast_bytes(payload, src, async_op=True, tag=tag), async_op
        )

    def control_max(self, values: list[float], *, tag: str = "") -> list[float]:
        """``inner.control_max`` (control traffic is not modelled)."""
        return self.inner.control_max(values, tag=tag)

    def barrier(self, timeout: float | None = None) -> None:
        """``inner.barrier``; in virtual mode every clock then jumps to the latest one.

        The barrier's own latency is not modelled.
        """
        self._begin()
        try:
            self.inner.barrier(timeout)
            if self._virtual:
                self._clock = float(self.inner.control_max([self._clock], tag=_CLOCK_TAG)[0])
        finally:
            self._end()

    def close(self) -> None:
        """Close ``inner``."""
        self.inner.close()
