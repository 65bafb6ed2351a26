"""Byte formulas of thinwire.collectives.accounting against hand-worked numbers, simulations and
hivemind itself."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.collectives import accounting as acct


def test_ring_allreduce_spec_example():
    # Worked by hand: P=4, 1e6 fp32 elements -> c = 250000*4 bytes, 2*3*c = 6,000,000 each way.
    assert acct.ring_allreduce_bytes(1_000_000, 4, 4) == (6_000_000, 6_000_000)


@pytest.mark.parametrize(
    "numel,itemsize,P,expected",
    [
        (7, 4, 3, 2 * 2 * 3 * 4),  # ceil(7/3)=3 elements per chunk (padded)
        (1, 4, 4, 2 * 3 * 1 * 4),  # one element still pads every chunk to 1
        (100003, 8, 2, 2 * 1 * 50002 * 8),
        (0, 4, 3, 0),
        (1000, 2, 1, 0),
    ],
)
def test_ring_allreduce_hand_values(numel, itemsize, P, expected):
    assert acct.ring_allreduce_bytes(numel, itemsize, P) == (expected, expected)


def test_allgather_tensor_has_no_length_header():
    # Sizes come from the shape: (P-1) blocks of nbytes each way, 8 bytes per peer fewer than
    # the ring all_gather_bytes of the same payloads.
    assert acct.allgather_tensor_bytes(1000, 4) == (3000, 3000)
    assert acct.allgather_tensor_bytes(0, 3) == (0, 0)
    assert acct.allgather_tensor_bytes(77, 1) == (0, 0)
    for P in (2, 3, 5):
        ring = acct.allgather_ring_bytes([123] * P)
        assert acct.allgather_tensor_bytes(123, P) == (ring[0] - 8 * (P - 1),) * 2


def test_allgather_spec_example():
    # Worked by hand: payload lengths [0, 5, 100] on P=3.
    sizes = [0, 5, 100]
    direct = [acct.allgather_direct_bytes(sizes, r) for r in range(3)]
    assert [s for s, _ in direct] == [16, 26, 216]
    # recv_r = sum_{j != r}(8 + m_j): rank 2 gets 8 + 13 = 21 (the brief's "26" breaks
    # sum(sent) == sum(recv) = 258).
    assert [r for _, r in direct] == [121, 116, 21]
    assert acct.allgather_ring_bytes(sizes) == (216, 216)
    assert sum(s for s, _ in direct) == sum(r for _, r in direct)


def test_binomial_spec_example():
    assert [acct.binomial_send_count(r, 0, 5) for r in range(5)] == [3, 1, 0, 0, 0]


def _simulate_binomial(P: int, src: int) -> tuple[list[int], list[int]]:
    """Round-by-round binomial broadcast: in round i every holder v < 2**i sends to v + 2**i."""
    sends, recvs = [0] * P, [0] * P
    have = {0}
    i = 0
    while len(have) < P:
        for v in sorted(have):
            if v < 2**i and v + 2**i < P:
                sends[(v + src) % P] += 1
                recvs[(v + 2**i + src) % P] += 1
                have = have | {v + 2**i}
        i += 1
    return sends, recvs


@pytest.mark.parametrize("P", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
def test_binomial_matches_simulation(P):
    for src in range(P):
        sends, recvs = _simulate_binomial(P, src)
        assert [acct.binomial_send_count(r, src, P) for r in range(P)] == sends
        assert sum(sends) == P - 1
        assert recvs == [0 if r == src else 1 for r in range(P)]
        for r in range(P):
            s, rc = acct.broadcast_binomial_bytes(11, r, src, P)
            assert (s, rc) == (11 * sends[r], 11 * recvs[r])


def test_broadcast_payload_and_pull():
    # broadcast_bytes: 8-byte length + 5-byte payload over the P=5 tree rooted at 0.
    assert acct.broadcast_payload_bytes(5, 0, 0, 5) == (3 * 13, 0)
    assert acct.broadcast_payload_bytes(5, 1, 0, 5) == (13, 13)
    assert acct.broadcast_payload_bytes(5, 4, 0, 5) == (0, 13)
    assert acct.pull_broadcast_bytes(100, 1, 1, 4) == (3 * 108, 0)
    assert acct.pull_broadcast_bytes(100, 0, 1, 4) == (0, 108)


def test_world_of_one_is_free():
    assert acct.ring_allreduce_bytes(1000, 4, 1) == (0, 0)
    assert acct.allgather_ring_bytes([123]) == (0, 0)
    assert acct.allgather_direct_bytes([123], 0) == (0, 0)
    assert acct.broadcast_binomial_bytes(99, 0, 0, 1) == (0, 0)
    assert acct.broadcast_payload_bytes(99, 0, 0, 1) == (0, 0)
    assert acct.pull_broadcast_bytes(99, 0, 0, 1) == (0, 0)
    parts = acct.butterfly_partition(1000, 1, 64)
    assert acct.butterfly_bytes(parts, 0, lambda n: 4 * n) == (0, 0)


@settings(deadline=None, max_examples=50, derandomize=True)
@given(
    sizes=st.lists(st.integers(0, 10_000), min_size=1, max_size=9),
    numel=st.integers(0, 100_000),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    src_seed=st.integers(0, 1000),
)
def test_sum_sent_equals_sum_recv(sizes, numel, itemsize, src_seed):
    P = len(sizes)
    src = src_seed % P
    wire = lambda n: n + 1024  # noqa: E731 - uint8 codes plus a 256-entry fp32 codebook
    per_op = [
        [acct.ring_allreduce_bytes(numel, itemsize, P)] * P,
        [acct.allgather_tensor_bytes(numel * itemsize, P)] * P,
        [acct.allgather_ring_bytes(sizes)] * P,
        [acct.allgather_direct_bytes(sizes, r) for r in range(P)],
        [acct.broadcast_binomial_bytes(numel, r, src, P) for r in range(P)],
        [acct.broadcast_payload_bytes(numel, r, src, P) for r in range(P)],
        [acct.pull_broadcast_bytes(numel, r, src, P) for r in range(P)],
    ]
    parts = acct.butterfly_partition(numel, P, 1 + sizes[0])
    per_op.append([acct.butterfly_bytes(parts, r, wire) for r in range(P)])
    for rows in per_op:
        assert sum(s for s, _ in rows) == sum(r for _, r in rows)
    # A direct gather receives exactly what the others send it.
    for r in range(P):
        assert acct.allgather_direct_bytes(sizes, r)[1] == sum(
            8 + sizes[j] for j in range(P) if j != r
        )


def test_butterfly_part_elems():
    # 2**19-byte parts: fp32 2**17, fp16 (ratio 0.5 of fp32) 2**18, uint8 (ratio 0.25) 2**19.
    assert acct.butterfly_part_elems(4) == 2**17
    assert acct.butterfly_part_elems(4, 0.5) == 2**18
    assert acct.butterfly_part_elems(4, 0.25) == 2**19
    assert acct.butterfly_part_elems(2) == 2**18


def test_butterfly_hand_examples():
    # numel=10, P=3, parts of 4: targets [4,3,3] -> pivots [4,7,10]; parts [4,4,2].
    # Part [4,8) overlaps peer 1 by 3 and peer 2 by 1 -> peer 1; part [8,10) -> peer 2.
    assert acct.butterfly_partition(10, 3, 4) == [[4], [4], [2]]
    # A vector shorter than one part goes whole to the peer it overlaps most: peer 0.
    assert acct.butterfly_shares(100, 3, 2**17) == [100, 0, 0]
    fp32 = lambda n: 4 * n  # noqa: E731
    parts = acct.butterfly_partition(100, 3, 2**17)
    # A vector below one part: one peer sends and receives (P-1)w, the others w.
    assert [acct.butterfly_bytes(parts, r, fp32) for r in range(3)] == [
        (800, 800),
        (400, 400),
        (400, 400),
    ]
    # hivemind's float64 pivots: 15/22*22 truncates to 14, so with one-element parts the
    # shares are [8, 6, 8] rather than the exact [8, 7, 7].
    assert acct.butterfly_shares(22, 3, 1) == [8, 6, 8]
    # uint8 wire bytes are per part: 2 parts of peer 0 carry 2 codebooks.
    u8 = lambda n: n + 1024  # noqa: E731
    parts = acct.butterfly_partition(8, 2, 2)
    assert parts == [[2, 2], [2, 2]]
    assert acct.butterfly_bytes(parts, 0, u8) == (2 * 1026 + 2 * 1026, 2 * 1026 + 2 * 1026)


@pytest.mark.parametrize(
    "numel,P,part,client",
    [
        (10, 3, 4, None),
        (22, 3, 1, None),
        (1000, 4, 37, None),
        (1000, 4, 37, (False, True, False, False)),
        (5, 5, 1, None),
        (100, 3, 1000, None),
        (12345, 7, 100, (True, False, False, True, False, False, False)),
        (2**18 + 3, 3, 2**17, None),
    ],
)
def test_butterfly_matches_hivemind(numel, P, part, client):
    # Oracle: hivemind's own load balancer and TensorPartContainer (what the formulas follow).
    from hivemind.averaging.load_balancing import load_balance_peers
    from hivemind.averaging.partition import TensorPartContainer

    bandwidths = [0.0 if (client and client[j]) else None for j in range(P)]
    fractions = load_balance_peers(numel, bandwidths)
    box = TensorPartContainer([torch.zeros(numel)], fractions, part_size_bytes=part * 4)
    expected = [[p.numel() for p in box.get_raw_input_parts(j)] for j in range(P)]
    box.finalize()
    assert acct.butterfly_partition(numel, P, part, client=client) == expected
    assert sum(acct.butterfly_shares(numel, P, part, client=client)) == numel


def test_validation_messages():
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\], got 3"):
        acct.allgather_direct_bytes([1, 2, 3], 3)
    with pytest.raises(ValueError, match=r"P must be in \[1, inf\), got 0"):
        acct.ring_allreduce_bytes(10, 4, 0)
    with pytest.raises(ValueError, match=r"src must be in \[0, 4\], got 5"):
        acct.binomial_send_count(0, 5, 5)
    with pytest.raises(ValueError, match=r"nbytes must be in \[0, inf\), got -1"):
        acct.allgather_tensor_bytes(-1, 2)
    with pytest.raises(ValueError, match=r"sizes\[1\] must be in \[0, inf\), got -1"):
        acct.allgather_ring_bytes([1, -1])
    with pytest.raises(ValueError, match="client"):
        acct.butterfly_partition(10, 2, 4, client=[True, True])
    assert math.isfinite(acct.butterfly_part_elems(4, 0.25))
