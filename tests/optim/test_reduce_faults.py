"""Reducers against faulty or hostile peers, on real in-process ranks (threads).

1. One peer that sends NaN, or finite values near the float32 limit, through the ring all-reduce
   (``robust="mean"``, no compressor) is dropped by every rank and the others train on: their θ
   equals a clean run without that peer, bitwise.
2. Robust rules that cannot protect at the group's size are refused (trimmed mean) or no longer
   freeze training (clip with a stalled, all-zero peer), dense and sparse paths alike.

The faulty rank runs a thin subclass of :class:`InprocCommunicator` that edits the float32 vector
it is asked to send and then calls the real engine, so every other rank talks to the real thing.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from thinwire.collectives import InprocCommunicator
from thinwire.compression import DenseCodec, SparseCodec
from thinwire.optim import DiLoCo
from thinwire.optim._reduce import make_reducer

HUGE = 3.0e38  # finite float32, but two of them overflow a float32 sum


def _poison(t: torch.Tensor, how: str) -> None:
    flat = t.view(-1)
    if how == "nan":
        flat.fill_(float("nan"))
    else:  # "huge": alternating +-3e38
        flat[0::2] = HUGE
        flat[1::2] = -HUGE


class _BadSender(InprocCommunicator):
    """A rank whose float32 vectors are replaced before the real engine sends them.

    ``poison`` is ``None`` (honest), ``"nan"`` or ``"huge"``; ``where`` says which sends:
    ``"all"`` (the ring all-reduce and any gather of the same vector: a sender whose vector is
    bad) or ``"ring"`` (only the all-reduce: a sender that lies in the ring and not after).
    """

    poison: str | None = None
    where: str = "all"

    def all_reduce(self, t, op="mean", *, async_op=False, tag=""):
        if self.poison is not None:
            _poison(t, self.poison)
        return super().all_reduce(t, op, async_op=async_op, tag=tag)

    def all_gather_into_tensor(self, t, *, async_op=False, tag=""):
        if self.poison is not None and self.where == "all" and t.dtype == torch.float32:
            t = t.clone()
            _poison(t, self.poison)
        return super().all_gather_into_tensor(t, async_op=async_op, tag=tag)


def _threads(comms: list[Any], fn: Callable[[Any, int], Any]) -> list[Any]:
    """Run ``fn(comm, rank)`` on one thread per rank; re-raise the first error."""
    P = len(comms)
    out: list[Any] = [None] * P
    errors: list[BaseException | None] = [None] * P

    def body(r: int) -> None:
        try:
            out[r] = fn(comms[r], r)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors[r] = exc
            comms[r].close()

    ts = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(P)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
        assert not t.is_alive(), "an inproc rank hung"
    for e in sorted(errors, key=lambda e: "closed before joining" in str(e)):
        if e is not None:
            raise e
    return out


# --------------------------------------------------------------- 1. DiLoCo, ring all-reduce
H, STEPS = 2, 8  # four syncs


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 6, generator=g)
    teacher = torch.arange(18, dtype=torch.float32).reshape(3, 6) / 18
    return x, x @ teacher.T + 0.1 * torch.randn(16, 3, generator=g)


def _diloco_run(
    P: int,
    *,
    poison: str | None = None,
    where: str = "all",
    on_nonfinite: str = "raise",
    bucket_cap_mb: float = 25.0,
) -> list[dict[str, Any]]:
    comms = _BadSender.group(P, timeout_s=30.0)
    if poison is not None:
        comms[2].poison, comms[2].where = poison, where

    torch.manual_seed(0)  # here, not in the workers: threads share the global generator
    base = torch.nn.Linear(6, 3)

    def worker(comm: _BadSender, r: int) -> dict[str, Any]:
        model = copy.deepcopy(base)
        opt = DiLoCo(
            model.parameters(),
            functools.partial(torch.optim.SGD, lr=0.1),
            sync_every=H,
            comm=comm,
            compressor=None,
            on_nonfinite=on_nonfinite,
            bucket_cap_mb=bucket_cap_mb,
        )
        weights = []
        for s in range(STEPS):
            x, y = _data(r, s)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            if (s + 1) % H == 0:
                weights.append(opt.last_sync["weight"])
        return {
            "params": [p.detach().clone() for p in model.parameters()],
            "anchors": [opt.state[p]["anchor"].clone() for p in model.parameters()],
            "weights": weights,
            "fallbacks": [
                rec.tag for rec in comm.ledger.records if rec.op == "all_gather_into_tensor"
            ],
        }

    return _threads(comms, worker)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("poison", ["nan", "huge"])
@pytest.mark.parametrize("bucket_cap_mb", [25.0, 1e-6])  # one bucket; one bucket per tensor
def test_a_peer_sending_nonfinite_or_overflowing_values_is_dropped(
    poison, on_nonfinite, bucket_cap_mb, caplog
):
    clean2 = _diloco_run(2, on_nonfinite=on_nonfinite, bucket_cap_mb=bucket_cap_mb)
    with caplog.at_level(logging.WARNING, logger="thinwire.optim._reduce"):
        bad3 = _diloco_run(3, poison=poison, on_nonfinite=on_nonfinite, bucket_cap_mb=bucket_cap_mb)
    n_buckets = 1 if bucket_cap_mb == 25.0 else 2
    for r in (0, 1):  # the honest ranks: exactly the 2-peer run without the bad one
        for a, b in zip(bad3[r]["params"], clean2[r]["params"], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(bad3[r]["anchors"], clean2[r]["anchors"], strict=True):
            assert torch.equal(a, b)
    for o in bad3:  # every replica holds the same θ_g; every round had 2 contributors
        for a, b in zip(o["anchors"], bad3[0]["anchors"], strict=True):
            assert torch.equal(a, b)
        assert o["weights"] == [2.0] * (STEPS // H)
        # the ledger shows one float32 gather per poisoned bucket and round, and nothing else
        assert o["fallbacks"] == ["diloco/sync/f0/g0/fallback"] * (n_buckets * STEPS // H)
    dropped = [m for m in caplog.messages if "peer 2" in m]
    assert len(dropped) == 3 * n_buckets * STEPS // H, caplog.messages  # every rank, every round
    assert not any("peer 0" in m or "peer 1" in m for m in caplog.messages)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_a_peer_that_lies_only_in_the_ring_is_taken_at_its_gathered_vector(poison):
    """The gather is what every rank decides on: a sender whose gathered vector is clean counts."""
    clean3 = _diloco_run(3)
    liar3 = _diloco_run(3, poison=poison, where="ring")
    for o, c in zip(liar3, clean3, strict=True):
        for a, b in zip(o["anchors"], c["anchors"], strict=True):
            assert torch.equal(a, b)  # both sum the same rows in rank order, then divide by 3
        assert o["weights"] == [3.0] * (STEPS // H)


def test_a_clean_run_takes_no_fallback():
    for o in _diloco_run(3):
        assert o["fallbacks"] == []
        assert o["weights"] == [3.0] * (STEPS // H)


# ------------------------------------------------------------------ 1b. the reducer itself
def _vectors(P: int, n: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, generator=g) for _ in range(P)]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_reducer_drops_the_bad_row_and_counts_it(poison, weighted):
    xs = _vectors(3)
    comms = _BadSender.group(3, timeout_s=30.0)
    comms[1].poison = poison

    def worker(comm, r):
        red = make_reducer(comm, None, weighted=weighted)
        (out,), w = red.start([xs[r]], tag="b0").result()
        drops = [(x.tag, x.src, x.sent, x.recv) for x in comm.ledger.records if x.op == "drop"]
        return out, w, dict(red.dropped), drops

    for out, w, dropped, drops in _threads(comms, worker):
        assert torch.equal(out, (xs[0] + xs[2]) / 2)  # the same two float32 adds and one divide
        assert w == 2.0
        assert dropped == {1: 1}
        assert drops == [("b0", 1, 0, 0)]  # in the ledger too: bucket tag, dropped peer, 0 bytes


def test_reducer_with_only_bad_rows_reports_weight_zero():
    xs = _vectors(2)
    comms = _BadSender.group(2, timeout_s=30.0)
    for c in comms:
        c.poison = "nan"

    def worker(comm, r):
        red = make_reducer(comm, None)
        (out,), w = red.start([xs[r]]).result()
        return out, w

    for out, w in _threads(comms, worker):
        assert w == 0.0 and torch.equal(out, torch.zeros(5))


# ------------------------------------------------- 2. robust rules at the group's size
def test_trimmed_mean_that_cannot_trim_is_refused_by_make_reducer():
    comms = InprocCommunicator.group(3)
    with pytest.raises(ValueError, match=r"trimmed_mean.*trim=0 with 3 peers"):
        make_reducer(comms[0], None, robust="trimmed_mean")
    with pytest.raises(ValueError, match=r"trimmed_mean.*trim=1 with 2 peers"):
        make_reducer(InprocCommunicator.group(2)[0], None, robust="trimmed_mean", trim=1)
    with pytest.raises(ValueError, match=r"trim applies only to rule='trimmed_mean'"):
        make_reducer(comms[0], None, robust="clip", trim=1)
    red = make_reducer(comms[0], None, robust="trimmed_mean", trim=1)
    assert red.trim == 1


@pytest.mark.timeout(60)
def test_trimmed_mean_with_trim_one_drops_a_huge_peer_among_three():
    xs = _vectors(3)
    xs[2] = xs[2] * 1e6
    comms = InprocCommunicator.group(3, timeout_s=30.0)

    def worker(comm, r):
        red = make_reducer(comm, None, robust="trimmed_mean", trim=1)
        return red.start([xs[r]]).result()

    want = torch.stack(xs).double().sort(dim=0).values[1]  # trim 1 of 3: the middle value
    for (out,), w in _threads(comms, worker):
        assert torch.equal(out.double(), want)  # one kept value, divided by 1: exact
        assert w == 3.0


@pytest.mark.timeout(60)
def test_trimmed_mean_skips_a_round_with_too_few_peers_present(caplog):
    """Trim 1 needs 3 contributors; with one peer skipping only 2 remain: no unprotected mean."""
    xs = _vectors(3)
    comms = InprocCommunicator.group(3, timeout_s=30.0)

    def worker(comm, r):
        red = make_reducer(comm, None, robust="trimmed_mean", trim=1, weighted=True)
        return red.start([xs[r]], contribute=r != 2).result()

    with caplog.at_level(logging.WARNING, logger="thinwire.optim._reduce"):
        res = _threads(comms, worker)
    for (out,), w in res:
        assert w == 0.0 and torch.equal(out, torch.zeros(5))
    assert any("trim=1 with 2 peers" in m for m in caplog.messages), caplog.messages


@pytest.mark.timeout(60)
def test_dense_clip_with_a_stalled_peer_does_not_freeze_training():
    g = _vectors(1, 8)[0]
    xs = [g, torch.zeros(8)]  # rank 1 sends an all-zero update (stalled or free-riding)
    comms = InprocCommunicator.group(2, timeout_s=30.0)

    def worker(comm, r):
        return make_reducer(comm, None, robust="clip").start([xs[r]]).result()

    for (out,), w in _threads(comms, worker):
        # cap = (0 + |g|) / 2: g is halved, then the mean of two: g / 4 (powers of two: exact);
        # the old lower-median cap of 0 returned zeros
        assert torch.equal(out, g / 4)
        assert w == 2.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("aggregate", ["index_mean", "global_mean"])
def test_sparse_clip_with_a_stalled_peer_does_not_freeze_training(aggregate):
    g = _vectors(1, 16)[0].reshape(4, 4)
    xs = [torch.zeros(4, 4), g]
    codec = SparseCodec(chunk=4, topk=16, transform="none", values="fp32", backend="torch")
    comms = InprocCommunicator.group(2, timeout_s=30.0)

    def worker(comm, r):
        red = make_reducer(comm, codec, robust="clip", aggregate=aggregate)
        return red.start([xs[r]]).result()

    for (out,), w in _threads(comms, worker):
        # every entry kept, values exact: peer 1 clipped to (0 + |g|) / 2, i.e. halved; both
        # peers select every coordinate, so both rules divide by 2: g / 4
        assert torch.equal(out, g / 4)
        assert w == 2.0


def test_make_reducer_keeps_dense_codec_for_robust_rules_without_a_codec():
    red = make_reducer(InprocCommunicator.group(4)[0], None, robust="trimmed_mean")
    assert isinstance(red.codec, DenseCodec) and red.trim is None  # floor(0.25 * 4) = 1
