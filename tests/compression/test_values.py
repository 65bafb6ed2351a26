"""Tests for thinwire.compression.values.

Oracles: the byte path (:meth:`ValueFormat.encode` / :meth:`ValueFormat.decode`, built on the
checked public quantizers and packers, themselves tested against float64 references) for the
device path; numpy's little-endian float32 reading of the side data; and a torch function mode
that fails on any read of a tensor value back to the host.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from thinwire.compression import quant as Q
from thinwire.compression.index_coding import INDEX_CODERS
from thinwire.compression.values import VALUE_FORMATS, ValueFormat

FORMATS = [
    ("fp32", {}),
    ("int8", {}),
    ("int8", {"block": 16}),
    ("int8", {"block": 16, "stochastic": True}),
    ("int4", {"block": 16}),
    ("int4", {"block": 16, "stochastic": True}),
    ("2bit", {}),
    ("2bit", {"n_bins": 8}),  # 3-bit fields
    ("2bit", {"n_bins": 16}),
    ("2bit", {"n_bins": 32, "range_sigmas": 4.0}),  # 5-bit fields
    ("sign", {}),
    ("sign", {"block": 16}),
    ("sign", {"scale": False}),
    ("fp8_e4m3", {"block": 16}),
    ("fp8_e5m2", {}),
    ("fp4_e3m0", {"block": 16}),
    ("fp4_e3m0", {"block": 16, "stochastic": True}),
    ("fp16", {}),
    ("bf16", {}),
]
IDS = [f"{name}-{params}" for name, params in FORMATS]
SIZES = [0, 1, 15, 16, 17, 131, 257]  # 0, 1, block-1, block, block+1 (block=16), primes


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))


def _gen(params: dict, seed: int) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if params.get("stochastic") else None


def _reference_ok(vf: ValueFormat, body: bytes, n: int) -> tuple[bool, torch.Tensor | None]:
    """Validity by the byte path: decodes without raising, to finite values and side data."""
    try:
        vals = vf.decode(body, 0, n)
    except ValueError:
        return False, None
    n_side = _side_count(vf, n)
    side = np.frombuffer(body[len(body) - 4 * n_side :], dtype="<f4")
    finite = bool(torch.isfinite(vals).all()) and bool(np.isfinite(side).all())
    return finite, (vals if finite else None)


def _side_count(vf: ValueFormat, n: int) -> int:
    return 0 if vf.name == "fp32" else Q.side_len(vf.name, n, **vf.params)


# ----------------------------------------------------------------------------- device == bytes


def test_exports():
    import thinwire.compression.values as V

    assert V.__all__ == ["VALUE_FORMATS", "ValueFormat"]
    assert VALUE_FORMATS == ("fp32", *Q.QUANTIZERS)


@pytest.mark.parametrize(("name", "params"), FORMATS, ids=IDS)
@pytest.mark.parametrize("n", SIZES)
def test_encode_tensor_equals_byte_encode(name, params, n):
    vf = ValueFormat(name, **params)
    x = _data(n, 10 + n)
    body_ref, deq_ref = vf.encode(x, _gen(params, n))
    body, deq, ok = vf.encode_tensor(x, _gen(params, n))
    assert body.dtype == torch.uint8 and body.shape == (vf.nbytes(n),)
    assert deq.dtype == torch.float32 and deq.shape == (n,)
    assert ok.dtype == torch.bool and ok.shape == () and bool(ok)
    assert body.numpy().tobytes() == body_ref
    assert torch.equal(deq, deq_ref)


@pytest.mark.parametrize(("name", "params"), FORMATS, ids=IDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_decode_rows_equals_byte_decode_per_row(name, params, n, rows):
    vf = ValueFormat(name, **params)
    bodies = [vf.encode(_data(n, 100 * r + n), _gen(params, r))[0] for r in range(rows)]
    stacked = torch.tensor(
        [list(b) for b in bodies] if rows else np.zeros((0, vf.nbytes(n)), dtype=np.uint8),
        dtype=torch.uint8,
    ).reshape(rows, vf.nbytes(n))
    vals, ok = vf.decode_rows(stacked, n)
    assert vals.dtype == torch.float32 and vals.shape == (rows, n)
    assert ok.dtype == torch.bool and ok.shape == (rows,) and ok.tolist() == [True] * rows
    for r in range(rows):
        assert torch.equal(vals[r], vf.decode(bodies[r], 0, n))


@pytest.mark.parametrize(("name", "params"), FORMATS, ids=IDS)
@pytest.mark.parametrize("n", [0, 17, 131])
def test_round_trip_encode_tensor_decode_rows(name, params, n):
    vf = ValueFormat(name, **params)
    bodies, deqs = [], []
    for r in range(3):
        body, deq, ok = vf.encode_tensor(_data(n, 7 * r + n).to(torch.bfloat16), _gen(params, r))
        assert bool(ok)
        bodies.append(body)
        deqs.append(deq)
    vals, ok = vf.decode_rows(torch.stack(bodies), n)
    assert ok.tolist() == [True] * 3
    assert torch.equal(vals, torch.stack(deqs))


@pytest.mark.parametrize(
    ("name", "params"), [("fp32", {}), ("int8", {"block": 16}), ("fp16", {}), ("bf16", {})]
)
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_decode_rows_of_a_misaligned_slice(name, params, offset):
    # Bodies cut out of a larger buffer at an odd byte offset cannot be viewed as float32 in place.
    vf = ValueFormat(name, **params)
    n = 17
    bodies = [vf.encode(_data(n, r), None)[0] for r in range(2)]
    nb = vf.nbytes(n)
    big = torch.zeros(2, offset + nb + 5, dtype=torch.uint8)
    for r, b in enumerate(bodies):
        big[r, offset : offset + nb] = torch.tensor(list(b), dtype=torch.uint8)
    flat = big.reshape(-1)[offset : offset + nb].view(1, nb)  # contiguous, storage offset odd
    for body in (big[:, offset : offset + nb], flat):
        vals, ok = vf.decode_rows(body, n)
        assert bool(ok.all())
        for r in range(body.shape[0]):
            assert torch.equal(vals[r], vf.decode(bodies[r], 0, n))


# ----------------------------------------------------------------------------- corruption flags


def _corruptions(vf: ValueFormat, body: bytes, n: int, seed: int) -> list[bytes]:
    """Every single-bit flip, NaN/inf written over each side value, and random garbage."""
    out = []
    for s in range(8 * len(body)):
        b = bytearray(body)
        b[s // 8] ^= 1 << (s % 8)
        out.append(bytes(b))
    n_side = _side_count(vf, n)
    side_start = len(body) - 4 * n_side
    if vf.name == "fp32":
        n_side, side_start = n, 0
    for i in range(n_side):
        for bad in (float("nan"), float("inf"), float("-inf")):
            b = bytearray(body)
            b[side_start + 4 * i : side_start + 4 * i + 4] = np.float32(bad).tobytes()
            out.append(bytes(b))
    rng = np.random.default_rng(seed)
    for _ in range(20):
        out.append(rng.integers(0, 256, len(body), dtype=np.uint8).tobytes())
    return out


@pytest.mark.parametrize(("name", "params"), FORMATS, ids=IDS)
@pytest.mark.parametrize("n", [1, 17])
def test_decode_rows_flags_agree_with_byte_decode(name, params, n):
    vf = ValueFormat(name, **params)
    body = vf.encode(_data(n, 3 + n), _gen(params, 0))[0]
    cases = _corruptions(vf, body, n, seed=n)
    vals, ok = vf.decode_rows(torch.tensor([list(c) for c in cases], dtype=torch.uint8), n)
    for r, case in enumerate(cases):
        ref_ok, ref_vals = _reference_ok(vf, case, n)
        assert bool(ok[r]) == ref_ok, (r, case.hex())
        if ref_ok:
            assert torch.equal(vals[r], ref_vals)
        else:
            assert torch.equal(vals[r], torch.zeros(n))  # invalid rows are zeroed


def _bytes_with(body: bytes, pos: int, patch: bytes) -> bytes:
    return body[:pos] + patch + body[pos + len(patch) :]


def test_decode_rows_flags_each_named_corruption():
    n = 17
    cases = []  # (format, good body, bad body)
    for name, params, pos, patch in [
        ("int8", {"block": 16}, 0, b"\x00"),  # code 0 is outside [1, 255]
        ("int4", {"block": 16}, 0, b"\x80"),  # low nibble 0: code outside [1, 15]
        ("fp8_e4m3", {"block": 16}, 3, b"\x7f"),  # NaN bit pattern
        ("fp16", {}, 4, b"\x00\x7c"),  # +inf bit pattern
        ("bf16", {}, 4, b"\xc0\x7f"),  # NaN bit pattern
        ("fp32", {}, 8, np.float32("nan").tobytes()),
    ]:
        vf = ValueFormat(name, **params)
        body = vf.encode(_data(n, 1), None)[0]
        cases.append((vf, body, _bytes_with(body, pos, patch)))
    for name, params in [("int4", {"block": 16}), ("2bit", {}), ("sign", {}), ("fp4_e3m0", {})]:
        vf = ValueFormat(name, **params)  # codes end mid-byte: set the top padding bit
        body = vf.encode(_data(n, 2), None)[0]
        cn = len(body) - 4 * _side_count(vf, n)
        cases.append((vf, body, _bytes_with(body, cn - 1, bytes([body[cn - 1] | 0x80]))))
    for name, params in [("int8", {}), ("2bit", {}), ("sign", {"block": 16})]:
        vf = ValueFormat(name, **params)  # NaN side value (last float32 of the body)
        body = vf.encode(_data(n, 3), None)[0]
        cases.append((vf, body, body[:-4] + np.float32("nan").tobytes()))
    for vf, good, bad in cases:
        rows = torch.tensor([list(good), list(bad), list(good)], dtype=torch.uint8)
        vals, ok = vf.decode_rows(rows, n)
        assert ok.tolist() == [True, False, True], vf.settings
        assert torch.equal(vals[1], torch.zeros(n))
        assert torch.equal(vals[0], vf.decode(good, 0, n))
        ref_ok, _ = _reference_ok(vf, bad, n)
        assert not ref_ok


@pytest.mark.parametrize(
    ("name", "params", "x"),
    [
        ("sign", {}, [3e38, 3e38, 1.0]),  # mean |x| overflows
        ("2bit", {}, [3e38, -3e38, 3e38, -3e38]),  # centred values overflow
        ("fp16", {}, [1.0, 70000.0]),  # above float16 max
        ("fp16", {}, [65519.0]),  # rounds down to the max, still refused by the cast
        ("int8", {}, [3.4e38, -3.4e38, 1.0]),  # finite: stays ok
    ],
)
def test_encode_tensor_ok_matches_byte_encode(name, params, x):
    vf = ValueFormat(name, **params)
    v = torch.tensor(x, dtype=torch.float32)
    body, deq, ok = vf.encode_tensor(v)
    try:
        body_ref, deq_ref = vf.encode(v)
    except ValueError:
        assert not bool(ok)
    else:
        assert bool(ok)
        assert body.numpy().tobytes() == body_ref and torch.equal(deq, deq_ref)


def test_encode_tensor_validation():
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        ValueFormat("int8", stochastic=True).encode_tensor(torch.ones(4))
    with pytest.raises(TypeError, match="v.dtype"):
        ValueFormat("int8").encode_tensor(torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="v must be Tensor"):
        ValueFormat("fp32").encode_tensor([1.0])
    # a generator is ignored by formats without stochastic rounding, as in encode
    body, _, ok = ValueFormat("sign").encode_tensor(torch.ones(4), torch.Generator())
    assert bool(ok) and body.numel() == ValueFormat("sign").nbytes(4)


def test_decode_rows_validation():
    vf = ValueFormat("int8", block=16)
    nb = vf.nbytes(17)
    with pytest.raises(ValueError, match=rf"shape \(R, {nb}\)"):
        vf.decode_rows(torch.zeros(1, nb + 1, dtype=torch.uint8), 17)
    with pytest.raises(ValueError, match=rf"shape \(R, {nb}\)"):
        vf.decode_rows(torch.zeros(nb, dtype=torch.uint8), 17)
    with pytest.raises(TypeError, match="body.dtype"):
        vf.decode_rows(torch.zeros(1, nb, dtype=torch.int8), 17)
    with pytest.raises(ValueError, match="n must be in"):
        vf.decode_rows(torch.zeros(1, 0, dtype=torch.uint8), -1)


def test_constructor_and_sizes_unchanged():
    vf = ValueFormat("2bit", n_bins=8)
    assert (vf.name, vf.params, vf.bits, vf.settings) == (
        "2bit",
        {"n_bins": 8},
        3,
        "v=2bit;n_bins=8",
    )
    assert vf.nbytes(17) == math.ceil(17 * 3 / 8) + 4 * 9
    assert ValueFormat("fp32").nbytes(5) == 20 and ValueFormat("bf16").nbytes(5) == 10
    with pytest.raises(ValueError, match="takes no settings"):
        ValueFormat("fp32", block=4)
    with pytest.raises(ValueError, match="values must be in"):
        ValueFormat("int3")


# ----------------------------------------------------------------------------- no host reads


class NoHostSync(TorchFunctionMode):
    """Fails on every torch call that reads a tensor's values back to the host or sizes an
    output by its data (which on a GPU waits for the device)."""

    _FORBIDDEN = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.nonzero,
        torch.Tensor.nonzero,
        torch.masked_select,
        torch.Tensor.masked_select,
        torch.bincount,
        torch.Tensor.bincount,
        torch.unique,
        torch.Tensor.unique,
        torch.equal,
        torch.Tensor.equal,
        torch.allclose,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FORBIDDEN:
            raise AssertionError(f"host read of tensor data: {func.__name__}")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                raise AssertionError("boolean-mask indexing has a data-dependent shape")
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
            if isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor):
                raise AssertionError("repeat_interleave by a tensor sizes its output by data")
        return func(*args, **kwargs)


def test_no_host_sync_mode_catches_reads():
    t = torch.arange(4)
    for read in (
        lambda: t.sum().item(),
        lambda: bool(t.any()),
        lambda: int(t[0]),
        lambda: t.nonzero(),
        lambda: t[t > 1],
        lambda: t.tolist(),
        lambda: [0, 1][t[1]],
    ):
        with NoHostSync(), pytest.raises(AssertionError, match="host read|boolean-mask"):
            read()


@pytest.mark.parametrize(("name", "params"), FORMATS, ids=IDS)
def test_value_device_path_never_reads_back(name, params):
    vf = ValueFormat(name, **params)
    n = 37
    x = [_data(n, r) for r in range(3)]
    gens = [_gen(params, r) for r in range(3)]
    with NoHostSync():
        encoded = [vf.encode_tensor(x[r], gens[r]) for r in range(3)]
        bodies = torch.stack([e[0] for e in encoded])
        bodies[1, 0] ^= 0x01  # a corrupted row still decodes without reading back
        bodies[2, -1] = 0xFF
        vals, ok = vf.decode_rows(bodies, n)
        empty = vf.decode_rows(torch.zeros(2, vf.nbytes(0), dtype=torch.uint8), 0)
    assert vals.shape == (3, n) and ok.shape == (3,) and empty[0].shape == (2, 0)
    assert bool(ok[0]) and torch.equal(vals[0], encoded[0][1])


@pytest.mark.parametrize("coding", sorted(INDEX_CODERS))
def test_index_device_path_never_reads_back(coding):
    coder = INDEX_CODERS[coding]
    N, C, k = 5, 97, 9
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(N, C, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values
    with NoHostSync():
        buf = coder.encode_trusted(idx, C)
        bufs = torch.stack([buf, buf, buf])
        bufs[1, 3] ^= 0xFF
        bufs[2, -1] |= 0x80
        out, ok = coder.decode_rows(bufs, N, k, C)
    assert torch.equal(buf, coder.encode(idx, C))
    assert torch.equal(out[0], idx) and bool(ok[0])
