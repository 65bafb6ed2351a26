"""Elastic rounds of the hivemind engine: peers that join late or fall behind adopt a live peer's state.

hivemind's own ``Optimizer`` has a peer that joins late call ``load_state_from_peers`` and download
the current parameters and optimizer state from a live peer (``hivemind/averaging/averager.py``,
``rpc_download_state``). This module does the same for thinwire's optimizers, through the
``Communicator`` round API (``attach_state``, ``agree_initial_state``, ``begin_round``,
``after_round``, ``end_round``):

* After every round (``after_round``) a peer snapshots the optimizer's global state (θ_g, the
  outer optimizer's tensors, step counters), and announces in its signed membership record how
  many rounds that state reflects and an 8-byte digest of it.
* The **canonical** state is the one of the live peer with the most rounds, then the earliest
  ``since`` (the longest-running peer), then the smallest peer id: every peer that reads the
  same table picks the same one.
* At ``begin_round(r)`` a peer that is behind the canonical peer (it missed a round, or it just
  joined) or at the same round with another digest (a butterfly that lost a member returns a
  partial average, which differs between peers) downloads the canonical state, loads it and
  skips round ``r``: it trains from the adopted θ_g and contributes from the next round on.
* ``agree_initial_state`` at construction: peers that start together wait until the expected
  group is live, then all adopt the canonical peer's start state (the longest-running peer's),
  as DDP broadcasts rank 0's; a peer that joins a running swarm adopts the current state.

A state transfer is a P2P stream (handler ``thinwire.state.<run_id>``) of ``torch.save`` bytes:
the length header, then chunks of at most 2^19 bytes. The receiver caps the size at twice its own
serialized state plus 64 KiB before fetching, loads with ``torch.load(weights_only=True)`` (no
code runs), and the optimizer's ``set_state`` checks every name, shape, dtype and value before it
changes anything; a peer whose state is refused is skipped for the next candidate.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from thinwire._validate import check_choice, check_type
from thinwire.collectives._hivemind_fetch import CHUNK_BYTES, pull_payload
from thinwire.collectives._rounds import INIT_SYNC_MODES, AttachedState, state_digests
from thinwire.collectives.accounting import LENGTH_HEADER_BYTES
from thinwire.collectives.base import (
    STEP_COUNTERS,
    ByteLedger,
    CommError,
    OpRecord,
    RoundStart,
    StateGetter,
    StateSetter,
)

__all__: list[str] = []

logger = logging.getLogger(__name__)

_STATE_SLACK = 64 * 1024  # bytes a donor's serialized state may exceed twice ours by


def digest_of(state: Mapping[str, torch.Tensor]) -> str:
    """16 hex digits identifying a state: names, dtypes, shapes and bytes of every tensor but
    the step counters (read at different steps by peers at the same round)."""
    h = hashlib.blake2b(digest_size=8)
    model = {k: v for k, v in state.items() if k != STEP_COUNTERS}
    for name, d in sorted(state_digests(model)):
        h.update(name.encode())
        h.update(d)
    return h.hexdigest()


class StateBox:
    """The latest snapshot of the attached state; serialized once, on the first request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.round = -1
        self.digest = ""
        self._tensors: dict[str, torch.Tensor] | None = None
        self._data: bytes | None = None

    def put(self, round: int, tensors: dict[str, torch.Tensor]) -> None:
        digest = digest_of(tensors)
        with self._lock:
            self.round, self.digest, self._tensors, self._data = round, digest, tensors, None

    def payload(self) -> bytes | None:
        """``torch.save`` bytes of the snapshot (None before the first one)."""
        with self._lock:
            if self._tensors is None:
                return None
            if self._data is None:
                buf = io.BytesIO()
                torch.save(self._tensors, buf)
                self._data = buf.getvalue()
            return self._data


def decode_state(data: bytes) -> dict[str, torch.Tensor]:
    """A received state: ``torch.load`` restricted to tensors and plain containers.

    Raises:
        ValueError: not a mapping of names to tensors, or not loadable at all.
    """
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or hostile bytes: refused, never executed
        raise ValueError(f"state bytes do not load: {exc}") from exc
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError("a state must map names to tensors")
    return obj


class HivemindRounds(AttachedState):
    """The round API of :class:`~thinwire.collectives.HivemindCommunicator` (a mixin).

    Uses the engine's membership table (``_live_members``, which fills ``_member_info`` with
    each live peer's ``(round, since, digest)``), its heartbeat and its P2P loop.
    """

    elastic = True
    run_id: str
    peer_id: str
    _o: dict[str, Any]
    _p2p: Any
    _member_info: dict[str, tuple[int, float, str]]
    ledger: ByteLedger
    engine: str
    _round: int | None = None  # the round id ops use while a round is open
    _state_tag = "state"  # ledger tag of state transfers after the start ("<method>/state")

    # engine methods (HivemindCommunicator defines them)
    _live_members: Callable[[], dict[str, str]]
    _heartbeat_once: Callable[[], None]
    _on_loop: Callable[[Any, float], Any]
    _solo: Callable[[], bool]

    @property
    def _state_name(self) -> str:
        return f"thinwire.state.{self.run_id}"

    # ---- the protocol ---------------------------------------------------------------------
    def attach_state(self, get_state: StateGetter, set_state: StateSetter) -> None:
        """Register the optimizer's state functions and start serving its snapshots."""
        if not callable(get_state) or not callable(set_state):
            raise TypeError(
                f"get_state and set_state must be callable, got {get_state!r}, {set_state!r}"
            )
        first = self._state_refs is None
        super().attach_state(get_state, set_state)
        if first and not self._o["client_mode"]:
            from hivemind.proto import runtime_pb2

            self._on_loop(
                self._p2p.add_protobuf_handler(
                    self._state_name, self._serve_state, runtime_pb2.ExpertRequest,
                    stream_output=True,
                ),
                10.0,
            )  # fmt: skip

    def agree_initial_state(self, mode: str = "broadcast", *, tag: str = "") -> None:
        """Serve this peer's start state; then (``"broadcast"``) adopt the canonical peer's, or
        (``"check"``) compare with it and raise ``ValueError`` naming the first tensor that
        differs. A peer joining a running swarm adopts (or is checked against) the current state.

        Peers starting together first wait until ``expected_world_size`` of them serve a state
        (at most ``round_wait_timeout``), or one heartbeat when no size is expected.
        """
        check_choice("mode", mode, INIT_SYNC_MODES)
        check_type("tag", tag, str)
        if tag:
            self._state_tag = f"{tag.rsplit('/', 1)[0]}/state"
        self._publish(0)
        if mode == "off" or self._solo():
            return
        self._settle()
        best = self._canonical()
        if best is None or best == self.peer_id:
            return
        if mode == "broadcast":
            if self._adopt([best] + self._same_as(best), tag or self._state_tag) is None:
                raise CommError(
                    f"init_sync='broadcast': no live peer delivered a start state "
                    f"(canonical peer {best})"
                )
            return
        data = self._pull_state(best, self._state_cap(), tag or self._state_tag)
        if data is None:
            raise CommError(f"init_sync='check': could not fetch the state of peer {best}")
        theirs = decode_state(data)
        mine = self._snapshot()
        mine_d, theirs_d = dict(state_digests(mine)), dict(state_digests(theirs))
        for name in mine:
            if mine_d[name] != theirs_d.get(name):
                raise ValueError(
                    f"init_sync='check': {name} differs between peer {best} and this peer "
                    f"{self.peer_id}; start every peer from the same weights, or use "
                    "init_sync='broadcast'"
                )

    def begin_round(self, round: int) -> RoundStart:
        """Open round ``round``, or adopt the canonical state first if this peer is behind.

        Returns ``RoundStart(take_part=False, healed=True)`` when the state was replaced (the
        optimizer skips this round), ``take_part=False, healed=False`` when this peer is behind
        but no peer delivered a state it accepts (it retries at the next round).
        """
        self._round = None
        if self._state_fns is not None and self._box.round != round:
            # The state changed outside a round (a checkpoint loaded, say): announce it as is.
            self._publish(round)
        if self._state_fns is not None and not self._solo():
            best = self._canonical()
            if best is not None and best != self.peer_id:
                r, _, digest = self._member_info[best]
                if r > round or (r == round and digest != self._box.digest):
                    why = "behind" if r > round else "diverged"
                    got = self._adopt([best] + self._same_as(best), self._state_tag)
                    if got is not None:
                        logger.info("round %d: %s peer %s; adopted its state of round %d",
                                    round, why, best, got)  # fmt: skip
                        return RoundStart(take_part=False, contribute=False, healed=True)
                    logger.warning("round %d: %s peer %s, but no peer delivered a state this "
                                   "optimizer accepts; skipping the round", round, why, best)  # fmt: skip
                    return RoundStart(take_part=False, contribute=False)
        self._round = round
        return RoundStart()

    def end_round(self, ok: bool) -> bool:
        """``ok``: a failed hivemind round raises in its op; the optimizer discards it."""
        self._round = None
        return bool(ok)

    def after_round(self, round: int) -> None:
        """Snapshot the state after ``round`` completed rounds and announce it."""
        self._round = None
        if self._state_fns is not None:
            self._publish(round)

    # ---- internals ------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, torch.Tensor]:
        get_state, _ = self._attached("the round API")
        return {k: v.detach().to("cpu", copy=True) for k, v in get_state().items()}

    def _publish(self, round: int) -> None:
        self._box.put(round, self._snapshot())
        self._heartbeat_once()  # announce (round, digest) now, not at the next heartbeat

    def _settle(self) -> None:
        want = self._o["expected_world_size"]
        deadline = time.monotonic() + (
            self._o["round_wait_timeout"] if want else self._o["heartbeat_s"]
        )
        while time.monotonic() < deadline:
            self._live_members()
            serving = sum(1 for r, _, _ in self._member_info.values() if r >= 0)
            if want and serving >= want:
                return
            time.sleep(0.2)

    def _canonical(self) -> str | None:
        """The live peer whose state everyone adopts: most rounds, earliest since, smallest id."""
        self._live_members()
        ranked = sorted(
            (-r, since, pid) for pid, (r, since, _) in self._member_info.items() if r >= 0
        )
        return ranked[0][2] if ranked else None

    def _same_as(self, best: str) -> list[str]:
        """Other live peers serving exactly ``best``'s state (fallback donors)."""
        key = self._member_info[best][::2]
        return sorted(
            p for p, info in self._member_info.items()
            if p not in (best, self.peer_id) and info[::2] == key
        )  # fmt: skip

    def _state_cap(self) -> int:
        own = self._box.payload()
        return 2 * (len(own) if own is not None else 0) + _STATE_SLACK

    def _pull_state(self, peer: str, cap: int, tag: str) -> bytes | None:
        """``peer``'s serialized state (at most ``cap`` bytes), counted in the ledger under ``tag``."""
        to = self._o["next_chunk_timeout"]
        budget = max(self._o["round_wait_timeout"], to)
        deadline = time.monotonic() + budget
        coro = pull_payload(
            self._p2p, self._state_name, peer, "state", cap, None, to, deadline, exact=False
        )
        data = self._on_loop(coro, budget + to + 1.0)
        if data is not None:
            n = LENGTH_HEADER_BYTES + len(data)
            self.ledger.add(OpRecord("state_fetch", "pull", self.engine, tag=tag, P=2, rank=1,
                                     payload_bytes=len(data), recv=n))  # fmt: skip
        return data

    def _adopt(self, donors: list[str], tag: str) -> int | None:
        """Load the first donor's state this optimizer accepts; the round it reflects."""
        _, set_state = self._attached("the round API")
        cap = self._state_cap()
        for peer in donors:
            data = self._pull_state(peer, cap, tag)
            if data is None:
                continue
            try:
                set_state(decode_state(data))
            except ValueError as exc:
                logger.warning("state of peer %s refused: %s", peer, exc)
                continue
            r = self._member_info.get(peer, (0, 0.0, ""))[0]
            self._publish(r)  # serve the adopted state on, under its round
            return r
        return None

    async def _serve_state(self, request: Any, context: Any) -> Any:
        """Stream the latest snapshot to a peer that asks: length header, then chunks."""
        from hivemind.proto import runtime_pb2

        data = await asyncio.get_running_loop().run_in_executor(None, self._box.payload)
        if data is None:
            return
        deadline = time.monotonic() + max(
            self._o["round_wait_timeout"], self._o["next_chunk_timeout"]
        )
        yield runtime_pb2.ExpertResponse(metadata=struct.pack("<Q", len(data)))
        for off in range(0, len(data), CHUNK_BYTES):
            if time.monotonic() > deadline:
                return
            yield runtime_pb2.ExpertResponse(metadata=data[off : off + CHUNK_BYTES])
        self.ledger.add(OpRecord("state_serve", "pull", self.engine, tag=self._state_tag, P=2,
                                 payload_bytes=len(data), sent=LENGTH_HEADER_BYTES + len(data)))  # fmt: skip

    _box: StateBox
