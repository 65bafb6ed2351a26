"""Tests for thinwire.compression.topk: selection, defined tie-break, scatter and the k rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from thinwire.compression.topk import k_for_chunk, scatter_chunks, topk_chunks


def _topk_oracle(row: list[float], k: int) -> list[int]:
    """Plain-Python definition: rank by (-|v|, index), keep k, report indices ascending."""
    ranked = sorted(range(len(row)), key=lambda i: (-abs(row[i]), i))
    return sorted(ranked[:k])


def test_spec_a3_example() -> None:
    # Spec §7 item 4 (A3 test).
    x = torch.tensor([[0.5223, 0.9625, 0.5487, 0.2152, 0.2161, 0.0363, 0.4944, 0.0974]])
    idx, val = topk_chunks(x, 2)
    assert idx.tolist() == [[1, 2]]
    assert torch.equal(val, torch.tensor([[0.9625, 0.5487]]))
    dense = scatter_chunks(idx, val, 8)
    assert torch.equal(dense, torch.tensor([[0, 0.9625, 0.5487, 0, 0, 0, 0, 0]]))


def test_signed_values_and_ascending_indices() -> None:
    x = torch.tensor([[0.1, -5.0, 0.3, 4.0, -0.2, 6.0]])
    idx, val = topk_chunks(x, 3)
    assert idx.tolist() == [[1, 3, 5]]
    assert val.tolist() == [[-5.0, 4.0, 6.0]]


def test_ties_lowest_index_wins() -> None:
    # All magnitudes equal (signs alternate): the first k indices win.
    x = torch.tensor([[1.0, -1.0] * 8])
    idx, val = topk_chunks(x, 5)
    assert idx.tolist() == [[0, 1, 2, 3, 4]]
    assert val.tolist() == [[1.0, -1.0, 1.0, -1.0, 1.0]]
    # A tie straddling the k-th place: index 1 is strictly largest, then 2, 3, 4 tie.
    idx, _ = topk_chunks(torch.tensor([[0.5, 2.0, -1.0, 1.0, 1.0]]), 3)
    assert idx.tolist() == [[1, 2, 3]]
    # Zeros (incl. -0.0) are ties too.
    idx, val = topk_chunks(torch.tensor([[0.0, -0.0, 0.0, 0.0]]), 2)
    assert idx.tolist() == [[0, 1]]
    # Long rows: the stable sort must hold across a 4096-element chunk.
    idx, _ = topk_chunks(torch.full((3, 4096), -0.25), 64)
    assert torch.equal(idx, torch.arange(64).expand(3, 64))


def test_k_equals_chunk_len_keeps_everything() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=gen)
    idx, val = topk_chunks(x, 9)
    assert torch.equal(idx, torch.arange(9).expand(4, 9))
    assert torch.equal(val, x)


_VALUES = st.sampled_from(["normal", "ties", "tiny"])


def _make(kind: str, n: int, c: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(n, c, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "ties":  # few distinct magnitudes, both signs: many ties
        return torch.randint(-3, 4, (n, c), generator=gen).to(dtype)
    return (torch.randn(n, c, generator=gen, dtype=torch.float64) * 1e-30).to(dtype)


@settings(deadline=None, max_examples=60, derandomize=True)
@given(
    n=st.integers(0, 5),
    c=st.integers(1, 80),
    kfrac=st.floats(0.0, 1.0),
    kind=_VALUES,
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_properties(n, c, kfrac, kind, dtype, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = _make(kind, n, c, gen, dtype)
    k = max(1, min(c, round(kfrac * c)))
    idx, val = topk_chunks(x, k)
    assert idx.shape == (n, k) and idx.dtype == torch.int64
    assert val.shape == (n, k) and val.dtype == dtype
    for r in range(n):
        row = x[r].double().tolist()
        kept = idx[r].tolist()
        assert kept == _topk_oracle(row, k)  # defined order and tie-break, exactly
        assert all(a < b for a, b in zip(kept, kept[1:], strict=False))  # strictly ascending
        assert val[r].double().tolist() == [row[i] for i in kept]  # signed values, exact
        dropped = [abs(row[i]) for i in range(c) if i not in set(kept)]
        if dropped:
            assert min(abs(row[i]) for i in kept) >= max(dropped)
    # Scatter puts kept entries back exactly and zeros the rest.
    dense = scatter_chunks(idx, val, c)
    mask = torch.zeros(n, c, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    assert dense.dtype == dtype
    assert torch.equal(dense[mask], x[mask])
    assert torch.equal(dense[~mask], torch.zeros_like(x[~mask]))


@settings(deadline=None, max_examples=40, derandomize=True)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 300),
    kfrac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_index_sets_match_torch_topk_without_ties(n, c, kfrac, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen, dtype=torch.float64)
    assume(all(len(set(r.abs().tolist())) == c for r in x))
    k = max(1, min(c, round(kfrac * c)))
    idx, val = topk_chunks(x, k)
    ref = torch.topk(x.abs(), k, dim=1, sorted=False).indices
    for r in range(n):
        assert set(idx[r].tolist()) == set(ref[r].tolist())
    assert torch.equal(val, x.gather(1, idx))


def test_topk_of_scatter_recovers_selection() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 64, generator=gen)
    idx, val = topk_chunks(x, 5)
    # The scattered chunk has exactly 5 nonzeros (randn values are nonzero), so selecting 5 again
    # returns the same indices and values.
    idx2, val2 = topk_chunks(scatter_chunks(idx, val, 64), 5)
    assert torch.equal(idx2, idx) and torch.equal(val2, val)


def test_scatter_by_hand() -> None:
    idx = torch.tensor([[0, 3], [1, 2]])
    val = torch.tensor([[1.5, -2.0], [7.0, 8.0]], dtype=torch.float64)
    out = scatter_chunks(idx, val, 4)
    assert out.dtype == torch.float64
    assert out.tolist() == [[1.5, 0.0, 0.0, -2.0], [0.0, 7.0, 8.0, 0.0]]


def test_empty_batch() -> None:
    idx, val = topk_chunks(torch.zeros(0, 16), 4)
    assert idx.shape == (0, 4) and val.shape == (0, 4)
    assert scatter_chunks(idx, val, 16).shape == (0, 16)


@pytest.mark.parametrize(
    ("x", "k", "exc", "pattern"),
    [
        (torch.zeros(2, 5), 0, ValueError, r"k must be in \[1, 5\], got 0"),
        (torch.zeros(2, 5), 6, ValueError, r"k must be in \[1, 5\], got 6"),
        (torch.zeros(2, 5), 2.0, TypeError, r"k must be int"),
        (torch.zeros(5), 2, ValueError, r"chunks\.shape must be \(N, C\), got \(5,\)"),
        (torch.zeros(2, 5, dtype=torch.int32), 2, TypeError, r"chunks\.dtype must be in"),
        (torch.tensor([[1.0, float("nan"), 0.0]]), 1, ValueError, r"chunks must be finite, got 1"),
        (torch.tensor([[1.0, float("inf"), -float("inf")]]), 1, ValueError, r"got 2 non-finite"),
    ],
)
def test_topk_validation(x, k, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        topk_chunks(x, k)


def test_scatter_validation() -> None:
    idx = torch.tensor([[0, 3]])
    val = torch.tensor([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"idx must be in \[0, 2\], got 3"):
        scatter_chunks(idx, val, 3)
    with pytest.raises(ValueError, match=r"idx must be in \[0, 3\], got -1"):
        scatter_chunks(torch.tensor([[-1, 2]]), val, 4)
    with pytest.raises(ValueError, match=r"val\.shape must be \(1, 2\), got \(2,\)"):
        scatter_chunks(idx, val[0], 4)
    with pytest.raises(TypeError, match=r"idx\.dtype must be in \{torch\.int64\}"):
        scatter_chunks(idx.int(), val, 4)
    with pytest.raises(ValueError, match=r"chunk_len must be in \[1, inf\), got 0"):
        scatter_chunks(idx, val, 0)


@pytest.mark.parametrize(
    ("chunk_len", "topk", "target", "expected"),
    [
        (4096, 64, 64, 64),  # full 64x64 tile, A6 default 64/4096
        (4096, 32, 64, 32),
        (64, 64, 64, 1),  # 1-D chunk of 64: 64*64/4096 = 1
        (64, 32, 64, 1),  # 0.5 rounds half-even to 0, then max(1, .)
        (64, 96, 64, 2),  # 1.5 -> 2
        (64, 160, 64, 2),  # 2.5 -> 2 (half-even)
        (64, 224, 64, 4),  # 3.5 -> 4
        (29 * 64, 64, 64, 29),  # vocab-matrix tile (n1 = 29)
        (1, 1, 64, 1),
        (1, 4096, 64, 1),
        (4096, 4096, 64, 4096),
        (16, 3, 4, 3),
    ],
)
def test_k_for_chunk_table(chunk_len, topk, target, expected) -> None:
    assert k_for_chunk(chunk_len, topk, target) == expected


def test_k_for_chunk_default_target_is_64() -> None:
    assert k_for_chunk(4096, 64) == 64
    assert k_for_chunk(128, 64) == 2


def test_k_for_chunk_validation() -> None:
    with pytest.raises(ValueError, match=r"chunk_len must be in \[1, inf\), got 0"):
        k_for_chunk(0, 64)
    with pytest.raises(ValueError, match=r"topk must be in \[1, 4096\], got 0"):
        k_for_chunk(64, 0)
    with pytest.raises(ValueError, match=r"topk must be in \[1, 16\], got 17"):
        k_for_chunk(16, 17, 4)
    with pytest.raises(ValueError, match=r"target must be in \[1, inf\), got 0"):
        k_for_chunk(16, 1, 0)
    with pytest.raises(TypeError, match=r"topk must be int"):
        k_for_chunk(16, 1.0)
