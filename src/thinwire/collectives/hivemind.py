"""The hivemind engine: :class:`HivemindCommunicator`, collectives over a hivemind DHT swarm.

Algorithms ``butterfly`` (all-reduce), ``direct`` (all-gather) and ``pull`` (broadcast); bytes as
:mod:`thinwire.collectives.accounting` counts them. Peers find each other through a ``hivemind.DHT``
(NAT traversal and relays come with libp2p); dense all-reduces run hivemind's butterfly
(``DecentralizedAverager``), byte payloads travel as P2P pulls after a group has formed on a
one-element averager whose ``gather`` metadata carries ``{round, tag, len, sha256}``. hivemind is
imported lazily, inside :meth:`HivemindCommunicator.create` and the methods it starts, so ``import
thinwire.collectives`` never needs it.

Every op runs on a per-tag worker thread (ops with one tag run in issue order, different tags
overlap), carries a round id, waits until the round's peers have registered in the DHT, then
matchmakes. Every wait has a timeout; every failure is a :class:`CommError` subclass.

Wire details: a fetch is ``ExpertRequest(uid=<token>)`` answered by one ``ExpertResponse``
holding the 8-byte little-endian length (the ledger's length header), then chunks of <= 2^19 bytes;
the token is a fresh 128-bit random id that only the op's gather metadata carries, and the puller
checks length and SHA-256 against that metadata (:mod:`._hivemind_fetch`). Without an explicit
``round`` an op uses the tag's own counter, so peers must issue ops from the same start; elastic
runs should pass the optimizer's outer step.

Hardening (an adversarial review of this engine found each of these open):
    * Transfers are bounded by what the receiver expects: ``all_gather_into_tensor`` fetches only
      payloads of exactly ``t``'s size, ``all_gather_bytes``/``broadcast_bytes`` refuse
      announcements above ``max_bytes`` (default 1 GiB) before fetching, and all fetches of one op
      share one deadline (``allreduce_timeout``, default ``round_wait_timeout``, at least
      ``next_chunk_timeout``); a peer that breaks either is dropped, logged and listed in
      ``handle.missing``.
    * The p2p daemon listens on loopback unless ``host_maddrs`` says otherwise. Membership
      records and round registrations are signed with the peer's libp2p key and shaped by a
      schema (:mod:`._hivemind_records`), so only a peer itself can write, refresh or tombstone
      its entry. Payloads are served only under their unguessable token and, once the group is
      known, only to its members.
    * A served payload is freed as soon as every member expected to pull it was served, or when
      the op's fetch deadline passes.
    * With ``expected_world_size`` set, once that many peers were seen a round waits only for the
      members whose heartbeat has not expired, so a dead peer stops costing a full
      ``round_wait_timeout`` per round after ``3 * heartbeat_s``.
    * All-reduce results are bit-identical on every member (:mod:`._hivemind_exact`): each part's
      owner sums it in rank order and every member copies the owner's encoded average verbatim.

Deviations (hivemind 1.1.12 forces them):
    * Averager prefixes are ``"{run_id}-{tag}-{kind}-{hash}"`` with characters outside
      ``[A-Za-z0-9_-]`` replaced, not ``f"{run_id}.{tag}"``: hivemind rejects a ``.`` in a prefix,
      and slots with one tag but different ``(numel, dtype, codec)`` need distinct P2P namespaces.
    * ``close()`` cannot write an *already expired* membership entry: the DHT keeps the entry with
      the latest expiration. It writes a tombstone (``alive=False``) that expires just after the
      last heartbeat (hivemind's own ``declare_averager(looking_for_group=False)`` trick).
    * Integer tensors are rejected for ``sum`` too (hivemind averages in floating point);
      ``bfloat16`` is averaged in a float32 slot (hivemind's default bf16 wire format is fp32).
    * ``P == 1`` (ops are local copies) means ``expected_world_size=1``; otherwise hivemind needs a
      group of two, and a lone peer gets :class:`GroupTooSmall`.
    * With ``expected_world_size=None`` the round waits for the peers the membership table lists
      as alive; when set, it is also hivemind's ``target_group_size`` so a full group forms without
      waiting out the matchmaking window.
    * Client-mode peers cannot serve fetches, so ``all_gather_bytes``/``all_gather_into_tensor``/
      ``broadcast*`` raise :class:`CommError` there (they are left out of gather groups).
    * A butterfly whose reducer failed returns a partial average (hivemind keeps local values
      for those parts), so those parts are not bit-identical across members; the ledger still
      follows the butterfly formula.
    * With a codec the result is the owner's average encoded once (``fp16``: rounded to fp16,
      ``int8``: hivemind's uniform 8-bit code of the average), not hivemind's
      ``x_own + codec(avg - x_own)``; that is what makes it identical on every member.
    * Every peer's libp2p identity is a fresh RSA key (hivemind's ``identity_path``); peers
      running hivemind's plain ``DecentralizedAverager`` or unsigned membership cannot join.
    * hivemind's uint8 codec ships ``8 + 1024 + n`` bytes per part (an int64 codebook length
      precedes the codebook); the ledger counts ``n + 1024``, the part size of its byte formula.
    * Under NumPy >= 2.4 hivemind's uint8 deserializer raises; see
      :func:`._hivemind_exact.native_codec`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from thinwire._validate import check_choice, check_float, check_int, check_type
from thinwire.collectives._hivemind_fetch import ServeTable, check_meta, pull_payload, serve_payload
from thinwire.collectives._hivemind_state import HivemindRounds, StateBox
from thinwire.collectives.accounting import (
    LENGTH_HEADER_BYTES,
    allgather_direct_bytes,
    butterfly_bytes,
    butterfly_part_elems,
    butterfly_partition,
    pull_broadcast_bytes,
)
from thinwire.collectives.base import (
    AllPeersLeft,
    ByteLedger,
    CommError,
    CommTimeout,
    GroupTooSmall,
    Handle,
    OpRecord,
    PeerInfo,
    PeerLost,
    RoundMismatch,
)

__all__ = ["HivemindCommunicator"]

logger = logging.getLogger(__name__)

_RATIO_BITS = {None: None, "fp16": 16, "int8": 8}  # hivemind estimate_compression_ratio numerators
_MAX_BYTES = 2**30  # default cap on one gathered payload (1 GiB); ops take max_bytes= for more
_LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)  # listen on loopback unless told otherwise
_CODEBOOK_BYTES = 256 * 4  # uint8 parts carry a 256-entry float32 codebook
_POLL_S = 0.2  # round-registration poll; well inside any matchmaking window (>= 1 s in tests)
_DHT_TIMEOUT_S = 10.0  # a few rounds of hivemind's 3 s DHT RPC wait_timeout (dht/node.py)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CREATE_LOCK = threading.Lock()  # averagers fork; one fork at a time keeps the child's locks sane


def _part_wire(n: int, codec: str | None, itemsize: int) -> int:
    """Wire bytes of one butterfly part of ``n`` elements (fp32/fp64 ``itemsize*n``,
    fp16 ``2n``, uint8 ``n + 1024`` for the per-part codebook)."""
    return {None: n * itemsize, "fp16": 2 * n, "int8": n + _CODEBOOK_BYTES}[codec]


def _as_bytes(payload: bytes | memoryview | torch.Tensor) -> bytes:
    if isinstance(payload, torch.Tensor):
        flat = payload.detach().reshape(-1).contiguous().cpu()
        return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    check_type("payload", payload, (bytes, bytearray, memoryview))
    return bytes(payload)


async def _cancel_pending() -> None:
    """Cancel every other task on the running loop (P2P listeners of a dead daemon included)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.wait(tasks, timeout=2.0) if tasks else None


def _copy_into(t: torch.Tensor, flat: torch.Tensor | None) -> torch.Tensor:
    """Post-processing of in-place ops: copy ``flat`` (if any) into ``t``, return ``t``."""
    if flat is not None:
        t.copy_(flat.view(t.shape))
    return t


def _others(group: _Group) -> list[str]:
    """Every member except this peer (``group.me``): whom ``direct`` pulls from."""
    return [p for p in group.ids if p != group.me]


def _meta_len(meta: dict[str, Any]) -> int:
    """The announced payload length for the ledger (0 when malformed: nothing is fetched)."""
    n = meta.get("len")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def _takes(meta: dict[str, Any], n: int) -> bool:
    """Whether a member whose gather metadata is ``meta`` accepts a payload of ``n`` bytes."""
    cap = meta.get("cap")
    return not isinstance(cap, int) or n <= cap


def _safe(s: str, n: int = 24) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", s)[:n] or "_"


@dataclass
class _Group:
    """A formed group: ids in the leader's order, sorted ids (= ranks), gathered metadata."""

    order: list[str]
    ids: list[str]
    metas: dict[str, dict[str, Any]]
    missing: tuple[str, ...]
    me: str


class HivemindCommunicator(HivemindRounds):
    """Communicator over a hivemind swarm. Build it with :meth:`create`.

    ``rank``/``world_size`` describe the sorted group of the last completed op (before any op:
    the live membership); ``epoch`` bumps whenever the live member set changes. Collective:
    every peer must call each op with the same ``tag`` and ``round``.

    Tuning: if ops end in :class:`GroupTooSmall` while peers are alive, raise ``matchmaking_time``
    (10-15 s over the internet, as hivemind's Optimizer docs advise); if healthy peers are dropped
    from butterflies, raise ``next_chunk_timeout``; if peers join late, raise
    ``round_wait_timeout``.
    """

    engine = "hivemind"

    def __init__(self, run_id: str, *, _private: bool = False, **opts: Any) -> None:
        if not _private:
            raise TypeError("use HivemindCommunicator.create(...) to build a HivemindCommunicator")
        self.run_id = run_id
        self._o = opts
        self.rank, self.world_size, self.epoch = 0, 1, 0
        self.ledger = ByteLedger()
        self.peer_id = ""
        self._dht: Any = None
        self._p2p: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._slots: dict[tuple, Any] = {}
        self._executors: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._seq: dict[str, int] = {}
        self._table = ServeTable()  # payloads this peer offers to fetches
        self._box = StateBox()  # the optimizer's global state, served to joiners
        self._member_info: dict[str, tuple[int, float, str]] = {}  # peer -> round, since, digest
        self._since = 0.0  # DHT time this peer joined
        self._seen_others = False  # another member was alive at some point
        self._warned_alone = False
        self._owners: Any = None  # _hivemind_records.Owners once started
        self._full_seen = False  # expected_world_size members were seen alive at least once
        self._steps: set[Any] = set()  # in-flight hivemind StepControls
        self._members: frozenset[str] = frozenset()
        self._addr = ""
        self._hb_exp = 0.0
        self._closed = False
        mm, rt = opts["matchmaking_time"], opts["request_timeout"]
        self._find_s = 2.0 * mm + 2.0 * rt  # > matchmaking_time, as hivemind's step() asserts
        run = opts["allreduce_timeout"] or opts["round_wait_timeout"]
        self._op_cap_s = self._find_s + run + rt  # from step() to its result
        self._fetch_s = max(run, opts["next_chunk_timeout"])  # all fetches of one op, together
        self._fetch_name = f"thinwire.fetch.{run_id}"

    @classmethod
    def create(
        cls,
        run_id: str,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] | None = None,
        announce_maddrs: Sequence[str] | None = None,
        client_mode: bool = False,
        use_auto_relay: bool | None = None,
        expected_world_size: int | None = None,
        matchmaking_time: float = 5.0,
        request_timeout: float = 3.0,
        allreduce_timeout: float | None = None,
        next_chunk_timeout: float = 30.0,
        round_wait_timeout: float = 600.0,
        heartbeat_s: float = 5.0,
        alone: str = "continue",
        start: bool = True,
    ) -> HivemindCommunicator:
        """Validate the settings, then (``start=True``) join the swarm.

        Args:
            run_id: swarm-wide name of the run; prefixes every DHT key and handler.
            initial_peers: multiaddrs of running peers (``visible_maddrs()`` of one); empty
                starts a new swarm.
            host_maddrs: listen multiaddrs (default None: ``("/ip4/127.0.0.1/tcp/0",)``,
                loopback only); pass e.g. ``("/ip4/0.0.0.0/tcp/31337",)`` to accept peers from
                other machines, which also exposes the run to anyone who can reach the port.
            announce_maddrs: multiaddrs to advertise instead (explicit ports).
            client_mode: True behind NAT without relay: joins butterflies with share 0, serves
                nothing (default False).
            use_auto_relay: look for libp2p relays (default: ``client_mode``).
            expected_world_size: peers a round waits for (default: those alive in the table);
                1 makes every op a local copy.
            matchmaking_time: hivemind ``min_matchmaking_time`` in s (default 5.0; 3-5 s on a
                LAN, 10-15 s over the internet).
            request_timeout: leader response timeout in s, in ``(0, matchmaking_time)``
                (default 3.0).
            allreduce_timeout: cap on one butterfly after the group formed, and on all P2P
                fetches of one gather-path op together, s (default None: hivemind bounds each
                butterfly chunk by ``next_chunk_timeout``; thinwire waits at most
                ``round_wait_timeout`` more, and fetches share ``max(round_wait_timeout,
                next_chunk_timeout)``).
            next_chunk_timeout: per-chunk timeout in s for butterflies and fetches (default 30;
                hivemind's ``sender_timeout``; reducers get twice this).
            round_wait_timeout: how long a round waits for its peers to register, s (default
                600, OpenDiLoCo's wait-for-peers). A served payload is freed once every member
                expected to pull it got it, or when the op's fetch deadline passes.
            heartbeat_s: membership refresh period in s; entries expire after 3x (default 5),
                and a peer whose entry expired is no longer waited for.
            alone: what a peer does once every other member has left (their heartbeats
                expired, ``3 * heartbeat_s`` after the last one): ``"continue"`` (default)
                runs each op as a group of one (an optimizer keeps training and syncing with
                itself; peers that join later are waited for again) or ``"raise"``:
                :class:`~thinwire.collectives.AllPeersLeft`, which optimizers let through.
                A peer that never saw another member is not "alone": its ops wait and
                matchmake as usual (:class:`GroupTooSmall`).
            start: join now (default True); otherwise call :meth:`start`.

        Raises:
            ValueError/TypeError: a setting out of range. CommError: the DHT could not start or
                bootstrap.
        """
        check_type("run_id", run_id, str)
        if not run_id:
            raise ValueError("run_id must be a non-empty string, got ''")
        host_maddrs = _LOOPBACK if host_maddrs is None else host_maddrs
        for name, v in (("initial_peers", initial_peers), ("host_maddrs", host_maddrs)):
            check_type(name, v, (list, tuple))
        check_type("client_mode", client_mode, bool)
        if expected_world_size is not None:
            check_int("expected_world_size", expected_world_size, 1)
        mm = check_float("matchmaking_time", matchmaking_time, 0.0, lo_open=True)
        rt = check_float("request_timeout", request_timeout, 0.0, mm, lo_open=True, hi_open=True)
        if allreduce_timeout is not None:
            allreduce_timeout = check_float(
                "allreduce_timeout", allreduce_timeout, 0.0, lo_open=True
            )
        opts = dict(
            initial_peers=[str(p) for p in initial_peers],
            host_maddrs=[str(m) for m in host_maddrs],
            announce_maddrs=None if announce_maddrs is None else [str(m) for m in announce_maddrs],
            client_mode=client_mode,
            use_auto_relay=client_mode if use_auto_relay is None else bool(use_auto_relay),
            expected_world_size=expected_world_size,
            matchmaking_time=mm,
            request_timeout=rt,
            allreduce_timeout=allreduce_timeout,
            next_chunk_timeout=check_float(
                "next_chunk_timeout", next_chunk_timeout, 0.0, lo_open=True
            ),
            round_wait_timeout=check_float("round_wait_timeout", round_wait_timeout, 0.0),
            heartbeat_s=check_float("heartbeat_s", heartbeat_s, 0.0, lo_open=True),
            alone=check_choice("alone", alone, ("continue", "raise")),
        )
        comm = cls(run_id, _private=True, **opts)
        if start:
            comm.start()
        return comm

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the DHT (forks before any thread exists), the P2P loop and the heartbeat.

        The DHT's libp2p identity is a fresh RSA key that also signs this peer's records.
        """
        import hivemind

        from thinwire.collectives import _hivemind_records as records

        o = self._o
        method = multiprocessing.get_start_method()
        if method != "fork":
            # hivemind's DHT and averagers are processes that must fork (an averager cannot be
            # pickled for spawn); a process started with spawn defaults to spawn too.
            raise CommError(
                f"HivemindCommunicator needs the 'fork' multiprocessing start method, got "
                f"{method!r}; call multiprocessing.set_start_method('fork', force=True) before "
                "creating it (e.g. first thing in a worker started by torch.multiprocessing.spawn)"
            )
        key, id_path = records.new_identity()
        try:
            self._dht = hivemind.DHT(
                initial_peers=o["initial_peers"] or None,
                start=True,
                host_maddrs=o["host_maddrs"],
                announce_maddrs=o["announce_maddrs"],
                client_mode=o["client_mode"],
                use_auto_relay=o["use_auto_relay"],
                record_validators=records.validators(self.run_id, key),
                identity_path=id_path,
                check_if_identity_free=False,  # a fresh 2048-bit key; no probe daemon needed
            )
            own_id = records.peer_id_of_identity(id_path)
        except Exception as exc:
            raise CommError(
                f"hivemind DHT failed to start or join {o['initial_peers']}: {exc}"
            ) from exc
        finally:
            os.unlink(id_path)
        try:
            self.peer_id = self._dht.peer_id.to_base58()
            if self.peer_id != own_id:
                raise CommError(f"the p2p daemon runs as {self.peer_id}, not as its key {own_id}")
            self._owners = records.Owners(key, self.peer_id)
            maddrs = self.visible_maddrs()
            self._addr = maddrs[0] if maddrs else ""
            from hivemind.utils.timed_storage import get_dht_time

            self._since = get_dht_time()
            self._loop = asyncio.new_event_loop()
            loop = threading.Thread(target=self._loop.run_forever, name="tw-hm-loop", daemon=True)
            loop.start()
            self._threads.append(loop)
            self._on_loop(self._attach_p2p(), _DHT_TIMEOUT_S)
            self._heartbeat_once()
            hb = threading.Thread(target=self._heartbeat_loop, name="tw-hm-beat", daemon=True)
            hb.start()
            self._threads.append(hb)
            ids = sorted(self._live_members())
        except Exception as exc:
            self.close()
            if isinstance(exc, CommError):
                raise
            raise CommError(f"joining the swarm failed: {exc!r}") from exc
        # Before the first op the group is the one a round will wait for.
        want = self._o["expected_world_size"] or 0
        self.rank, self.world_size = ids.index(self.peer_id), max(len(ids), want)

    async def _attach_p2p(self) -> None:
        from hivemind.proto import runtime_pb2

        self._p2p = await self._dht.replicate_p2p()
        if not self._o["client_mode"]:
            await self._p2p.add_protobuf_handler(
                self._fetch_name, self._serve, runtime_pb2.ExpertRequest, stream_output=True
            )

    def visible_maddrs(self) -> list[str]:
        """Multiaddrs other peers can pass as ``initial_peers``."""
        return [str(m) for m in self._dht.get_visible_maddrs()]

    def close(self) -> None:
        """Leave the swarm: tombstone the membership entry, stop averagers, DHT and threads."""
        if self._closed or self._dht is None:
            self._closed = True
            return
        self._closed = True
        self._stop.set()
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)
        for ctl in list(self._steps):
            ctl.cancel()
        alive = self._dht.is_alive()
        if alive and self._owners is not None:
            try:
                # every field of the schema (hivemind refuses a record that validation changes);
                # expires just after our last heartbeat
                dead = {"alive": False, "addr": "", "round": -1, "since": self._since, "digest": ""}
                exp = math.nextafter(max(self._hb_exp, time.time()), math.inf)
                sub = self._owners.subkey()
                self._dht_store(self._members_key, dead, exp, sub, "tombstone store")
            except CommError as exc:
                logger.warning("close(): %s", exc)
        for av in self._slots.values():
            if av.is_alive():
                av.shutdown()
        if self._loop is not None:
            if self._p2p is not None and alive:
                try:
                    self._on_loop(self._detach_p2p(), 5.0)
                except CommError as exc:
                    logger.warning("close(): %s", exc)
            try:
                self._on_loop(_cancel_pending(), 5.0)
            except CommError as exc:
                logger.warning("close(): %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
        for th in self._threads:
            th.join(timeout=max(5.0, self._o["heartbeat_s"] + _DHT_TIMEOUT_S))
        if alive:
            self._dht.shutdown()

    async def _detach_p2p(self) -> None:
        if not self._o["client_mode"]:
            await self._p2p.remove_protobuf_handler(self._fetch_name, stream_output=True)
        await self._p2p.shutdown()

    # ---- membership ------------------------------------------------------------------------
    @property
    def _members_key(self) -> str:
        return f"{self.run_id}_members"  # _hivemind_records.members_key: the schema's field

    def _heartbeat_once(self) -> None:
        from hivemind.utils.timed_storage import get_dht_time

        exp = get_dht_time() + 3.0 * self._o["heartbeat_s"]
        entry = {"alive": True, "addr": self._addr, "round": self._box.round,
                 "since": self._since, "digest": self._box.digest}  # fmt: skip
        self._dht_store(self._members_key, entry, exp, self._owners.subkey(), "heartbeat store")
        self._hb_exp = max(self._hb_exp, exp)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self._o["heartbeat_s"]):
            if not self._dht.is_alive():
                logger.warning("heartbeat: DHT process of %s is gone; stopping", self.peer_id)
                return
            self._table.sweep()  # free payloads whose round ended even when no op runs
            try:
                self._heartbeat_once()
                self._live_members()
            except (CommError, OSError) as exc:
                logger.warning("heartbeat of %s failed: %s", self.peer_id, exc)

    def _live_members(self) -> dict[str, str]:
        """peer id -> address of unexpired, alive entries (self always included); bumps epoch.

        Only entries whose subkey's key owns the peer id count (the DHT already refused unsigned
        ones); an entry past its expiration (three missed heartbeats) is a dead peer.
        """
        from hivemind.utils.timed_storage import get_dht_time

        res = self._dht_get(self._members_key, "membership get")
        now, out = get_dht_time(), {self.peer_id: self._addr}
        info = {self.peer_id: (self._box.round, self._since, self._box.digest)}
        if res is not None and isinstance(res.value, dict):
            for sub, item in res.value.items():
                pid, v = self._owners.peer_of(sub), item.value
                if pid is None or not isinstance(v, dict) or item.expiration_time <= now:
                    continue
                if v.get("alive") is True and pid != self.peer_id:
                    out[pid] = str(v.get("addr", ""))
                    info[pid] = (int(v.get("round", -1)), float(v.get("since", 0.0)),
                                 str(v.get("digest", "")))  # fmt: skip
        self._member_info = info
        self._seen_others = self._seen_others or len(out) > 1
        with self._lock:
            if frozenset(out) != self._members:
                if self._members:
                    self.epoch += 1
                self._members = frozenset(out)
            ews = self._o["expected_world_size"]
            self._full_seen = self._full_seen or (ews is not None and len(out) >= ews)
        return out

    def peers(self) -> list[PeerInfo]:
        """Live members of the run from the DHT table, sorted by peer id (rank = position)."""
        live = self._live_members()
        return [PeerInfo(i, p, live[p], True) for i, p in enumerate(sorted(live))]

    # ---- helpers ---------------------------------------------------------------------------
    def _dht_get(self, key: str, what: str) -> Any:
        return self._dht_wait(self._dht.get(key, latest=True, return_future=True), what)

    def _dht_store(self, key: str, value: Any, exp: float, subkey: str | bytes, what: str) -> Any:
        fut = self._dht.store(key, value, exp, subkey=subkey, return_future=True)
        return self._dht_wait(fut, what)

    def _dht_wait(self, fut: Any, what: str) -> Any:
        """Result of a DHT future; fails fast if the DHT process died, else after 10 s."""
        deadline = time.monotonic() + _DHT_TIMEOUT_S
        while True:
            try:
                return fut.result(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            except concurrent.futures.TimeoutError:
                if not self._dht.is_alive():
                    fut.cancel()
                    raise PeerLost(f"DHT {what}: this peer's DHT process is gone") from None
                if time.monotonic() >= deadline:
                    fut.cancel()
                    raise CommTimeout(
                        f"DHT {what} did not answer within {_DHT_TIMEOUT_S} s"
                    ) from None

    def _on_loop(self, coro: Any, timeout: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise CommTimeout(f"P2P task did not finish within {timeout:.1f} s") from None

    def _check_open(self) -> None:
        if self._closed or self._dht is None:
            raise CommError("communicator is closed or not started; call create(..., start=True)")

    def _slot(self, tag: str, kind: str, numel: int, dtype: torch.dtype, codec: str | None) -> Any:
        """The averager of one (tag, kind, numel, dtype, codec) slot, created on first use."""
        key = (tag, kind, numel, str(dtype), codec)
        av = self._slots.get(key)
        if av is None:
            from thinwire.collectives._hivemind_exact import ExactAverager, native_codec

            o = self._o
            digest = hashlib.sha1(repr((self.run_id, key)).encode()).hexdigest()[:12]
            prefix = f"{_safe(self.run_id)}-{_safe(tag)}-{kind}-{digest}"
            with _CREATE_LOCK:
                compression = native_codec(codec)
                av = ExactAverager(
                    [torch.zeros(numel, dtype=dtype)], self._dht, start=False, prefix=prefix,
                    target_group_size=o["expected_world_size"],
                    min_matchmaking_time=o["matchmaking_time"], request_timeout=o["request_timeout"],
                    allreduce_timeout=o["allreduce_timeout"], next_chunk_timeout=o["next_chunk_timeout"],
                    compression=compression, client_mode=o["client_mode"],
                    allow_state_sharing=False, shutdown_timeout=3,
                )  # fmt: skip
                # not run_in_background(): it installs a SIGINT handler, legal in the main thread only
                av.start()
            try:
                av.wait_until_ready(timeout=_DHT_TIMEOUT_S)
            except Exception as exc:
                raise CommError(f"hivemind averager {prefix} failed to start: {exc!r}") from exc
            self._slots[key] = av
        return av

    def _next_round(self, tag: str, round: int | None) -> int:
        check_type("tag", tag, str)
        if round is not None:
            return check_int("round", round, 0)
        if self._round is not None:  # an optimizer's round is open (begin_round)
            return self._round
        with self._lock:
            self._seq[tag] = self._seq.get(tag, -1) + 1
            return self._seq[tag]

    def _await_round(self, rid: int, tag: str) -> None:
        """Register for round ``rid`` and wait (<= round_wait_timeout) until its peers did."""
        from hivemind.utils.timed_storage import get_dht_time

        key, wait_s = f"{self.run_id}.round.{rid}", self._o["round_wait_timeout"]
        exp = get_dht_time() + 2.0 * wait_s + self._find_s
        mine = f"{len(tag)}:{tag}|".encode()  # length-prefixed: no tag is a prefix of another's
        self._dht_store(key, True, exp, self._owners.subkey(mine), "round registration")
        deadline = time.monotonic() + wait_s
        while True:
            live = self._live_members()
            want = self._round_size(len(live))
            res = self._dht_get(key, "round get")
            subs = res.value if res is not None and isinstance(res.value, dict) else {}
            got = len({self._owners.peer_of(s, mine) for s in subs} & live.keys())
            left = deadline - time.monotonic()
            if got >= want:
                return
            if self._stop.is_set():
                raise CommError(f"round {rid} tag {tag!r}: communicator closed while waiting")
            if left <= 0:
                logger.info("round %s tag %r: %d of %d peers registered after %.1f s; matchmaking "
                            "anyway", rid, tag, got, want, wait_s)  # fmt: skip
                return
            time.sleep(min(_POLL_S, left))

    def _round_size(self, n_live: int) -> int:
        """Registrations a round waits for: the live members, or ``expected_world_size`` until
        that many were seen (late joiners), then at most the live ones (dead peers forgotten)."""
        ews = self._o["expected_world_size"]
        if ews is None:
            return n_live
        return min(ews, n_live) if self._full_seen else ews

    def _form_group(self, slot: Any | None, tag: str, rid: int, meta: dict[str, Any]) -> _Group:
        """Round wait, hivemind matchmaking (+ butterfly on ``slot``), round/tag check.

        ``slot=None`` (P = 1): a group of one, no network.
        """
        meta = dict(meta, round=rid, tag=tag, client=self._o["client_mode"])
        me = self.peer_id
        if slot is None:
            return _Group([me], [me], {me: meta}, (), me)
        before = set(self._live_members())
        self._await_round(rid, tag)
        if self._seen_others and set(self._live_members()) == {me}:
            # Every other member left (their heartbeats expired): no group can form.
            gone = tuple(sorted(before - {me}))
            if self._o["alone"] == "raise":
                raise AllPeersLeft(
                    f"tag {tag!r} round {rid}: every other peer of run {self.run_id!r} left "
                    f"(no heartbeat for {3 * self._o['heartbeat_s']:g} s; last seen: "
                    f"{list(gone) or 'none'}); stopping as alone='raise' asks"
                )
            if not self._warned_alone:
                logger.warning("round %s: every other peer left; continuing alone (alone="
                               "'continue') until peers join", rid)  # fmt: skip
                self._warned_alone = True
            return _Group([me], [me], {me: meta}, gone, me)
        self._warned_alone = False
        ctl = slot.step(gather=meta, timeout=self._find_s, allow_retries=True, wait=False)
        self._steps.add(ctl)  # close() cancels it, so no worker outlives the communicator
        try:
            gathered = ctl.result(timeout=self._op_cap_s)
        except concurrent.futures.CancelledError:
            raise CommError(f"tag {tag!r} round {rid}: cancelled by close()") from None
        except concurrent.futures.TimeoutError:
            ctl.cancel()
            raise CommTimeout(
                f"tag {tag!r} round {rid}: no result within {self._op_cap_s:.1f} s"
            ) from None
        except Exception as exc:
            if "could not find a group" in str(exc):
                raise GroupTooSmall(
                    f"tag {tag!r} round {rid}: no group of >= 2 peers formed within "
                    f"{self._find_s:.1f} s (hivemind: {exc}); skip this round and retry the next"
                ) from exc
            raise CommError(f"tag {tag!r} round {rid}: hivemind averaging failed: {exc!r}") from exc
        finally:
            self._steps.discard(ctl)
        order = [pid.to_base58() for pid in gathered]
        metas = {
            p: m if isinstance(m, dict) else {}
            for p, m in zip(order, gathered.values(), strict=True)
        }
        bad = {p: (m.get("round"), m.get("tag")) for p, m in metas.items()}
        bad = {p: rt for p, rt in bad.items() if rt != (rid, tag)}
        if bad:
            raise RoundMismatch(f"tag {tag!r} round {rid}: matched peers with (round, tag) {bad}; "
                                "local tensors left untouched")  # fmt: skip
        ids = sorted(order)
        return _Group(order, ids, metas, tuple(sorted(before - set(ids))), self.peer_id)

    def _launch(self, tag: str, record: OpRecord, body: Callable[[Handle], Any],
                post: Callable[[Any], Any] | None, async_op: bool) -> Any:  # fmt: skip
        """Run ``body`` on the tag's worker thread; ``post`` runs once inside ``wait()``.

        Returns the :class:`Handle` if ``async_op``, else its waited value.
        """
        self._check_open()
        t0 = time.perf_counter()
        fut: concurrent.futures.Future | None = None

        def wait_fn(timeout: float | None) -> Any:
            try:
                out = fut.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                raise CommTimeout(
                    f"{record.op}(tag={tag!r}) not done after wait({timeout})"
                ) from None
            except concurrent.futures.CancelledError:
                raise CommError(
                    f"{record.op}(tag={tag!r}) cancelled: communicator closed"
                ) from None
            return post(out) if post is not None else out

        def run(h: Handle) -> Any:
            try:
                out = body(h)
            except CommError:
                raise
            except Exception as exc:  # a dead daemon's pipe, a closed loop: still a CommError
                what = "communicator closed" if self._closed else "engine failure"
                raise CommError(f"{record.op}(tag={tag!r}): {what}: {exc!r}") from exc
            record.t_real_s = time.perf_counter() - t0
            self.ledger.add(record)
            if h.group:
                self.rank, self.world_size = h.group.index(self.peer_id), len(h.group)
            return out

        handle: Handle = Handle(record, wait_fn, lambda: fut is not None and fut.done())
        with self._lock:
            ex = self._executors.get(tag)
            if ex is None:
                ex = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix=f"tw-hm-{_safe(tag)}"
                )
                self._executors[tag] = ex
        fut = ex.submit(run, handle)
        return handle if async_op else handle.wait()

    def _record(self, op: str, algorithm: str, tag: str, **kw: Any) -> OpRecord:
        return OpRecord(op, algorithm, self.engine, tag=tag, **kw)

    def _solo(self) -> bool:
        return self._o["expected_world_size"] == 1

    # ---- fetch path (_hivemind_fetch) -------------------------------------------------------
    async def _serve(self, request: Any, context: Any) -> Any:
        async for msg in serve_payload(self._table, request.uid, context.remote_id.to_base58()):
            yield msg

    def _pull_many(self, want: dict[str, tuple[str, int, str]]) -> dict[str, bytes | None]:
        """Fetch ``peer -> (uid, len, sha256)`` concurrently under one deadline (``_fetch_s``)."""
        to, deadline = self._o["next_chunk_timeout"], time.monotonic() + self._fetch_s

        async def pull_all() -> list[bytes | None]:
            return await asyncio.gather(*(
                pull_payload(self._p2p, self._fetch_name, p, uid, n, sha, to, deadline)
                for p, (uid, n, sha) in want.items()
            ))  # fmt: skip

        # each pull ends by its deadline plus one bounded hang-up; this only guards the loop
        out = self._on_loop(pull_all(), self._fetch_s + to + 1.0)
        return dict(zip(want, out, strict=True))

    def _gather_slot(self, tag: str) -> Any:
        """The tag's 1-element averager used only to form groups (None when P = 1)."""
        return None if self._solo() else self._slot(tag, "g", 1, torch.float32, None)

    def _gather_payloads(self, h: Handle, rec: OpRecord, tag: str, rid: int, data: bytes,
                         pull: Callable[[_Group], list[str]],
                         pullers: Callable[[_Group], list[str]], cap: int, exact: bool = False,
                         ) -> tuple[_Group, dict[str, bytes | None]]:  # fmt: skip
        """Offer ``data``, form a group, pull from ``pull(group)``; fill the ``direct`` ledger.

        ``pullers(group)``: the members expected to fetch ``data`` (its offer is freed once they
        all did). A member announcing more than ``cap`` bytes (with ``exact``: not exactly
        ``cap``) or malformed metadata is not fetched from; like a member whose fetch failed
        or ran past the op's deadline, it is logged, joins ``h.missing``, and ``recv`` leaves
        its payload out.
        """
        if self._o["client_mode"]:
            raise CommError("client-mode peers cannot serve fetches: gather-path ops are "
                            "unavailable; use all_reduce with a native codec")  # fmt: skip
        offer_s = self._o["round_wait_timeout"] + self._op_cap_s + self._fetch_s  # group + fetch
        uid = self._table.offer(data, time.monotonic() + offer_s)
        meta = {"len": len(data), "sha256": hashlib.sha256(data).hexdigest(), "uid": uid,
                "cap": cap}  # fmt: skip
        try:
            grp = self._form_group(self._gather_slot(tag), tag, rid, meta)
        except BaseException:
            self._table.withdraw(uid)
            raise
        self._table.expect(uid, _others(grp), pullers(grp),
                           time.monotonic() + self._fetch_s + self._o["request_timeout"])  # fmt: skip
        lens = [_meta_len(grp.metas[p]) for p in grp.ids]
        want: dict[str, tuple[str, int, str]] = {}
        for p in pull(grp):
            ok = check_meta(grp.metas[p], cap)
            if not isinstance(ok, str) and exact and ok[1] != cap:
                ok = f"announced length {ok[1]} != the {cap} bytes this op expects"
            if isinstance(ok, str):
                logger.warning("tag %r round %s: not fetching from %s: %s", tag, rid, p, ok)
            else:
                want[p] = ok
        got = self._pull_many(want) if want else {}
        got[self.peer_id] = data
        rec.P, rec.rank, rec.sizes = len(grp.ids), grp.ids.index(self.peer_id), tuple(lens)
        rec.sent, rec.recv = allgather_direct_bytes(lens, rec.rank)
        lost = [i for i, p in enumerate(grp.ids) if got.get(p) is None]
        rec.recv -= sum(LENGTH_HEADER_BYTES + lens[i] for i in lost)
        h.group = tuple(grp.ids)
        h.missing = tuple(sorted(set(grp.missing) | {grp.ids[i] for i in lost}))
        return grp, got

    # ---- collectives ---------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "mean", *, codec: str | None = None,
                   async_op: bool = False, tag: str = "", round: int | None = None
                   ) -> Handle[torch.Tensor] | torch.Tensor:  # fmt: skip
        """In-place mean/sum of ``t`` over the group (hivemind's ``butterfly``).

        Args:
            t: floating tensor (fp16/bf16/fp32/fp64); untouched on any error.
            op: ``"mean"`` (hivemind's mean with weight 1) or ``"sum"`` (mean times group size).
            codec: None, ``"fp16"`` or ``"int8"``: hivemind's own NoCompression /
                Float16Compression / Uniform8BitQuantization on the butterfly (this engine only).
            async_op: return a :class:`Handle` instead of the tensor.
            tag: op name; one averager per (tag, numel, dtype, codec).
            round: round id (outer step); default: this tag's op counter.

        Raises:
            TypeError: non-floating ``t``. GroupTooSmall, RoundMismatch, CommTimeout, CommError.
        """
        check_type("t", t, torch.Tensor)
        check_choice("op", op, ("mean", "sum"))
        if t.dtype not in _FLOATS:
            raise TypeError(f"t.dtype must be in {{{', '.join(map(str, _FLOATS))}}} for the hivemind "
                            f"engine (it averages in floating point), got {t.dtype}")  # fmt: skip
        if codec is not None:
            check_choice("codec", codec, ("fp16", "int8"))
        rid = self._next_round(tag, round)
        numel, dtype = t.numel(), (torch.float32 if t.dtype == torch.bfloat16 else t.dtype)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        rec = self._record("all_reduce", "butterfly", tag, numel=numel, itemsize=itemsize,
                           payload_bytes=numel * itemsize)  # fmt: skip
        src = t.detach().reshape(-1).to("cpu", dtype, copy=True)  # snapshot at issue time

        def body(h: Handle) -> torch.Tensor:
            if self._solo() or numel == 0:  # P = 1 or nothing to average: a local copy
                grp, out = self._form_group(None, tag, rid, {}), src
            else:
                av = self._slot(tag, "ar", numel, dtype, codec)
                with av.get_tensors() as ts:
                    ts[0].copy_(src)
                grp = self._form_group(av, tag, rid, {"len": numel})
                with av.get_tensors() as ts:
                    out = ts[0].clone()
            out = out * len(grp.ids) if op == "sum" else out
            # shares follow the leader's (shuffled) order, the insertion order of step()'s dict
            bits, client = _RATIO_BITS[codec], [bool(grp.metas[p].get("client")) for p in grp.order]
            q = butterfly_part_elems(itemsize, 1.0 if bits is None else bits / (8 * itemsize))
            parts = butterfly_partition(numel, len(grp.order), q, client=client) if numel else []
            wire = {p: sum(_part_wire(n, codec, itemsize) for n in ps)
                    for p, ps in zip(grp.order, parts, strict=True)}  # fmt: skip
            rec.P, rec.rank = len(grp.ids), grp.ids.index(self.peer_id)
            rec.sizes = tuple(wire.get(p, 0) for p in grp.ids)
            if numel:
                me = grp.order.index(self.peer_id)
                rec.sent, rec.recv = butterfly_bytes(
                    parts, me, lambda n: _part_wire(n, codec, itemsize)
                )
            if numel or self._solo():  # an empty op met nobody: keep rank/world_size as they are
                h.group, h.missing = tuple(grp.ids), grp.missing
            return out

        return self._launch(tag, rec, body, lambda out: _copy_into(t, out), async_op)

    def all_gather_bytes(self, payload: bytes | memoryview | torch.Tensor, *, algorithm: str = "direct",
                         async_op: bool = False, tag: str = "", round: int | None = None,
                         max_bytes: int = _MAX_BYTES,
                         ) -> Handle[list[bytes | None]] | list[bytes | None]:  # fmt: skip
        """Every member's payload, index = position in the sorted group.

        ``handle.group`` gives the ids; unreachable members are ``None`` and listed in
        ``handle.missing`` (with live members that were not matched), and so are members that
        announce more than ``max_bytes`` (not fetched) or do not deliver within the op's fetch
        deadline. Only ``algorithm="direct"`` (``"auto"`` is accepted as its alias).

        Args:
            max_bytes: largest payload accepted from one member, bytes (default 2^30 = 1 GiB,
                >= 0); a member announcing more is dropped before any byte is fetched.
        """
        check_choice("algorithm", algorithm, ("direct", "auto"))
        check_int("max_bytes", max_bytes, 0)
        data = _as_bytes(payload)
        rid = self._next_round(tag, round)
        rec = self._record("all_gather_bytes", "direct", tag, payload_bytes=len(data))

        def pullers(g: _Group) -> list[str]:
            return [p for p in _others(g) if _takes(g.metas[p], len(data))]

        def body(h: Handle) -> list[bytes | None]:
            grp, got = self._gather_payloads(h, rec, tag, rid, data, _others, pullers, max_bytes)
            return [got.get(p) for p in grp.ids]

        return self._launch(tag, rec, body, None, async_op)

    def all_gather_into_tensor(self, t: torch.Tensor, *, async_op: bool = False, tag: str = "",
                               round: int | None = None
                               ) -> Handle[torch.Tensor] | torch.Tensor:  # fmt: skip
        """Every member's equal-shape tensor as row ``j`` of a new ``(P, *t.shape)`` tensor.

        Row order is the sorted group, as in :meth:`all_gather_bytes` (``handle.group`` gives
        the ids). The bytes of ``t`` travel on the same ``direct`` pull path; a member that
        delivered nothing, or announced a size other than ``t``'s, gets an all-zero row and is
        listed in ``handle.missing`` (its payload is not fetched). The result is on
        ``t.device``; the group size ``P`` is known only when the op completes.

        Raises:
            GroupTooSmall, RoundMismatch, CommTimeout, CommError (client-mode peers too).
        """
        check_type("t", t, torch.Tensor)
        nbytes = t.numel() * t.element_size()
        data = _as_bytes(t)
        rid = self._next_round(tag, round)
        rec = self._record("all_gather_into_tensor", "direct", tag, numel=t.numel(),
                           itemsize=t.element_size(), payload_bytes=nbytes)  # fmt: skip

        def same_size(g: _Group) -> list[str]:  # only they pull from this peer, and vice versa
            return [p for p in _others(g) if _meta_len(g.metas[p]) == nbytes]

        def body(h: Handle) -> torch.Tensor:
            grp, got = self._gather_payloads(h, rec, tag, rid, data, same_size, same_size, nbytes,
                                             exact=True)  # fmt: skip
            # members of another size do not pull from this peer either
            pullers = sum(1 for j, n in enumerate(rec.sizes) if j != rec.rank and n == nbytes)
            rec.sent = pullers * (LENGTH_HEADER_BYTES + nbytes)
            rows = torch.zeros((len(grp.ids), nbytes), dtype=torch.uint8)  # [P, nbytes]
            for i, p in enumerate(grp.ids):
                b = got.get(p)
                if b is not None and len(b) == nbytes and nbytes:
                    rows[i] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
            return rows

        def post(rows: torch.Tensor) -> torch.Tensor:
            P = rows.shape[0]
            if not nbytes:
                return torch.zeros((P, *t.shape), dtype=t.dtype, device=t.device)
            return rows.view(t.dtype).reshape(P, *t.shape).to(t.device)

        return self._launch(tag, rec, body, post, async_op)

    def broadcast_bytes(self, payload: bytes | None, src: int = 0, *, async_op: bool = False,
                        tag: str = "", round: int | None = None, max_bytes: int = _MAX_BYTES,
                        ) -> Handle[bytes] | bytes:  # fmt: skip
        """``src``'s payload on every member (``pull``); src = rank in the sorted group.

        Args:
            max_bytes: largest payload accepted from ``src``, bytes (default 2^30 = 1 GiB);
                a larger announcement is not fetched (:class:`PeerLost`).

        Raises:
            PeerLost: the source's payload could not be fetched (or was over ``max_bytes``, or
                late for the op's fetch deadline). CommError: ``src`` >= group size.
        """
        check_int("src", src, 0)
        check_int("max_bytes", max_bytes, 0)
        data = b"" if payload is None else _as_bytes(payload)
        rid = self._next_round(tag, round)
        rec = self._record("broadcast_bytes", "pull", tag, src=src, payload_bytes=len(data))

        def pick(g: _Group) -> list[str]:
            if src >= len(g.ids):
                raise CommError(f"src must be in [0, {len(g.ids) - 1}] for this group, got {src}")
            return [] if g.ids[src] == g.me else [g.ids[src]]

        def pullers(g: _Group) -> list[str]:  # everyone pulls from src, nobody from the rest
            if src >= len(g.ids) or g.ids[src] != g.me:
                return []
            return [p for p in _others(g) if _takes(g.metas[p], len(data))]

        def body(h: Handle) -> bytes:
            grp, got = self._gather_payloads(h, rec, tag, rid, data, pick, pullers, max_bytes)
            src_id = grp.ids[src]
            if got.get(src_id) is None:
                raise PeerLost(f"broadcast tag {tag!r} round {rid}: src {src_id} not fetched")
            rec.payload_bytes = rec.sizes[src]
            rec.sent, rec.recv = pull_broadcast_bytes(rec.sizes[src], rec.rank, src, rec.P)
            h.missing = grp.missing
            return got[src_id]

        return self._launch(tag, rec, body, None, async_op)

    def broadcast(self, t: torch.Tensor, src: int = 0, *, async_op: bool = False, tag: str = "",
                  round: int | None = None) -> Handle[torch.Tensor] | torch.Tensor:  # fmt: skip
        """In-place copy of ``src``'s tensor into ``t`` on every member (``pull``)."""
        check_type("t", t, torch.Tensor)
        nbytes = t.numel() * t.element_size()
        inner = self.broadcast_bytes(_as_bytes(t), src, async_op=True, tag=tag, round=round,
                                     max_bytes=nbytes)  # fmt: skip
        rec = inner.record
        rec.op, rec.numel, rec.itemsize = "broadcast", t.numel(), t.element_size()

        def wait_fn(timeout: float | None) -> torch.Tensor:
            data = inner.wait(timeout)
            h.group, h.missing = inner.group, inner.missing
            if len(data) != nbytes:
                raise CommError(f"broadcast: src sent {len(data)} bytes, t holds {nbytes}")
            flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if nbytes else None
            return _copy_into(t, None if flat is None else flat.view(t.dtype))

        h: Handle = Handle(inner.record, wait_fn, inner.done)
        return h if async_op else h.wait()

    def control_max(self, values: list[float], *, tag: str = "", round: int | None = None,
                    timeout: float | None = None) -> list[float]:  # fmt: skip
        """Element-wise MAX of a few floats over the group; rides the gather metadata (for the WAN clock).

        Counted as control bytes, 8 per value to and from each other member.
        """
        vals = [float(v) for v in values]
        rid = self._next_round(tag, round)
        rec = self._record("control_max", "gather", tag)

        def body(h: Handle) -> list[float]:
            grp = self._form_group(self._gather_slot(tag), tag, rid, {"values": vals})
            rows = [grp.metas[p].get("values") for p in grp.ids]
            if any(not isinstance(r, list) or len(r) != len(vals) for r in rows):
                raise CommError(f"control_max tag {tag!r}: got {rows}, {len(vals)} values each")
            rec.P, rec.rank = len(grp.ids), grp.ids.index(self.peer_id)
            rec.control_sent = rec.control_recv = 8 * len(vals) * (rec.P - 1)
            h.group, h.missing = tuple(grp.ids), grp.missing
            return [max(float(r[i]) for r in rows) for i in range(len(vals))]

        return self._launch(tag, rec, body, None, True).wait(timeout)

    def barrier(self, timeout: float | None = None) -> None:
        """Return once every member reached the barrier (a control_max over one zero)."""
        self.control_max([0.0], tag="thinwire.barrier", timeout=timeout)
