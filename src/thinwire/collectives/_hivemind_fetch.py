"""The P2P fetch path of the hivemind engine: the serve table, the pull and the metadata checks.

A gather-path op offers its payload under a fresh 128-bit token (:func:`secrets.token_hex`) that
travels only inside the op's gather metadata, which hivemind's matchmaking hands to the members
of the group (never to the DHT), so a peer outside the group cannot name the payload. Once the
group is known the offer is restricted to its members and freed as soon as every member expected
to pull it has been served, or when the op's fetch deadline has passed, whichever is first.

A pull trusts nothing the remote side says: the announced length must be what the receiver
accepts (the exact tensor size for ``all_gather_into_tensor``, at most ``max_bytes`` otherwise)
before a single byte is requested; the length header must match it; no chunk may be empty, longer
than :data:`CHUNK_BYTES` or run past the announced length; and the whole transfer shares one
deadline (the op's fetch budget), so a peer that trickles one chunk per ``next_chunk_timeout - ε``
is dropped when the deadline passes instead of holding the op for ``len / chunk`` timeouts.

Wire format (unchanged): ``ExpertRequest(uid=<token>)`` answered by a stream of
``ExpertResponse``: the 8-byte little-endian length header, then chunks of <= 2^19 bytes.
hivemind is imported inside the coroutines only, so importing this module never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CHUNK_BYTES", "ServeTable", "check_meta", "pull_payload", "serve_payload"]

logger = logging.getLogger(__name__)

CHUNK_BYTES = 2**19  # fetch chunks <= 2^19 bytes, hivemind's DEFAULT_PART_SIZE_BYTES
_TOKEN_BYTES = 16  # 128-bit offer ids: unguessable (RFC 4086 §8.3 strength for session ids)
_TOKEN_RE = re.compile(rf"[0-9a-f]{{{2 * _TOKEN_BYTES}}}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclass
class _Offer:
    data: bytes
    deadline: float  # time.monotonic() after which nobody is served and the entry is dropped
    allowed: frozenset[str] | None = None  # group members; None until the group is known
    pending: set[str] | None = None  # members still expected to pull; None until known
    done: set[str] = field(default_factory=set)  # members served so far


class ServeTable:
    """Payloads this peer offers, by unguessable token; thread-safe (ops and the P2P loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offers: dict[str, _Offer] = {}

    def offer(self, data: bytes, deadline: float) -> str:
        """Offer ``data`` until ``deadline`` (monotonic s) to whoever names the returned token."""
        uid = secrets.token_hex(_TOKEN_BYTES)
        with self._lock:
            self._sweep_locked(time.monotonic())
            self._offers[uid] = _Offer(data, deadline)
        return uid

    def expect(self, uid: str, members: Iterable[str], pullers: Iterable[str],
               deadline: float) -> None:  # fmt: skip
        """The group formed: serve only ``members``; free the offer once ``pullers`` got it."""
        with self._lock:
            o = self._offers.get(uid)
            if o is None:
                return
            o.allowed, o.deadline = frozenset(members), deadline
            o.pending = set(pullers) - o.done
            if not o.pending:
                del self._offers[uid]

    def withdraw(self, uid: str) -> None:
        with self._lock:
            self._offers.pop(uid, None)

    def take(self, uid: str, remote: str) -> tuple[bytes, float] | None:
        """``(data, deadline)`` if ``remote`` may fetch ``uid`` now, else None."""
        with self._lock:
            self._sweep_locked(time.monotonic())
            o = self._offers.get(uid)
            if o is None or (o.allowed is not None and remote not in o.allowed):
                return None
            return o.data, o.deadline

    def served(self, uid: str, remote: str) -> None:
        """``remote`` received the whole payload: drop the offer once nobody else is expected."""
        with self._lock:
            o = self._offers.get(uid)
            if o is None:
                return
            o.done.add(remote)
            if o.pending is not None:
                o.pending.discard(remote)
                if not o.pending:
                    del self._offers[uid]

    def sweep(self) -> None:
        with self._lock:
            self._sweep_locked(time.monotonic())

    def nbytes(self) -> int:
        """Payload bytes held right now (expired offers excluded)."""
        with self._lock:
            self._sweep_locked(time.monotonic())
            return sum(len(o.data) for o in self._offers.values())

    def __len__(self) -> int:
        with self._lock:
            self._sweep_locked(time.monotonic())
            return len(self._offers)

    def _sweep_locked(self, now: float) -> None:
        for k in [k for k, o in self._offers.items() if o.deadline < now]:
            del self._offers[k]


def check_meta(meta: Mapping[str, Any], cap: int) -> tuple[str, int, str] | str:
    """``(uid, len, sha256)`` from a member's gather metadata, or the reason it is refused.

    ``cap``: the largest payload the receiver accepts; announcements above it are refused before
    any byte is fetched.
    """
    n, uid, sha = meta.get("len"), meta.get("uid"), meta.get("sha256")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return f"announced length {n!r} is not a byte count"
    if n > cap:
        return f"announced length {n} exceeds the {cap} bytes this op accepts"
    if not isinstance(uid, str) or not _TOKEN_RE.fullmatch(uid):
        return f"offer id {uid!r} is not a {2 * _TOKEN_BYTES}-digit hex token"
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        return f"sha256 {sha!r} is not a hex digest"
    return uid, n, sha


async def serve_payload(table: ServeTable, uid: str, remote: str) -> AsyncIterator[Any]:
    """The response stream for one fetch: length header, then chunks; nothing if not offered."""
    from hivemind.proto import runtime_pb2

    got = table.take(uid, remote)
    if got is None:
        return
    data, deadline = got
    yield runtime_pb2.ExpertResponse(metadata=struct.pack("<Q", len(data)))
    for off in range(0, len(data), CHUNK_BYTES):
        if time.monotonic() > deadline:  # the round ended: stop feeding a slow reader
            return
        yield runtime_pb2.ExpertResponse(metadata=data[off : off + CHUNK_BYTES])
    table.served(uid, remote)


async def pull_payload(p2p: Any, handler: str, peer: str, uid: str, n: int, sha: str | None,
                       chunk_timeout: float, deadline: float, *, exact: bool = True,
                       ) -> bytes | None:  # fmt: skip
    """Fetch ``n`` bytes offered as ``uid`` by ``peer``; None (logged) on any failure.

    Every await is bounded by ``chunk_timeout`` and by the transfer's ``deadline`` (monotonic s),
    and at most ``n`` bytes are ever buffered. ``exact=False`` makes ``n`` a cap: the length
    header may announce any size up to it (a state transfer, whose size the receiver bounds
    but does not know). ``sha=None`` skips the digest check (the receiver validates the
    content itself).
    """
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    def left() -> float:
        rest = deadline - time.monotonic()
        if rest <= 0:
            raise TimeoutError(f"fetch deadline passed after {len(buf)} of {n} bytes")
        return min(rest, chunk_timeout)

    buf = bytearray()
    try:
        stream = await asyncio.wait_for(p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer), handler, runtime_pb2.ExpertRequest(uid=uid),
            runtime_pb2.ExpertResponse), left())  # fmt: skip
        try:
            head = (await asyncio.wait_for(stream.__anext__(), left())).metadata
            m = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if m < 0 or (m != n if exact else m > n):
                want = f"announced {n}" if exact else f"at most {n}"
                raise ValueError(f"length header {head[:16]!r} is not {want}")
            n = m
            while len(buf) < n:
                chunk = (await asyncio.wait_for(stream.__anext__(), left())).metadata
                if not chunk or len(chunk) > CHUNK_BYTES or len(buf) + len(chunk) > n:
                    raise ValueError(f"chunk of {len(chunk)} bytes at offset {len(buf)} of {n}")
                buf += chunk
        finally:
            with contextlib.suppress(Exception):  # a peer that will not hang up costs no more
                await asyncio.wait_for(stream.aclose(), chunk_timeout)
        if sha is not None and hashlib.sha256(buf).hexdigest() != sha:
            raise ValueError("sha256 of the received payload differs from the announced one")
        return bytes(buf)
    except Exception as exc:
        logger.warning("fetch from %s failed, dropping it from the op: %r", peer, exc)
        return None
