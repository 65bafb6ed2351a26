"""InprocCommunicator: results against float64 oracles, ledger against its formulas, failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.collectives import accounting as acct
from thinwire.collectives.base import CommError, CommTimeout, Handle, OrderMismatch, PeerLost
from thinwire.collectives.inproc import InprocCommunicator

NUMELS = (1, 7, 1000, 100003)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# rtol 1e-5 and atol 1e-6*P for fp32/fp64; bf16 keeps 8 mantissa bits -> 2e-2.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2}


def run_group(P: int, fn: Callable[[InprocCommunicator], Any], **kw: Any) -> list[Any]:
    """Run ``fn(comm)`` on P threads; return per-rank results, or the exception each raised."""
    comms = InprocCommunicator.group(P, **kw)
    out: list[Any] = [None] * P

    def body(r: int) -> None:
        try:
            out[r] = fn(comms[r])
        except BaseException as exc:  # returned to the test, which asserts on it
            out[r] = exc

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "an inproc rank hung"
    return out


def ok(results: list[Any]) -> list[Any]:
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def inputs(P: int, numel: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g, dtype=torch.float64).to(dtype) for _ in range(P)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_all_reduce_vs_float64_oracle(P):
    cases = [(n, d, op) for n in NUMELS for d in DTYPES for op in ("sum", "mean")]

    def fn(c: InprocCommunicator) -> list[torch.Tensor]:
        res = []
        for i, (n, d, op) in enumerate(cases):
            t = inputs(P, n, d, seed=i)[c.rank].clone()
            assert c.all_reduce(t, op) is t
            res.append(t)
        return res

    results = ok(run_group(P, fn))
    for i, (n, d, op) in enumerate(cases):
        oracle = torch.zeros(n, dtype=torch.float64)
        for x in inputs(P, n, d, seed=i):
            oracle += x.double()
        if op == "mean":
            oracle /= P
        for r in range(P):
            assert results[r][i].dtype == d
            assert torch.equal(results[r][i], results[0][i])  # bitwise identical on all ranks
        torch.testing.assert_close(results[0][i].double(), oracle, rtol=RTOL[d], atol=1e-6 * P)


def test_all_reduce_ints_noncontiguous_and_errors():
    def fn(c: InprocCommunicator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        ints = torch.arange(5, dtype=torch.int32) * (c.rank + 1)
        c.all_reduce(ints, "sum")
        base = torch.arange(12, dtype=torch.float32).view(3, 4) * (c.rank + 1)
        view = base.t()  # non-contiguous: reduced through a copy, written back
        c.all_reduce(view, "sum")
        errs = []
        for bad in (
            lambda: c.all_reduce(torch.ones(3, dtype=torch.int64), "mean"),
            lambda: c.all_reduce(torch.ones(3, dtype=torch.complex64), "sum"),
            lambda: c.all_reduce(torch.ones(3), "max"),
        ):
            try:
                bad()
            except (TypeError, ValueError) as exc:
                errs.append(f"{type(exc).__name__}: {exc}")
        return ints, base, errs

    res = ok(run_group(3, fn))
    for ints, base, errs in res:
        assert ints.tolist() == [0, 6, 12, 18, 24]  # (1+2+3) * arange
        assert torch.equal(base, torch.arange(12, dtype=torch.float32).view(3, 4) * 6)
        assert errs[0].startswith("TypeError: op must be in {'sum'}")
        assert errs[1].startswith("TypeError: t.dtype must be in")
        assert errs[2] == "ValueError: op must be in {'mean', 'sum'}, got 'max'"


def test_ledger_matches_formulas():
    P = 4
    sizes = [0, 5, 100, 5]

    def fn(c: InprocCommunicator) -> list:
        r = c.rank
        c.all_reduce(torch.ones(1000), "mean", tag="dense")
        c.all_reduce(torch.ones(7, dtype=torch.bfloat16), "sum")
        c.all_gather_into_tensor(torch.ones(2, 5))
        c.all_gather_bytes(bytes(sizes[r]), algorithm="ring")
        c.all_gather_bytes(bytes(sizes[r]), algorithm="direct")
        c.all_gather_bytes(bytes(sizes[r]))
        c.all_gather_bytes(bytes(9))
        c.broadcast(torch.zeros(6, dtype=torch.float64), src=P - 1)
        c.broadcast_bytes(b"x" * 11 if r == 1 else None, src=1)
        c.control_max([1.0, float(r)])
        return c.ledger.records

    recs = ok(run_group(P, fn))
    for r in range(P):
        got = [(x.op, x.algorithm, x.sent, x.recv) for x in recs[r]]
        expected = [
            ("all_reduce", "ring", *acct.ring_allreduce_bytes(1000, 4, P)),
            ("all_reduce", "ring", *acct.ring_allreduce_bytes(7, 4, P)),  # bf16 travels as fp32
            ("all_gather_into_tensor", "ring", *acct.allgather_tensor_bytes(40, P)),
            ("all_gather_bytes", "ring", *acct.allgather_ring_bytes(sizes)),
            ("all_gather_bytes", "direct", *acct.allgather_direct_bytes(sizes, r)),
            ("all_gather_bytes", "direct", *acct.allgather_direct_bytes(sizes, r)),
            ("all_gather_bytes", "ring", *acct.allgather_ring_bytes([9] * P)),
            ("broadcast", "binomial", *acct.broadcast_binomial_bytes(48, r, P - 1, P)),
            ("broadcast_bytes", "binomial", *acct.broadcast_payload_bytes(11, r, 1, P)),
            ("control_max", "ring", 0, 0),
        ]
        assert got == expected
        assert recs[r][-1].control_sent == acct.ring_allreduce_bytes(2, 8, P)[0]
        assert all(x.control_sent == 0 for x in recs[r][:-1])  # no debug_checks
        assert recs[r][0].tag == "dense" and recs[r][0].numel == 1000 and recs[r][0].itemsize == 4
        assert recs[r][3].sizes == tuple(sizes) and recs[r][7].src == P - 1
        assert recs[r][2].sizes == (40,) * P and recs[r][2].payload_bytes == 40
        assert (recs[r][2].numel, recs[r][2].itemsize) == (10, 4)
    for i in range(len(recs[0])):
        assert sum(recs[r][i].sent for r in range(P)) == sum(recs[r][i].recv for r in range(P))


def test_all_gather_and_broadcast_contents():
    P = 3
    lens = [0, 3, 17]

    def fn(c: InprocCommunicator) -> dict:
        r = c.rank
        mine = bytes((r * 31 + k) % 256 for k in range(lens[r]))
        out = {alg: c.all_gather_bytes(mine, algorithm=alg) for alg in ("ring", "direct", "auto")}
        out["tensor"] = c.all_gather_bytes(torch.tensor([r, -r], dtype=torch.int16))
        t0 = torch.full((4,), float(r))
        c.broadcast(t0, src=0)
        tl = torch.full((2, 2), r, dtype=torch.int64)
        c.broadcast(tl, src=P - 1)
        out["b"] = (t0, tl)
        out["bb"] = c.broadcast_bytes(b"payload" if r == P - 1 else None, src=P - 1)
        out["empty"] = c.broadcast_bytes(b"" if r == 0 else None, src=0)
        return out

    res = ok(run_group(P, fn))
    expected = [bytes((j * 31 + k) % 256 for k in range(lens[j])) for j in range(P)]
    for out in res:
        for alg in ("ring", "direct", "auto"):
            assert out[alg] == expected
        assert out["tensor"] == [
            torch.tensor([j, -j], dtype=torch.int16).numpy().tobytes() for j in range(P)
        ]
        assert torch.equal(out["b"][0], torch.zeros(4))
        assert torch.equal(out["b"][1], torch.full((2, 2), P - 1, dtype=torch.int64))
        assert out["bb"] == b"payload" and out["empty"] == b""


def test_world_of_one():
    def fn(c: InprocCommunicator) -> tuple:
        t = torch.arange(5.0)
        c.all_reduce(t, "mean")
        rows = c.all_gather_into_tensor(t)
        g = c.all_gather_bytes(b"abc")
        b = c.broadcast_bytes(b"q")
        h = c.all_reduce(t, async_op=True)
        return t, rows, g, b, h.done(), c.control_max([3.0]), c.ledger.totals()

    ((t, rows, g, b, done, mx, tot),) = ok(run_group(1, fn))
    assert torch.equal(t, torch.arange(5.0)) and g == [b"abc"] and b == b"q" and done
    assert torch.equal(rows, torch.arange(5.0).view(1, 5)) and rows.data_ptr() != t.data_ptr()
    assert mx == [3.0]
    assert tot == {"sent": 0, "recv": 0, "control_sent": 0, "control_recv": 0, "ops": 6}


def _gather_inputs(P: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per rank: a 1-D uint8 payload of random bytes and a 2-D float32 tensor."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 256, (1001,), generator=g, dtype=torch.uint8),
            torch.randn(3, 7, generator=g),
        )
        for _ in range(P)
    ]


@pytest.mark.parametrize("P", [1, 2, 3])
def test_all_gather_into_tensor(P):
    xs = _gather_inputs(P, seed=11)

    def fn(c: InprocCommunicator) -> tuple:
        u8, f32 = (x.clone() for x in xs[c.rank])
        rows_u8 = c.all_gather_into_tensor(u8, tag="payload")
        h = c.all_gather_into_tensor(f32, async_op=True)
        # another op on the wire before the handle is waited
        c.all_reduce(torch.ones(4), "sum")
        assert isinstance(h, Handle)
        rows_f32 = h.wait()
        # a non-contiguous view and an empty tensor, both with their own dtype
        view = c.all_gather_into_tensor(f32.t())
        empty = c.all_gather_into_tensor(torch.zeros(0, 5, dtype=torch.int16))
        recs = [x for x in c.ledger.records if x.op == "all_gather_into_tensor"]
        return rows_u8, rows_f32, h.wait() is rows_f32, h.done(), view, empty, recs, (u8, f32)

    for r, (rows_u8, rows_f32, same, done, view, empty, recs, mine) in enumerate(
        ok(run_group(P, fn))
    ):
        assert rows_u8.shape == (P, 1001) and rows_u8.dtype == torch.uint8
        assert rows_f32.shape == (P, 3, 7) and rows_f32.dtype == torch.float32
        for j in range(P):
            assert torch.equal(rows_u8[j], xs[j][0]) and torch.equal(rows_f32[j], xs[j][1])
            assert torch.equal(view[j], xs[j][1].t())
        assert same and done
        assert empty.shape == (P, 0, 5) and empty.dtype == torch.int16
        assert torch.equal(mine[0], xs[r][0]) and torch.equal(mine[1], xs[r][1])  # inputs kept
        # ledger: a ring all-gather of equal sizes, no length header
        for rec, nbytes in zip(recs, (1001, 3 * 7 * 4, 3 * 7 * 4, 0), strict=True):
            assert (rec.algorithm, rec.P, rec.rank) == ("ring", P, r)
            assert rec.sent == rec.recv == (P - 1) * nbytes
            assert rec.payload_bytes == nbytes and rec.sizes == (nbytes,) * P
        assert recs[0].tag == "payload"


def test_all_gather_into_tensor_debug_checks_and_failure_state():
    def fine(c: InprocCommunicator) -> Any:
        c.all_gather_into_tensor(torch.full((6,), c.rank, dtype=torch.uint8))
        return c.ledger.records[-1]

    for rec in ok(run_group(3, fine, debug_checks=True)):
        assert rec.control_sent == rec.control_recv == 2 * 16  # (P-1) * 16-byte signature
        assert rec.sent == rec.recv == 2 * 6

    def diverge(c: InprocCommunicator) -> Any:
        if c.rank == 0:
            c.all_gather_into_tensor(torch.zeros(4, dtype=torch.uint8), tag="x")
        else:
            c.broadcast(torch.zeros(4, dtype=torch.uint8), tag="x")

    for exc in run_group(2, diverge, timeout_s=10, debug_checks=True):
        assert isinstance(exc, OrderMismatch), exc
        assert "all_gather_into_tensor" in str(exc) and "broadcast" in str(exc)

    comms = InprocCommunicator.group(2, timeout_s=0.3)
    h = comms[0].all_gather_into_tensor(torch.ones(3), async_op=True)
    with pytest.raises(CommTimeout):
        h.wait()
    with pytest.raises(CommTimeout):  # failed state: raises at once
        comms[0].all_gather_into_tensor(torch.ones(3))


def test_async_reverse_wait_and_done():
    P = 3

    def fn(c: InprocCommunicator) -> tuple:
        ts = [torch.full((50,), float(c.rank * 10 + i)) for i in range(3)]
        hs = [c.all_reduce(t, "sum", async_op=True) for t in ts]
        assert all(isinstance(h, Handle) for h in hs)
        vals = [h.wait() for h in reversed(hs)]
        again = hs[0].wait()
        return [h.done() for h in hs], vals, again is vals[-1]

    for done, vals, same in ok(run_group(P, fn)):
        assert done == [True, True, True] and same
        # sum_r (10 r + i) = 30 + 3 i for r in {0, 1, 2}
        assert [v[0].item() for v in vals] == [36.0, 33.0, 30.0]


def test_done_flips_only_when_all_arrive():
    comms = InprocCommunicator.group(2, timeout_s=10)
    h = comms[0].all_reduce(torch.ones(3), "sum", async_op=True)
    assert not h.done()
    comms[1].all_reduce(torch.ones(3), "sum")
    assert h.done()
    assert h.wait().tolist() == [2.0, 2.0, 2.0]


def test_timeout_propagates_and_fails_fast():
    comms = InprocCommunicator.group(2, timeout_s=0.3)
    h = comms[0].all_reduce(torch.ones(3), async_op=True)
    t0 = time.monotonic()
    with pytest.raises(CommTimeout, match="did not arrive"):
        h.wait()
    with pytest.raises(CommTimeout):
        h.wait()  # cached error
    assert isinstance(h.exception(), CommTimeout)
    with pytest.raises(CommTimeout):
        comms[0].broadcast(torch.ones(1))  # failed state: raises at once
    assert time.monotonic() - t0 < 5.0


def test_peer_closed_raises_peer_lost():
    comms = InprocCommunicator.group(2, timeout_s=30)
    comms[1].close()
    with pytest.raises(PeerLost):
        comms[0].all_reduce(torch.ones(2))
    with pytest.raises(CommError, match="closed"):
        comms[1].all_reduce(torch.ones(2))


def test_debug_checks_detect_order_mismatch():
    def fn(c: InprocCommunicator) -> Any:
        c.all_reduce(torch.ones(4), tag="same")
        before = c.ledger.records[-1].control_sent
        if c.rank == 0:
            c.all_reduce(torch.ones(4), tag="grad")
        else:
            c.broadcast(torch.ones(4), tag="grad")
        return before

    res = run_group(2, fn, timeout_s=10, debug_checks=True)
    for exc in res:
        assert isinstance(exc, OrderMismatch), exc
        assert "all_reduce" in str(exc) and "broadcast" in str(exc)

    def fine(c: InprocCommunicator) -> Any:
        c.all_reduce(torch.ones(2))
        return c.ledger.records[-1]

    for rec in ok(run_group(3, fine, debug_checks=True)):
        assert rec.control_sent == rec.control_recv == 2 * 16  # (P-1) * 16-byte signature
        assert rec.sent == acct.ring_allreduce_bytes(2, 4, 3)[0]


@settings(deadline=None, max_examples=30, derandomize=True)
@given(
    lens=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    algorithm=st.sampled_from(["auto", "ring", "direct"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_all_gather_bytes_property(lens, algorithm, seed):
    P = len(lens)
    g = torch.Generator().manual_seed(seed)
    payloads = [
        torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes() for n in lens
    ]

    def fn(c: InprocCommunicator) -> tuple:
        return c.all_gather_bytes(payloads[c.rank], algorithm=algorithm), c.ledger.records[-1]

    res = ok(run_group(P, fn))
    picked = algorithm if algorithm != "auto" else ("ring" if len(set(lens)) == 1 else "direct")
    for r, (got, rec) in enumerate(res):
        assert got == payloads
        want = (
            acct.allgather_ring_bytes(lens)
            if picked == "ring"
            else acct.allgather_direct_bytes(lens, r)
        )
        assert (rec.algorithm, rec.sent, rec.recv, rec.sizes) == (picked, *want, tuple(lens))
