"""In-process communicator: ``P`` thread-backed ranks sharing one rendezvous object.

This is **not a network engine**: no byte leaves the process. It runs the same algorithms as the
``torch.distributed`` engine (``ring`` dense all-reduce, ``ring``/``direct``/``auto`` byte
all-gather, ``ring`` equal-size tensor all-gather, ``binomial`` broadcast) and fills the ledger with
the same formulas (:mod:`thinwire.collectives.accounting`), so unit tests and
``thinwire bench --engine inproc`` see the bytes a real run would count. Each rank's ops must be
called from its own thread.

Every primitive an op issues gets a slot keyed by a per-rank sequence number. Ranks deposit
their contribution; the last one to arrive combines all contributions in rank order (float32
accumulation for half-precision input, float64 for float64) and wakes the others, so every rank
gets a bitwise-identical result. A rank whose partners do not arrive within ``timeout_s`` raises
:class:`CommTimeout`; one waiting on a rank that has closed raises :class:`PeerLost`. Sizes are
exact: a rank that sends more or fewer bytes than it announced makes the op raise
:class:`CommError` (all-gather rows of different sizes, or a point-to-point message of another
length), so nothing a rank did not send is ever returned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from thinwire._validate import check_float, check_int, check_type
from thinwire.collectives._engine import _CollectiveEngine, _Pending
from thinwire.collectives.base import CommError, CommTimeout, OrderMismatch, PeerLost

__all__ = ["InprocCommunicator"]

Combine = Callable[[list[Any]], list[Any]]


class _Slot:
    def __init__(self, kind: str, P: int) -> None:
        self.kind = kind
        self.contribs: list[Any] = [None] * P
        self.arrived = [False] * P
        self.results: list[Any] | None = None
        self.error: tuple[type[CommError], str] | None = None
        self.taken = 0


class _Rendezvous:
    """State shared by the ranks of one :meth:`InprocCommunicator.group`."""

    def __init__(self, P: int) -> None:
        self.P = P
        self.cond = threading.Condition()
        self.slots: dict[int, _Slot] = {}
        self.closed: set[int] = set()


class _InprocPending(_Pending):
    def __init__(
        self, rdzv: _Rendezvous, seq: int, rank: int, finish: Callable[[Any], Any]
    ) -> None:
        self._rdzv, self._seq, self._rank, self._finish = rdzv, seq, rank, finish
        self._taken = False
        self._value: Any = None

    def _slot(self) -> _Slot:
        return self._rdzv.slots[self._seq]

    def done(self) -> bool:
        if self._taken:
            return True
        with self._rdzv.cond:
            slot = self._slot()
            return slot.results is not None or slot.error is not None

    def wait(self, timeout: float) -> Any:
        if self._taken:
            return self._value
        rdzv = self._rdzv
        deadline = time.monotonic() + timeout
        with rdzv.cond:
            while True:
                slot = self._slot()
                if slot.error is not None:
                    cls, msg = slot.error
                    raise cls(msg)
                if slot.results is not None:
                    result = slot.results[self._rank]
                    slot.taken += 1
                    if slot.taken == rdzv.P:
                        del rdzv.slots[self._seq]
                    break
                missing = [j for j in range(rdzv.P) if not slot.arrived[j]]
                lost = [j for j in missing if j in rdzv.closed]
                if lost:
                    raise PeerLost(
                        f"inproc {slot.kind} #{self._seq}: rank(s) {lost} closed before joining"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommTimeout(
                        f"inproc {slot.kind} #{self._seq} on rank {self._rank}: rank(s) "
                        f"{missing} did not arrive within {timeout:g} s"
                    )
                rdzv.cond.wait(left)
        self._value = self._finish(result)
        self._taken = True
        return self._value


def _sum_in_rank_order(contribs: list[torch.Tensor], op: str) -> torch.Tensor:
    acc = contribs[0].clone()
    for c in contribs[1:]:
        if op == "sum":
            acc.add_(c)
        else:
            torch.maximum(acc, c, out=acc)
    return acc


class InprocCommunicator(_CollectiveEngine):
    """One rank of an in-process group; build the group with :meth:`group`, never directly.

    Not a network engine: use it for tests and the ``--engine inproc`` benchmark mode only.
    ``engine == "inproc"``. Semantics, algorithms and ledger match
    :class:`~thinwire.collectives.torch_dist.TorchDistCommunicator`.
    """

    def __init__(
        self, rdzv: _Rendezvous, rank: int, *, timeout_s: float, debug_checks: bool
    ) -> None:
        self._setup(rank, rdzv.P, "inproc", timeout_s, debug_checks)
        self._rdzv = rdzv
        self._prim_seq = 0
        self._device = torch.device("cpu")

    @classmethod
    def group(
        cls, P: int, *, timeout_s: float = 60.0, debug_checks: bool = False
    ) -> list[InprocCommunicator]:
        """Create ``P`` connected ranks; hand ``comms[r]`` to the thread that plays rank ``r``.

        Args:
            P: number of ranks, ``>= 1``.
            timeout_s: seconds a rank waits for its partners before :class:`CommTimeout`
                (default 60).
            debug_checks: exchange op signatures before each op and raise
                :class:`OrderMismatch` on divergence (counted as control bytes).
        """
        check_int("P", P, 1)
        check_float("timeout_s", timeout_s, 0.0, lo_open=True)
        check_type("debug_checks", debug_checks, bool)
        rdzv = _Rendezvous(P)
        return [cls(rdzv, r, timeout_s=timeout_s, debug_checks=debug_checks) for r in range(P)]

    # ------------------------------------------------------------------------------- transport
    def _post(
        self, kind: str, contrib: Any, combine: Combine, finish: Callable[[Any], Any]
    ) -> _Pending:
        seq = self._prim_seq
        self._prim_seq += 1
        rdzv = self._rdzv
        with rdzv.cond:
            slot = rdzv.slots.setdefault(seq, _Slot(kind, rdzv.P))
            if slot.kind != kind and slot.error is None:
                slot.error = (
                    OrderMismatch,
                    f"inproc primitive #{seq}: rank {self.rank} issued {kind} while another rank "
                    f"issued {slot.kind}; every rank must issue collectives in the same order",
                )
            slot.contribs[self.rank] = contrib
            slot.arrived[self.rank] = True
            if all(slot.arrived) and slot.error is None:
                try:
                    slot.results = combine(slot.contribs)
                except Exception as exc:  # surfaced on every rank through wait()
                    slot.error = (CommError, f"inproc {kind} #{seq}: {type(exc).__name__}: {exc}")
            rdzv.cond.notify_all()
        return _InprocPending(rdzv, seq, self.rank, finish)

    def _prim_allreduce(self, buf: torch.Tensor, op: str) -> _Pending:
        P = self.world_size

        def combine(cs: list[torch.Tensor]) -> list[torch.Tensor]:
            if len({(c.shape, c.dtype) for c in cs}) != 1:
                raise ValueError(
                    f"ranks passed different shapes/dtypes: {[(c.shape, c.dtype) for c in cs]}"
                )
            return [_sum_in_rank_order(cs, op)] * P

        return self._post(f"allreduce-{op}", buf.clone(), combine, lambda res: buf.copy_(res))

    def _prim_allgather(self, buf: torch.Tensor) -> _Pending:
        P = self.world_size

        def combine(cs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
            if len({c.shape for c in cs}) != 1:
                raise ValueError(f"ranks passed different shapes: {[c.shape for c in cs]}")
            return [cs] * P

        return self._post("allgather", buf.clone(), combine, lambda res: res)

    def _prim_alltoall(self, rows: torch.Tensor) -> _Pending:
        P = self.world_size

        def combine(cs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.stack([cs[j][r] for j in range(P)]) for r in range(P)]

        return self._post("alltoall", rows.clone(), combine, lambda res: res)

    def _prim_exchange(
        self, sends: dict[int, torch.Tensor], recv_sizes: dict[int, int], tag: int
    ) -> _Pending:
        P = self.world_size
        contrib = {j: b.clone() for j, b in sends.items()}

        def combine(cs: list[dict[int, torch.Tensor]]) -> list[dict[int, torch.Tensor]]:
            return [{j: cs[j][r] for j in range(P) if r in cs[j]} for r in range(P)]

        def finish(got: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            for j, n in recv_sizes.items():  # exact sizes: nothing a peer did not send
                sent = got[j].numel() if j in got else 0
                if sent != n:
                    raise CommError(
                        f"inproc exchange on rank {self.rank}: rank {j} announced {n} bytes "
                        f"and sent {sent}"
                    )
            return got

        return self._post("exchange", contrib, combine, finish)

    def _prim_broadcast(self, buf: torch.Tensor, src: int) -> _Pending:
        P = self.world_size

        def combine(cs: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
            if len({s for s, _ in cs}) != 1:
                raise ValueError(f"ranks passed different src: {[s for s, _ in cs]}")
            return [cs[src][1]] * P

        def finish(res: torch.Tensor) -> torch.Tensor:
            if self.rank != src:
                buf.copy_(res)
            return buf

        contrib = (src, buf.clone() if self.rank == src else buf[:0])
        return self._post("broadcast", contrib, combine, finish)

    def _prim_barrier(self) -> _Pending:
        return self._post("barrier", None, lambda cs: [None] * self.world_size, lambda res: None)

    def close(self) -> None:
        """Leave the group; ranks waiting on this one raise :class:`PeerLost`. Idempotent."""
        self.closed = True
        with self._rdzv.cond:
            self._rdzv.closed.add(self.rank)
            self._rdzv.cond.notify_all()
