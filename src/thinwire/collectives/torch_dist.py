"""Communicator over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

:class:`TorchDistCommunicator` wraps an initialised process group, or creates one from
torchrun's environment (``env://``) or any ``init_method`` and then owns it. The algorithms and
ledger live in :mod:`thinwire.collectives._engine`; this file maps its primitives onto
``dist.all_reduce`` (SUM or MAX; ``ReduceOp.AVG`` is never used, as torchft's Manager does SUM
then divides), ``dist.all_gather``, ``dist.all_to_all_single``, ``dist.isend``/``dist.irecv``
(tag = the op's sequence number) and ``dist.broadcast``. Every primitive is issued with
``async_op=True`` and waited with a timeout, so a dead or silent peer surfaces as
:class:`CommError` instead of a hang.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import struct
import time
import weakref
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from thinwire._validate import check_choice, check_float, check_int, check_type
from thinwire.collectives._engine import _CollectiveEngine, _Pending

__all__ = ["TorchDistCommunicator"]

logger = logging.getLogger(__name__)

# Every live communicator, so that interpreter exit can release their groups first (below).
_LIVE: weakref.WeakSet[TorchDistCommunicator] = weakref.WeakSet()
_EXIT_HOOK = False


def _release_at_exit() -> None:
    """``atexit``: close every communicator still alive, then collect garbage.

    A gloo group (or its work) freed during interpreter shutdown aborts the process ("terminate
    called without an active exception"); a communicator held by an optimizer in a reference
    cycle would otherwise keep its group until then, even after the caller destroyed it with
    ``dist.destroy_process_group()``. ``atexit`` runs while the interpreter is whole.
    """
    for comm in list(_LIVE):
        comm.close()
    gc.collect()


class _WorkPending(_Pending):
    """Work objects of one primitive plus the function that reads its result."""

    def __init__(self, works: list[Any], result: Callable[[], Any]) -> None:
        self._works = works
        self._result = result

    def done(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def wait(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        for w in self._works:
            left = max(deadline - time.monotonic(), 0.001)
            w.wait(datetime.timedelta(seconds=left))
        return self._result()


class TorchDistCommunicator(_CollectiveEngine):
    """thinwire's communicator over a ``torch.distributed`` process group.

    Collective ops follow torch.distributed's contract: every rank calls each op in the same
    order with the same ``tag`` (``debug_checks=True`` verifies it with a 16-byte signature per
    op, counted as control bytes). Dense all-reduce issues SUM and divides locally for ``mean``;
    fp16/bf16 tensors are summed in a float32 copy and cast back (they travel, and are counted,
    as 4 bytes per element). ``P == 1`` ops are local and move no bytes.

    Failure semantics (``docs/design.md``, "Failures and timeouts"): any transport error or timeout
    is raised as :class:`CommTimeout`, :class:`PeerLost` or :class:`CommError`; the communicator
    then stays ``failed`` and every later call raises that error at once; a ``Handle.wait(timeout)``
    that expires counts as such an error, because the group's state is then unknown. Recover by
    restarting the job (torchrun ``--max-restarts``) and resuming from a checkpoint.

    Ordering: phases before an op's last one (length exchanges) block at issue, and only the
    last phase runs asynchronously, so the process group sees ops in issue order whatever order
    handles are waited in.

    Untrusted peers (``all_gather_bytes``): announced lengths above ``max_bytes`` (default
    1 GiB) raise :class:`CommError` before anything of that size is allocated. gloo accepts a
    message shorter than the buffer posted for it. Point-to-point receives (``direct``) land in
    zeroed buffers, so a short sender's entry is its bytes then zeros up to the length it
    announced. gloo's all-gather (``ring``) copies every row out of an internal, uninitialised
    buffer, so a short row would come back padded with stale bytes of this process (earlier
    collectives' data); each ring row therefore ends with an 8-byte end mark (counted as control
    bytes), and a row that arrives without it raises :class:`CommError`. A peer that sends *more*
    bytes than announced makes gloo abort the receiving process (``EnforceNotMet`` in its
    transport thread), which no Python code can catch: gloo trusts its peers that far.

    Args:
        process_group: group to use; default the initialised default group, or a new one.
        backend: ``"gloo"`` or ``"nccl"``; used only when this object creates the group
            (default ``"gloo"``). ``engine`` reports the group's actual backend.
        timeout_s: seconds any op may take before :class:`CommTimeout` (default 300; also the
            timeout of a group created here). Over a slow WAN raise it: see
            :func:`thinwire.collectives.suggest_timeout`.
        init_method: rendezvous URL for a group created here (default ``"env://"``, which reads
            torchrun's ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``).
        rank: this process's rank for a group created here (default: from the environment).
        world_size: group size for a group created here (default: from the environment).
        debug_checks: exchange op signatures and raise :class:`OrderMismatch` on divergence.

    Example::

        dist.init_process_group("gloo")  # under torchrun
        comm = TorchDistCommunicator()
        comm.all_reduce(grad, "mean")
    """

    # gloo's all-gather can return a row its sender did not fully send: mark ring rows.
    _RING_END_MARK = 8

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        backend: str = "gloo",
        timeout_s: float = 300.0,
        init_method: str = "env://",
        rank: int | None = None,
        world_size: int | None = None,
        debug_checks: bool = False,
    ) -> None:
        check_choice("backend", backend, ("gloo", "nccl"))
        check_float("timeout_s", timeout_s, 0.0, lo_open=True)
        check_type("init_method", init_method, str)
        if rank is not None:
            check_int("rank", rank, 0)
        if world_size is not None:
            check_int("world_size", world_size, 1)
        self._owns_group = False
        if process_group is None and not dist.is_initialized():
            dist.init_process_group(
                backend,
                init_method=init_method,
                timeout=datetime.timedelta(seconds=timeout_s),
                rank=-1 if rank is None else rank,
                world_size=-1 if world_size is None else world_size,
            )
            self._owns_group = True
        self._pg = process_group if process_group is not None else dist.group.WORLD
        engine = str(dist.get_backend(self._pg))
        self._setup(
            dist.get_rank(self._pg), dist.get_world_size(self._pg), engine, timeout_s, debug_checks
        )
        if engine == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())
        else:
            self._device = torch.device("cpu")
        self._global = [dist.get_global_rank(self._pg, r) for r in range(self.world_size)]
        self._mark_salt = zlib.crc32(struct.pack(f"<{self.world_size}q", *self._global))
        global _EXIT_HOOK
        _LIVE.add(self)
        if not _EXIT_HOOK:
            atexit.register(_release_at_exit)
            _EXIT_HOOK = True
        logger.debug(
            "TorchDistCommunicator rank %d/%d on %s (owns group: %s)",
            self.rank,
            self.world_size,
            engine,
            self._owns_group,
        )

    # ------------------------------------------------------------------------------- transport
    def _prim_allreduce(self, buf: torch.Tensor, op: str) -> _Pending:
        red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        work = dist.all_reduce(buf, op=red, group=self._pg, async_op=True)
        return _WorkPending([work], lambda: buf)

    def _prim_allgather(self, buf: torch.Tensor) -> _Pending:
        outs = [torch.empty_like(buf) for _ in range(self.world_size)]
        work = dist.all_gather(outs, buf, group=self._pg, async_op=True)
        return _WorkPending([work], lambda: outs)

    def _prim_alltoall(self, rows: torch.Tensor) -> _Pending:
        out = torch.zeros_like(rows)  # written in place: a short message leaves zeros
        work = dist.all_to_all_single(out, rows, group=self._pg, async_op=True)
        return _WorkPending([work], lambda: out)

    def _prim_exchange(
        self, sends: dict[int, torch.Tensor], recv_sizes: dict[int, int], tag: int
    ) -> _Pending:
        # gloo matches point-to-point messages by (peer, tag); the op sequence number keeps
        # messages of different ops apart. Zero-length payloads are never sent: both sides know
        # the lengths from the exchange that precedes this phase. gloo accepts a message shorter
        # than the buffer and writes it in place, so the buffers start zeroed: bytes a peer did
        # not send are zeros, never memory of this process.
        tag = tag % 2**31
        works: list[Any] = []
        got = {
            j: torch.zeros(n, dtype=torch.uint8, device=self._device) for j, n in recv_sizes.items()
        }
        for j, buf in got.items():
            works.append(dist.irecv(buf, self._global[j], group=self._pg, tag=tag))
        for j, buf in sends.items():
            works.append(dist.isend(buf, self._global[j], group=self._pg, tag=tag))
        return _WorkPending(works, lambda: got)

    def _prim_broadcast(self, buf: torch.Tensor, src: int) -> _Pending:
        work = dist.broadcast(buf, self._global[src], group=self._pg, async_op=True)
        return _WorkPending([work], lambda: buf)

    def _prim_barrier(self) -> _Pending:
        work = dist.barrier(group=self._pg, async_op=True)
        return _WorkPending([work], lambda: None)

    def close(self) -> None:
        """Stop using the group; destroy it if this object created it. Idempotent.

        Interpreter exit closes every communicator still open (after the caller's own
        ``dist.destroy_process_group()`` too: the communicator then only drops its reference).
        """
        if self.closed:
            return
        self.closed = True
        # Free unreachable objects that may still hold this group's work (handles in reference
        # cycles) while the group is alive: freed after it, during interpreter shutdown, gloo
        # aborts the process ("terminate called without an active exception").
        gc.collect()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        # Drop this object's reference too: a gloo group destroyed only during interpreter
        # shutdown aborts the process (its worker threads outlive the interpreter state).
        self._pg = None
