"""Tests for thinwire.compression.pipeline: ValueFormat, DenseCodec, SparseCodec, build_codec.

Oracles: a byte-count formula written from the chunk geometry rule (as bloc97/DeMo and Psyche
chunk), SparseLoCo's density rule, the index and value stream sizes and the envelope layout; torch
casts for fp16/bf16; absmax scales recomputed in float64; a hand-computed golden vector of
SparseLoCo's 2-bit quantizer; a float64 plain-loop sparse reference (tile,
``scipy.fft.dctn(norm="ortho")``, keep the k largest ``|coef|`` with lowest-index tie-break,
inverse).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.fft import dctn, idctn

from thinwire.compression.payload import PayloadError, unpack_payload
from thinwire.compression.pipeline import (
    VALUE_FORMATS,
    DenseCodec,
    SparseCodec,
    ValueFormat,
    build_codec,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [(), (0,), (1,), (7,), (13,), (97,), (3, 5), (4, 8), (2, 0, 3), (2, 3, 4), (3, 4, 8)]

DENSE = [dict(values=v) for v in VALUE_FORMATS] + [
    dict(values="int8", block=16),
    dict(values="int4", block=8),
    dict(values="sign", block=4),
    dict(values="sign", scale=False),
    dict(values="2bit", n_bins=8),
    dict(values="2bit", range_sigmas=3.0),
    dict(values="fp8_e4m3", block=5),
    dict(values="fp4_e3m0", block=3),
]
SPARSE = [
    dict(chunk=4, topk=5 if r == "density" else 3, transform=t, topk_rule=r, index_coding=i)
    for t, r, i in itertools.product(
        ("dct", "none"), ("per_chunk", "density"), ("entropy", "fixed")
    )
] + [dict(chunk=8, topk=20, topk_rule="density", values=v) for v in VALUE_FORMATS]
CONFIGS = [("dense", c) for c in DENSE] + [("sparse", c) for c in SPARSE]


def make(kind: str, cfg: dict) -> DenseCodec | SparseCodec:
    return DenseCodec(**cfg) if kind == "dense" else SparseCodec(**cfg)


def cfg_id(kc) -> str:
    return kc[0] + ":" + ",".join(f"{k}={v}" for k, v in kc[1].items())


# ----------------------------------------------------------------------------- byte formula


def ref_split(n: int, s: int) -> int:
    """Chunk side: largest divisor of n that is <= s (n itself when n <= s); zero dims -> 1."""
    if n == 0:
        return 1
    return n if n <= s else max(d for d in range(1, s + 1) if n % d == 0)


def ref_geometry(shape: tuple[int, ...], s: int) -> tuple[int, int, int, int, int]:
    """(batch, rows, cols, n1, n2) of the chunk geometry (0-d as (1,), N-D folds leading dims)."""
    if len(shape) == 0:
        b, r, c = 1, 1, 1
    elif len(shape) == 1:
        b, r, c = 1, 1, shape[0]
    else:
        b, r, c = math.prod(shape[:-2]), shape[-2], shape[-1]
    n1 = 1 if len(shape) < 2 else ref_split(r, s)
    return b, r, c, n1, ref_split(c, s)


def ref_k(C: int, cfg: dict) -> int:
    s, topk = cfg.get("chunk", 64), cfg.get("topk", 32)
    if cfg.get("topk_rule", "per_chunk") == "density":  # SparseLoCo density rule, half to even
        return min(C, max(1, round(Fraction(C * topk, s * s))))
    return min(topk, C)


def ref_value_bytes(n: int, cfg: dict) -> int:
    """Value streams: packed codes then float32 side data."""
    v = cfg.get("values", "fp32")
    blk = cfg.get("block")
    if v == "fp32":
        return 4 * n
    if v in ("fp16", "bf16"):
        return 2 * n
    if v == "int8":
        return n + 4 * math.ceil(n / (blk or 256))
    if v in ("int4", "fp4_e3m0"):
        return math.ceil(n / 2) + 4 * math.ceil(n / (blk or 128))
    if v in ("fp8_e4m3", "fp8_e5m2"):
        return n + 4 * math.ceil(n / (blk or 128))
    if v == "2bit":
        nb = cfg.get("n_bins", 4)
        return math.ceil(n * int(math.log2(nb)) / 8) + 4 * (1 + nb)
    if v == "sign":
        scales = (
            0 if cfg.get("scale", True) is False else (math.ceil(n / blk) if blk else min(n, 1))
        )
        return math.ceil(n / 8) + 4 * scales
    raise AssertionError(v)


def ref_index_bits(k: int, C: int, coding: str) -> int:
    if coding == "fixed":
        return k * math.ceil(math.log2(C))  # fixed-width indices: ceil(log2 C) bits
    low = 0  # Elias-Fano: L = floor(log2(C / k)), high part k + (C-1 >> L) + 1 bits
    while k * 2 ** (low + 1) <= C:
        low += 1
    return k * low + k + ((C - 1) >> low) + 1


def ref_wire_bytes(kind: str, cfg: dict, shape: tuple[int, ...], settings_text: str) -> int:
    head = 8 + 4 * len(shape) + len(settings_text) + 8
    if kind == "dense":
        return head + ref_value_bytes(math.prod(shape), cfg)
    b, r, c, n1, n2 = ref_geometry(shape, cfg.get("chunk", 64))
    N, C = b * (r // n1) * (c // n2), n1 * n2
    if N == 0:
        return head
    k = ref_k(C, cfg)
    idx_bytes = math.ceil(N * ref_index_bits(k, C, cfg.get("index_coding", "entropy")) / 8)
    return head + idx_bytes + ref_value_bytes(N * k, cfg)


def rand(shape, dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------- wire bytes


def _check_wire(kind, cfg, shape, dtype, seed):
    codec = make(kind, cfg)
    x = rand(shape, dtype, seed)
    payload = codec.encode(x)
    want = ref_wire_bytes(kind, cfg, shape, codec.settings)
    assert len(payload) == codec.wire_bytes(shape) == want
    out = codec.decode(payload)
    assert out.dtype == torch.float32 and tuple(out.shape) == shape
    assert unpack_payload(payload)[0].dtype == dtype


@pytest.mark.parametrize("kc", CONFIGS, ids=cfg_id)
def test_wire_bytes_exact_on_named_shapes(kc):
    for i, shape in enumerate(SHAPES):
        _check_wire(*kc, shape, DTYPES[i % 3], i)


dims = st.integers(0, 17)


@settings(deadline=None, max_examples=60, derandomize=True)
@given(
    kc=st.sampled_from(CONFIGS),
    shape=st.one_of(st.sampled_from(SHAPES), st.lists(dims, max_size=3).map(tuple)),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_wire_bytes_property(kc, shape, dtype, seed):
    _check_wire(*kc, shape, dtype, seed)


def test_wire_bytes_50257_by_64_chunk_side_29():
    shape = (50257, 64)
    assert ref_geometry(shape, 64)[3:] == (29, 64)
    assert SparseCodec().geometry(shape).n1 == 29
    x = rand(shape, torch.bfloat16, 0)
    for kind, cfg in [
        ("sparse", dict(topk=32)),
        (
            "sparse",
            dict(
                topk=64, topk_rule="density", transform="none", values="2bit", index_coding="fixed"
            ),
        ),
        ("dense", dict(values="int8")),
        ("dense", dict(values="sign")),
    ]:
        codec = make(kind, cfg)
        want = ref_wire_bytes(kind, cfg, shape, codec.settings)
        assert len(codec.encode(x)) == codec.wire_bytes(shape) == want


def test_wire_bytes_int_means_flat_and_decode_numel_form():
    codec = SparseCodec(chunk=4, topk=2)
    x = rand((3, 8), torch.float32, 1)
    payload = codec.encode(x)
    assert codec.wire_bytes(24) == ref_wire_bytes(
        "sparse", dict(chunk=4, topk=2), (24,), codec.settings
    )
    flat = codec.decode(payload, 24)
    assert flat.shape == (24,) and torch.equal(flat, codec.decode(payload).reshape(-1))
    with pytest.raises(PayloadError, match="numel must be 25"):
        codec.decode(payload, 25)
    dense = DenseCodec("fp16")
    p = dense.encode(x)
    assert torch.equal(dense.decode(p, 24), x.half().float().reshape(-1))
    with pytest.raises(PayloadError, match="numel"):
        dense.decode(p, 23)


# ----------------------------------------------------------------------------- dense oracles


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_fp32_fp16_bf16_exact(dtype):
    x = rand((5, 7), dtype, 2) * 100
    assert torch.equal(DenseCodec("fp32").decode(DenseCodec("fp32").encode(x)), x.float())
    for fmt, cast in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        c = DenseCodec(fmt)
        assert torch.equal(c.decode(c.encode(x)), x.float().to(cast).float())


@pytest.mark.parametrize(
    ("fmt", "levels", "block"), [("int8", 127, 256), ("int4", 7, 128), ("int8", 127, 5)]
)
def test_dense_absmax_within_half_scale(fmt, levels, block):
    x = rand((1000,), torch.float32, 3) * torch.linspace(0.01, 10, 1000)
    x[:block] = 0.0  # an all-zero block: scale 0, exact zeros
    cfg = dict(values=fmt) if block in (256, 128) else dict(values=fmt, block=block)
    out = make("dense", cfg).decode(make("dense", cfg).encode(x)).double()
    x64 = x.double()
    for b0 in range(0, 1000, block):
        blk = x64[b0 : b0 + block]
        amax = float(blk.abs().max())
        scale = amax / levels  # float64, independent of the codec
        # Bound: scale/2 plus float32 rounding of the scale and product (<= 3 * 2^-24 * amax).
        bound = scale / 2 + 3 * 2.0**-24 * amax
        assert float((out[b0 : b0 + block] - blk).abs().max()) <= bound
    assert torch.equal(out[:block], torch.zeros(block, dtype=torch.float64))


def test_dense_sign_and_2bit_closed_forms():
    x = rand((37,), torch.float32, 4)
    mean_abs = float(x.double().abs().mean())
    want = torch.where(x < 0, -1.0, 1.0).double() * mean_abs
    out = DenseCodec("sign").decode(DenseCodec("sign").encode(x)).double()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0)  # fp32 mean vs float64 mean
    unscaled = DenseCodec("sign", scale=False)
    assert torch.equal(unscaled.decode(unscaled.encode(x)), torch.where(x < 0, -1.0, 1.0))
    # The 2-bit quantizer's golden vector (see test_quant.py) through the dense 2-bit codec.
    v = torch.tensor([-3, -2, -1, -0.2, 0.1, 0.9, 1.5, 2.5, 3, 4])
    got = DenseCodec("2bit").decode(DenseCodec("2bit").encode(v))
    golden = torch.tensor([-2.5, -2.5] + [0.26] * 5 + [19 / 6] * 3)
    torch.testing.assert_close(got, golden, rtol=0, atol=1e-5)  # golden quoted to 5 digits


@pytest.mark.parametrize(
    ("fmt", "rel", "sub"),
    [
        ("fp8_e4m3", 2.0**-4, 2.0**-10),
        ("fp8_e5m2", 2.0**-3, 2.0**-17),
        ("fp4_e3m0", 1 / 3, 2.0**-7),
    ],
)
def test_dense_minifloat_error_bounds(fmt, rel, sub):
    # rel: half an ulp relative (3 / 2 mantissa bits; E3M0 worst case 1/3 at 1.5 * 2^k);
    # sub: half the smallest step below the normal range, times the block scale (amax / fmax).
    x = rand((256,), torch.float32, 5) * torch.logspace(-3, 2, 256)
    out = DenseCodec(fmt).decode(DenseCodec(fmt).encode(x)).double()
    fmax = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp4_e3m0": 1.0}[fmt]
    x64 = x.double()
    for b0 in range(0, 256, 128):
        blk, got = x64[b0 : b0 + 128], out[b0 : b0 + 128]
        scale = float(blk.abs().max()) / fmax
        # 1e-6: float32 rounding of x / scale and of the product (a few ulps).
        bound = blk.abs() * (rel + 1e-6) + scale * sub * (1 + 1e-6)
        assert bool(((got - blk).abs() <= bound).all())


# ----------------------------------------------------------------------------- sparse oracles


def ref_tiles(x: np.ndarray, s: int):
    """Yield (slices into the (B, R, C) view, tile) in canonical tile order, as plain loops."""
    b, r, c, n1, n2 = ref_geometry(tuple(x.shape), s)
    v = x.reshape(b, r, c)
    for bi in range(b):
        for ty in range(r // n1):
            for tx in range(c // n2):
                sl = (bi, slice(ty * n1, (ty + 1) * n1), slice(tx * n2, (tx + 1) * n2))
                yield sl, v[sl]


def ref_sparse(x: np.ndarray, cfg: dict) -> np.ndarray:
    """Float64 reference of SparseCodec with fp32 values: top-k per tile, inverse transform."""
    s = cfg.get("chunk", 64)
    b, r, c, n1, n2 = ref_geometry(tuple(x.shape), s)
    out = np.zeros((b, r, c))
    dct = cfg.get("transform", "dct") == "dct"
    for sl, tile in ref_tiles(x.astype(np.float64), s):
        coef = (dctn(tile, norm="ortho") if dct else tile).ravel()
        k = ref_k(n1 * n2, cfg)
        keep = sorted(range(coef.size), key=lambda i: (-abs(coef[i]), i))[:k]
        kept = np.zeros(coef.size)
        kept[keep] = coef[keep]
        kept = kept.reshape(n1, n2)
        out[sl] = idctn(kept, norm="ortho") if dct else kept
    return out.reshape(x.shape)


def separated_input(shape, cfg: dict, seed: int) -> np.ndarray:
    """An input whose (transformed) tile entries have magnitudes at least 1/C apart, so the fp32
    and float64 top-k pick the same entries (no near-ties)."""
    rng = np.random.default_rng(seed)
    s = cfg.get("chunk", 64)
    b, r, c, n1, n2 = ref_geometry(tuple(shape), s)
    x = np.zeros((b, r, c))
    dct = cfg.get("transform", "dct") == "dct"
    for sl, _ in ref_tiles(x, s):
        C = n1 * n2
        mags = (rng.permutation(C) + 1.0) / C
        coef = (mags * rng.choice([-1.0, 1.0], C)).reshape(n1, n2)
        x[sl] = idctn(coef, norm="ortho") if dct else coef
    return x.reshape(shape)


SPARSE_REF_CFGS = [
    dict(chunk=4, topk=3, transform="dct"),
    dict(chunk=4, topk=3, transform="none", index_coding="fixed"),
    dict(chunk=8, topk=20, transform="dct", topk_rule="density"),
    dict(chunk=8, topk=40, transform="none", topk_rule="density"),
]


@settings(deadline=None, max_examples=40, derandomize=True)
@given(
    cfg=st.sampled_from(SPARSE_REF_CFGS),
    shape=st.one_of(
        st.sampled_from(SHAPES), st.lists(st.integers(1, 24), min_size=1, max_size=3).map(tuple)
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_matches_float64_reference(cfg, shape, seed):
    x64 = separated_input(shape, cfg, seed)
    x = torch.from_numpy(x64).float()
    codec = SparseCodec(**cfg)
    out = codec.decode(codec.encode(x))
    # fp32 DCT of O(1) tiles of <= 64 entries: error a few 1e-7; 1e-5 leaves a wide margin.
    np.testing.assert_allclose(out.double().numpy(), ref_sparse(x64, cfg), rtol=0, atol=1e-5)


def test_sparse_tie_break_lowest_index():
    x = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, 1.0, -1.0, 1.0])  # six magnitude-1 ties
    out = SparseCodec(chunk=8, topk=3, transform="none").decode(
        SparseCodec(chunk=8, topk=3, transform="none").encode(x)
    )
    assert torch.equal(out, torch.tensor([1.0, -1.0, 1.0, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize("shape", [(7,), (13,), (6, 10), (2, 3, 8)])
def test_sparse_keep_all_reconstructs(shape):
    x = rand(shape, torch.float32, 6)
    for t in ("none", "dct"):
        codec = SparseCodec(chunk=4, topk=16, transform=t)
        out = codec.decode(codec.encode(x))
        if t == "none":
            assert torch.equal(out, x)  # keep-all, fp32 values: exact
        else:
            torch.testing.assert_close(out, x, rtol=0, atol=1e-5)  # orthonormal DCT round trip


@pytest.mark.parametrize("kc", CONFIGS, ids=cfg_id)
def test_roundtrip_second_output_equals_decode(kc):
    codec = make(*kc)
    for i, shape in enumerate([(), (0,), (13,), (6, 8), (2, 4, 4)]):
        x = rand(shape, DTYPES[i % 3], 7 + i)
        payload, local = codec.roundtrip(x)
        assert payload == codec.encode(x)
        assert torch.equal(local, codec.decode(payload))


@pytest.mark.parametrize("values", VALUE_FORMATS)
def test_encode_sparse_raw_val_and_message(values):
    codec = SparseCodec(chunk=4, topk=3, values=values)
    x = rand((8, 12), torch.float32, 8)
    enc = codec.encode_sparse(x)
    coeffs = codec.coefficients(x)[1]
    msg = codec.decode_sparse(enc.payload)
    assert torch.equal(enc.message.idx, msg.idx) and torch.equal(enc.message.val, msg.val)
    assert torch.equal(enc.raw_val, coeffs.gather(1, enc.message.idx))
    if values == "fp32":
        assert torch.equal(enc.raw_val, enc.message.val)
    else:  # the message carries what the receiver decodes: the raw values through the format
        fmt = ValueFormat(values)
        assert torch.equal(enc.message.val.reshape(-1), fmt.encode(enc.raw_val.reshape(-1))[1])


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("kc", CONFIGS, ids=cfg_id)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_value_error(kc, bad):
    x = rand((4, 8), torch.float32, 9)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="finite"):
        make(*kc).encode(x)


@pytest.mark.parametrize("fmt", ["sign", "2bit"])
def test_overflowing_side_data_raises_at_encode(fmt):
    # Finite input whose mean |x| overflows float32: used to encode a payload every receiver
    # rejects (inf scale / NaN centroids); now refused at encode.
    x = torch.full((8,), 3e38)
    with pytest.raises(ValueError, match="finite"):
        DenseCodec(fmt).encode(x)


def test_bad_input_types():
    with pytest.raises(TypeError, match="x must be"):
        DenseCodec().encode([1.0, 2.0])
    with pytest.raises(TypeError, match=r"x.dtype must be in"):
        SparseCodec().encode(torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x.dtype must be in"):
        DenseCodec().encode(torch.ones(4, dtype=torch.int32))


def test_generator_and_stochastic_settings():
    x = rand((300,), torch.float32, 10)
    for kc in CONFIGS:  # a generator is accepted by every codec (ignored by deterministic ones)
        codec = make(*kc)
        assert codec.encode(x, generator=torch.Generator().manual_seed(0)) == codec.encode(x)
    codec = DenseCodec("int8", stochastic=True)
    p1 = codec.encode(x, generator=torch.Generator().manual_seed(3))
    p2 = codec.encode(x, generator=torch.Generator().manual_seed(3))
    assert p1 == p2 and len(p1) == codec.wire_bytes(300)
    scale = float(x.abs().max()) / 127
    assert float((codec.decode(p1) - x).abs().max()) < scale * (1 + 1e-6)  # stochastic: < 1 step
    with pytest.raises(ValueError, match="generator"):
        codec.encode(x)


# ----------------------------------------------------------------------------- build_codec


@pytest.mark.parametrize(
    ("spec", "settings_text"),
    [
        ("fp16", "dense;v=fp16"),
        ("quant(int8, block=256)", "dense;v=int8;block=256"),
        ("quant(8)", "dense;v=int8"),
        ("quant(32)", "dense;v=fp32"),
        ("quant(2, n_bins=8)", "dense;v=2bit;n_bins=8"),
        ({"values": "int8", "block": 256}, "dense;v=int8;block=256"),
        ({"topk": 8, "chunk": 16}, "sparse;s=16;k=8;t=dct;r=per_chunk;i=entropy;v=fp32"),
        (
            "dct > topk(32) > quant(sign) > pack",
            "sparse;s=64;k=32;t=dct;r=per_chunk;i=entropy;v=sign",
        ),
        (
            "dct → topk(32) → quant(1, scale=false)",
            "sparse;s=64;k=32;t=dct;r=per_chunk;i=entropy;v=sign;scale=False",
        ),
        ("topk(64, rule=density) > quant(2)", "sparse;s=64;k=64;t=none;r=density;i=entropy;v=2bit"),
        (
            "chunk(16) > topk(8) > quant(bf16) > index(fixed) > pack",
            "sparse;s=16;k=8;t=none;r=per_chunk;i=fixed;v=bf16",
        ),
        (" chunk( 8 ) >topk( 4 )", "sparse;s=8;k=4;t=none;r=per_chunk;i=entropy;v=fp32"),
    ],
)
def test_build_codec_forms(spec, settings_text):
    codec = build_codec(spec)
    assert codec.settings == settings_text
    assert isinstance(codec, SparseCodec if "topk" in str(spec) else DenseCodec)
    assert build_codec(codec) is codec


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("dct > topk(32) > foo", "'foo'"),
        ("topk", "'topk'"),
        ("dct(3) > topk(2)", r"'dct\(3\)'"),
        ("topk(2) > quant(3)", "quant must be in"),
        ("topk(2) > quant(int9)", "quant must be in"),
        ("dct > dct > topk(3)", "'dct' must appear once"),
        ("dct", "need a topk"),
        ("chunk(8) > index(fixed)", "need a topk"),
        ("", "stage must look like"),
        ("topk(2) > index(rice)", "index_coding must be in"),
        ("topk(0)", "topk must be in"),
        ("chunk(8) > topk(65, rule=density)", "topk must be in"),
        ("quant(int8, block=0)", "block must be in"),
        ("quant(fp32, block=3)", "takes no settings"),
    ],
)
def test_build_codec_bad_stage(spec, match):
    with pytest.raises(ValueError, match=match):
        build_codec(spec)


def test_constructor_validation():
    with pytest.raises(ValueError, match="values must be in"):
        DenseCodec("int3")
    with pytest.raises(ValueError, match="transform must be in"):
        SparseCodec(transform="fft")
    with pytest.raises(ValueError, match="topk_rule must be in"):
        SparseCodec(topk_rule="global")
    with pytest.raises(ValueError, match="chunk must be in"):
        SparseCodec(chunk=0)
    with pytest.raises(TypeError):
        build_codec(3)
