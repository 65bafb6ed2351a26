"""Policy store, version bookkeeping, weight fingerprints and the remote weight channel.

A :class:`PolicyStore` (one per learner) keeps the latest
published weights and their ``policy_version`` plus a few older versions (the verifier and lagged
workers read them); co-located workers pull from it over the LAN (counted under
``"weights/local"``). Remote workers never receive full weights after the first publish:
:class:`DeltaPublisher` sends ``θ_new − θ_mirror`` through a :mod:`thinwire.compression` codec,
where ``θ_mirror`` is the sender's exact copy of what the receiver reconstructed, so quantization
error never accumulates (the next delta carries it); :class:`DeltaSubscriber` applies the same
decode on the remote side, bit-identically.

Versions: every event that changes the weights a learner samples from adds one —
each inner step and each outer merge; :func:`merge_count` reads the merges of a thinwire optimizer.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from thinwire._validate import check_int, check_type
from thinwire.collectives import ByteLedger, OpRecord
from thinwire.compression import PayloadError, build_codec
from thinwire.rl.rollout import Channel

__all__ = [
    "DeltaPublisher",
    "DeltaSubscriber",
    "FINGERPRINT_BYTES",
    "PolicySnapshot",
    "PolicyStore",
    "WeightPayloadError",
    "merge_count",
    "param_fingerprint",
    "state_nbytes",
]

FINGERPRINT_BYTES = 16  # 128 bits of SHA-256: collisions need ~2^64 tries
_W_MAGIC = b"TWWU"
_W_HEADER = struct.Struct("<4sBqQ")  # magic, kind (0 full, 1 delta), version, numel
_FULL, _DELTA = 0, 1


class WeightPayloadError(ValueError):
    """A weight-update payload is truncated, corrupted or out of order."""


def param_fingerprint(state: Mapping[str, torch.Tensor] | torch.nn.Module) -> bytes:
    """16-byte digest of a parameter set: SHA-256 over each entry's name, dtype, shape and bytes.

    Two replicas have the same fingerprint exactly when every tensor is bitwise equal (up to
    SHA-256 collisions), so a rollout's fingerprint names the weights that produced it.
    """
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()[:FINGERPRINT_BYTES]


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a full copy of ``state``: ``b·P`` for ``P`` values of ``b`` bytes each."""
    return sum(t.numel() * t.element_size() for t in state.values())


def merge_count(optimizer: torch.optim.Optimizer) -> int:
    """Outer merges done so far by a DiLoCo-family optimizer (``outer_step``); 0 for others.

    A learner adds ``1 + (merges after − merges before)`` to its version per ``step()``:
    the inner step and each merge that overwrote the replica. DeMo steps count once.
    """
    return int(getattr(optimizer, "outer_step", 0))


@dataclass(frozen=True)
class PolicySnapshot:
    """Published weights: ``version``, a private copy of the state, and its fingerprint."""

    version: int
    state: dict[str, torch.Tensor]
    fingerprint: bytes
    published_at: float


class PolicyStore:
    """Latest published weights of one learner plus the ``keep − 1`` versions before them.

    Thread-safe: a learner publishes while worker threads pull. Pulls by co-located workers are
    counted as LAN traffic (``b·P`` per pull, tag ``"weights/local"``) in ``ledger``.

    Args:
        keep: versions kept (>= 1); lagged workers and the verifier can read any of them.
        learner_id: origin id written into rollouts sampled from these weights.
        ledger: where pulls are counted (None: not counted).
        tag: ledger tag of pulls (default ``"weights/local"``).
    """

    def __init__(
        self,
        *,
        keep: int = 8,
        learner_id: int = 0,
        ledger: ByteLedger | None = None,
        tag: str = "weights/local",
    ) -> None:
        self.keep = check_int("keep", keep, 1)
        self.learner_id = check_int("learner_id", learner_id, 0)
        self.ledger = ledger
        self.tag = check_type("tag", tag, str)
        self._cond = threading.Condition()
        self._snaps: OrderedDict[int, PolicySnapshot] = OrderedDict()
        self._closed = False

    def publish(
        self, state: Mapping[str, torch.Tensor] | torch.nn.Module, version: int
    ) -> PolicySnapshot:
        """Store a copy of ``state`` as ``version`` (strictly newer than the latest).

        Raises:
            ValueError: ``version`` is not newer than the latest published one.
        """
        if isinstance(state, torch.nn.Module):
            state = state.state_dict()
        check_int("version", version, 0)
        with self._cond:
            if self._snaps and version <= self.version:
                raise ValueError(f"version must be in [{self.version + 1}, inf), got {version}")
        copy = {k: v.detach().clone() for k, v in state.items()}
        snap = PolicySnapshot(version, copy, param_fingerprint(copy), time.time())
        with self._cond:
            self._snaps[version] = snap
            while len(self._snaps) > self.keep:
                self._snaps.popitem(last=False)
            self._cond.notify_all()
        return snap

    @property
    def version(self) -> int:
        """Latest published version, −1 before the first publish."""
        with self._cond:
            return next(reversed(self._snaps)) if self._snaps else -1

    def versions(self) -> list[int]:
        """Versions currently kept, oldest first."""
        with self._cond:
            return list(self._snaps)

    def latest(self) -> PolicySnapshot:
        """The newest snapshot.

        Raises:
            LookupError: nothing was published yet.
        """
        with self._cond:
            if not self._snaps:
                raise LookupError("the policy store is empty: publish() the initial weights first")
            return next(reversed(self._snaps.values()))

    def get(self, version: int) -> PolicySnapshot:
        """The snapshot of ``version``.

        Raises:
            KeyError: the version was never published or is no longer kept (raise ``keep``).
        """
        with self._cond:
            snap = self._snaps.get(version)
            if snap is None:
                raise KeyError(
                    f"version {version} is not kept by this store (kept: {list(self._snaps)}; "
                    f"keep={self.keep})"
                )
            return snap

    def fingerprint(self, version: int) -> bytes:
        """Fingerprint of the weights of ``version`` (see :meth:`get` for errors)."""
        return self.get(version).fingerprint

    def wait_newer(self, version: int, timeout: float | None = None) -> PolicySnapshot | None:
        """Block until a version newer than ``version`` is published (None on timeout/close)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._closed or (self._snaps and next(reversed(self._snaps)) > version),
                timeout,
            )
            if not ok or not self._snaps or next(reversed(self._snaps)) <= version:
                return None
            return next(reversed(self._snaps.values()))

    def load_into(self, policy: torch.nn.Module, version: int | None = None) -> PolicySnapshot:
        """Copy the weights of ``version`` (default: latest) into ``policy``; count LAN bytes."""
        snap = self.latest() if version is None else self.get(version)
        policy.load_state_dict(snap.state)
        if self.ledger is not None:
            n = state_nbytes(snap.state)
            self.ledger.add(
                OpRecord(op="send", algorithm="p2p", engine="channel", tag=self.tag, P=2,
                         payload_bytes=n, sent=n)
            )  # fmt: skip
        return snap

    def close(self) -> None:
        """Wake every waiter (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# --------------------------------------------------------------------------- remote weights
def _flat(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in state.values()])


def _unflat(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for k, t in like.items():
        out[k] = vec[off : off + t.numel()].reshape(t.shape).to(t.dtype).clone()
        off += t.numel()
    return out


def _frame(kind: int, version: int, numel: int, body: bytes) -> bytes:
    head = _W_HEADER.pack(_W_MAGIC, kind, version, numel)
    return head + body + struct.pack("<I", zlib.crc32(body, zlib.crc32(head)))


class DeltaPublisher:
    """Sends a learner's weights to remote workers: full float32 once, then compressed deltas.

    Every :meth:`publish` after the first encodes ``θ_new − θ_mirror`` with ``codec`` (a
    :func:`thinwire.compression.build_codec` pipeline, default int8 absmax blocks, about ``P`` bytes
    plus the scales) and advances ``θ_mirror`` by exactly what the receivers decode. ``view`` is a
    :class:`PolicyStore` of the mirror, i.e. of the weights remote workers actually sample with, so
    their rollouts can be verified against the right fingerprint.

    Args:
        channel: carries the payloads (tag it ``"weights/broadcast"``; one channel per remote
            worker, each payload counted on each).
        codec: pipeline string for the deltas (default ``"quant(int8)"``).
        keep: versions kept in ``view``.
    """

    def __init__(
        self,
        channels: list[Channel],
        *,
        codec: str = "quant(int8)",
        keep: int = 8,
        learner_id: int = 0,
    ) -> None:
        self.channels = list(channels)
        self.codec_spec = check_type("codec", codec, str)
        self.codec = build_codec(codec)
        self.view = PolicyStore(keep=keep, learner_id=learner_id)
        self._mirror: torch.Tensor | None = None
        self._like: dict[str, torch.Tensor] | None = None
        self.full_sent = 0
        self.deltas_sent = 0

    def publish(self, state: Mapping[str, torch.Tensor], version: int) -> int:
        """Send ``version`` to every channel; return the payload size in bytes."""
        flat = _flat(state)
        if self._mirror is None:
            self._like = {k: v.detach() for k, v in state.items()}
            payload = _frame(_FULL, version, flat.numel(), flat.numpy().astype("<f4").tobytes())
            self._mirror = flat.clone()
            self.full_sent += 1
        else:
            blob, dec = self.codec.roundtrip(flat - self._mirror)
            payload = _frame(_DELTA, version, flat.numel(), blob)
            self._mirror.add_(dec.reshape(-1))
            self.deltas_sent += 1
        assert self._like is not None  # internal invariant: set at the first publish
        self.view.publish(_unflat(self._mirror, self._like), version)
        for ch in self.channels:
            ch.send(payload)
        return len(payload)


class DeltaSubscriber:
    """The remote side of :class:`DeltaPublisher`: rebuilds the mirror weights from payloads.

    Args:
        like: a state dict of the policy architecture (names, shapes, dtypes).
        codec: the publisher's codec pipeline string.
    """

    def __init__(self, like: Mapping[str, torch.Tensor], *, codec: str = "quant(int8)") -> None:
        self._like = {k: v.detach() for k, v in like.items()}
        self.codec = build_codec(check_type("codec", codec, str))
        self._numel = sum(t.numel() for t in self._like.values())
        self._weights: torch.Tensor | None = None
        self.version = -1

    def apply(self, payload: bytes) -> tuple[int, dict[str, torch.Tensor]]:
        """Apply one payload; return ``(version, state)`` of the rebuilt weights.

        Raises:
            WeightPayloadError: truncated/corrupted payload, wrong size, a delta before the
                first full copy, or a version not newer than the current one.
        """
        buf = memoryview(payload).cast("B")
        if len(buf) < _W_HEADER.size + 4:
            raise WeightPayloadError(f"weight payload is truncated: {len(buf)} bytes")
        magic, kind, version, numel = _W_HEADER.unpack(buf[: _W_HEADER.size])
        if magic != _W_MAGIC:
            raise WeightPayloadError(
                f"not a weight payload: magic must be {_W_MAGIC!r}, got {bytes(magic)!r}"
            )
        body = buf[_W_HEADER.size : len(buf) - 4]
        (crc,) = struct.unpack("<I", buf[len(buf) - 4 :])
        if zlib.crc32(body, zlib.crc32(buf[: _W_HEADER.size])) != crc:
            raise WeightPayloadError("weight payload is truncated or corrupted: CRC-32 mismatch")
        if numel != self._numel:
            raise WeightPayloadError(f"weight payload numel must be {self._numel}, got {numel}")
        if version <= self.version:
            raise WeightPayloadError(
                f"weight payload version must be in [{self.version + 1}, inf), got {version}"
            )
        if kind == _FULL:
            if len(body) != 4 * numel:
                raise WeightPayloadError(
                    f"full weight payload must hold {4 * numel} bytes, got {len(body)}"
                )
            self._weights = torch.frombuffer(bytearray(body), dtype=torch.float32).clone()
        elif kind == _DELTA:
            if self._weights is None:
                raise WeightPayloadError("a delta arrived before the first full weight payload")
            try:
                dec = self.codec.decode(bytes(body), numel)
            except PayloadError as exc:
                raise WeightPayloadError(f"weight delta does not decode: {exc}") from None
            self._weights.add_(dec.reshape(-1))
        else:
            raise WeightPayloadError(f"weight payload kind must be in {{0, 1}}, got {kind}")
        self.version = version
        return version, _unflat(self._weights, self._like)
