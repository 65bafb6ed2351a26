"""The hivemind engine: :class:`HivemindCommunicator`, collectives over a hivemind DHT swarm.

Spec: ``specs/collectives_wan_bench.md`` §4 (engine), §2.3 (``butterfly``, ``direct``, ``pull``)
and §2.4 (byte ledger). Peers find each other through a ``hivemind.DHT``
(NAT traversal and relays come with libp2p); dense all-reduces run hivemind's butterfly
(``DecentralizedAverager``), byte payloads travel as P2P pulls after a group has formed on a
one-element averager whose ``gather`` metadata carries ``{round, tag, len, sha256}``.
hivemind is imported lazily, inside :meth:`HivemindCommunicator.create` and the methods it
starts, so ``import thinwire.collectives`` never needs it.

Every op runs on a per-tag worker thread (ops with one tag run in issue order, different tags
overlap), carries a round id, waits until the round's peers have registered in the DHT, then
matchmakes. Every wait has a timeout; every failure is a :class:`CommError` subclass.

Wire details: a fetch is ``ExpertRequest(uid=f"{round}:{tag}")`` answered by one
``ExpertResponse`` holding the 8-byte little-endian length (the §2.4 length header), then chunks
of <= 2^19 bytes; the puller checks length and SHA-256 against the gather metadata. Without an
explicit ``round`` an op uses the tag's own counter, so peers must issue ops from the same start;
elastic runs should pass the optimizer's outer step.

Deviations (hivemind 1.1.12 forces them):
    * Averager prefixes are ``"{run_id}-{tag}-{kind}-{hash}"`` with characters outside
      ``[A-Za-z0-9_-]`` replaced, not ``f"{run_id}.{tag}"``: hivemind rejects a ``.`` in a prefix,
      and slots with one tag but different ``(numel, dtype, codec)`` need distinct P2P namespaces.
    * ``close()`` cannot write an *already expired* membership entry: the DHT keeps the entry with
      the latest expiration. It writes a tombstone (``alive=False``) that expires just after the
      last heartbeat (hivemind's own ``declare_averager(looking_for_group=False)`` trick).
    * Integer tensors are rejected for ``sum`` too (hivemind averages in floating point);
      ``bfloat16`` is averaged in a float32 slot (hivemind's default bf16 wire format is fp32).
    * ``P == 1`` (spec §2.1 rule 4) means ``expected_world_size=1``; otherwise hivemind needs a
      group of two, and a lone peer gets :class:`GroupTooSmall`.
    * With ``expected_world_size=None`` the round waits for the peers the membership table lists
      as alive; when set, it is also hivemind's ``target_group_size`` so a full group forms without
      waiting out the matchmaking window.
    * Client-mode peers cannot serve fetches, so ``all_gather_bytes``/``all_gather_into_tensor``/
      ``broadcast*`` raise :class:`CommError` there (spec §4 "excluded from gather groups").
    * A butterfly whose reducer failed returns a partial average (hivemind keeps local values
      for those parts); the ledger still follows the §2.4 formula.
    * hivemind's uint8 codec ships ``8 + 1024 + n`` bytes per part (an int64 codebook length
      precedes the codebook); the ledger counts ``n + 1024`` as §2.4 specifies.
    * Under NumPy >= 2.4 hivemind's uint8 deserializer raises; see :func:`_native_codec`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import re
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from thinwire._validate import check_choice, check_float, check_int, check_type
from thinwire.collectives.accounting import (
    LENGTH_HEADER_BYTES,
    allgather_direct_bytes,
    butterfly_bytes,
    butterfly_part_elems,
    butterfly_partition,
    pull_broadcast_bytes,
)
from thinwire.collectives.base import (
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
_CHUNK_BYTES = 2**19  # spec §4: fetch chunks <= 2^19 bytes, far below the 4 MiB protobuf cap
_CODEBOOK_BYTES = 256 * 4  # spec §2.4: uint8 parts carry a 256-entry float32 codebook
_POLL_S = 0.2  # round-registration poll; well inside any matchmaking window (>= 1 s in tests)
_DHT_TIMEOUT_S = 10.0  # a few rounds of hivemind's 3 s DHT RPC wait_timeout (dht/node.py)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# hivemind codec class per name (spec §4)
_NATIVE = {None: "NoCompression", "fp16": "Float16Compression", "int8": "Uniform8BitQuantization"}
_CREATE_LOCK = threading.Lock()  # averagers fork; one fork at a time keeps the child's locks sane


def _part_wire(n: int, codec: str | None, itemsize: int) -> int:
    """Wire bytes of one butterfly part of ``n`` elements (spec §2.4: fp32/fp64 ``itemsize*n``,
    fp16 ``2n``, uint8 ``n + 1024`` for the per-part codebook)."""
    return {None: n * itemsize, "fp16": 2 * n, "int8": n + _CODEBOOK_BYTES}[codec]


def _native_codec(codec: str | None) -> Any:
    """The hivemind compression object for ``codec`` (spec §4 codec map).

    hivemind 1.1.12's ``Uniform8BitQuantization.extract`` calls ``int()`` on a one-element
    array, a TypeError since NumPy 2.4 ("raise TypeError on attempt to convert array with
    ndim > 0 to scalar", NumPy 2.4.0 release notes). When a probe shows that failure, the
    UNIFORM_8BIT entry of hivemind's deserializer table is replaced (once, logged) by a subclass
    whose ``extract`` reads the same wire format: int64 codebook length, float32 codebook,
    uint8 codes. Averagers fork after this, so their processes inherit the fix.
    """
    import hivemind.compression as hc
    import hivemind.compression.serialization as hs
    import numpy as np

    if codec != "int8":
        return getattr(hc, _NATIVE[codec])()
    table = hs._BASE_COMPRESSION_TYPES
    probe = torch.linspace(-1.0, 1.0, 16)
    try:
        table["UNIFORM_8BIT"].extract(
            table["UNIFORM_8BIT"].compress(probe, hc.CompressionInfo.from_tensor(probe))
        )
    except TypeError:

        class _Uniform8BitNumpy24(hc.Uniform8BitQuantization):
            def extract(self, msg: Any) -> torch.Tensor:
                k = int(np.frombuffer(msg.buffer, dtype=np.int64, count=1)[0])
                book = np.frombuffer(msg.buffer, dtype=np.float32, count=k, offset=8)
                codes = np.frombuffer(msg.buffer, dtype=np.uint8, offset=8 + 4 * k)
                table_t = torch.as_tensor(book.copy()).to(getattr(torch, msg.dtype))
                out = table_t[torch.as_tensor(codes.copy(), dtype=torch.int64)]
                return out.reshape(tuple(msg.size)).requires_grad_(msg.requires_grad)

        logger.warning("hivemind Uniform8BitQuantization.extract fails under NumPy %s; installing "
                       "a deserializer for the same wire format", np.__version__)  # fmt: skip
        table["UNIFORM_8BIT"] = _Uniform8BitNumpy24()
    return table["UNIFORM_8BIT"]


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


class HivemindCommunicator:
    """Communicator over a hivemind swarm (spec §4). Build it with :meth:`create`.

    ``rank``/``world_size`` describe the sorted group of the last completed op (before any op:
    the live membership); ``epoch`` bumps whenever the live member set changes. Collective:
    every peer must call each op with the same ``tag`` and ``round``.

    Tuning: if ops end in :class:`GroupTooSmall` while peers are alive, raise
    ``matchmaking_time`` (10-15 s over the internet, spec §1); if healthy peers are dropped from
    butterflies, raise ``next_chunk_timeout``; if peers join late, raise ``round_wait_timeout``.
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
        self._served: dict[str, tuple[bytes, float]] = {}
        self._steps: set[Any] = set()  # in-flight hivemind StepControls
        self._members: frozenset[str] = frozenset()
        self._addr = ""
        self._hb_exp = 0.0
        self._closed = False
        mm, rt = opts["matchmaking_time"], opts["request_timeout"]
        self._find_s = 2.0 * mm + 2.0 * rt  # > matchmaking_time, as hivemind's step() asserts
        run = opts["allreduce_timeout"] or opts["round_wait_timeout"]
        self._op_cap_s = self._find_s + run + rt  # from step() to its result
        self._fetch_name = f"thinwire.fetch.{run_id}"

    @classmethod
    def create(
        cls,
        run_id: str,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
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
        start: bool = True,
    ) -> HivemindCommunicator:
        """Validate the settings, then (``start=True``) join the swarm (spec §4 "Join").

        Args:
            run_id: swarm-wide name of the run; prefixes every DHT key and handler.
            initial_peers: multiaddrs of running peers (``visible_maddrs()`` of one); empty
                starts a new swarm.
            host_maddrs: listen multiaddrs (tests: ``("/ip4/127.0.0.1/tcp/0",)``).
            announce_maddrs: multiaddrs to advertise instead (explicit ports).
            client_mode: True behind NAT without relay: joins butterflies with share 0, serves
                nothing (default False).
            use_auto_relay: look for libp2p relays (default: ``client_mode``).
            expected_world_size: peers a round waits for (default: those alive in the table);
                1 makes every op a local copy (spec §2.1 rule 4).
            matchmaking_time: hivemind ``min_matchmaking_time`` in s (default 5.0; 3-5 s on a
                LAN, 10-15 s over the internet).
            request_timeout: leader response timeout in s, in ``(0, matchmaking_time)``
                (default 3.0).
            allreduce_timeout: cap on one butterfly after the group formed, s (default None:
                hivemind bounds each chunk by ``next_chunk_timeout``; thinwire waits at most
                ``round_wait_timeout`` more).
            next_chunk_timeout: per-chunk timeout in s for butterflies and fetches (default 30;
                hivemind's ``sender_timeout``; reducers get twice this).
            round_wait_timeout: how long a round waits for its peers to register, s (default
                600, OpenDiLoCo's wait-for-peers); payloads are served twice this long.
            heartbeat_s: membership refresh period in s; entries expire after 3x (default 5).
            start: join now (default True); otherwise call :meth:`start`.

        Raises:
            ValueError/TypeError: a setting out of range. CommError: the DHT could not start or
                bootstrap.
        """
        check_type("run_id", run_id, str)
        if not run_id:
            raise ValueError("run_id must be a non-empty string, got ''")
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
        )
        comm = cls(run_id, _private=True, **opts)
        if start:
            comm.start()
        return comm

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the DHT (forks before any thread exists), the P2P loop and the heartbeat."""
        import hivemind

        o = self._o
        try:
            self._dht = hivemind.DHT(
                initial_peers=o["initial_peers"] or None,
                start=True,
                host_maddrs=o["host_maddrs"],
                announce_maddrs=o["announce_maddrs"],
                client_mode=o["client_mode"],
                use_auto_relay=o["use_auto_relay"],
            )
        except Exception as exc:
            raise CommError(
                f"hivemind DHT failed to start or join {o['initial_peers']}: {exc}"
            ) from exc
        try:
            self.peer_id = self._dht.peer_id.to_base58()
            maddrs = self.visible_maddrs()
            self._addr = maddrs[0] if maddrs else ""
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
        if alive:
            try:
                dead = {"alive": False, "addr": ""}  # expires just after our last heartbeat
                exp = math.nextafter(max(self._hb_exp, time.time()), math.inf)
                self._dht_store(self._members_key, dead, exp, self.peer_id, "tombstone store")
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
        return f"{self.run_id}.members"

    def _heartbeat_once(self) -> None:
        from hivemind.utils.timed_storage import get_dht_time

        exp = get_dht_time() + 3.0 * self._o["heartbeat_s"]
        entry = {"alive": True, "addr": self._addr}
        self._dht_store(self._members_key, entry, exp, self.peer_id, "heartbeat store")
        self._hb_exp = max(self._hb_exp, exp)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self._o["heartbeat_s"]):
            if not self._dht.is_alive():
                logger.warning("heartbeat: DHT process of %s is gone; stopping", self.peer_id)
                return
            try:
                self._heartbeat_once()
                self._live_members()
            except (CommError, OSError) as exc:
                logger.warning("heartbeat of %s failed: %s", self.peer_id, exc)

    def _live_members(self) -> dict[str, str]:
        """peer id -> address of unexpired, alive entries (self always included); bumps epoch."""
        from hivemind.utils.timed_storage import get_dht_time

        res = self._dht_get(self._members_key, "membership get")
        now, out = get_dht_time(), {self.peer_id: self._addr}
        if res is not None and isinstance(res.value, dict):
            for sub, item in res.value.items():
                v = item.value
                if isinstance(v, dict) and v.get("alive") and item.expiration_time > now:
                    out[str(sub)] = str(v.get("addr", ""))
        with self._lock:
            if frozenset(out) != self._members:
                if self._members:
                    self.epoch += 1
                self._members = frozenset(out)
        return out

    def peers(self) -> list[PeerInfo]:
        """Live members of the run from the DHT table, sorted by peer id (rank = position)."""
        live = self._live_members()
        return [PeerInfo(i, p, live[p], True) for i, p in enumerate(sorted(live))]

    # ---- helpers ---------------------------------------------------------------------------
    def _dht_get(self, key: str, what: str) -> Any:
        return self._dht_wait(self._dht.get(key, latest=True, return_future=True), what)

    def _dht_store(self, key: str, value: Any, exp: float, subkey: str, what: str) -> Any:
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
            from hivemind.averaging import DecentralizedAverager

            o = self._o
            digest = hashlib.sha1(repr((self.run_id, key)).encode()).hexdigest()[:12]
            prefix = f"{_safe(self.run_id)}-{_safe(tag)}-{kind}-{digest}"
            with _CREATE_LOCK:
                compression = _native_codec(codec)
                av = DecentralizedAverager(
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
        with self._lock:
            self._seq[tag] = self._seq.get(tag, -1) + 1
            return self._seq[tag]

    def _await_round(self, rid: int, tag: str) -> None:
        """Register for round ``rid`` and wait (<= round_wait_timeout) until its peers did (§4)."""
        from hivemind.utils.timed_storage import get_dht_time

        key, wait_s = f"{self.run_id}.round.{rid}", self._o["round_wait_timeout"]
        exp = get_dht_time() + 2.0 * wait_s + self._find_s
        mine = f"{len(tag)}:{tag}|"  # length-prefixed so no tag is a prefix of another's
        self._dht_store(key, True, exp, mine + self.peer_id, "round registration")
        deadline = time.monotonic() + wait_s
        while True:
            want = self._o["expected_world_size"] or len(self._live_members())
            res = self._dht_get(key, "round get")
            subs = res.value if res is not None and isinstance(res.value, dict) else {}
            got = sum(1 for s in subs if str(s).startswith(mine))
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

    # ---- fetch path --------------------------------------------------------------------------
    async def _serve(self, request: Any, context: Any) -> Any:
        from hivemind.proto import runtime_pb2

        entry = self._served.get(request.uid)
        if entry is None:
            return
        data = entry[0]
        yield runtime_pb2.ExpertResponse(metadata=struct.pack("<Q", len(data)))
        for off in range(0, len(data), _CHUNK_BYTES):
            yield runtime_pb2.ExpertResponse(metadata=data[off : off + _CHUNK_BYTES])

    def _offer(self, uid: str, data: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            for k in [k for k, (_, until) in self._served.items() if until < now]:
                del self._served[k]
            self._served[uid] = (data, now + 2.0 * self._o["round_wait_timeout"] + self._find_s)

    async def _pull(self, peer: str, uid: str, n: int, sha: str) -> bytes | None:
        from hivemind.p2p import PeerID
        from hivemind.proto import runtime_pb2

        to = self._o["next_chunk_timeout"]
        try:
            stream = await asyncio.wait_for(self._p2p.iterate_protobuf_handler(
                PeerID.from_base58(peer), self._fetch_name, runtime_pb2.ExpertRequest(uid=uid),
                runtime_pb2.ExpertResponse), to)  # fmt: skip
            try:
                head = await asyncio.wait_for(stream.__anext__(), to)
                if struct.unpack("<Q", head.metadata)[0] != n:
                    raise CommError(f"length header {head.metadata!r} != announced {n}")
                buf = bytearray()
                while len(buf) < n:
                    buf += (await asyncio.wait_for(stream.__anext__(), to)).metadata
            finally:
                await asyncio.wait_for(stream.aclose(), to)
            if hashlib.sha256(buf).hexdigest() != sha:
                raise CommError("sha256 of the received payload differs from the announced one")
            return bytes(buf)
        except Exception as exc:
            logger.warning("fetch %s from %s failed: %r", uid, peer, exc)
            return None

    def _pull_many(self, uid: str, want: dict[str, tuple[int, str]]) -> dict[str, bytes | None]:
        async def pull_all() -> list[bytes | None]:
            return await asyncio.gather(*(self._pull(p, uid, n, s) for p, (n, s) in want.items()))

        chunks = max((n // _CHUNK_BYTES for n, _ in want.values()), default=0) + 3
        out = self._on_loop(pull_all(), self._o["next_chunk_timeout"] * chunks + 1.0)
        return dict(zip(want, out, strict=True))

    def _gather_slot(self, tag: str) -> Any:
        """The tag's 1-element averager used only to form groups (None when P = 1)."""
        return None if self._solo() else self._slot(tag, "g", 1, torch.float32, None)

    def _gather_payloads(self, h: Handle, rec: OpRecord, tag: str, rid: int, data: bytes,
                         pull: Callable[[_Group], list[str]]
                         ) -> tuple[_Group, dict[str, bytes | None]]:  # fmt: skip
        """Offer ``data``, form a group, pull from ``pull(group)``; fill the ``direct`` ledger.

        ``recv`` leaves out payloads that never arrived; those peers join ``h.missing``.
        """
        if self._o["client_mode"]:
            raise CommError("client-mode peers cannot serve fetches: gather-path ops are "
                            "unavailable (spec §4); use all_reduce with a native codec")  # fmt: skip
        uid = f"{rid}:{tag}"
        self._offer(uid, data)
        meta = {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        grp = self._form_group(self._gather_slot(tag), tag, rid, meta)
        lens = [int(grp.metas[p].get("len", 0)) for p in grp.ids]
        want = {p: (lens[grp.ids.index(p)], str(grp.metas[p].get("sha256"))) for p in pull(grp)}
        got = self._pull_many(uid, want) if want else {}
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
        """In-place mean/sum of ``t`` over the group (spec §2.3 ``butterfly``).

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
                         async_op: bool = False, tag: str = "", round: int | None = None
                         ) -> Handle[list[bytes | None]] | list[bytes | None]:  # fmt: skip
        """Every member's payload, index = position in the sorted group (spec §2.1 rule 3, §4).

        ``handle.group`` gives the ids; unreachable members are ``None`` and listed in
        ``handle.missing`` (with live members that were not matched). Only ``algorithm="direct"``
        (``"auto"`` is accepted as its alias).
        """
        check_choice("algorithm", algorithm, ("direct", "auto"))
        data = _as_bytes(payload)
        rid = self._next_round(tag, round)
        rec = self._record("all_gather_bytes", "direct", tag, payload_bytes=len(data))

        def body(h: Handle) -> list[bytes | None]:
            grp, got = self._gather_payloads(h, rec, tag, rid, data, _others)
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

        def same_size(g: _Group) -> list[str]:
            return [p for p in _others(g) if g.metas[p].get("len") == nbytes]

        def body(h: Handle) -> torch.Tensor:
            grp, got = self._gather_payloads(h, rec, tag, rid, data, same_size)
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
                        tag: str = "", round: int | None = None) -> Handle[bytes] | bytes:  # fmt: skip
        """``src``'s payload on every member (``pull``, spec §2.3); src = rank in the sorted group.

        Raises:
            PeerLost: the source's payload could not be fetched. CommError: ``src`` >= group size.
        """
        check_int("src", src, 0)
        data = b"" if payload is None else _as_bytes(payload)
        rid = self._next_round(tag, round)
        rec = self._record("broadcast_bytes", "pull", tag, src=src, payload_bytes=len(data))

        def pick(g: _Group) -> list[str]:
            if src >= len(g.ids):
                raise CommError(f"src must be in [0, {len(g.ids) - 1}] for this group, got {src}")
            return [] if g.ids[src] == g.me else [g.ids[src]]

        def body(h: Handle) -> bytes:
            grp, got = self._gather_payloads(h, rec, tag, rid, data, pick)
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
        """In-place copy of ``src``'s tensor into ``t`` on every member (``pull``, spec §2.3)."""
        check_type("t", t, torch.Tensor)
        nbytes = t.numel() * t.element_size()
        inner = self.broadcast_bytes(_as_bytes(t), src, async_op=True, tag=tag, round=round)
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
        """Element-wise MAX of a few floats over the group; rides the gather metadata (§3.3).

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
