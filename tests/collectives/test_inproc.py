"""InprocCommunicator: results against float64 oracles, ledger against spec §2.4, failures."""

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
# Spec §7 item 1: rtol 1e-5 and atol 1e-6*P for fp32/fp64; bf16 keeps 8 mantissa bits -> 2e-2.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2}


class Fp16Codec:
    """Test codec: fp16 cast, 2 bytes per element, no header."""

    def encode(self, x: torch.Tensor) -> bytes:
        return x.to(torch.float16).numpy().tobytes()

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(payload), dtype=torch.float16)[:numel].float()

    def wire_bytes(self, numel: int) -> int:
        return 2 * numel


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


def test_codec_rsag_q():
    P, n = 3, 1001
    codec = Fp16Codec()

    def fn(c: InprocCommunicator) -> tuple[torch.Tensor, torch.Tensor]:
        x = inputs(P, n, torch.float32, seed=5)[c.rank]
        s, m = x.clone(), x.clone()
        c.all_reduce(s, "sum", codec=codec)
        c.all_reduce(m, "mean", codec=codec, tag="m")
        return s, m

    res = ok(run_group(P, fn))
    xs = [x.double() for x in inputs(P, n, torch.float32, seed=5)]
    oracle = sum(xs)
    # Each input is rounded to fp16 (rel 2**-11), the shard sum once more: |err| <= 2**-11 *
    # (sum_j |x_j| + |sum|), plus slack for the fp32 accumulation.
    bound = 2.0**-11 * (sum(x.abs() for x in xs) + oracle.abs()) * 1.01 + 1e-7
    for s, m in res:
        assert torch.equal(s, res[0][0]) and torch.equal(m, res[0][1])
        assert ((s.double() - oracle).abs() <= bound).all()
        assert ((m.double() - oracle / P).abs() <= bound / P).all()


def test_ledger_matches_formulas():
    P = 4
    sizes = [0, 5, 100, 5]
    codec = Fp16Codec()

    def fn(c: InprocCommunicator) -> list:
        r = c.rank
        c.all_reduce(torch.ones(1000), "mean", tag="dense")
        c.all_reduce(torch.ones(7, dtype=torch.bfloat16), "sum")
        c.all_reduce(torch.ones(10), "sum", codec=codec)
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
        fp16 = lambda k: 2 * k  # noqa: E731
        expected = [
            ("all_reduce", "ring", *acct.ring_allreduce_bytes(1000, 4, P)),
            ("all_reduce", "ring", *acct.ring_allreduce_bytes(7, 4, P)),  # bf16 travels as fp32
            ("all_reduce", "rsag-q", *acct.rsagq_allreduce_bytes(10, P, fp16)),
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
        assert recs[r][2].sizes == (2 * 3,) * P  # encoded chunk w = wire_bytes(ceil(10/4))
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
        c.all_reduce(t, "sum", codec=Fp16Codec())
        g = c.all_gather_bytes(b"abc")
        b = c.broadcast_bytes(b"q")
        h = c.all_reduce(t, async_op=True)
        return t, g, b, h.done(), c.control_max([3.0]), c.ledger.totals()

    ((t, g, b, done, mx, tot),) = ok(run_group(1, fn))
    assert torch.equal(t, torch.arange(5.0)) and g == [b"abc"] and b == b"q" and done
    assert mx == [3.0]
    assert tot == {"sent": 0, "recv": 0, "control_sent": 0, "control_recv": 0, "ops": 6}


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
