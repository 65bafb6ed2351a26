"""Fuzz test of payload decoding (>= 10,000 random, truncated and bit-flipped
payloads; only ``PayloadError``, never another exception, a hang or a silent result).

Every codec configuration (each dense value format, sparse DCT / no transform, both top-k rules,
both index codes, every sparse value format) contributes valid payloads that are then damaged:

* without a valid CRC (random bytes, random bytes behind a valid prefix, truncation, extension,
  single and multiple bit flips, payloads of another codec): decoding must raise ``PayloadError``;
* with the CRC recomputed after the damage, so the body parsers themselves are exercised (random
  bodies, bit flips and byte stores in the body, one codec's header on another's body, forged
  shapes and dtype codes): decoding must raise ``PayloadError`` or, where the damaged body is
  still a structurally valid encoding, return a finite float32 tensor of the header's shape.

A hang fails the test through its pytest-timeout.
"""

from __future__ import annotations

import random
import struct
import zlib

import pytest
import torch

from thinwire.compression.payload import PayloadError, unpack_payload
from thinwire.compression.pipeline import VALUE_FORMATS, DenseCodec, SparseCodec

CODECS = (
    [DenseCodec(v) for v in VALUE_FORMATS]
    + [
        DenseCodec("int8", block=8),
        DenseCodec("sign", block=4),
        DenseCodec("2bit", n_bins=8),
        DenseCodec("2bit", range_sigmas=3.0),
    ]
    + [
        SparseCodec(chunk=4, topk=kk, transform=t, topk_rule=r, index_coding=i)
        for t in ("dct", "none")
        for r, kk in (("per_chunk", 3), ("density", 5))
        for i in ("entropy", "fixed")
    ]
    + [SparseCodec(chunk=8, topk=3, values=v, index_coding="fixed") for v in VALUE_FORMATS]
)
SHAPES = [(), (1,), (5,), (13,), (16,), (3, 5), (8, 8), (2, 4, 6)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_DECODES = 10_000


def envelope(codec_id: int, dtype_code: int, shape, settings: bytes, body: bytes) -> bytes:
    """A payload with a correct CRC, built field by field (module docstring of payload.py)."""
    head = b"TW" + bytes([1, codec_id, dtype_code, len(shape)]) + struct.pack("<H", len(settings))
    head += b"".join(struct.pack("<I", d) for d in shape) + settings + struct.pack("<I", len(body))
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


class Tally:
    """Runs decodes and checks each outcome."""

    def __init__(self) -> None:
        self.decodes = 0
        self.accepted = 0
        self.body_errors = 0  # PayloadErrors raised by the body parsers, past the envelope

    def must_reject(self, codec, payload) -> None:
        self.decodes += 1
        try:
            out = codec.decode(payload)
        except PayloadError:
            return
        raise AssertionError(f"{codec} silently decoded a damaged payload to {out!r}")

    def reject_or_valid(self, codec, payload, numel_form: bool) -> None:
        self.decodes += 1
        try:
            header, _ = unpack_payload(payload)
            shape = (header.numel,) if numel_form else header.shape
        except PayloadError:
            shape = None
        try:
            out = codec.decode(payload, shape[0] if numel_form and shape else None)
        except PayloadError as exc:
            if "does not decode" in str(exc) or "non-finite" in str(exc):
                self.body_errors += 1
            return
        assert shape is not None, "an envelope unpack_payload rejects was decoded"
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert tuple(out.shape) == tuple(shape)
        assert bool(torch.isfinite(out).all())
        self.accepted += 1


def flip_bits(rng: random.Random, buf: bytes, n_flips: int, start: int = 0) -> bytes:
    b = bytearray(buf)
    for _ in range(n_flips):
        pos = rng.randrange(start, len(b))
        b[pos] ^= 1 << rng.randrange(8)
    return bytes(b)


@pytest.mark.timeout(180)
def test_fuzz_decode_only_raises_payload_error():
    rng = random.Random(20240602)
    gen = torch.Generator().manual_seed(7)
    pool = []  # (codec, payload, header, body)
    for ci, codec in enumerate(CODECS):
        for si, shape in enumerate(SHAPES):
            x = torch.randn(shape, generator=gen).to(DTYPES[(ci + si) % 3])
            payload = codec.encode(x)
            header, body = unpack_payload(payload)
            pool.append((codec, payload, header, body))
    tally = Tally()

    def pick():
        return pool[rng.randrange(len(pool))]

    # --- no valid CRC: always PayloadError -------------------------------------------------
    for _ in range(1200):  # random bytes
        codec = pick()[0]
        tally.must_reject(codec, bytes(rng.randrange(256) for _ in range(rng.randrange(120))))
    for _ in range(800):  # random bytes behind a valid magic / version / codec / dtype prefix
        codec = pick()[0]
        prefix = b"TW" + bytes([1, codec.codec_id, rng.choice([1, 2, 3]), rng.randrange(4)])
        tally.must_reject(
            codec, prefix + bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
        )
    for _ in range(2000):  # truncated at a random length
        codec, payload, _, _ = pick()
        tally.must_reject(codec, payload[: rng.randrange(len(payload))])
    for _ in range(300):  # extended
        codec, payload, _, _ = pick()
        tally.must_reject(
            codec, payload + bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        )
    for _ in range(2000):  # one bit flipped anywhere
        codec, payload, _, _ = pick()
        tally.must_reject(codec, flip_bits(rng, payload, 1))
    for _ in range(1000):  # 2-16 bits flipped anywhere
        codec, payload, _, _ = pick()
        tally.must_reject(codec, flip_bits(rng, payload, rng.randint(2, 16)))
    for _ in range(400):  # a payload of another codec configuration
        codec, _, _, _ = pick()
        other, payload, _, _ = pick()
        if other.settings != codec.settings:
            tally.must_reject(codec, payload)

    # --- CRC recomputed: PayloadError or a finite float32 tensor of the header's shape ------
    for i in range(3000):  # damaged body
        codec, _, h, body = pick()
        kind = i % 4
        if kind == 0:
            new = bytes(rng.randrange(256) for _ in body)
        elif kind == 1 and body:
            new = flip_bits(rng, body, rng.randint(1, 4))
        elif kind == 2 and body:
            b = bytearray(body)
            b[rng.randrange(len(b))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x7C])
            new = bytes(b)
        else:  # float32 side data / values set to extremes (overflow in dequantize or IDCT)
            b = bytearray(body)
            for _ in range(rng.randint(1, 3)):
                if len(b) >= 4:
                    at = rng.randrange(len(b) - 3)
                    b[at : at + 4] = struct.pack("<f", rng.choice([3.4e38, -3.4e38, 1e30, 1e-45]))
            new = bytes(b)
        payload = envelope(codec.codec_id, 1, h.shape, h.settings.encode(), new)
        tally.reject_or_valid(codec, payload, numel_form=rng.random() < 0.25)
    for _ in range(600):  # one codec's header fields on another's body, or a body of a wrong size
        codec, _, h, _ = pick()
        other, _, h2, body2 = pick()
        shape = h2.shape if rng.random() < 0.5 else h.shape
        payload = envelope(
            codec.codec_id, rng.choice([1, 2, 3, 4]), shape, codec.settings.encode(), body2
        )
        tally.reject_or_valid(codec, payload, numel_form=False)
    for _ in range(600):  # forged shapes (huge, zero, many dims) with a plausible body
        codec, _, h, body = pick()
        shape = tuple(
            rng.choice([0, 1, 2, 3, 7, 64, 2**16, 2**31, 2**32 - 1])
            for _ in range(rng.randrange(17))
        )
        if rng.random() < 0.5:
            want = None
            try:
                want = codec.body_nbytes(shape)
            except (ValueError, OverflowError):
                pass
            if want is not None and want <= 4096:
                body = bytes(rng.randrange(256) for _ in range(want))
        payload = envelope(codec.codec_id, 1, shape, codec.settings.encode(), body)
        tally.reject_or_valid(codec, payload, numel_form=False)

    assert tally.decodes >= MIN_DECODES, tally.decodes
    # The recomputed-CRC cases really reach both outcomes and the body validators.
    assert tally.accepted > 100 and tally.body_errors > 100, (tally.accepted, tally.body_errors)


def test_forged_finite_coefficients_that_overflow_the_inverse_dct_are_rejected():
    # Finite fp32 DCT coefficients near the float32 limit sum to inf in the inverse transform;
    # before the fix SparseCodec.decode returned that inf silently.
    codec = SparseCodec(chunk=8, topk=8, transform="dct", index_coding="fixed")
    _, body = unpack_payload(codec.encode(torch.ones(8)))
    index_bytes = len(body) - 8 * 4
    forged = body[:index_bytes] + struct.pack("<8f", *([3e38] * 8))
    with pytest.raises(PayloadError, match="non-finite"):
        codec.decode(envelope(2, 1, (8,), codec.settings.encode(), forged))
