"""Tests for thinwire.compression.payload: the versioned envelope and ``PayloadError``.

Oracles: a header assembled by hand with ``struct`` and ``zlib.crc32`` from the layout in the
module docstring, hand-written settings
strings, and single-field corruptions whose expected error names the field.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from thinwire.compression.payload import (
    DTYPE_CODES,
    FORMAT_VERSION,
    MAGIC,
    PayloadError,
    header_nbytes,
    pack_payload,
    unpack_payload,
)
from thinwire.compression.pipeline import DenseCodec, SparseCodec

# The small example used throughout: a (2, 3) float32 tensor through the raw fp32 codec.
X = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, 4.0]])
DENSE_FP32_SETTINGS = "dense;v=fp32"  # hand-written: "dense;" + "v=" + format name, no params


def hand_payload(
    *,
    magic: bytes = b"TW",
    version: int = 1,
    codec_id: int = 1,
    dtype_code: int = 1,
    shape: tuple[int, ...] = (2, 3),
    settings: bytes = DENSE_FP32_SETTINGS.encode(),
    body: bytes | None = None,
    body_len: int | None = None,
    crc: int | None = None,
) -> bytes:
    """The envelope of the module docstring, field by field, with an optionally forced CRC."""
    if body is None:
        body = np.asarray(X.numpy(), dtype="<f4").tobytes()
    head = magic + bytes([version, codec_id, dtype_code, len(shape)])
    head += struct.pack("<H", len(settings))
    head += b"".join(struct.pack("<I", d) for d in shape)
    head += settings
    head += struct.pack("<I", len(body) if body_len is None else body_len)
    if crc is None:
        crc = zlib.crc32(head + body)
    return head + struct.pack("<I", crc) + body


def recrc(buf: bytes, ndim: int, settings_len: int) -> bytes:
    """Recompute the CRC of a (modified) payload so that only the modified field is wrong."""
    crc_at = 8 + 4 * ndim + settings_len + 4
    return (
        buf[:crc_at]
        + struct.pack("<I", zlib.crc32(buf[:crc_at] + buf[crc_at + 4 :]))
        + buf[crc_at + 4 :]
    )


# ----------------------------------------------------------------------------- layout


def test_header_layout_matches_hand_built_struct_byte_by_byte():
    payload = DenseCodec("fp32").encode(X)
    expected = hand_payload()
    assert payload == expected
    # Spot-check the fixed offsets of the module docstring on the real payload.
    assert payload[0:2] == b"TW" and MAGIC == b"TW"
    assert payload[2] == 1 == FORMAT_VERSION
    assert payload[3] == 1  # dense codec id
    assert payload[4] == 1  # float32 dtype code
    assert payload[5] == 2  # ndim
    assert struct.unpack_from("<H", payload, 6)[0] == len(DENSE_FP32_SETTINGS)
    assert struct.unpack_from("<II", payload, 8) == (2, 3)
    s_end = 16 + len(DENSE_FP32_SETTINGS)
    assert payload[16:s_end] == DENSE_FP32_SETTINGS.encode()
    assert struct.unpack_from("<I", payload, s_end)[0] == 24  # body: 6 float32
    crc = struct.unpack_from("<I", payload, s_end + 4)[0]
    assert crc == zlib.crc32(payload[: s_end + 4] + payload[s_end + 8 :])
    assert payload[s_end + 8 :] == struct.pack("<6f", 1.0, -2.0, 3.0, 0.5, 0.0, 4.0)


@pytest.mark.parametrize(
    ("dtype", "code"), [(torch.float32, 1), (torch.float16, 2), (torch.bfloat16, 3)]
)
def test_dtype_code_of_encoded_tensor(dtype, code):
    payload = DenseCodec("fp32").encode(X.to(dtype))
    assert payload[4] == code == DTYPE_CODES[dtype]
    assert payload == hand_payload(dtype_code=code, body=X.to(dtype).float().numpy().tobytes())


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (1, 2, 3, 4)])
@pytest.mark.parametrize("settings", ["", "x", "dense;v=int8;block=16"])
def test_header_nbytes_exact(shape, settings):
    body = bytes(range(7))
    payload = pack_payload(1, torch.float32, shape, settings, body)
    want = 2 + 1 + 1 + 1 + 1 + 2 + 4 * len(shape) + len(settings) + 4 + 4  # docstring table
    assert header_nbytes(len(shape), settings) == want
    assert len(payload) == want + len(body)
    header, got = unpack_payload(payload)
    assert got == body
    assert (header.codec_id, header.dtype, header.shape, header.settings, header.body_len) == (
        1,
        torch.float32,
        shape,
        settings,
        7,
    )
    assert header.numel == int(np.prod(shape))


def test_accepts_bytes_like_and_uint8_tensor():
    codec = DenseCodec("fp32")
    payload = codec.encode(X)
    arr = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    for form in (payload, bytearray(payload), memoryview(payload), arr, arr.clone().view(1, -1)):
        assert torch.equal(codec.decode(form), X)


@pytest.mark.parametrize(
    "bad", ["TW", None, 3, 1.5, [84, 87], (84,), np.frombuffer(b"TW", np.uint8), torch.zeros(4)]
)
def test_non_bytes_types_raise_payload_error(bad):
    with pytest.raises(PayloadError, match="payload"):
        DenseCodec("fp32").decode(bad)
    with pytest.raises(PayloadError, match="payload"):
        unpack_payload(bad)


def test_pack_payload_rejects_unknown_dtype_and_too_many_dims():
    with pytest.raises(TypeError, match="dtype must be in"):
        pack_payload(1, torch.int32, (1,), "", b"")
    with pytest.raises(ValueError, match=r"ndim must be in \[0, 16\]"):
        pack_payload(1, torch.float32, (1,) * 17, "", b"")


# ----------------------------------------------------------------------------- corruptions

SETTINGS_LEN = len(DENSE_FP32_SETTINGS)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (hand_payload(magic=b"TX"), "magic"),
        (hand_payload(magic=b"\x00\x00"), "magic"),
        (hand_payload(version=2), "version"),
        (hand_payload(version=0), "version"),
        (hand_payload(codec_id=2), "codec id"),
        (hand_payload(codec_id=0), "codec id"),
        (hand_payload(dtype_code=0), "dtype code"),
        (hand_payload(dtype_code=9), "dtype code"),
        (hand_payload(shape=(2, 3) + (1,) * 15), "ndim"),
        (hand_payload(body_len=25), "length"),
        (hand_payload(body_len=23), "length"),
        (hand_payload(body_len=2**32 - 1), "length"),
        (hand_payload(crc=0), "CRC32"),
        # Fields covered by the CRC, changed without recomputing it: the CRC names the damage.
        (hand_payload(crc=zlib.crc32(b"anything")), "CRC32"),
    ],
)
def test_single_field_corruption_names_the_field(payload, field):
    with pytest.raises(PayloadError, match=field):
        DenseCodec("fp32").decode(payload)


def _mutate(buf: bytes, offset: int, value: int) -> bytes:
    b = bytearray(buf)
    b[offset] = value
    return bytes(b)


@pytest.mark.parametrize(
    ("offset", "field"),
    [
        (4, "CRC32"),  # dtype code 1 -> 2 is a valid code: only the CRC sees it
        (8, "CRC32"),  # shape[0]
        (16, "CRC32"),  # first settings byte
        (16 + SETTINGS_LEN + 8, "CRC32"),  # first body byte
        (16 + SETTINGS_LEN + 8 + 23, "CRC32"),  # last body byte
        (16 + SETTINGS_LEN + 4, "CRC32"),  # CRC field itself
    ],
)
def test_covered_field_change_is_a_crc_mismatch(offset, field):
    good = hand_payload()
    bad = _mutate(good, offset, good[offset] ^ 0x02)
    with pytest.raises(PayloadError, match=field):
        DenseCodec("fp32").decode(bad)


def test_shape_change_with_valid_crc_names_shape():
    bad = recrc(_mutate(hand_payload(), 8, 3), 2, SETTINGS_LEN)  # shape (3, 3): 9 elements
    with pytest.raises(PayloadError, match=r"shape \(3, 3\)"):
        DenseCodec("fp32").decode(bad)


def test_settings_change_with_valid_crc_names_settings():
    bad = recrc(_mutate(hand_payload(), 16, ord("D")), 2, SETTINGS_LEN)
    with pytest.raises(PayloadError, match="settings must be 'dense;v=fp32'"):
        DenseCodec("fp32").decode(bad)
    non_ascii = hand_payload(settings=b"dense;v=fp3\xff")
    with pytest.raises(PayloadError, match="settings are not ASCII"):
        DenseCodec("fp32").decode(non_ascii)


@pytest.mark.parametrize("delta", [-1, 1, 100])
def test_settings_length_or_ndim_change_raises(delta):
    good = hand_payload()
    slen = bytearray(good)
    struct.pack_into("<H", slen, 6, max(0, SETTINGS_LEN + delta))
    ndim = _mutate(good, 5, max(0, 2 + delta))
    for bad in (bytes(slen), ndim):
        # another ndim makes the parser read other bytes as dims: the declared size is then
        # refused (numel above the default cap) before the length or the CRC is checked
        with pytest.raises(PayloadError, match="truncated|length|CRC32|ndim|numel"):
            DenseCodec("fp32").decode(bad)


def test_truncation_at_every_length_raises():
    codec = SparseCodec(chunk=4, topk=2, values="2bit")
    payload = codec.encode(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)))
    for n in range(len(payload)):
        with pytest.raises(PayloadError, match="truncated|length"):
            codec.decode(payload[:n])


@pytest.mark.parametrize("extra", [b"\x00", b"\x01\x02", bytes(100)])
def test_extension_raises(extra):
    codec = DenseCodec("int8")
    payload = codec.encode(X)
    with pytest.raises(PayloadError, match="length"):
        codec.decode(payload + extra)


@pytest.mark.parametrize(
    ("sender", "receiver", "field"),
    [
        (DenseCodec("int8"), DenseCodec("int8", block=128), "settings"),
        (DenseCodec("fp16"), DenseCodec("bf16"), "settings"),
        (DenseCodec("fp32"), SparseCodec(chunk=4, topk=2), "codec id"),
        (SparseCodec(chunk=4, topk=2), DenseCodec("fp32"), "codec id"),
        (SparseCodec(chunk=4, topk=2), SparseCodec(chunk=4, topk=3), "settings"),
        (SparseCodec(chunk=4, topk=2), SparseCodec(chunk=8, topk=2), "settings"),
        (
            SparseCodec(chunk=4, topk=2),
            SparseCodec(chunk=4, topk=2, index_coding="fixed"),
            "settings",
        ),
        (SparseCodec(chunk=4, topk=2), SparseCodec(chunk=4, topk=2, transform="none"), "settings"),
    ],
)
def test_foreign_payload_raises(sender, receiver, field):
    payload = sender.encode(X)
    with pytest.raises(PayloadError, match=field):
        receiver.decode(payload)


def test_unpack_payload_checks_codec_id_and_settings_only_when_asked():
    payload = DenseCodec("int8").encode(X)
    header, _ = unpack_payload(payload)
    assert header.settings == "dense;v=int8" and header.codec_id == 1
    with pytest.raises(PayloadError, match="codec id must be 2"):
        unpack_payload(payload, codec_id=2)
    with pytest.raises(PayloadError, match="settings must be"):
        unpack_payload(payload, settings="dense;v=int4")


def test_header_that_torch_cannot_index_raises():
    # A forged header with a valid CRC: a zero dim makes numel 0, but the other dims overflow
    # torch's int64 strides. Before the fix this leaked TypeError/RuntimeError from reshape.
    for codec in (DenseCodec("fp32"), SparseCodec(chunk=4, topk=2)):
        bad = hand_payload(
            codec_id=codec.codec_id,
            shape=(2**32 - 1, 2**32 - 1, 0, 5),
            settings=codec.settings.encode(),
            body=b"",
        )
        with pytest.raises(PayloadError, match="shape"):
            codec.decode(bad)
        # Large-but-representable zero-size shapes still decode to an empty tensor of that shape.
        ok = hand_payload(
            codec_id=codec.codec_id,
            shape=(2**20, 0, 2**20),
            settings=codec.settings.encode(),
            body=b"",
        )
        assert codec.decode(ok).shape == (2**20, 0, 2**20)
