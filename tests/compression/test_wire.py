"""The bucket frame (wire format 2) and the bucket codecs, against zlib and the per-tensor codecs."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch

from thinwire.compression import (
    ENVELOPE_BYTES,
    STATUS_EMPTY,
    STATUS_OK,
    DenseBucket,
    Envelope,
    SparseBucket,
    SparseMessage,
    aggregate_sparse,
    build_codec,
    layout_digest,
)
from thinwire.compression import bucket as bucket_module
from thinwire.compression.wire import STATUS_BODY, STATUS_CRC


def _oracle_crc(digest: int, flag: int, body: bytes) -> int:
    """CRC32 of the unsent key and the body, with zlib: what the frame's last 4 bytes hold."""
    return zlib.crc32(struct.pack("<2sBBI", b"TW", 2, flag, digest) + body)


@pytest.mark.parametrize("n", [0, 1, 7, 256, 4099])
@pytest.mark.parametrize("contributes", [True, False, "device-true", "device-false"])
def test_seal_matches_zlib_and_opens(n, contributes):
    gen = torch.Generator().manual_seed(n)
    body = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    digest = layout_digest("dense;v=int8;block=256", [(n,)])
    env = Envelope(digest, n)
    flag = contributes in (True, "device-true")
    arg = torch.tensor(flag) if isinstance(contributes, str) else contributes
    frame = env.seal(body, arg)
    assert frame.numel() == n + ENVELOPE_BYTES == env.nbytes
    sent = bytes(body.tolist()) if flag else bytes(n)
    assert bytes(frame[:n].tolist()) == sent
    assert int.from_bytes(bytes(frame[n:].tolist()), "little") == _oracle_crc(digest, flag, sent)
    bodies, status = env.open_rows(frame[None])
    assert status.tolist() == [STATUS_OK if flag else STATUS_EMPTY]
    assert torch.equal(bodies[0], frame[:n])


def test_every_single_bit_flip_is_caught():
    body = torch.arange(40, dtype=torch.uint8)
    env = Envelope(layout_digest("x", [(40,)]), 40)
    frame = env.seal(body)
    flips = []
    for bit in range(frame.numel() * 8):
        bad = frame.clone()
        bad[bit // 8] ^= 1 << (bit % 8)
        flips.append(bad)
    _, status = env.open_rows(torch.stack(flips))
    assert set(status.tolist()) == {STATUS_CRC}  # CRC32 detects every 1-bit error


def test_foreign_settings_shapes_or_version_are_rejected():
    body = torch.arange(64, dtype=torch.uint8)
    mine = Envelope(layout_digest("sparse;s=64;k=32", [(64,)]), 64)
    for other in (
        Envelope(layout_digest("sparse;s=64;k=16", [(64,)]), 64),  # other settings
        Envelope(layout_digest("sparse;s=64;k=32", [(8, 8)]), 64),  # other shapes
    ):
        _, status = mine.open_rows(other.seal(body)[None])
        assert status.tolist() == [STATUS_CRC]
    # A version-3 frame of the same layout (key by hand): not accepted by a version-2 reader.
    digest = layout_digest("sparse;s=64;k=32", [(64,)])
    crc = zlib.crc32(struct.pack("<2sBBI", b"TW", 3, 1, digest) + bytes(body.tolist()))
    v3 = torch.cat([body, torch.tensor(list(crc.to_bytes(4, "little")), dtype=torch.uint8)])
    assert mine.open_rows(v3[None])[1].tolist() == [STATUS_CRC]


def test_open_rows_rejects_a_batch_of_the_wrong_size():
    env = Envelope(0, 10)
    with pytest.raises(ValueError, match=r"frames must be uint8 of shape \(P, 14\)"):
        env.open_rows(torch.zeros(2, 13, dtype=torch.uint8))
    with pytest.raises(ValueError, match="body must be uint8 with 10 bytes"):
        env.seal(torch.zeros(9, dtype=torch.uint8))


SHAPES = [(64, 32), (32,), (7, 13), (3, 64, 8)]


@pytest.mark.parametrize(
    "spec", ["fp16", "quant(int8, block=64)", "quant(int4, block=32)", "quant(2)"]
)
def test_dense_bucket_decodes_what_the_flat_codec_decodes(spec):
    codec = build_codec(spec)
    gen = torch.Generator().manual_seed(1)
    flat = torch.randn(sum(math.prod(s) for s in SHAPES), generator=gen)
    bucket = DenseBucket(codec, SHAPES)
    frame, deq, ok = bucket.encode(flat)
    assert bool(ok) and frame.numel() == bucket.nbytes == codec.body_nbytes((flat.numel(),)) + 4
    want = codec.decode(codec.encode(flat))  # the per-tensor bytes path as the oracle
    assert torch.equal(deq, want)
    vals, status = bucket.decode(torch.stack([frame, frame]))
    assert status.tolist() == [STATUS_OK, STATUS_OK]
    assert torch.equal(vals[0], want) and torch.equal(vals[1], want)


def test_dense_bucket_flags_a_resealed_nan_body():
    codec = build_codec("quant(int8, block=64)")
    bucket = DenseBucket(codec, SHAPES)
    flat = torch.randn(
        sum(math.prod(s) for s in SHAPES), generator=torch.Generator().manual_seed(2)
    )
    frame, _, _ = bucket.encode(flat)
    body = frame[:-4].clone()
    body[-4:] = 0xFF  # the last float32 scale becomes NaN
    bad = bucket.envelope.seal(body)  # a valid CRC: only the value check can catch it
    _, status = bucket.decode(torch.stack([frame, bad]))
    assert status.tolist() == [STATUS_OK, STATUS_BODY]


@pytest.mark.parametrize(
    "spec",
    ["dct > topk(4) > quant(sign)", "chunk(8) > topk(4, rule=density) > quant(2)", "dct > topk(6)"],
)
def test_sparse_bucket_keeps_each_tensors_geometry(spec):
    codec = build_codec(spec)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=gen) for s in SHAPES]
    bucket = SparseBucket(codec, SHAPES)
    frame, sent, _, ok = bucket.encode(xs)
    assert bool(ok)
    # Sections: each tensor's body is what the per-tensor codec writes after its own header.
    assert bucket.body_nbytes == sum(codec.body_nbytes(s) for s in SHAPES)
    parts, status = bucket.decode(frame[None])
    assert status.tolist() == [STATUS_OK]
    for i, (x, s) in enumerate(zip(xs, SHAPES, strict=True)):
        msg = codec.decode_sparse(codec.encode(x))  # the per-tensor bytes path as the oracle
        assert torch.equal(parts[i].idx[0], msg.idx) and torch.equal(sent[i].idx, msg.idx)
        assert torch.equal(parts[i].val[0], msg.val.reshape(parts[i].val[0].shape))
        dense = bucket.densify(i, sent[i])
        assert dense.shape == s
        torch.testing.assert_close(dense, codec.decode(codec.encode(x)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "spec", ["chunk(8) > topk(4, rule=density) > quant(2)", "chunk(8) > dct > topk(6)"]
)
@pytest.mark.parametrize("mode", ["index_mean", "global_mean"])
def test_sparse_bucket_fold_is_the_same_in_any_block_size(spec, mode, monkeypatch):
    # The CPU fold fills each tensor a block of bands at a time; one band per block, a few, and
    # the whole tensor at once give the same bits, and (no transform) aggregate_sparse's bits.
    codec = build_codec(spec)
    gen = torch.Generator().manual_seed(5)
    bucket = SparseBucket(codec, SHAPES)
    xs = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(3)]
    xs[2][0][:8] = xs[0][0][:8]  # peers 0 and 2 select the same entries there: slots shared
    parts, status = bucket.decode(torch.stack([bucket.encode(x)[0] for x in xs]))
    assert status.tolist() == [STATUS_OK] * 3
    folds = []
    for block in ({}, {"cpu": 1}, {"cpu": 3 * 64 * 8}):
        monkeypatch.setattr(bucket_module, "_FOLD_BLOCK", block)
        folds.append(bucket.aggregate(parts, [0, 2], mode))
    for i, g in enumerate(bucket.geometries):
        assert torch.equal(folds[0][i], folds[1][i]) and torch.equal(folds[0][i], folds[2][i])
        if codec.transform == "none":
            msgs = [SparseMessage(g, "none", parts[i].idx[p], parts[i].val[p]) for p in (0, 2)]
            assert torch.equal(folds[0][i], aggregate_sparse(msgs, mode=mode))
