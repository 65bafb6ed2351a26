"""Rollout wire record: round trip, documented layout, rejection of bad input,
and the byte-counted channel."""

from __future__ import annotations

import math
import struct
import uuid
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.compression import pack_bundle
from thinwire.rl import (
    Rollout,
    RolloutDecodeError,
    RolloutGroup,
    decode,
    decode_groups,
    encode,
    encode_groups,
    groups_nbytes,
    wire_nbytes,
)


def _rollout(seed: int, lp: int = 4, lc: int = 3, *, n_comp: int = 0, fp_len: int = 16, idx: int = 0,
             gid: bytes | None = None) -> Rollout:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    comps = {f"f{i}_é": float(torch.randn((), generator=g)) for i in range(n_comp)}
    return Rollout(
        group_id=gid or uuid.UUID(int=seed * 7919 + 1).bytes,
        prompt_id=int(torch.randint(-(2**40), 2**40, (), generator=g)),
        sample_idx=idx,
        prompt_ids=torch.randint(-(2**31), 2**31 - 1, (lp,), generator=g),
        completion_ids=torch.randint(0, 50000, (lc,), generator=g),
        loss_mask=torch.rand(lc, generator=g) > 0.3,
        behavior_logprobs=-torch.rand(lc, generator=g) * 5,
        policy_version=int(torch.randint(0, 2**40, (), generator=g)),
        origin=int(torch.randint(0, 100, (), generator=g)),
        worker_id=int(torch.randint(-5, 100, (), generator=g)),
        temperature=0.7,
        truncated=bool(seed % 2),
        reward=math.nan if seed % 3 == 0 else float(torch.rand((), generator=g)),
        reward_components=comps,
        created_at=1.7e9 + seed / 3,
        fingerprint=bytes(range(fp_len)),
    )


def _same(a: Rollout, b: Rollout) -> None:
    for name in ("group_id", "prompt_id", "sample_idx", "policy_version", "origin", "worker_id",
                 "truncated", "created_at", "fingerprint"):  # fmt: skip
        assert getattr(a, name) == getattr(b, name), name
    # temperature and reward travel as float32 (the layout in encode's docstring)
    assert b.temperature == float(np.float32(a.temperature))
    assert (math.isnan(a.reward) and math.isnan(b.reward)) or b.reward == float(
        np.float32(a.reward)
    )
    assert torch.equal(a.prompt_ids.long(), b.prompt_ids)
    assert torch.equal(a.completion_ids.long(), b.completion_ids)
    assert torch.equal(a.loss_mask, b.loss_mask)
    assert torch.equal(a.behavior_logprobs.float(), b.behavior_logprobs)
    assert a.reward_components.keys() == b.reward_components.keys()
    for k, v in a.reward_components.items():
        assert b.reward_components[k] == float(np.float32(v))


@settings(deadline=None, max_examples=40, derandomize=True)
@given(seed=st.integers(0, 2**20), lp=st.integers(0, 20), lc=st.integers(0, 40),
       n_comp=st.integers(0, 3), fp_len=st.sampled_from([0, 16, 32, 64]))  # fmt: skip
def test_round_trip_and_exact_size(seed, lp, lc, n_comp, fp_len):
    r = _rollout(seed, lp, lc, n_comp=n_comp, fp_len=fp_len)
    blob = encode(r)
    _same(r, decode(blob))
    # closed form of the docstring: header, fixed fields, fingerprint, lengths, arrays, comps, CRC
    comps = sum(6 + len(k.encode()) for k in r.reward_components)
    assert (
        len(blob)
        == wire_nbytes(r)
        == 12 + 61 + fp_len + 8 + 4 * lp + 8 * lc + (lc + 7) // 8 + 2 + comps + 4
    )


def test_digit_sum_record_is_144_bytes():
    # Lp = 4, Lc = 3, 16-byte fingerprint, no components: 12+61+16+8+16+12+1+12+2+4
    assert len(encode(_rollout(1))) == 144


def test_documented_layout_offsets():
    r = _rollout(5, lp=2, lc=9, fp_len=16)
    b = encode(r)
    assert b[:4] == b"TWRO" and struct.unpack_from("<H", b, 4)[0] == 1
    assert struct.unpack_from("<H", b, 6)[0] == 1  # seed 5 is odd: truncated flag
    assert struct.unpack_from("<I", b, 8)[0] == len(b) - 16  # body excludes header and CRC
    assert b[12:28] == r.group_id
    assert struct.unpack_from("<q", b, 28)[0] == r.prompt_id
    assert struct.unpack_from("<I", b, 36)[0] == r.sample_idx
    assert struct.unpack_from("<q", b, 40)[0] == r.policy_version
    assert struct.unpack_from("<ii", b, 48) == (r.origin, r.worker_id)
    assert struct.unpack_from("<d", b, 64)[0] == r.created_at
    assert b[72] == 16 and b[73:89] == r.fingerprint
    assert struct.unpack_from("<II", b, 89) == (2, 9)
    assert list(struct.unpack_from("<2i", b, 97)) == r.prompt_ids.tolist()
    assert list(struct.unpack_from("<9i", b, 105)) == r.completion_ids.tolist()
    bits = int.from_bytes(b[141:143], "little")  # 9 mask bits, least significant first
    assert [bool(bits >> i & 1) for i in range(9)] == r.loss_mask.tolist()
    assert list(struct.unpack_from("<9f", b, 143)) == r.behavior_logprobs.tolist()
    assert struct.unpack_from("<H", b, 179)[0] == 0
    assert struct.unpack_from("<I", b, 181)[0] == zlib.crc32(b[:181]) and len(b) == 185


def test_every_truncation_is_rejected():
    blob = encode(_rollout(2, lp=4, lc=5, n_comp=2))
    for n in range(len(blob)):
        with pytest.raises(RolloutDecodeError, match="truncated|CRC"):
            decode(blob[:n])


def test_every_single_bit_flip_is_rejected():
    blob = bytearray(encode(_rollout(4, lp=3, lc=3, n_comp=1)))
    for i in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(RolloutDecodeError):
                decode(bytes(bad))


def test_trailing_bytes_schema_and_flags_are_rejected():
    blob = encode(_rollout(3))
    with pytest.raises(RolloutDecodeError, match="trailing"):
        decode(blob + b"\x00")
    future = bytearray(blob)
    struct.pack_into("<H", future, 4, 2)
    future[-4:] = struct.pack("<I", zlib.crc32(bytes(future[:-4])))
    with pytest.raises(RolloutDecodeError, match="schema must be in \\[1, 1\\], got 2"):
        decode(bytes(future))
    flags = bytearray(blob)
    struct.pack_into("<H", flags, 6, 0x80)
    flags[-4:] = struct.pack("<I", zlib.crc32(bytes(flags[:-4])))
    with pytest.raises(RolloutDecodeError, match="flags"):
        decode(bytes(flags))
    # a length field that lies, with a CRC that matches the lie, is still caught by the cursor
    lie = bytearray(blob)
    struct.pack_into("<I", lie, 89 + 4, 9)  # Lc = 9 instead of 3
    lie[-4:] = struct.pack("<I", zlib.crc32(bytes(lie[:-4])))
    with pytest.raises(RolloutDecodeError, match="malformed"):
        decode(bytes(lie))


def test_encode_validates_fields():
    r = _rollout(1)
    r.completion_ids = torch.tensor([0, 2**31, 1])
    with pytest.raises(ValueError, match="completion_ids must be in"):
        encode(r)
    with pytest.raises(ValueError, match="group_id must be 16 bytes"):
        Rollout(b"x", 0, 0, torch.zeros(1, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                torch.ones(2, dtype=torch.bool), torch.zeros(2), 0)  # fmt: skip
    with pytest.raises(ValueError, match="behavior_logprobs must have the completion's length 2"):
        Rollout(bytes(16), 0, 0, torch.zeros(1, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                torch.ones(2, dtype=torch.bool), torch.zeros(3), 0)  # fmt: skip


def test_groups_round_trip_size_and_rejection():
    groups = []
    for k, (n, version) in enumerate([(4, 12), (2, 13)]):
        gid = uuid.UUID(int=99 + k).bytes
        members = [_rollout(10 * k + i, idx=i, gid=gid) for i in range(n)]
        for m in members:
            m.prompt_id, m.policy_version = 7 + k, version
        groups.append(RolloutGroup(tuple(members)))
    blob = encode_groups(groups)
    # a bundle: 8-byte header, a 4-byte length per record, the records (144 bytes each)
    assert len(blob) == groups_nbytes(groups) == 8 + 6 * (4 + 144)
    back = decode_groups(blob)
    assert [g.size for g in back] == [4, 2] and [g.policy_version for g in back] == [12, 13]
    for a, b in zip(groups, back, strict=True):
        for x, y in zip(a.rollouts, b.rollouts, strict=True):
            _same(x, y)
    assert decode_groups(encode_groups([])) == []
    for n in range(0, len(blob), 7):
        with pytest.raises(RolloutDecodeError):
            decode_groups(blob[:n])
    bad = bytearray(blob)
    bad[200] ^= 4  # inside the second record
    with pytest.raises(RolloutDecodeError, match="CRC"):
        decode_groups(bytes(bad))
    # consecutive records of one group must agree on the prompt
    a, b = groups[0].rollouts[:2]
    b = Rollout(**{**b.__dict__, "prompt_id": 99})
    with pytest.raises(RolloutDecodeError, match="inconsistent"):
        decode_groups(pack_bundle([encode(a), encode(b)]))


def test_group_invariants():
    gid = uuid.UUID(int=5).bytes
    a, b = _rollout(1, gid=gid), _rollout(2, idx=1, gid=gid)
    with pytest.raises(ValueError, match="share group_id and prompt_id"):
        RolloutGroup((a, b))  # different prompt ids
    b.prompt_id = a.prompt_id
    with pytest.raises(ValueError, match="one policy version"):
        _ = RolloutGroup((a, b)).policy_version
    with pytest.raises(ValueError, match="at least one rollout"):
        RolloutGroup(())
