"""Tests for thinwire.compression.topk: selection, defined tie-break, scatter and the k rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import thinwire.compression.topk as topk_mod
from thinwire.compression.topk import (
    k_for_chunk,
    scatter_chunks,
    scatter_chunks_fast,
    topk_chunks,
    topk_chunks_fast,
    topk_chunks_reference,
)


def _topk_oracle(row: list[float], k: int) -> list[int]:
    """Plain-Python definition: rank by (-|v|, index), keep k, report indices ascending."""
    ranked = sorted(range(len(row)), key=lambda i: (-abs(row[i]), i))
    return sorted(ranked[:k])


def test_spec_a3_example() -> None:
    # The example of Psyche's top-k test (distro.rs).
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
        (4096, 64, 64, 64),  # full 64x64 tile, templar's default 64/4096
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


# --- topk_chunks_fast against the stable-sort reference, bit for bit ------------------------------

_ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _kind_values(
    kind: str, n: int, c: int, gen: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """(n, c) finite test data of a given flavour, built in float64 and cast (exactly) to dtype."""
    r = torch.rand(n, c, generator=gen, dtype=torch.float64)
    if kind == "normal":
        x = torch.randn(n, c, generator=gen, dtype=torch.float64)
    elif kind == "ties":  # a few distinct magnitudes, both signs
        x = torch.randint(-3, 4, (n, c), generator=gen).double()
    elif kind == "zeros":
        x = torch.zeros(n, c, dtype=torch.float64)
    elif kind == "signed_zeros":  # -0.0 and 0.0 mixed, with a few nonzeros
        x = torch.where(r < 0.5, -0.0, 0.0).double()
        x = torch.where(r > 0.9, torch.randn(n, c, generator=gen, dtype=torch.float64), x)
    elif kind == "extremes":  # largest finite, smallest subnormal, zeros, both signs
        fi = torch.finfo(dtype)
        picks = [fi.max, -fi.max, fi.smallest_normal, fi.tiny / 4, 0.0, -0.0, 1.0]
        picks = torch.tensor(picks, dtype=torch.float64).to(dtype).double()
        x = picks[torch.randint(0, len(picks), (n, c), generator=gen)]
    else:
        raise AssertionError(kind)
    return x.to(dtype)


def _assert_fast_matches_reference(x: torch.Tensor, k: int) -> None:
    idx, val = topk_chunks_fast(x, k)
    ref_idx, ref_val = topk_chunks_reference(x, k)
    assert idx.dtype == torch.int64 and val.dtype == x.dtype
    assert torch.equal(idx, ref_idx)
    assert torch.equal(val, ref_val)
    # Bit-level equality of values: -0.0 and 0.0 compare equal, their bit patterns do not.
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    assert torch.equal(val.view(as_int), ref_val.view(as_int))


@pytest.mark.parametrize("dtype", _ALL_DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "signed_zeros", "extremes"])
@pytest.mark.parametrize(
    ("n", "c", "k"), [(5, 40, 7), (3, 17, 1), (4, 13, 13), (6, 1, 1), (0, 9, 3)]
)
def test_fast_matches_reference(dtype, kind, n, c, k) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + c * 10 + k)
    _assert_fast_matches_reference(_kind_values(kind, n, c, gen, dtype), k)


def test_fast_tie_exactly_at_kth_place() -> None:
    # Two strictly larger entries, then five tied at the 3rd..5th kept places, scattered so
    # that the tie set straddles the cut; magnitudes tie across signs.
    row = [0.5, 1.0, 3.0, -1.0, 0.25, 1.0, -2.0, -1.0, 0.0, 1.0]
    x = torch.tensor([row, row[::-1]], dtype=torch.float64)
    for dtype in _ALL_DTYPES:
        for k in range(1, len(row) + 1):
            _assert_fast_matches_reference(x.to(dtype), k)
    idx, _ = topk_chunks_fast(x.float(), 4)
    assert idx[0].tolist() == [1, 2, 3, 6]


def test_fast_matches_reference_long_rows() -> None:
    # 70 x 4096 elements exceed one CPU key block, so the blocked loop runs (64 rows, then 6).
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-40, 41, (70, 4096), generator=gen).float() / 8
    for k in (1, 64, 4096):
        _assert_fast_matches_reference(x, k)
    _assert_fast_matches_reference(torch.full((3, 4096), -0.25), 64)


@pytest.mark.parametrize("budget", [1, 7, 40, 64])
def test_fast_blocked_key_matches_reference(monkeypatch, budget) -> None:
    # Tiny key blocks: one row at a time, several rows with a partial last block, and C > budget.
    monkeypatch.setitem(topk_mod._KEY_BLOCK_ELEMS, "cpu", budget)
    gen = torch.Generator().manual_seed(budget)
    for kind in ("normal", "ties", "signed_zeros"):
        x = _kind_values(kind, 23, 20, gen, torch.float32)
        for k in (1, 5, 20):
            _assert_fast_matches_reference(x, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_two_pass_selection_matches_reference(dtype) -> None:
    # The float64 selection also serves 16/32-bit input; check it there too, ties included.
    gen = torch.Generator().manual_seed(11)
    for kind in ("normal", "ties", "zeros", "signed_zeros", "extremes"):
        x = _kind_values(kind, 6, 31, gen, dtype)
        for k in (1, 4, 30, 31):
            idx = torch.sort(topk_mod._topk_rows_two_pass(x, k), dim=1).values
            assert torch.equal(idx, topk_chunks_reference(x, k)[0])


@pytest.mark.parametrize("dtype", _ALL_DTYPES)
def test_fast_non_contiguous_input(dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    base = _kind_values("ties", 30, 24, gen, dtype)
    for x in (base.t(), base[::2, 1::3], base.t()[3:, ::2]):
        assert not x.is_contiguous()
        for k in (1, 3, x.shape[1]):
            _assert_fast_matches_reference(x, k)


def test_public_topk_is_fast_path() -> None:
    gen = torch.Generator().manual_seed(8)
    x = _kind_values("ties", 9, 50, gen, torch.bfloat16)
    for got, want in zip(topk_chunks(x, 10), topk_chunks_fast(x, 10), strict=True):
        assert torch.equal(got, want)


@settings(deadline=None, max_examples=60, derandomize=True)
@given(
    n=st.integers(0, 6),
    c=st.integers(1, 90),
    kfrac=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "ties", "zeros", "signed_zeros", "extremes"]),
    dtype=st.sampled_from(_ALL_DTYPES),
    transpose=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fast_matches_reference_property(n, c, kfrac, kind, dtype, transpose, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = (
        _kind_values(kind, c, n, gen, dtype).t()
        if transpose
        else _kind_values(kind, n, c, gen, dtype)
    )
    k = max(1, min(c, round(kfrac * c)))
    _assert_fast_matches_reference(x, k)


def test_scatter_fast_matches_scatter() -> None:
    gen = torch.Generator().manual_seed(2)
    x = _kind_values("ties", 8, 33, gen, torch.bfloat16)
    idx, val = topk_chunks_fast(x, 6)
    assert torch.equal(scatter_chunks_fast(idx, val, 33), scatter_chunks(idx, val, 33))
    empty = torch.zeros(0, 6, dtype=torch.int64)
    assert scatter_chunks_fast(empty, empty.float(), 33).shape == (0, 33)


class _HostPullForbidden(RuntimeError):
    pass


class _NoHostPull(torch.overrides.TorchFunctionMode):
    """Raises on every call that reads tensor data back to the host (a device sync on a GPU)."""

    _FORBIDDEN = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.nonzero,
        torch.nonzero,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._FORBIDDEN:
            raise _HostPullForbidden(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def test_no_host_pull_guard_catches_a_pull() -> None:
    # The guard is live: the validating entry point's finiteness count is caught.
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    with _NoHostPull(), pytest.raises(_HostPullForbidden):
        topk_chunks(x, 3)
    with _NoHostPull(), pytest.raises(_HostPullForbidden):
        torch.nonzero(x > 0)


@pytest.mark.parametrize("dtype", _ALL_DTYPES)
def test_fast_paths_do_not_pull_to_host(dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    x = _kind_values("ties", 12, 40, gen, dtype)
    with _NoHostPull():
        idx, val = topk_chunks_fast(x, 9)
        idx_t, _ = topk_chunks_fast(x.t(), 5)
        dense = scatter_chunks_fast(idx, val, 40)
    _assert_fast_matches_reference(x, 9)
    assert torch.equal(idx_t, topk_chunks_reference(x.t(), 5)[0])
    assert torch.equal(dense, scatter_chunks(idx, val, 40))
