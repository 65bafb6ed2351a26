"""Rollout records and their versioned little-endian wire format.

A :class:`Rollout` is one sampled completion with everything a learner (or a verifier) needs: the
policy version and the fingerprint of the weights that produced it, their origin, the behaviour
log-probs the worker recorded, the loss mask, the reward and its components (the
INTELLECT-2-era prime-rl parquet schema is the model). A :class:`RolloutGroup` holds the G
completions of one prompt. :func:`encode` / :func:`decode` give the wire record (the only byte
format of ``thinwire.rl``); :func:`decode` rejects truncated, corrupted (CRC-32) or malformed
input with :class:`RolloutDecodeError`, never a half-built record. Several groups travel as one
:func:`thinwire.compression.pack_bundle` of records (:func:`encode_groups`), through a
communicator's byte ops.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from thinwire._validate import check_int, check_type
from thinwire.compression import PayloadError, bundle_nbytes, pack_bundle, unpack_bundle

__all__ = [
    "SCHEMA_VERSION",
    "Rollout",
    "RolloutDecodeError",
    "RolloutGroup",
    "decode",
    "decode_groups",
    "encode",
    "encode_groups",
    "groups_nbytes",
    "replace_mask",
    "wire_nbytes",
]

SCHEMA_VERSION = 1
_MAGIC = b"TWRO"
# magic, schema, flags, body length (bytes between this header and the CRC trailer)
_HEADER = struct.Struct("<4sHHI")
# group_id, prompt_id, sample_idx, policy_version, origin, worker_id, temperature, reward,
# created_at, fingerprint length
_FIXED = struct.Struct("<16sqIqiiffdB")
_LENGTHS = struct.Struct("<II")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_F32 = struct.Struct("<f")
_FLAG_TRUNCATED = 1
_KNOWN_FLAGS = _FLAG_TRUNCATED
_MAX_FINGERPRINT = 64  # a SHA-512 digest at most; thinwire uses 16-byte truncated SHA-256
_INT32 = (-(2**31), 2**31 - 1)


class RolloutDecodeError(ValueError):
    """A rollout payload is truncated, corrupted or does not follow the wire schema."""


@dataclass(eq=False)
class Rollout:
    """One completion of one prompt, tagged with the policy version that produced it.

    Args:
        group_id: 16-byte id shared by the G members of a group (a uuid4).
        prompt_id: id of the prompt (task) within its environment.
        sample_idx: index of this member in its group, ``[0, G)``.
        prompt_ids: prompt token ids, 1-D integer tensor (int32 on the wire).
        completion_ids: completion token ids, 1-D integer tensor of length ``Lc``.
        loss_mask: 1-D bool tensor of length ``Lc``; False for padding, tool/env tokens and
            withheld or overlong completions.
        behavior_logprobs: 1-D float32 tensor of length ``Lc``: log-prob of each sampled token
            under the temperature-scaled sampling distribution.
        policy_version: version of the weights that sampled it (see :mod:`thinwire.rl.learner`).
        origin: id of the learner whose weights sampled it.
        worker_id: id of the rollout worker.
        temperature: sampling temperature.
        truncated: hit the length limit without EOS.
        reward: scalar reward; NaN for an unscorable completion (no reward function applied).
        reward_components: reward of each reward function by name (None → NaN on the wire).
        created_at: wall-clock time of creation (``time.time()``).
        fingerprint: digest of the weights that sampled it (:func:`thinwire.rl.param_fingerprint`);
            empty when unknown.
    """

    group_id: bytes
    prompt_id: int
    sample_idx: int
    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    loss_mask: torch.Tensor
    behavior_logprobs: torch.Tensor
    policy_version: int
    origin: int = 0
    worker_id: int = 0
    temperature: float = 1.0
    truncated: bool = False
    reward: float = math.nan
    reward_components: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    fingerprint: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.group_id, bytes) or len(self.group_id) != 16:
            raise ValueError(f"group_id must be 16 bytes (a uuid), got {self.group_id!r}")
        n = self.completion_ids.shape[0] if self.completion_ids.dim() == 1 else -1
        for name in ("prompt_ids", "completion_ids", "loss_mask", "behavior_logprobs"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D tensor, got {type(t).__name__}")
        for name in ("loss_mask", "behavior_logprobs"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"{name} must have the completion's length {n}, got {getattr(self, name).shape[0]}"
                )
        if len(self.fingerprint) > _MAX_FINGERPRINT:
            raise ValueError(
                f"fingerprint length must be in [0, {_MAX_FINGERPRINT}], got {len(self.fingerprint)}"
            )

    @property
    def rollout_id(self) -> bytes:
        """Unique id of this record: ``group_id`` followed by ``sample_idx`` (4 bytes LE)."""
        return self.group_id + _U32.pack(self.sample_idx)

    @property
    def n_tokens(self) -> int:
        """Number of tokens the loss sees (``loss_mask.sum()``)."""
        return int(self.loss_mask.sum())


@dataclass(frozen=True, eq=False)
class RolloutGroup:
    """The G completions of one prompt (members in ``sample_idx`` order).

    The pipeline guarantees that all members come from one policy version;
    :attr:`policy_version` raises if they do not. ``info`` carries task metadata that travels
    with shared groups (SAPO, :mod:`thinwire.rl.runtime`); it is not part of the wire record.
    """

    rollouts: tuple[Rollout, ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rollouts:
            raise ValueError("a RolloutGroup must hold at least one rollout, got none")
        gid, pid = self.rollouts[0].group_id, self.rollouts[0].prompt_id
        for r in self.rollouts:
            if r.group_id != gid or r.prompt_id != pid:
                raise ValueError(
                    "every member of a RolloutGroup must share group_id and prompt_id, got "
                    f"({r.group_id.hex()}, {r.prompt_id}) next to ({gid.hex()}, {pid})"
                )

    @property
    def group_id(self) -> bytes:
        """The members' shared 16-byte id."""
        return self.rollouts[0].group_id

    @property
    def prompt_id(self) -> int:
        """The members' shared prompt id."""
        return self.rollouts[0].prompt_id

    @property
    def size(self) -> int:
        """G, the number of members."""
        return len(self.rollouts)

    @property
    def origin(self) -> int:
        """Learner id of the weights that sampled the first member."""
        return self.rollouts[0].origin

    @property
    def versions(self) -> tuple[int, ...]:
        """Policy version of each member."""
        return tuple(r.policy_version for r in self.rollouts)

    @property
    def policy_version(self) -> int:
        """The one version all members were sampled with.

        Raises:
            ValueError: members carry different versions (a worker broke the rule of one version
                per group).
        """
        vs = set(self.versions)
        if len(vs) != 1:
            raise ValueError(
                f"members of one group must come from one policy version, got {sorted(vs)}"
            )
        return self.rollouts[0].policy_version

    def rewards(self) -> torch.Tensor:
        """Rewards of the members as a float64 tensor ``[G]`` (NaN = unscorable)."""
        return torch.tensor([r.reward for r in self.rollouts], dtype=torch.float64)

    def with_rollouts(self, rollouts: Iterable[Rollout]) -> RolloutGroup:
        """A copy of this group holding ``rollouts`` (same ``info``)."""
        return RolloutGroup(tuple(rollouts), self.info)


# ------------------------------------------------------------------------------- wire format
def _ints(name: str, t: torch.Tensor) -> bytes:
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.numel() and (int(t.min()) < _INT32[0] or int(t.max()) > _INT32[1]):
        raise ValueError(f"{name} must be in [{_INT32[0]}, {_INT32[1]}] (int32 on the wire)")
    return t.detach().cpu().numpy().astype("<i4", copy=False).tobytes()


def _component_bytes(components: Mapping[str, float | None]) -> bytes:
    if len(components) > 0xFFFF:
        raise ValueError(
            f"reward_components must have at most 65535 entries, got {len(components)}"
        )
    out = [_U16.pack(len(components))]
    for name, value in components.items():
        raw = check_type("reward component name", name, str).encode("utf-8")
        if len(raw) > 0xFFFF:
            raise ValueError(f"reward component name must be at most 65535 bytes, got {len(raw)}")
        out += [_U16.pack(len(raw)), raw, _F32.pack(math.nan if value is None else float(value))]
    return b"".join(out)


def wire_nbytes(rollout: Rollout) -> int:
    """Exact length of ``encode(rollout)`` without encoding.

    ``12 + 61 + len(fingerprint) + 8 + 4·Lp + 4·Lc + ceil(Lc / 8) + 4·Lc + 2 + Σ(6 + len(name))
    + 4`` bytes: header, fixed fields, fingerprint, lengths, prompt and completion int32, bit-packed
    mask, float32 log-probs, reward components, CRC-32. DigitSum (Lp = 4, Lc = 3, 16-byte
    fingerprint, no components): 144 bytes, against ~104 for the rough estimate
    ``4(Lp + Lc) + 4·Lc + 64``.
    """
    lp, lc = rollout.prompt_ids.shape[0], rollout.completion_ids.shape[0]
    comps = sum(6 + len(n.encode("utf-8")) for n in rollout.reward_components)
    return (
        _HEADER.size + _FIXED.size + len(rollout.fingerprint) + _LENGTHS.size
        + 4 * lp + 8 * lc + (lc + 7) // 8 + 2 + comps + 4
    )  # fmt: skip


def encode(rollout: Rollout) -> bytes:
    """Serialize one rollout to the versioned little-endian wire record.

    Layout (byte offsets): 0 magic ``b"TWRO"``; 4 schema u16 (= 1); 6 flags u16 (bit 0:
    truncated); 8 body length u32; 12 ``group_id`` (16 bytes); 28 ``prompt_id`` i64;
    36 ``sample_idx`` u32; 40 ``policy_version`` i64; 48 ``origin`` i32; 52 ``worker_id`` i32;
    56 ``temperature`` f32; 60 ``reward`` f32 (NaN: unscorable); 64 ``created_at`` f64;
    72 fingerprint length u8; 73 fingerprint; then ``Lp`` u32, ``Lc`` u32, ``prompt_ids``
    int32[Lp], ``completion_ids`` int32[Lc], ``loss_mask`` bits (LSB first), ``behavior_logprobs``
    f32[Lc], component count u16 and per component (name length u16, UTF-8 name, value f32);
    last, CRC-32 (u32) of every preceding byte.

    Raises:
        ValueError: a field does not fit its wire type (token ids outside int32, ...).
        TypeError: a field has the wrong type.
    """
    lp, lc = rollout.prompt_ids.shape[0], rollout.completion_ids.shape[0]
    mask = rollout.loss_mask.detach().cpu().to(torch.bool).numpy()
    body = b"".join(
        (
            _FIXED.pack(
                rollout.group_id,
                rollout.prompt_id,
                check_int("sample_idx", rollout.sample_idx, 0, 2**32 - 1),
                rollout.policy_version,
                rollout.origin,
                rollout.worker_id,
                float(rollout.temperature),
                float(rollout.reward),
                float(rollout.created_at),
                len(rollout.fingerprint),
            ),
            rollout.fingerprint,
            _LENGTHS.pack(lp, lc),
            _ints("prompt_ids", rollout.prompt_ids),
            _ints("completion_ids", rollout.completion_ids),
            np.packbits(mask, bitorder="little").tobytes(),
            rollout.behavior_logprobs.detach().cpu().numpy().astype("<f4", copy=False).tobytes(),
            _component_bytes(rollout.reward_components),
        )
    )
    flags = _FLAG_TRUNCATED if rollout.truncated else 0
    head = _HEADER.pack(_MAGIC, SCHEMA_VERSION, flags, len(body))
    return head + body + _U32.pack(zlib.crc32(body, zlib.crc32(head)))


class _Reader:
    """Cursor over a bytes buffer that raises :class:`RolloutDecodeError` on any overrun."""

    def __init__(self, buf: memoryview, start: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, start, end

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise RolloutDecodeError(
                f"rollout record is malformed: {what} needs {n} bytes at offset {self.pos}, "
                f"only {self.end - self.pos} left"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, what: str) -> tuple[Any, ...]:
        return st.unpack(self.take(st.size, what))


def _record_span(buf: memoryview, offset: int, limit: int) -> int:
    """Validate header and CRC of the record at ``offset``; return its end offset."""
    avail = limit - offset
    if avail < _HEADER.size:
        raise RolloutDecodeError(
            f"rollout record is truncated: {avail} bytes, the header alone needs {_HEADER.size}"
        )
    magic, schema, flags, body_len = _HEADER.unpack(buf[offset : offset + _HEADER.size])
    if magic != _MAGIC:
        raise RolloutDecodeError(
            f"not a rollout record: magic must be {_MAGIC!r}, got {bytes(magic)!r}"
        )
    if schema != SCHEMA_VERSION:
        raise RolloutDecodeError(
            f"rollout schema must be in [{SCHEMA_VERSION}, {SCHEMA_VERSION}], got {schema}; "
            "upgrade thinwire on the receiving side"
        )
    if flags & ~_KNOWN_FLAGS:
        raise RolloutDecodeError(
            f"rollout flags must be a subset of {_KNOWN_FLAGS:#x}, got {flags:#x}"
        )
    end = offset + _HEADER.size + body_len + 4
    if end > limit:
        raise RolloutDecodeError(
            f"rollout record is truncated: header announces {end - offset} bytes, got {avail}"
        )
    head = buf[offset : offset + _HEADER.size]
    body = buf[offset + _HEADER.size : end - 4]
    (crc,) = _U32.unpack(buf[end - 4 : end])
    if zlib.crc32(body, zlib.crc32(head)) != crc:
        raise RolloutDecodeError("rollout record is corrupted: CRC-32 mismatch")
    return end


def _decode_at(buf: memoryview, offset: int, end: int) -> Rollout:
    flags = _HEADER.unpack(buf[offset : offset + _HEADER.size])[2]
    rd = _Reader(buf, offset + _HEADER.size, end - 4)
    (gid, pid, idx, version, origin, worker, temp, reward, created, fp_len) = rd.unpack(
        _FIXED, "fixed fields"
    )
    if fp_len > _MAX_FINGERPRINT:
        raise RolloutDecodeError(
            f"fingerprint length must be in [0, {_MAX_FINGERPRINT}], got {fp_len}"
        )
    fingerprint = bytes(rd.take(fp_len, "fingerprint"))
    lp, lc = rd.unpack(_LENGTHS, "lengths")
    prompt = np.frombuffer(rd.take(4 * lp, "prompt_ids"), dtype="<i4")
    completion = np.frombuffer(rd.take(4 * lc, "completion_ids"), dtype="<i4")
    mask_bits = np.frombuffer(rd.take((lc + 7) // 8, "loss_mask"), dtype=np.uint8)
    logp = np.frombuffer(rd.take(4 * lc, "behavior_logprobs"), dtype="<f4")
    (n_comp,) = rd.unpack(_U16, "component count")
    comps: dict[str, float] = {}
    for _ in range(n_comp):
        (n,) = rd.unpack(_U16, "component name length")
        try:
            name = bytes(rd.take(n, "component name")).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RolloutDecodeError(f"reward component name is not UTF-8: {exc}") from None
        (comps[name],) = rd.unpack(_F32, "component value")
    if rd.pos != rd.end:
        raise RolloutDecodeError(f"rollout record has {rd.end - rd.pos} unexpected trailing bytes")
    mask = np.unpackbits(mask_bits, count=lc, bitorder="little").astype(bool)
    return Rollout(
        group_id=bytes(gid),
        prompt_id=pid,
        sample_idx=idx,
        prompt_ids=torch.from_numpy(prompt.astype(np.int64)),
        completion_ids=torch.from_numpy(completion.astype(np.int64)),
        loss_mask=torch.from_numpy(mask),
        behavior_logprobs=torch.from_numpy(logp.astype(np.float32)),
        policy_version=version,
        origin=origin,
        worker_id=worker,
        temperature=temp,
        truncated=bool(flags & _FLAG_TRUNCATED),
        reward=reward,
        reward_components=comps,
        created_at=created,
        fingerprint=fingerprint,
    )


def decode(payload: bytes | bytearray | memoryview) -> Rollout:
    """Parse one wire record produced by :func:`encode`.

    Raises:
        RolloutDecodeError: the payload is truncated, has trailing bytes, fails its CRC-32, has an
            unknown magic/schema/flag, or a field is inconsistent.
    """
    buf = memoryview(payload).cast("B")
    end = _record_span(buf, 0, len(buf))
    if end != len(buf):
        raise RolloutDecodeError(f"rollout record has {len(buf) - end} unexpected trailing bytes")
    return _decode_at(buf, 0, end)


def encode_groups(groups: Sequence[RolloutGroup]) -> bytes:
    """Serialize groups as one :func:`thinwire.compression.pack_bundle` of member records.

    Members in group order, groups in order; ``8 + Σ (4 + len(record))`` bytes
    (:func:`groups_nbytes`). The bundle only delimits: every record has its own CRC-32.
    """
    return pack_bundle([encode(r) for g in groups for r in g.rollouts])


def groups_nbytes(groups: Sequence[RolloutGroup]) -> int:
    """Exact length of ``encode_groups(groups)`` without encoding."""
    return bundle_nbytes([wire_nbytes(r) for g in groups for r in g.rollouts])


def decode_groups(payload: bytes | bytearray | memoryview) -> list[RolloutGroup]:
    """Parse :func:`encode_groups` output; consecutive records of one ``group_id`` form a group.

    Raises:
        RolloutDecodeError: the bundle or any record is truncated, corrupted or malformed, or a
            group's members disagree (prompt, origin).
    """
    try:
        records = unpack_bundle(bytes(payload))
    except PayloadError as exc:
        raise RolloutDecodeError(f"rollout bundle: {exc}") from None
    out: list[RolloutGroup] = []
    members: list[Rollout] = []
    for rec in records:
        r = decode(rec)
        if members and r.group_id != members[0].group_id:
            out.append(_group(members))
            members = []
        members.append(r)
    if members:
        out.append(_group(members))
    return out


def _group(members: list[Rollout]) -> RolloutGroup:
    try:
        return RolloutGroup(tuple(members))
    except ValueError as exc:
        raise RolloutDecodeError(f"rollout group is inconsistent: {exc}") from None


def replace_mask(rollout: Rollout, mask: torch.Tensor | Sequence[bool]) -> Rollout:
    """A copy of ``rollout`` with a new loss mask (withhold mode, overlong masking)."""
    return replace(rollout, loss_mask=torch.as_tensor(mask, dtype=torch.bool))
