"""Fuzzed, truncated and bit-flipped payloads and frames through every receive path.

Two receive paths, each fed damaged messages:

1. Per-tensor payloads and bundles (the standalone ``Codec`` bytes API). At least 100,000 damaged
   messages: a dense payload is ``codec.decode(blob, numel)``; a sparse bundle is
   ``unpack_bundle(blob, count)``, then ``decode_sparse(part, numel)`` per tensor, a geometry
   check, and the fold ``aggregate_sparse`` (so a forged message that decodes but would crash the
   aggregator is caught too). The only acceptable outcomes: :class:`PayloadError`, or, when a
   forged message is still a structurally valid encoding (CRC recomputed after the damage),
   finite float32 tensors of the header's shape.
2. Bucket frames (what optimizers send: one frame per bucket, ``make_bucket(codec, shapes)``,
   all-gathered as a ``(P, W)`` uint8 tensor and decoded in one batch by every receiver, as
   ``thinwire.optim._reduce`` does). At least 40,000 damaged frames, in batches whose row 0 is an
   intact frame: bit flips, byte edits, a zero-filled tail, random bytes, a frame sealed under
   another layout's digest (all with the CRC left as it was), and frames RE-SEALED with a valid
   CRC over a damaged or random body (flag 1), or over a non-zero body with flag 0. The oracle:
   ``decode`` never raises; every status is a known code; a frame damaged without re-sealing is
   caught (``STATUS_CRC``; 1 or 2 flipped bits always are, CRC32's Hamming distance guarantees
   it); a re-sealed flag-1 frame is ``STATUS_OK`` or ``STATUS_BODY``, a re-sealed flag-0 frame
   ``STATUS_EMPTY``; status ``STATUS_OK`` never comes with non-finite values (sparse: nor with an
   index outside its chunk), and the fold of the accepted rows does not crash; the intact row
   decodes as it does alone, whatever its neighbours hold.

Codecs: :class:`DenseCodec` over every value format (and non-default settings),
:class:`SparseCodec` over both transforms, both top-k rules, both index codes and every value
format, plus the DeMo and SparseLoCo wire codecs. Any other exception, a non-finite value or a
wrong shape fails; a hang fails through the timeout. Small tensors keep the campaigns to seconds.
"""

from __future__ import annotations

import math
import random
import struct
from collections import Counter

import pytest
import torch

from thinwire.compression import (
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_REASONS,
    VALUE_FORMATS,
    DenseBucket,
    DenseCodec,
    Envelope,
    PayloadError,
    SparseBucket,
    SparseCodec,
    aggregate_sparse,
    build_codec,
    make_bucket,
    pack_bundle,
    unpack_bundle,
)
from thinwire.compression.payload import pack_payload, unpack_payload
from thinwire.compression.wire import STATUS_BODY, STATUS_CRC
from thinwire.optim.demo import demo_compressor
from thinwire.optim.sparseloco import sparseloco_compressor

DENSE = [DenseCodec(v) for v in VALUE_FORMATS] + [
    DenseCodec("int8", block=8),
    DenseCodec("int4", block=4),
    DenseCodec("sign", block=4),
    DenseCodec("sign", scale=False),
    DenseCodec("2bit", n_bins=8),
    DenseCodec("fp8_e4m3", block=8),
    DenseCodec("fp4_e3m0", block=8),
]
SPARSE = (
    [
        SparseCodec(chunk=4, topk=k, transform=t, topk_rule=r, index_coding=i)
        for t in ("dct", "none")
        for r, k in (("per_chunk", 3), ("density", 5))
        for i in ("entropy", "fixed")
    ]
    + [SparseCodec(chunk=8, topk=3, values=v, index_coding="fixed") for v in VALUE_FORMATS]
    + [
        demo_compressor(topk=4, chunk=8),
        demo_compressor(topk=4, chunk=8, values="sign"),
        build_codec(sparseloco_compressor(topk=8, chunk=8, bits=2)),
        build_codec(sparseloco_compressor(topk=8, chunk=8, bits=32)),
    ]
)
SHAPES = [(1,), (7,), (16,), (3, 5), (8, 8), (4, 9)]
MIN_DECODES = 100_000
MIN_FRAMES = 40_000


class Tally:
    """Counts decodes and checks every outcome against the module docstring's oracle."""

    def __init__(self) -> None:
        self.decodes = self.accepted = self.rejected = 0

    def dense(self, codec: DenseCodec, blob: bytes, numel: int) -> None:
        self.decodes += 1
        try:
            out = codec.decode(blob, numel)
        except PayloadError:
            self.rejected += 1
            return
        assert out.dtype == torch.float32 and tuple(out.shape) == (numel,), out.shape
        assert bool(torch.isfinite(out).all())
        self.accepted += 1

    def bundle(self, codec: SparseCodec, blob: bytes, shapes: list[tuple[int, ...]]) -> None:
        self.decodes += 1
        try:
            parts = unpack_bundle(blob, len(shapes))
            msgs = [
                codec.decode_sparse(p, math.prod(s)) for p, s in zip(parts, shapes, strict=True)
            ]
            for m, s in zip(msgs, shapes, strict=True):
                if m.geometry != codec.geometry(s):
                    raise PayloadError(f"payload shape {m.geometry.shape} must be {s}")
        except PayloadError:
            self.rejected += 1
            return
        for m, s in zip(msgs, shapes, strict=True):
            out = aggregate_sparse([m, m])  # what the receiver folds; must not crash
            assert out.dtype == torch.float32 and tuple(out.shape) == s
        self.accepted += 1


def _flip(rng: random.Random, buf: bytes, n: int) -> bytes:
    b = bytearray(buf)
    for _ in range(n):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _reseal(blob: bytes, body: bytes, shape: tuple[int, ...] | None = None) -> bytes:
    """``blob``'s header over a new body (or shape), with a correct CRC: reaches the body parsers."""
    h, _ = unpack_payload(blob)
    return pack_payload(h.codec_id, h.dtype, h.shape if shape is None else shape, h.settings, body)


def _damage_body(rng: random.Random, body: bytes) -> bytes:
    if not body:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in body)
    if kind == 1:
        return _flip(rng, body, rng.randint(1, 6))
    b = bytearray(body)
    if kind == 2:
        b[rng.randrange(len(b))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x7C])
    elif len(b) >= 4:  # a float32 near the limit or NaN/inf pattern where side data lives
        at = rng.randrange(len(b) - 3)
        b[at : at + 4] = struct.pack("<f", rng.choice([3.4e38, -3.4e38, 1e30, 1e-45, math.inf]))
    return bytes(b)


def _damaged(rng: random.Random, blob: bytes, others: list[bytes]) -> bytes:
    """One damaged copy of ``blob``: truncated, extended, bit-flipped, replaced or foreign."""
    kind = rng.randrange(8)
    if kind == 0:
        return blob[: rng.randrange(len(blob))]
    if kind == 1:
        return blob + bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
    if kind == 2:
        return _flip(rng, blob, 1)
    if kind == 3:
        return _flip(rng, blob, rng.randint(2, 24))
    if kind == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(2 * len(blob) + 2)))
    if kind == 5:
        return rng.choice(others)  # a payload of another codec or shape
    if kind == 6:
        return b"" if rng.random() < 0.1 else blob[:6] + _flip(rng, blob[6:], 3)
    return blob[: len(blob) // 2] + blob[len(blob) // 2 + 1 :]  # one byte cut out of the middle


def fuzz(dense_cases: int = 60_000, bundle_cases: int = 45_000, seed: int = 9) -> Tally:
    """Run the fuzz campaign; every outcome is checked as it happens. Returns the tally."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(9)
    dense = []  # (codec, shape, payload)
    for codec in DENSE:
        for shape in SHAPES:
            dense.append((codec, shape, codec.encode(torch.randn(shape, generator=gen))))
    bundles = []  # (codec, shapes, parts)
    for codec in SPARSE:
        for _ in range(4):
            shapes = [rng.choice(SHAPES) for _ in range(rng.randint(1, 3))]
            parts = [codec.encode(torch.randn(s, generator=gen)) for s in shapes]
            bundles.append((codec, shapes, parts))
    every = [p for _, _, p in dense] + [p for _, _, ps in bundles for p in ps]
    tally = Tally()
    for codec, shape, blob in dense:  # the undamaged messages decode (sanity of the harness)
        tally.dense(codec, blob, math.prod(shape))
    for codec, shapes, parts in bundles:
        tally.bundle(codec, pack_bundle(parts), shapes)
    assert tally.rejected == 0, "an intact payload was rejected"

    for i in range(dense_cases):  # dense path
        codec, shape, blob = dense[rng.randrange(len(dense))]
        n = math.prod(shape)
        if i % 5 == 4:  # valid envelope over a damaged body, shape or numel
            _, body = unpack_payload(blob)
            forged = _reseal(blob, _damage_body(rng, body))
            if rng.random() < 0.2:
                forged = _reseal(
                    blob,
                    body,
                    tuple(
                        rng.choice([0, 1, 3, 7, 2**20, 2**32 - 1]) for _ in range(rng.randrange(4))
                    ),
                )
            tally.dense(codec, forged, n if rng.random() < 0.9 else rng.randrange(1, 2 * n + 2))
        else:
            tally.dense(codec, _damaged(rng, blob, every), n)

    for i in range(bundle_cases):  # sparse bundles
        codec, shapes, parts = bundles[rng.randrange(len(bundles))]
        blob = pack_bundle(parts)
        kind = i % 6
        if kind == 0:  # the bundle's own framing damaged
            tally.bundle(codec, _damaged(rng, blob, every), shapes)
        elif kind == 1:  # count or length table forged
            b = bytearray(blob)
            at = rng.randrange(4, min(len(b), 8 + 4 * len(parts)))
            b[at] = rng.randrange(256)
            tally.bundle(codec, bytes(b), shapes)
        elif kind == 2:  # one part damaged inside an intact frame
            j = rng.randrange(len(parts))
            bad = list(parts)
            bad[j] = _damaged(rng, parts[j], every)
            tally.bundle(codec, pack_bundle(bad), shapes)
        elif kind == 3:  # one part resealed over a damaged body: the body parsers run
            j = rng.randrange(len(parts))
            bad = list(parts)
            _, body = unpack_payload(parts[j])
            bad[j] = _reseal(parts[j], _damage_body(rng, body))
            tally.bundle(codec, pack_bundle(bad), shapes)
        elif kind == 4:  # parts swapped, dropped or repeated: sizes or geometry disagree
            bad = list(parts)
            rng.shuffle(bad)
            bad = bad[: rng.randint(0, len(bad))] + ([bad[0]] if bad and rng.random() < 0.5 else [])
            tally.bundle(codec, pack_bundle(bad), shapes)
        else:  # a bundle whose part is a foreign payload with a valid envelope
            bad = list(parts)
            bad[rng.randrange(len(bad))] = rng.choice(every)
            tally.bundle(codec, pack_bundle(bad), shapes)

    return tally


# ------------------------------------------------------------------------ bucket frames
# Mutations of a frame; the first group leaves the CRC as it was, the second re-seals it.
DAMAGED = ("flip_1_2", "flip_many", "byte_edit", "zero_tail", "random_bytes", "foreign_digest")
RESEALED = ("reseal_damaged_body", "reseal_random_body", "reseal_flag0_nonzero_body")


class FrameTally:
    """Counts damaged frames by mutation and by the status receivers gave them."""

    def __init__(self) -> None:
        self.frames = 0  # damaged frames decoded (intact rows not counted)
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.caught = 0  # dropped by receivers: CRC mismatch or a body that does not decode
        self.accepted = 0  # re-sealed frames whose body still decodes to finite values
        self.empty = 0  # re-sealed flag-0 frames: no contribution

    def add(self, kind: str, code: int) -> None:
        self.frames += 1
        self.by_kind[kind] += 1
        self.by_status[code] += 1
        if code == STATUS_OK:
            self.accepted += 1
        elif code == STATUS_EMPTY:
            self.empty += 1
        else:
            self.caught += 1

    def status_counts(self) -> dict[str, int]:
        names = {STATUS_OK: "ok", STATUS_EMPTY: "empty", STATUS_CRC: "crc", STATUS_BODY: "body"}
        return {names[c]: n for c, n in sorted(self.by_status.items())}


def _mutate_frame(
    rng: random.Random, bucket: DenseBucket | SparseBucket, frame: bytes
) -> tuple[str, bytes]:
    """One damaged copy of ``frame`` (same size: a frame's size is fixed by its shapes)."""
    kind = rng.choice(DAMAGED + RESEALED)
    while True:
        out = _mutated(rng, bucket, frame, kind)
        if out != frame:  # flips that cancel out (one bit flipped twice) damage nothing: redraw
            return kind, out


def _mutated(
    rng: random.Random, bucket: DenseBucket | SparseBucket, frame: bytes, kind: str
) -> bytes:
    L = bucket.body_nbytes
    if kind == "flip_1_2":
        out = _flip(rng, frame, rng.randint(1, 2))
    elif kind == "flip_many":
        out = _flip(rng, frame, rng.randint(3, 24))
    elif kind == "byte_edit":
        b = bytearray(frame)
        at = rng.randrange(len(b))
        b[at] = rng.choice([v for v in (0x00, 0xFF, 0x7F, 0x80, 0x7C) if v != b[at]])
        out = bytes(b)
    elif kind == "zero_tail":  # cut short: the tail of a zero-filled receive buffer, CRC included
        last = max(i for i, v in enumerate(frame) if v)
        cut = rng.randrange(last + 1)
        out = frame[:cut] + bytes(len(frame) - cut)
    elif kind == "random_bytes":
        out = bytes(rng.randrange(256) for _ in frame)
    elif kind == "foreign_digest":  # the same body under another settings/shape digest
        digest = (bucket.envelope.digest ^ (1 + rng.randrange(2**32 - 1))) & 0xFFFFFFFF
        sealed = Envelope(digest, L).seal(_u8(frame[:L]), rng.random() < 0.8)
        out = bytes(sealed.tolist())
    elif kind == "reseal_damaged_body":
        out = _seal(bucket, _damage_body(rng, frame[:L]) if L else b"", True)
    elif kind == "reseal_random_body":
        out = _seal(bucket, bytes(rng.randrange(256) for _ in range(L)), True)
    else:  # flag 0 over a body that is not all zero: receivers ignore the body
        body = bytearray(frame[:L])
        if L:
            body[rng.randrange(L)] |= 1 << rng.randrange(8)
        out = _seal(bucket, bytes(body), False)
    return out


def _u8(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def _seal(bucket: DenseBucket | SparseBucket, body: bytes, contributes: bool) -> bytes:
    body = body[: bucket.body_nbytes].ljust(bucket.body_nbytes, b"\0")  # keep the size
    return bytes(bucket.envelope.seal(_u8(body), contributes).tolist())


def _check_batch(
    bucket: DenseBucket | SparseBucket,
    rows: list[bytes],
    kinds: list[str],
    clean: tuple[torch.Tensor, ...],
    tally: FrameTally,
) -> None:
    """Decode one batch (row 0 intact) as receivers do; check every row against the oracle."""
    frames = torch.tensor([list(r) for r in rows], dtype=torch.uint8)
    out, status = bucket.decode(frames)  # must not raise, whatever the rows hold
    codes = status.tolist()
    assert status.shape == (len(rows),) and all(c in STATUS_REASONS for c in codes), codes
    assert codes[0] == STATUS_OK, "an intact frame was dropped next to damaged ones"
    if isinstance(bucket, DenseBucket):
        assert out.dtype == torch.float32 and tuple(out.shape) == (len(rows), bucket.numel)
        assert torch.equal(out[0], clean[0]), "a damaged row changed an intact row's values"
        for r, code in enumerate(codes):
            if code == STATUS_OK:
                assert bool(torch.isfinite(out[r]).all()), (kinds[r], "status 0, non-finite")
    else:
        for i, (part, g) in enumerate(zip(out, bucket.geometries, strict=True)):
            if g.num_chunks == 0:
                continue
            assert torch.equal(part.idx[0], clean[i][0]) and torch.equal(part.val[0], clean[i][1])
            for r, code in enumerate(codes):
                if code == STATUS_OK:
                    assert bool(torch.isfinite(part.val[r]).all()), (kinds[r], "non-finite")
                    idx = part.idx[r]
                    assert bool(((idx >= 0) & (idx < g.chunk_len)).all()), (kinds[r], "index")
        present = [r for r, c in enumerate(codes) if c == STATUS_OK]
        folded = bucket.aggregate(out, present)  # what the receiver folds; must not crash
        assert [tuple(t.shape) for t in folded] == [tuple(s) for s in bucket.shapes]
        assert all(t.dtype == torch.float32 for t in folded)
    for r in range(1, len(rows)):
        kind, code = kinds[r], codes[r]
        if kind in DAMAGED:
            assert code == STATUS_CRC, (kind, code, "a damaged frame was not caught")
        elif kind == "reseal_flag0_nonzero_body":
            assert code == STATUS_EMPTY, (kind, code)
        else:
            assert code in (STATUS_OK, STATUS_BODY), (kind, code)
        tally.add(kind, code)


BUCKET_SHAPES = [[(7,)], [(16,), (3, 5)], [(8, 8), (4, 9), (1,)], [(1,), (5, 3)]]


def fuzz_frames(
    dense_frames: int = 20_000, sparse_frames: int = 20_000, batch: int = 48, seed: int = 11
) -> FrameTally:
    """Run the frame campaign of the module docstring; every batch is checked as it is decoded."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(11)
    cases = []  # (bucket, clean frame bytes, clean decode of row 0)
    for codec in DENSE + SPARSE:
        for shapes in BUCKET_SHAPES:
            bucket = make_bucket(codec, shapes)
            if isinstance(bucket, DenseBucket):
                frame, _, ok = bucket.encode(torch.randn(bucket.numel, generator=gen))
                vals, st = bucket.decode(frame[None])
                clean: tuple = (vals[0],)
            else:
                frame, _, _, ok = bucket.encode([torch.randn(s, generator=gen) for s in shapes])
                parts, st = bucket.decode(frame[None])
                clean = tuple((p.idx[0], p.val[0]) for p in parts)
            assert bool(ok) and int(st[0]) == STATUS_OK, "an intact frame was rejected"
            cases.append((bucket, bytes(frame.tolist()), clean))
    dense = [c for c in cases if isinstance(c[0], DenseBucket)]
    sparse = [c for c in cases if isinstance(c[0], SparseBucket)]
    tally = FrameTally()
    for pool, total in ((dense, dense_frames), (sparse, sparse_frames)):
        done = 0
        while done < total:
            bucket, frame, clean = pool[rng.randrange(len(pool))]
            n = min(batch - 1, total - done)
            rows, kinds = [frame], ["intact"]
            for _ in range(n):
                kind, row = _mutate_frame(rng, bucket, frame)
                rows.append(row)
                kinds.append(kind)
            _check_batch(bucket, rows, kinds, clean, tally)
            done += n
    return tally


@pytest.mark.timeout(300)
def test_fuzz_every_receive_path_raises_only_payload_error():
    tally = fuzz()
    assert tally.decodes >= MIN_DECODES, tally.decodes
    # Both outcomes are reached: forged-but-valid bodies decode, everything else is refused.
    assert tally.accepted > 1000 and tally.rejected > 90_000, (tally.accepted, tally.rejected)


@pytest.mark.timeout(300)
def test_fuzz_bucket_frames_never_raise_and_never_accept_nonfinite():
    tally = fuzz_frames()
    assert tally.frames >= MIN_FRAMES, tally.frames
    assert set(tally.by_kind) == set(DAMAGED + RESEALED), tally.by_kind
    # Every frame damaged without re-sealing was caught by its CRC; re-sealed bodies reach the
    # body parsers, which both accept (finite, valid) and refuse them.
    damaged = sum(tally.by_kind[k] for k in DAMAGED)
    assert tally.by_status[STATUS_CRC] == damaged, (tally.by_status, damaged)
    assert tally.by_status[STATUS_BODY] > 500 and tally.accepted > 500, tally.status_counts()
    assert tally.empty == tally.by_kind["reseal_flag0_nonzero_body"]
