"""Rounds and the start state on engines with static membership (torch.distributed, in-process).

The :class:`~thinwire.collectives.base.Communicator` round API (``attach_state``,
``agree_initial_state``, ``begin_round``, ``end_round``) lets elastic engines hand state to
joiners and discard failed rounds. With a static group the only part that does anything is the
start-state agreement: DDP broadcasts rank 0's parameters when it is built, and so does
``agree_initial_state("broadcast")`` here; ``"check"`` compares per-tensor digests instead and
names the first tensor that differs. The helpers that flatten a named state and digest it are
shared with the elastic engines.
"""

from __future__ import annotations

import hashlib
import inspect
import struct
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from thinwire._validate import check_choice, check_type
from thinwire.collectives.base import RoundStart, StateGetter, StateSetter

__all__: list[str] = []

INIT_SYNC_MODES = ("broadcast", "check", "off")


def state_digests(state: Mapping[str, torch.Tensor]) -> list[tuple[str, bytes]]:
    """(name, 8-byte BLAKE2b digest of dtype, shape and bytes) per tensor, in ``state`` order.

    Reads every tensor to the host once: this runs when an optimizer is built, never in a step.
    """
    out = []
    for name, t in state.items():
        h = hashlib.blake2b(digest_size=8)
        h.update(str(t.dtype).encode())
        h.update(struct.pack(f"<{t.dim()}q", *t.shape))
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        out.append((name, h.digest()))
    return out


def _flat_by_dtype(state: Mapping[str, torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
    """One contiguous buffer per dtype, tensors concatenated in ``state`` order."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in state.values():
        groups.setdefault(t.dtype, []).append(t.detach().reshape(-1))
    return {dt: torch.cat(ts) for dt, ts in groups.items()}


def _unflatten(state: Mapping[str, torch.Tensor], flat: Mapping[torch.dtype, torch.Tensor]):
    """Tensors of ``state``'s names and shapes cut from the per-dtype buffers ``flat``."""
    offsets = dict.fromkeys(flat, 0)
    out = {}
    for name, t in state.items():
        o, n = offsets[t.dtype], t.numel()
        out[name] = flat[t.dtype][o : o + n].reshape(t.shape).clone()
        offsets[t.dtype] = o + n
    return out


def agree_by_collectives(
    comm: Any, fns: tuple[StateGetter, StateSetter] | None, mode: str, tag: str
) -> None:
    """Broadcast rank 0's state, or check that every rank holds the same one, over ``comm``.

    ``"broadcast"`` sends one buffer per dtype from rank 0 (ledger: ``broadcast`` ops under
    ``tag``) and loads the result through ``set_state`` on every rank, rank 0 included, so every
    rank continues from bitwise the same tensors. ``"check"`` all-gathers an 8-byte digest per
    tensor and raises ``ValueError`` naming the first tensor (in the state's order) whose digest
    differs from rank 0's. ``comm`` is the engine itself or a wrapper of it (the WAN model times
    and counts these ops like any other). Collective: every rank must call this.
    """
    check_choice("mode", mode, INIT_SYNC_MODES)
    check_type("tag", tag, str)
    if mode == "off" or comm.world_size == 1:
        return
    if fns is None:
        raise RuntimeError(
            "agree_initial_state needs attach_state() first (the optimizer calls it), by an "
            "optimizer that is still alive"
        )
    get_state, set_state = fns
    state = get_state()
    if mode == "check":
        _check_same_state(comm, state, tag)
        return
    flat = _flat_by_dtype(state)
    for dt in sorted(flat, key=str):  # the same order on every rank
        comm.broadcast(flat[dt], src=0, tag=tag)
    set_state(_unflatten(state, flat))


def _check_same_state(comm: Any, state: Mapping[str, torch.Tensor], tag: str) -> None:
    mine = state_digests(state)
    rows = comm.all_gather_bytes(b"".join(d for _, d in mine), tag=tag)
    ref = rows[0]
    for j, row in enumerate(rows):
        if row == ref:
            continue
        if row is None or len(row) != len(ref):
            raise ValueError(
                f"init_sync='check': rank {j} holds {0 if row is None else len(row) // 8} "
                f"state tensors, rank 0 holds {len(ref) // 8}; build every worker's model "
                "and optimizer the same way"
            )
        first = next(
            i for i in range(len(mine)) if row[8 * i : 8 * i + 8] != ref[8 * i : 8 * i + 8]
        )
        raise ValueError(
            f"init_sync='check': {mine[first][0]} differs between rank 0 and rank {j}; "
            "start every worker from the same weights (seed the model identically, or load "
            "one checkpoint), or use init_sync='broadcast' to take rank 0's"
        )


def _weak(fn: Callable[..., Any]) -> Callable[[], Callable[..., Any] | None]:
    """A weak reference to a bound method (a plain function is held strongly)."""
    if inspect.ismethod(fn):
        return weakref.WeakMethod(fn)
    return lambda: fn


class AttachedState:
    """Holds the state functions an optimizer attached, weakly.

    The optimizer holds its communicator; if the communicator held the optimizer's bound methods
    strongly, the two would form a cycle that only the garbage collector frees, possibly during
    interpreter shutdown, where destroying a gloo process group still referenced by the
    communicator aborts the process ("terminate called without an active exception").
    """

    _state_refs: tuple[Callable[[], Any], Callable[[], Any]] | None = None

    def attach_state(self, get_state: StateGetter, set_state: StateSetter) -> None:
        """Register the owner's state functions (see the protocol); the latest call wins."""
        if not callable(get_state) or not callable(set_state):
            raise TypeError(
                f"get_state and set_state must be callable, got {get_state!r}, {set_state!r}"
            )
        self._state_refs = (_weak(get_state), _weak(set_state))  # a newer optimizer replaces

    @property
    def _state_fns(self) -> tuple[StateGetter, StateSetter] | None:
        """The attached functions, or None (none attached, or their optimizer is gone)."""
        if self._state_refs is None:
            return None
        get_state, set_state = (ref() for ref in self._state_refs)
        if get_state is None or set_state is None:
            return None
        return get_state, set_state

    def _attached(self, what: str) -> tuple[StateGetter, StateSetter]:
        fns = self._state_fns
        if fns is None:
            raise RuntimeError(
                f"{what} needs attach_state() first (the optimizer calls it), by an optimizer "
                "that is still alive"
            )
        return fns


class StaticRounds(AttachedState):
    """The round API of an engine whose members never change: every round is kept.

    Mixed into the torch.distributed and in-process engines (through their shared engine).
    """

    elastic = False
    rank: int
    world_size: int

    def agree_initial_state(self, mode: str = "broadcast", *, tag: str = "") -> None:
        """See :func:`agree_by_collectives` (this engine's own ops). Collective."""
        agree_by_collectives(self, self._state_fns, mode, tag)

    def begin_round(self, round: int) -> RoundStart:
        """Every member takes part and contributes: the group never changes."""
        return RoundStart()

    def after_round(self, round: int) -> None:
        """Nothing to publish: no peer of a static group ever needs this worker's state."""

    def end_round(self, ok: bool) -> bool:
        """``ok``: a failure on a static group raises instead of returning False."""
        return bool(ok)
