"""Closed-form byte counts for every (op, algorithm) a thinwire communicator runs.

Each function returns ``(sent, recv)`` for one rank, in application payload bytes as the
algorithm moves them (``docs/design.md``, "Byte formulas", gives the main ones): padding, codec
headers and the 8-byte length headers are counted; TCP/IP framing, rendezvous traffic and debug
signatures are not; a rank never counts its own contribution as received. Engines fill their
ledgers from these functions and tests compare the ledgers with them, so they are pure and take
only integers (plus, for the butterfly, a per-part ``wire_bytes(numel) -> int`` callable).

For every op the sum of ``sent`` over ranks equals the sum of ``recv``; ``P == 1`` gives zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from thinwire._validate import check_float, check_int

__all__ = [
    "LENGTH_HEADER_BYTES",
    "HIVEMIND_PART_SIZE_BYTES",
    "ring_allreduce_bytes",
    "allgather_ring_bytes",
    "allgather_tensor_bytes",
    "allgather_direct_bytes",
    "binomial_send_count",
    "broadcast_binomial_bytes",
    "broadcast_payload_bytes",
    "pull_broadcast_bytes",
    "butterfly_part_elems",
    "butterfly_partition",
    "butterfly_shares",
    "butterfly_bytes",
]

# Every variable-length payload travels with one int64 length header.
LENGTH_HEADER_BYTES = 8
# hivemind's DEFAULT_PART_SIZE_BYTES (hivemind/averaging/partition.py).
HIVEMIND_PART_SIZE_BYTES = 2**19


def _check_world(P: int, rank: int | None = None, src: int | None = None) -> None:
    check_int("P", P, 1)
    if rank is not None:
        check_int("rank", rank, 0, P - 1)
    if src is not None:
        check_int("src", src, 0, P - 1)


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    out = [check_int(f"sizes[{i}]", s, 0) for i, s in enumerate(sizes)]
    if not out:
        raise ValueError(f"sizes must be in non-empty sequences, got {list(sizes)!r}")
    return out


def _wire(wire_bytes: Callable[[int], int], numel: int) -> int:
    return check_int(f"wire_bytes({numel})", wire_bytes(numel), 0)


def ring_allreduce_bytes(numel: int, itemsize: int, P: int) -> tuple[int, int]:
    """Dense ring all-reduce (reduce-scatter + all-gather), algorithm ``ring``.

    Args:
        numel: elements of the reduced tensor, ``>= 0``.
        itemsize: bytes per element on the wire, ``>= 1``.
        P: participants, ``>= 1``.

    Returns:
        ``(2(P-1)c, 2(P-1)c)`` with ``c = ceil(numel/P) * itemsize`` (the ring pads the vector to a
        multiple of ``P``).
    """
    check_int("numel", numel, 0)
    check_int("itemsize", itemsize, 1)
    _check_world(P)
    c = -(-numel // P) * itemsize
    b = 2 * (P - 1) * c
    return b, b


def allgather_ring_bytes(sizes: Sequence[int]) -> tuple[int, int]:
    """``all_gather_bytes`` with the ``ring`` algorithm: lengths, then payloads padded to ``M``.

    Args:
        sizes: payload length ``m_j`` of every rank (``len(sizes) == P``).

    Returns:
        ``((P-1)(8+M), (P-1)(8+M))`` with ``M = max(sizes)``; identical on every rank.
    """
    m = _check_sizes(sizes)
    b = (len(m) - 1) * (LENGTH_HEADER_BYTES + max(m))
    return b, b


def allgather_tensor_bytes(nbytes: int, P: int) -> tuple[int, int]:
    """``all_gather_into_tensor``: ring all-gather of one equal-size tensor per rank.

    Every rank knows the size from the shape, so no length is exchanged and no header is sent:
    in each of the ``P-1`` ring steps a rank forwards one ``nbytes`` block and receives one.

    Args:
        nbytes: bytes of each rank's tensor (``numel * itemsize``), ``>= 0``.
        P: participants, ``>= 1``.

    Returns:
        ``((P-1) nbytes, (P-1) nbytes)``; identical on every rank.
    """
    check_int("nbytes", nbytes, 0)
    _check_world(P)
    b = (P - 1) * nbytes
    return b, b


def allgather_direct_bytes(sizes: Sequence[int], rank: int) -> tuple[int, int]:
    """``all_gather_bytes`` with the ``direct`` algorithm: every rank sends its payload to each peer.

    Args:
        sizes: payload length ``m_j`` of every rank (``len(sizes) == P``).
        rank: the rank whose bytes are returned.

    Returns:
        ``((P-1)(8+m_r), sum_{j != r}(8+m_j))``.
    """
    m = _check_sizes(sizes)
    _check_world(len(m), rank)
    P = len(m)
    sent = (P - 1) * (LENGTH_HEADER_BYTES + m[rank])
    recv = sum(LENGTH_HEADER_BYTES + m[j] for j in range(P) if j != rank)
    return sent, recv


def binomial_send_count(rank: int, src: int, P: int) -> int:
    """How many times ``rank`` sends in a binomial-tree broadcast rooted at ``src``.

    With virtual rank ``v = (rank - src) mod P`` and ``D = ceil(log2 P)`` rounds, ``v`` receives
    once, in round ``hsb(v)``, and sends in every round ``i`` with ``hsb(v) < i < D`` and
    ``v + 2**i < P`` (the root sends in every round with ``2**i < P``). The counts sum to ``P - 1``;
    ``P = 5, src = 0`` gives ``[3, 1, 0, 0, 0]``.
    """
    _check_world(P, rank, src)
    if P == 1:
        return 0
    v = (rank - src) % P
    rounds = math.ceil(math.log2(P))
    first = 0 if v == 0 else v.bit_length()  # hsb(v) + 1: the first round v may send in
    return sum(1 for i in range(first, rounds) if v + 2**i < P)


def broadcast_binomial_bytes(nbytes: int, rank: int, src: int, P: int) -> tuple[int, int]:
    """Tensor broadcast over a binomial tree (gloo's algorithm; the ledger uses it for every engine).

    Returns:
        ``(k_r * S, S)`` for a non-root and ``(k_src * S, 0)`` for the root, ``S = nbytes``.
    """
    check_int("nbytes", nbytes, 0)
    _check_world(P, rank, src)
    return binomial_send_count(rank, src, P) * nbytes, (0 if rank == src else nbytes)


def broadcast_payload_bytes(nbytes: int, rank: int, src: int, P: int) -> tuple[int, int]:
    """The ``broadcast_bytes`` op: an 8-byte length broadcast, then the payload broadcast.

    Both use the binomial tree, so the result is ``broadcast_binomial_bytes(8 + nbytes, ...)``.
    """
    check_int("nbytes", nbytes, 0)
    return broadcast_binomial_bytes(LENGTH_HEADER_BYTES + nbytes, rank, src, P)


def pull_broadcast_bytes(nbytes: int, rank: int, src: int, P: int) -> tuple[int, int]:
    """hivemind ``pull`` broadcast: every member fetches the payload from ``src`` over P2P.

    Returns:
        ``((P-1)(8+S), 0)`` for ``src`` and ``(0, 8+S)`` for everyone else.
    """
    check_int("nbytes", nbytes, 0)
    _check_world(P, rank, src)
    if rank == src:
        return (P - 1) * (LENGTH_HEADER_BYTES + nbytes), 0
    return 0, LENGTH_HEADER_BYTES + nbytes


def butterfly_part_elems(itemsize: int, ratio: float = 1.0) -> int:
    """Elements per hivemind part: ``floor(2**19 / (itemsize * ratio))``, as hivemind cuts them.

    ``ratio`` is the codec's ``estimate_compression_ratio`` (1.0 none, 0.5 fp16 from fp32, 0.25
    uint8 from fp32), so fp32 gives ``2**17``, fp16 ``2**18`` and uint8 ``2**19``; the division is
    done in floating point as hivemind's ``TensorPartContainer`` does it.
    """
    check_int("itemsize", itemsize, 1)
    check_float("ratio", ratio, 0.0, lo_open=True)
    return int(HIVEMIND_PART_SIZE_BYTES / (itemsize * ratio))


def _hagenbach_bischoff(numel: int, scores: Sequence[float]) -> list[int]:
    # Integer shares from real scores, as hivemind's load_balance_peers does when no bandwidth
    # is declared (hivemind/averaging/load_balancing.py): floor first, then one element at a
    # time to the highest quotient, lowest index on ties.
    total = sum(scores)
    alloc = [int(numel * s / total) for s in scores]
    while sum(alloc) < numel:
        quotients = [s / (alloc[i] + 1) for i, s in enumerate(scores)]
        alloc[quotients.index(max(quotients))] += 1
    return alloc


def butterfly_partition(
    numel: int, P: int, part_elems: int, *, client: Sequence[bool] | None = None
) -> list[list[int]]:
    """Part lengths each peer reduces in hivemind's butterfly all-reduce.

    Reproduces hivemind 1.1.x: peers capable of averaging get equal integer targets (client-mode
    peers 0), pivots are ``int64(cumsum(targets) / sum(targets) * numel)`` computed in float64
    (so a pivot can land one element below the exact integer, as in hivemind), the vector is cut
    into parts of ``part_elems`` elements (the last one shorter), and each part goes to the peer
    whose pivot range it overlaps most, the earliest such peer on ties.

    Args:
        numel: elements of the averaged vector, ``>= 0``.
        P: group size, ``>= 1``.
        part_elems: elements per part, ``>= 1`` (see :func:`butterfly_part_elems`).
        client: per peer, True for a client-mode peer (share 0); default all False.

    Returns:
        ``parts[j]`` = lengths of the parts peer ``j`` reduces, in vector order.

    Raises:
        ValueError: if every peer is a client or ``len(client) != P``.
    """
    check_int("numel", numel, 0)
    _check_world(P)
    check_int("part_elems", part_elems, 1)
    is_client = [False] * P if client is None else [bool(c) for c in client]
    if len(is_client) != P:
        raise ValueError(f"client must be in sequences of length P={P}, got {len(is_client)}")
    if all(is_client):
        raise ValueError("client must be in sequences with at least one False, got all True")
    targets = _hagenbach_bischoff(numel, [0.0 if c else 1.0 for c in is_client])
    cum = np.cumsum(np.asarray(targets, dtype=np.int64))
    pivots = (cum / np.sum(targets) * numel).astype(np.int64).tolist() if numel else [0] * P
    pivots[-1] = numel

    parts: list[list[int]] = [[] for _ in range(P)]
    lengths = [part_elems] * (numel // part_elems) + (
        [numel % part_elems] if numel % part_elems else []
    )
    if not lengths:
        lengths = [0]  # torch.split of an empty vector yields one empty part
    pos = 0
    peer = 0
    for n in lengths:
        if pos + n > pivots[peer]:
            first = peer
            overlaps = [pivots[peer] - pos]
            while pos + n > pivots[peer]:
                peer += 1
                overlaps.append(min(pos + n, pivots[peer]) - pivots[peer - 1])
            owner = first + overlaps.index(max(overlaps))
        else:
            owner = peer
        parts[owner].append(n)
        pos += n
    return parts


def butterfly_shares(
    numel: int, P: int, part_elems: int, *, client: Sequence[bool] | None = None
) -> list[int]:
    """Elements ``e_j`` each peer reduces: sums of :func:`butterfly_partition`; ``sum == numel``."""
    return [sum(p) for p in butterfly_partition(numel, P, part_elems, client=client)]


def butterfly_bytes(
    parts_by_peer: Sequence[Sequence[int]],
    rank: int,
    part_wire_bytes: Callable[[int], int],
) -> tuple[int, int]:
    """hivemind butterfly all-reduce bytes for peer ``rank`` (algorithm ``butterfly``).

    Phase 1 sends each peer ``j`` this rank's copy of ``j``'s parts and receives ``P - 1`` copies
    of its own parts; phase 2 returns the reduced parts. With ``w(e_j)`` = sum of
    ``part_wire_bytes(n)`` over ``j``'s parts (wire bytes are per part: uint8 carries a
    1024-byte codebook per part), sent = recv = ``sum_{j != r} w(e_j) + (P-1) w(e_r)``.

    Args:
        parts_by_peer: output of :func:`butterfly_partition`, in group order.
        rank: position of this peer in the group.
        part_wire_bytes: encoded bytes of one part of ``n`` elements.
    """
    P = len(parts_by_peer)
    _check_world(P, rank)
    w = [sum(_wire(part_wire_bytes, n) for n in parts) for parts in parts_by_peer]
    b = sum(w[j] for j in range(P) if j != rank) + (P - 1) * w[rank]
    return b, b
