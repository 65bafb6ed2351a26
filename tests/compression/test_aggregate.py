"""Tests for thinwire.compression.aggregate: SparseMessage, densify, aggregate_sparse.

Oracles: a hand-worked index-mean example (indices [0,1,1,2], values [1,2,4,-3] into 4
slots -> [1, 3, -3, 0]) and its global-mean counterpart by hand; a float64 plain-loop reference
(per-slot sums and counts, then untile and ``scipy.fft.idctn(norm="ortho")`` per tile); and
permutation / arrival-order invariance checked bit for bit (``torch.equal``).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.fft import idctn

from thinwire.compression.aggregate import SparseMessage, aggregate_sparse, densify
from thinwire.compression.chunk import ChunkGeometry
from thinwire.compression.pipeline import SparseCodec

MODES = ("index_mean", "global_mean")


def msg(shape, s, idx, val, transform="none") -> SparseMessage:
    g = ChunkGeometry.of(shape, s)
    return SparseMessage(
        g, transform, torch.tensor(idx, dtype=torch.int64), torch.tensor(val, dtype=torch.float32)
    )


# The hand-worked example: one 4-slot chunk, peers A and B.
A = msg((4,), 4, [[0, 1]], [[1.0, 2.0]])
B = msg((4,), 4, [[1, 2]], [[4.0, -3.0]])


def test_spec_example_index_mean():
    assert torch.equal(aggregate_sparse([A, B]), torch.tensor([1.0, 3.0, -3.0, 0.0]))
    assert torch.equal(
        aggregate_sparse([A, B], mode="index_mean"), torch.tensor([1.0, 3.0, -3.0, 0.0])
    )


def test_spec_example_global_mean():
    want = torch.tensor([1 / 2, (2 + 4) / 2, -3 / 2, 0.0])
    assert torch.equal(aggregate_sparse([A, B], mode="global_mean"), want)


def test_densify_single_message():
    assert torch.equal(densify(A), torch.tensor([1.0, 2.0, 0.0, 0.0]))
    # One peer: both modes equal its own densified message.
    for mode in MODES:
        assert torch.equal(aggregate_sparse([B], mode=mode), densify(B))


# ----------------------------------------------------------------------------- float64 reference


def ref_untile(coeffs: np.ndarray, g: ChunkGeometry, transform: str) -> np.ndarray:
    """(N, C) chunk coefficients -> dense tensor of g.shape, canonical tile order, plain loops."""
    out = np.zeros((g.batch, g.rows, g.cols))
    gy, gx = g.rows // g.n1, g.cols // g.n2
    i = 0
    for b in range(g.batch):
        for ty in range(gy):
            for tx in range(gx):
                tile = coeffs[i].reshape(g.n1, g.n2)
                if transform == "dct":
                    tile = idctn(tile, norm="ortho")
                out[b, ty * g.n1 : (ty + 1) * g.n1, tx * g.n2 : (tx + 1) * g.n2] = tile
                i += 1
    return out.reshape(g.shape)


def ref_aggregate(messages, mode: str) -> np.ndarray:
    present = [m for m in messages if m is not None]
    g = present[0].geometry
    total = np.zeros((g.num_chunks, g.chunk_len))
    count = np.zeros((g.num_chunks, g.chunk_len))
    for m in present:
        idx, val = m.idx.numpy(), m.val.double().numpy()
        for n in range(idx.shape[0]):
            for j in range(idx.shape[1]):
                total[n, idx[n, j]] += val[n, j]
                count[n, idx[n, j]] += 1
    if mode == "index_mean":
        agg = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    else:
        agg = total / len(present)
    return ref_untile(agg, g, present[0].transform)


def random_messages(rng: np.random.Generator, shape, s: int, transform: str, n_peers: int):
    """Peers with random per-chunk k (distinct sorted indices) and random values."""
    g = ChunkGeometry.of(shape, s)
    out = []
    for _ in range(n_peers):
        k = int(rng.integers(1, g.chunk_len + 1))
        idx = np.stack(
            [np.sort(rng.choice(g.chunk_len, k, replace=False)) for _ in range(g.num_chunks)]
        )
        idx = idx.reshape(g.num_chunks, k)
        val = rng.standard_normal((g.num_chunks, k))
        out.append(
            SparseMessage(g, transform, torch.from_numpy(idx).long(), torch.from_numpy(val).float())
        )
    return out


@settings(deadline=None, max_examples=40, derandomize=True)
@given(
    shape=st.sampled_from([(4,), (13,), (8, 8), (6, 10), (2, 4, 6), (1,), ()]),
    s=st.sampled_from([2, 4, 8]),
    transform=st.sampled_from(["none", "dct"]),
    n_peers=st.integers(3, 5),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_reference(shape, s, transform, n_peers, mode, seed):
    rng = np.random.default_rng(seed)
    messages = random_messages(rng, shape, s, transform, n_peers)
    got = aggregate_sparse(messages, mode=mode)
    assert got.dtype == torch.float32 and tuple(got.shape) == tuple(shape)
    # float32 sums of <= 5 O(1) values and an fp32 inverse DCT of <= 64 entries: ~1e-6.
    np.testing.assert_allclose(
        got.double().numpy(), ref_aggregate(messages, mode), rtol=0, atol=1e-5
    )


# ----------------------------------------------------------------------------- order invariance


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transform", ["none", "dct"])
def test_mapping_form_is_bit_identical_whatever_the_arrival_order(mode, transform):
    rng = np.random.default_rng(11)
    messages = random_messages(rng, (16, 24), 8, transform, 5)
    want = aggregate_sparse(messages, mode=mode)  # list: rank order
    ranks = list(range(5))
    shuffler = random.Random(0)
    for _ in range(10):
        shuffler.shuffle(ranks)
        arrived = {r: messages[r] for r in ranks}  # insertion order = arrival order
        assert torch.equal(aggregate_sparse(arrived, mode=mode), want)


def test_every_rank_decodes_the_same_bits_from_payloads():
    # Five peers encode; each "rank" receives the payloads in its own order, decodes them and
    # aggregates by rank. All ranks must agree bit for bit.
    codec = SparseCodec(chunk=8, topk=40, topk_rule="density")  # fp32 values: sums round
    gen = torch.Generator().manual_seed(12)
    payloads = {r: codec.encode(torch.randn(24, 16, generator=gen)) for r in range(5)}
    results = []
    for perm in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 3, 1], [1, 4, 0, 2, 3]):
        received = {r: codec.decode_sparse(payloads[r]) for r in perm}
        results.append(aggregate_sparse(received))
    for r in results[1:]:
        assert r.numpy().tobytes() == results[0].numpy().tobytes()


def test_list_order_is_rank_order():
    rng = np.random.default_rng(13)
    messages = random_messages(rng, (8, 8), 4, "none", 3)
    as_map = aggregate_sparse({2: messages[2], 0: messages[0], 1: messages[1]})
    assert torch.equal(aggregate_sparse(messages), as_map)


# ----------------------------------------------------------------------------- missing peers


def test_none_entries_are_skipped():
    assert torch.equal(aggregate_sparse([A, None, B]), aggregate_sparse([A, B]))
    assert torch.equal(aggregate_sparse({0: A, 1: None, 2: B}), aggregate_sparse([A, B]))
    # global_mean divides by the number present (2), not the list length (3).
    want = torch.tensor([1 / 2, 6 / 2, -3 / 2, 0.0])
    assert torch.equal(aggregate_sparse([None, A, None, B], mode="global_mean"), want)


@pytest.mark.parametrize("messages", [[], [None], {0: None, 1: None}, {}])
def test_no_message_raises(messages):
    with pytest.raises(ValueError, match="at least one"):
        aggregate_sparse(messages)


# ----------------------------------------------------------------------------- validation


def test_mismatched_geometry_or_transform_raises():
    other_shape = msg((8,), 4, [[0], [1]], [[1.0], [2.0]])
    other_chunk = msg((4,), 2, [[0], [1]], [[1.0], [2.0]])
    other_transform = msg((4,), 4, [[0]], [[1.0]], transform="dct")
    for bad in (other_shape, other_chunk, other_transform):
        with pytest.raises(ValueError, match="share geometry and transform"):
            aggregate_sparse([A, bad])


def test_bad_mode_raises():
    with pytest.raises(ValueError, match="mode must be in"):
        aggregate_sparse([A], mode="mean")


def test_empty_geometry():
    g = ChunkGeometry.of((0, 5), 4)
    m = SparseMessage(g, "dct", torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, 0))
    for mode in MODES:
        out = aggregate_sparse([m, m], mode=mode)
        assert out.shape == (0, 5) and out.dtype == torch.float32
