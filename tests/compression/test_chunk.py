"""Tests for thinwire.compression.chunk: split table, geometry rules and exact tiling inverses."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.compression import chunk
from thinwire.compression.chunk import ChunkGeometry, split

# Values of split (first four from Psyche's distro.rs tests, the rest follow from the rule).
SPEC_SPLIT_TABLE = [
    (12, 5, 4),
    (100, 7, 5),
    (100, 26, 25),
    (100, 101, 100),
    (1, 64, 1),
    (50304, 64, 64),
    (5440, 64, 64),
    (50257, 64, 29),
    (97, 64, 1),
]


def _split_oracle(n: int, target: int) -> int:
    """The definition, written as a filter over all candidates."""
    if n <= target:
        return n
    return max(d for d in range(1, target + 1) if n % d == 0)


@pytest.mark.parametrize(("n", "target", "expected"), SPEC_SPLIT_TABLE)
def test_split_spec_table(n: int, target: int, expected: int) -> None:
    assert split(n, target) == expected


def test_split_matches_definition_on_a_grid() -> None:
    for n in range(1, 400):
        for target in (1, 2, 3, 5, 7, 16, 64, 500):
            assert split(n, target) == _split_oracle(n, target), (n, target)


def test_split_large_primes_and_composites() -> None:
    assert split(999_983, 64) == 1  # largest prime below 1e6
    assert split(2 * 999_983, 64) == 2
    assert split(1_000_000, 64) == 64  # 1e6 = 2^6 * 5^6
    assert split(1_000_000, 63) == 50  # divisors of 1e6 in [51, 63]: none
    assert split(3 * 999_983, 64) == 3


@pytest.mark.parametrize(
    ("n", "target", "exc", "pattern"),
    [
        (0, 64, ValueError, r"n must be in \[1, inf\), got 0"),
        (-3, 64, ValueError, r"n must be in \[1, inf\), got -3"),
        (5, 0, ValueError, r"target must be in \[1, inf\), got 0"),
        (5.0, 4, TypeError, r"n must be int"),
        (True, 4, TypeError, r"n must be int"),
    ],
)
def test_split_validation(n, target, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        split(n, target)


@pytest.mark.parametrize(
    ("shape", "target", "fields"),
    [
        # fields: (n1, n2, batch, rows, cols, num_chunks, chunk_len, numel)
        ((), 64, (1, 1, 1, 1, 1, 1, 1, 1)),
        ((7,), 64, (1, 7, 1, 1, 7, 1, 7, 7)),
        ((128,), 64, (1, 64, 1, 1, 128, 2, 64, 128)),
        ((97,), 64, (1, 1, 1, 1, 97, 97, 1, 97)),
        ((50257, 64), 64, (29, 64, 1, 50257, 64, 1733, 29 * 64, 50257 * 64)),
        ((128, 256), 64, (64, 64, 1, 128, 256, 8, 4096, 128 * 256)),
        ((2, 3, 8, 12), 4, (4, 4, 6, 8, 12, 36, 16, 576)),
        ((0,), 64, (1, 1, 1, 1, 0, 0, 1, 0)),
        ((3, 0), 64, (3, 1, 1, 3, 0, 0, 3, 0)),
        ((0, 4, 4), 2, (2, 2, 0, 4, 4, 0, 4, 0)),
    ],
)
def test_geometry_fields(shape, target, fields) -> None:
    g = ChunkGeometry.of(shape, target)
    got = (g.n1, g.n2, g.batch, g.rows, g.cols, g.num_chunks, g.chunk_len, g.numel)
    assert got == fields
    assert g.shape == tuple(shape)
    assert g.target == target


def test_geometry_default_target_is_64() -> None:
    g = ChunkGeometry.of((4096, 4096))
    assert (g.target, g.n1, g.n2, g.chunk_len) == (64, 64, 64, 4096)


def test_geometry_accepts_torch_size_and_is_frozen() -> None:
    g = ChunkGeometry.of(torch.Size([6, 4]), 2)
    assert g.shape == (6, 4)
    with pytest.raises(AttributeError):
        g.n1 = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("shape", "target", "exc", "pattern"),
    [
        ((3, -1), 64, ValueError, r"shape\[1\] must be in \[0, inf\), got -1"),
        ((3, 2.0), 64, TypeError, r"shape\[1\] must be int"),
        ((3, 4), 0, ValueError, r"target must be in \[1, inf\), got 0"),
        (5, 64, TypeError, r"shape must be"),
    ],
)
def test_geometry_validation(shape, target, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        ChunkGeometry.of(shape, target)


def test_layout_4x4_target_2_by_hand() -> None:
    g = ChunkGeometry.of((4, 4), 2)
    x = torch.arange(16).reshape(4, 4)
    # Tiles in row-major tile order, each tile row-major (the canonical layout).
    expected_tiles = torch.tensor(
        [
            [[0, 1], [4, 5]],
            [[2, 3], [6, 7]],
            [[8, 9], [12, 13]],
            [[10, 11], [14, 15]],
        ]
    )
    assert torch.equal(g.to_tiles(x), expected_tiles)
    expected_chunks = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
    assert torch.equal(g.to_chunks(x), expected_chunks)
    assert torch.equal(g.from_chunks(expected_chunks), x)
    assert torch.equal(g.from_tiles(expected_tiles), x)


def test_layout_non_square_tiles_by_hand() -> None:
    # (2, 6) with target 3: n1 = 2, n2 = 3 -> two 2x3 tiles side by side.
    g = ChunkGeometry.of((2, 6), 3)
    x = torch.arange(12).reshape(2, 6)
    assert torch.equal(g.to_chunks(x), torch.tensor([[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]))


def test_layout_1d_and_0d_by_hand() -> None:
    g = ChunkGeometry.of((12,), 4)
    assert torch.equal(g.to_chunks(torch.arange(12)), torch.arange(12).reshape(3, 4))
    assert g.to_tiles(torch.arange(12)).shape == (3, 1, 4)
    g0 = ChunkGeometry.of((), 64)
    x0 = torch.tensor(3.5)
    assert torch.equal(g0.to_chunks(x0), torch.tensor([[3.5]]))
    back = g0.from_chunks(torch.tensor([[3.5]]))
    assert back.shape == () and back.item() == 3.5


def test_layout_batched_3d_by_hand() -> None:
    # (2, 2, 4) target 2: batch 2, each matrix 2x4 -> tiles (b0,t0), (b0,t1), (b1,t0), (b1,t1).
    g = ChunkGeometry.of((2, 2, 4), 2)
    x = torch.arange(16).reshape(2, 2, 4)
    expected = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
    assert torch.equal(g.to_chunks(x), expected)


def _layout_oracle(x: torch.Tensor, g: ChunkGeometry) -> torch.Tensor:
    """Chunks built element by element from the layout's index formulas (chunk.py docstring)."""
    m = x.reshape(g.batch, g.rows, g.cols)
    gy, gx = g.rows // g.n1, g.cols // g.n2
    out = torch.empty(g.num_chunks, g.chunk_len, dtype=x.dtype)
    for b in range(g.batch):
        for r in range(g.rows):
            for c in range(g.cols):
                ci = (b * gy + r // g.n1) * gx + c // g.n2
                pos = (r % g.n1) * g.n2 + c % g.n2
                out[ci, pos] = m[b, r, c]
    return out


_DIMS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 16, 29, 30])


@settings(deadline=None, max_examples=60, derandomize=True)
@given(
    shape=st.lists(_DIMS, min_size=0, max_size=4).filter(lambda s: math.prod(s) <= 3000),
    target=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_and_layout_property(shape: list[int], target: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = ChunkGeometry.of(shape, target)
    assert g.numel == x.numel()
    assert g.num_chunks * g.chunk_len == x.numel()
    tiles = g.to_tiles(x)
    chunks_ = g.to_chunks(x)
    assert tiles.shape == (g.num_chunks, g.n1, g.n2)
    assert torch.equal(chunks_, _layout_oracle(x, g))
    assert torch.equal(g.from_tiles(tiles), x)
    assert torch.equal(g.from_chunks(chunks_), x)
    assert g.from_chunks(chunks_).shape == x.shape


def test_round_trip_vocab_matrix_50257x64() -> None:
    g = ChunkGeometry.of((50257, 64), 64)
    assert (g.n1, g.n2) == (29, 64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50257, 64, generator=gen)
    c = g.to_chunks(x)
    assert c.shape == (1733, 29 * 64)
    # Chunk 5 is rows 145..173 (5 * 29), flattened row-major.
    assert torch.equal(c[5], x[145:174].reshape(-1))
    assert torch.equal(g.from_chunks(c), x)


def test_round_trip_keeps_dtype_and_strided_input() -> None:
    g = ChunkGeometry.of((6, 8), 4)
    base = torch.arange(96, dtype=torch.bfloat16).reshape(8, 12)
    x = base[1:7, 2:10]  # non-contiguous view
    c = g.to_chunks(x)
    assert c.dtype == torch.bfloat16
    assert torch.equal(g.from_chunks(c), x)


def test_shape_mismatch_errors() -> None:
    g = ChunkGeometry.of((4, 4), 2)
    with pytest.raises(ValueError, match=r"x\.shape must be \(4, 4\), got \(4, 5\)"):
        g.to_chunks(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"x\.shape must be \(4, 4\), got \(16,\)"):
        g.to_tiles(torch.zeros(16))
    with pytest.raises(ValueError, match=r"c\.shape must be \(4, 4\), got \(2, 8\)"):
        g.from_chunks(torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"t\.shape must be \(4, 2, 2\), got \(4, 4\)"):
        g.from_tiles(torch.zeros(4, 4))
    with pytest.raises(TypeError, match=r"x must be Tensor"):
        g.to_chunks([[0.0] * 4] * 4)  # type: ignore[arg-type]


def test_degraded_side_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    chunk._warn_degraded.cache_clear()
    with caplog.at_level(logging.WARNING, logger="thinwire.compression.chunk"):
        ChunkGeometry.of((97,), 64)  # prime > target -> side 1 < 64/4
        ChunkGeometry.of((3, 97), 64)  # same dimension again: no second warning
    msgs = [r.getMessage() for r in caplog.records if r.name == "thinwire.compression.chunk"]
    assert len(msgs) == 1
    assert "dimension 97 has chunk side 1" in msgs[0]


@pytest.mark.parametrize(
    ("shape", "target"),
    [
        ((50257, 64), 64),  # side 29 >= 64/4: acceptable
        ((7,), 64),  # n <= target: the whole dim is one chunk, not degraded
        ((101, 101), 400),  # n <= target again
        ((34,), 32),  # side 17 >= 8
    ],
)
def test_no_warning_when_side_is_acceptable(shape, target, caplog) -> None:
    chunk._warn_degraded.cache_clear()
    with caplog.at_level(logging.WARNING, logger="thinwire.compression.chunk"):
        ChunkGeometry.of(shape, target)
    assert not [r for r in caplog.records if r.name == "thinwire.compression.chunk"]
