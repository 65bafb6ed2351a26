"""Tests for thinwire.compression.crc against ``zlib.crc32`` (the oracle: C zlib, an independent
implementation of the same polynomial), plus a check that no value is pulled back to the host."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from thinwire.compression import crc as crc_mod
from thinwire.compression.crc import BLOCK, crc32, crc32_rows

# 0, 1, small odd sizes, BLOCK - 1 / BLOCK / BLOCK + 1, 4 * BLOCK +- 1, a prime, ~100 kB.
WIDTHS = [0, 1, 2, 3, 7, 8, 255, 256, 257, 1023, 1024, 1025, 4099, 100_003]


def zlib_rows(data: torch.Tensor) -> list[int]:
    return [zlib.crc32(data[r].numpy().tobytes()) for r in range(data.shape[0])]


def random_bytes(rows: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, width), generator=gen, dtype=torch.uint8)


def test_block_is_a_power_of_two() -> None:
    assert BLOCK > 0 and BLOCK & (BLOCK - 1) == 0


@pytest.mark.parametrize("width", WIDTHS)
def test_random_rows_match_zlib(width: int) -> None:
    data = random_bytes(4, width, seed=width)
    out = crc32_rows(data)
    assert out.dtype == torch.int64 and out.shape == (4,) and out.device == data.device
    assert out.tolist() == zlib_rows(data)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("fill", [0x00, 0xFF])
def test_constant_rows_match_zlib(width: int, fill: int) -> None:
    data = torch.full((2, width), fill, dtype=torch.uint8)
    assert crc32_rows(data).tolist() == [zlib.crc32(bytes([fill]) * width)] * 2


@pytest.mark.parametrize("width", [0, 1, 257, 4099])
def test_crc32_one_row(width: int) -> None:
    data = random_bytes(1, width, seed=7)[0]
    out = crc32(data)
    assert out.dtype == torch.int64 and out.dim() == 0
    assert out.item() == zlib.crc32(data.numpy().tobytes())


def test_known_value() -> None:
    # The CRC-32 check value of "123456789" (the catalogue's 'check' field for CRC-32/ISO-HDLC).
    data = torch.tensor(list(b"123456789"), dtype=torch.uint8)
    assert crc32(data).item() == 0xCBF43926


def test_non_contiguous_view() -> None:
    base = random_bytes(6, 2 * 1031, seed=3)
    view = base[::2, 1::2]  # (3, 1031), strides (2 * 2 * 1031, 2)
    assert not view.is_contiguous()
    assert crc32_rows(view).tolist() == zlib_rows(view.contiguous())
    assert crc32_rows(base.t()).tolist() == zlib_rows(base.t().contiguous())


@pytest.mark.parametrize("width", [0, 5, 300])
def test_zero_rows(width: int) -> None:
    out = crc32_rows(torch.zeros((0, width), dtype=torch.uint8))
    assert out.shape == (0,) and out.dtype == torch.int64


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_many_slices(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    # A tiny slice forces the lookup loop through many slices, one block each for rows > 4.
    monkeypatch.setitem(crc_mod._SLICE_BYTES, "cpu", 4 * BLOCK)
    data = random_bytes(rows, 37 * BLOCK + 11, seed=rows)
    assert crc32_rows(data).tolist() == zlib_rows(data)


@given(
    rows=st.integers(0, 4),
    width=st.integers(0, 3 * BLOCK + 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_zlib(rows: int, width: int, seed: int) -> None:
    data = random_bytes(rows, width, seed)
    assert crc32_rows(data).tolist() == zlib_rows(data)


# Calls that pull a tensor's value to the host (a CUDA synchronisation) or give a data-dependent
# shape.
_HOST_PULLS = {
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "masked_select",
    "unique",
    "argwhere",
}


class _Recorder(TorchFunctionMode):
    """Records every torch call; raises on a host pull of a non-empty tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        self.calls.append(name)
        if name in _HOST_PULLS and any(isinstance(a, torch.Tensor) and a.numel() > 0 for a in args):
            raise AssertionError(f"host pull {name} inside crc32_rows")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(3, 0), (3, 1), (2, 255), (3, 1025), (1, 100_003)])
def test_no_host_pull_and_data_independent_ops(shape: tuple[int, int]) -> None:
    first, second = random_bytes(*shape, seed=1), random_bytes(*shape, seed=2)
    expected = crc32_rows(first)  # warm the table caches outside the mode
    with _Recorder() as rec_first:
        got = crc32_rows(first)
    with _Recorder() as rec_second:
        crc32_rows(second)
    assert torch.equal(got, expected)
    assert rec_first.calls == rec_second.calls  # the same ops whatever the bytes


def test_validation() -> None:
    with pytest.raises(TypeError, match=r"data must be Tensor, got list"):
        crc32_rows([[1, 2]])
    with pytest.raises(
        TypeError, match=r"data\.dtype must be in \{torch\.uint8\}, got torch\.int8"
    ):
        crc32_rows(torch.zeros((1, 2), dtype=torch.int8))
    with pytest.raises(ValueError, match=r"data must be a 2-D uint8 tensor, got shape \(4,\)"):
        crc32_rows(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"data must be Tensor, got bytes"):
        crc32(b"abc")
    with pytest.raises(
        TypeError, match=r"data\.dtype must be in \{torch\.uint8\}, got torch\.int64"
    ):
        crc32(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"data must be a 1-D uint8 tensor, got shape \(1, 3\)"):
        crc32(torch.zeros((1, 3), dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("width", [0, 257, 100_003, 3 << 20])
def test_cuda_matches_zlib(width: int) -> None:
    data = random_bytes(3, width, seed=11)
    out = crc32_rows(data.cuda())
    assert out.device.type == "cuda"
    assert out.cpu().tolist() == zlib_rows(data)
