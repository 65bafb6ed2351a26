"""Decoding is bounded: a payload's declared shape never decides alone how much memory a decode
allocates.

Oracles: payloads crafted by hand with a valid CRC (``pack_payload`` around a body of exactly
``codec.body_nbytes(shape)`` bytes) whose header declares a shape far larger than the payload;
the element counts are products of the declared dims. The memory check runs the decode in a
child process whose address space is capped at 1 GiB above what it has mapped after import, so
an allocation of the declared size (4 GiB for ``(32768, 32768)`` float32) cannot succeed there:
before the fix it surfaced as ``RuntimeError`` (or a ``PayloadError`` wrapping the failed
allocation), after the fix the decode is refused from the header alone.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import thinwire.compression.base as codec_base
from thinwire.compression.base import DEFAULT_MAX_NUMEL
from thinwire.compression.index_coding import INDEX_CODERS
from thinwire.compression.payload import PayloadError, pack_payload, unpack_payload
from thinwire.compression.pipeline import DenseCodec, SparseCodec

# The review's bomb: one kept entry per 64x64 chunk, sign values, declared shape (32768, 32768).
BOMB_SHAPE = (32768, 32768)
SPARSE_KW = dict(chunk=64, topk=1, values="sign")
# A dense bomb: 1 bit per element on the wire, 2**29 elements (2 GiB of float32) declared.
DENSE_BOMB_SHAPE = (2**29,)
DENSE_KW = dict(values="sign")


def sparse_bomb(codec: SparseCodec, shape: tuple[int, ...]) -> bytes:
    """A valid sparse payload for ``shape``: index 0 kept in every chunk, all values +1."""
    g = codec.geometry(shape)
    k = codec.k_for(g.chunk_len)
    idx = torch.zeros(g.num_chunks, k, dtype=torch.long)
    index_body = INDEX_CODERS[codec.index_coding].encode(idx, g.chunk_len).numpy().tobytes()
    value_body, _ = codec.values.encode(torch.ones(g.num_chunks * k), None)
    return pack_payload(
        codec.codec_id, torch.float32, shape, codec.settings, index_body + value_body
    )


def dense_bomb(codec: DenseCodec, shape: tuple[int, ...]) -> bytes:
    """A valid dense payload for ``shape``: an all-zero body (sign codes, scale 0)."""
    body = bytes(codec.body_nbytes(shape))
    return pack_payload(codec.codec_id, torch.float32, shape, codec.settings, body)


def test_bomb_payload_is_small_and_valid():
    codec = SparseCodec(**SPARSE_KW)
    payload = sparse_bomb(codec, BOMB_SHAPE)
    assert len(payload) == codec.wire_bytes(BOMB_SHAPE) < 500_000  # 0.49 MB for 2**30 elements
    header, _ = unpack_payload(payload, codec_id=2, settings=codec.settings)  # CRC and fields ok
    assert header.shape == BOMB_SHAPE and header.numel == 2**30 > DEFAULT_MAX_NUMEL
    # With the cap raised on purpose, the message itself decodes: 262144 chunks x 1 entry (a few
    # MB of indices); only densifying it would allocate the declared 4 GiB.
    msg = codec.decode_sparse(payload, max_numel=2**30)
    assert tuple(msg.idx.shape) == (262144, 1) and bool((msg.idx == 0).all())


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from thinwire.compression.pipeline import DenseCodec, SparseCodec

    cases = json.loads(sys.argv[1])
    codecs = {"sparse": SparseCodec(**cases["sparse_kw"]), "dense": DenseCodec(**cases["dense_kw"])}
    payloads = {name: open(path, "rb").read() for name, path in cases["files"].items()}
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for call in ("sparse.decode", "sparse.decode_sparse", "dense.decode"):
        name, method = call.split(".")
        try:
            getattr(codecs[name], method)(payloads[name])
            out[call] = ["returned", ""]
        except BaseException as exc:  # the type is what the test checks
            out[call] = [type(exc).__name__, str(exc)[:300]]
    out["rss_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    print(json.dumps(out))
    """
)


def test_huge_declared_shape_raises_payload_error_under_memory_limit(tmp_path):
    sparse, dense = SparseCodec(**SPARSE_KW), DenseCodec(**DENSE_KW)
    files = {"sparse": tmp_path / "sparse.bin", "dense": tmp_path / "dense.bin"}
    files["sparse"].write_bytes(sparse_bomb(sparse, BOMB_SHAPE))
    files["dense"].write_bytes(dense_bomb(dense, DENSE_BOMB_SHAPE))
    arg = json.dumps(
        {
            "sparse_kw": SPARSE_KW,
            "dense_kw": DENSE_KW,
            "files": {k: str(v) for k, v in files.items()},
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for call in ("sparse.decode", "sparse.decode_sparse", "dense.decode"):
        kind, msg = got[call]
        # Refused from the header: a PayloadError naming the cap, not a failed allocation.
        assert kind == "PayloadError" and "max_numel" in msg, (call, kind, msg)
    # Peak RSS growth over the three decodes (46 MB measured; 674 MB before the fix, when the
    # allocations of the declared size were attempted). 256 MiB bound: a decode may copy the
    # payload body once (64 MB here), while each declared output is 2 GiB or more.
    assert got["rss_growth_kb"] < 256 * 1024, got


@pytest.mark.parametrize(
    "codec", [DenseCodec("fp32"), SparseCodec(chunk=4, topk=2, transform="none")], ids=str
)
def test_decode_checks_expected_shape(codec):
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    payload = codec.encode(x)
    want = codec.decode(payload)
    assert torch.equal(codec.decode(payload, shape=(4, 6)), want)
    assert torch.equal(codec.decode(payload, shape=torch.Size([4, 6])), want)
    for other in [(6, 4), (24,), 24, (4, 6, 1), (4, 7)]:
        with pytest.raises(PayloadError, match=r"payload shape must be"):
            codec.decode(payload, shape=other)
    assert torch.equal(codec.decode(payload, 24, shape=(4, 6)), want.reshape(-1))  # flat form
    with pytest.raises(ValueError, match="numel must be the product of shape"):
        codec.decode(payload, 25, shape=(4, 6))
    if isinstance(codec, SparseCodec):
        with pytest.raises(PayloadError, match="payload shape must be"):
            codec.decode_sparse(payload, shape=(2, 12))


@pytest.mark.parametrize(
    "codec", [DenseCodec("int8", block=4), SparseCodec(chunk=4, topk=2)], ids=str
)
def test_max_numel_is_checked_before_the_body_is_decoded(codec, monkeypatch):
    x = torch.linspace(-1, 1, 24).reshape(4, 6)
    payload = codec.encode(x)
    want = codec.decode(payload)
    assert torch.equal(codec.decode(payload, max_numel=24), want)  # the bound is inclusive

    def refuse(*args, **kwargs):
        raise AssertionError("the body was decoded before the size check")

    # Nothing sized by the header may be decoded (values, indices) once the size is refused.
    monkeypatch.setattr(codec.values, "decode", refuse)
    if isinstance(codec, SparseCodec):
        monkeypatch.setattr(codec._coder, "decode", refuse)
    with pytest.raises(PayloadError, match=r"numel must be in \[0, 23\] \(max_numel\), got 24"):
        codec.decode(payload, max_numel=23)
    if isinstance(codec, SparseCodec):
        with pytest.raises(PayloadError, match="max_numel"):
            codec.decode_sparse(payload, max_numel=0)


def test_default_cap_applies_only_without_an_expected_shape(monkeypatch):
    # The default cap (2**28) scaled down so the test stays small; the rule is the same.
    monkeypatch.setattr(codec_base, "DEFAULT_MAX_NUMEL", 23)
    x = torch.linspace(-1, 1, 24).reshape(4, 6)
    for codec in (DenseCodec("fp16"), SparseCodec(chunk=4, topk=2)):
        payload = codec.encode(x)
        with pytest.raises(PayloadError, match=r"\[0, 23\] \(max_numel\), got 24"):
            codec.decode(payload)
        if isinstance(codec, SparseCodec):
            with pytest.raises(PayloadError, match="max_numel"):
                codec.decode_sparse(payload)
        # A caller that states what it expects, or raises the cap, gets the tensor.
        oracle = codec.decode(payload, max_numel=24)
        assert oracle.shape == (4, 6)
        assert torch.equal(codec.decode(payload, 24), oracle.reshape(-1))
        assert torch.equal(codec.decode(payload, shape=(4, 6)), oracle)
        # An explicit cap applies on top of an expected shape.
        with pytest.raises(PayloadError, match="max_numel"):
            codec.decode(payload, shape=(4, 6), max_numel=10)


def test_sparse_entries_never_exceed_the_checked_numel():
    # Indices and values decoded are num_chunks * k <= numel, so the cap on numel bounds them:
    # checked over geometries with prime, 1-D and N-D shapes (chunks hold numel exactly).
    for shape in [(97,), (64, 64), (3, 5, 128), (1, 1), (2, 0, 7)]:
        for kw in (dict(chunk=8, topk=64), dict(chunk=4, topk=3, topk_rule="density")):
            codec = SparseCodec(**kw)
            g = codec.geometry(shape)
            assert g.num_chunks * g.chunk_len == math.prod(shape)
            assert g.num_chunks * codec.k_for(g.chunk_len) <= math.prod(shape)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_limit_arguments_are_validated(bad):
    payload = DenseCodec("fp32").encode(torch.ones(3))
    err = TypeError if isinstance(bad, bool | float) else ValueError
    with pytest.raises(err, match="max_numel"):
        DenseCodec("fp32").decode(payload, max_numel=bad)
    with pytest.raises(err, match="numel"):
        DenseCodec("fp32").decode(payload, bad)


def test_a_huge_declared_size_is_refused_before_the_body_is_checksummed(monkeypatch):
    # The bound runs on the declared shape as soon as it is parsed: the body of an oversized
    # payload is never copied or checksummed (zlib.crc32 is not called at all).
    import zlib

    from thinwire.compression import payload as payload_mod

    codec = DenseCodec("fp32")
    good = codec.encode(torch.zeros(64, 64))
    calls = []
    real = zlib.crc32
    monkeypatch.setattr(payload_mod.zlib, "crc32", lambda *a: calls.append(1) or real(*a))
    with pytest.raises(PayloadError, match=r"max_numel"):
        codec.decode(good, max_numel=100)
    assert calls == []
    codec.decode(good)  # and an accepted one is checksummed as before
    assert calls
