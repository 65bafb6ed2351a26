"""Tests of :class:`thinwire.collectives.hivemind.HivemindCommunicator` on real DHT peers.

Every peer is a real communicator (its own DHT process, p2p daemon and averager processes) on
127.0.0.1; later peers join through the first one's visible multiaddrs. Peers live in this process
and issue ops from threads, as hivemind's own averaging tests do. Oracles: float64 means of the same
seeded inputs, hivemind's own partitioner (``TensorPartContainer``) and hand-derived shares for the
ledger, the byte formulas of :mod:`thinwire.collectives.accounting`, and the payloads themselves.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
import torch

from thinwire.collectives.base import AllPeersLeft, CommError, RoundMismatch
from thinwire.collectives.hivemind import HivemindCommunicator

# matchmaking 1 s (enough on loopback) with request_timeout below it, as hivemind requires
KW = dict(
    host_maddrs=("/ip4/127.0.0.1/tcp/0",),
    matchmaking_time=1.0,
    request_timeout=0.5,
    heartbeat_s=1.0,
    next_chunk_timeout=5.0,
)


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc; Linux only, as hivemind's p2pd is)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _kill(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


@pytest.fixture(scope="session", autouse=True)
def _reap_children():
    """Kill whatever DHT, averager or p2pd process a failed test left behind.

    torch_shm_manager (started because hivemind selects the file_system sharing strategy) is
    spared: this process still talks to it at exit and aborts on a broken pipe.
    """
    yield
    _kill([p for p in _descendants(os.getpid()) if not _comm(p).startswith("torch_shm")])
    for child in mp.active_children():
        child.join(timeout=1)


def _swarm(n: int, run_id: str, **kw) -> list[HivemindCommunicator]:
    kw = dict(KW, **kw)
    first = HivemindCommunicator.create(run_id, **kw)
    peers = [first]
    for _ in range(n - 1):
        peers.append(
            HivemindCommunicator.create(run_id, initial_peers=first.visible_maddrs(), **kw)
        )
    return peers


def _close(peers: list[HivemindCommunicator]) -> None:
    for c in reversed(peers):
        c.close()


def _together(fns: list[Callable[[], object]]) -> list[object]:
    """Run one call per peer concurrently; return each result or the exception it raised."""
    out: list[object] = [None] * len(fns)

    def run(i: int) -> None:
        try:
            out[i] = fns[i]()
        except Exception as exc:  # returned, then asserted on by the test
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _rec(comm: HivemindCommunicator, op: Callable[[], object]):
    """Run ``op`` on ``comm``, return the ledger record it added."""
    op()
    return comm.ledger.records[-1]


def _waited(handle):
    handle.wait(timeout=60)
    return handle


def _inputs(n: int, numel: int, seed: int, uniform: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    draw = torch.rand if uniform else torch.randn
    return [draw(numel, generator=g) for _ in range(n)]


def _mean64(xs: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros(xs[0].numel(), dtype=torch.float64)
    for x in xs:
        acc += x.double()
    return acc / len(xs)


def _check_direct_ledger(handles, by_rank: list[bytes]) -> None:
    """``direct`` all-gather: sent (P-1)(8+m_r), recv sum_{j!=r}(8+m_j); sum sent == sum recv.

    ``by_rank``: the payloads in rank (sorted peer id) order.
    """
    P, lens = len(by_rank), [len(m) for m in by_rank]
    assert sorted(h.record.rank for h in handles) == list(range(P))
    for h in handles:
        rec, r = h.record, h.record.rank
        assert rec.P == P and rec.sizes == tuple(lens)
        assert rec.sent == (P - 1) * (8 + lens[r])
        assert rec.recv == sum(8 + lens[j] for j in range(P) if j != r)
    assert sum(h.record.sent for h in handles) == sum(h.record.recv for h in handles)


@pytest.fixture(scope="module")
def duo():
    peers = _swarm(
        2, "tw-duo", expected_world_size=2, round_wait_timeout=2.0, allreduce_timeout=10.0
    )
    yield peers
    _close(peers)


@pytest.fixture(scope="module")
def trio():
    peers = _swarm(
        3, "tw-trio", expected_world_size=3, round_wait_timeout=5.0, allreduce_timeout=10.0
    )
    yield peers
    _close(peers)


@pytest.mark.timeout(90)
def test_two_peers_mean_and_all_gather(duo):
    xs = _inputs(2, 1000, seed=0)
    ts = [x.clone() for x in xs]
    hs = _together([lambda c=c, t=t: _rec(c, lambda: c.all_reduce(t, "mean", tag="w"))
                    for c, t in zip(duo, ts, strict=True)])  # fmt: skip
    ref = _mean64(xs)
    for t in ts:
        torch.testing.assert_close(
            t.double(), ref, rtol=0, atol=1e-6
        )  # fp32 rounding of a 2-term mean
    # 1000 fp32 elements < one part (2^17): one peer reduces everything, w = 4000 bytes;
    # it sends/receives (P-1)w, the other w; for P = 2 both are 4000
    for rec in hs:
        assert rec.algorithm == "butterfly" and rec.P == 2
        assert sorted(rec.sizes) == [0, 4000] and rec.sent == rec.recv == 4000
    assert hs[0].sizes == hs[1].sizes

    g = torch.Generator().manual_seed(1)
    payloads = [
        b"",
        bytes(torch.randint(0, 256, (700_001,), generator=g, dtype=torch.uint8).tolist()),
    ]
    handles = [
        c.all_gather_bytes(p, async_op=True, tag="g") for c, p in zip(duo, payloads, strict=True)
    ]
    results = [h.wait(timeout=60) for h in handles]
    ids = sorted(c.peer_id for c in duo)
    order = [payloads[[c.peer_id for c in duo].index(p)] for p in ids]
    for h, res in zip(handles, results, strict=True):
        assert h.group == tuple(ids) and h.missing == ()
        assert res == order
    _check_direct_ledger(handles, order)
    assert [c.rank for c in duo] == [ids.index(c.peer_id) for c in duo]
    assert all(c.world_size == 2 for c in duo)


@pytest.mark.timeout(90)
def test_round_mismatch_leaves_tensors_untouched(duo):
    xs = _inputs(2, 64, seed=2)
    ts = [x.clone() for x in xs]
    out = _together([lambda c=c, t=t, k=k: c.all_reduce(t, tag="rm", round=7 + k)
                     for k, (c, t) in enumerate(zip(duo, ts, strict=True))])  # fmt: skip
    for res, t, x in zip(out, ts, xs, strict=True):
        assert isinstance(res, RoundMismatch), res
        assert torch.equal(t, x)


@pytest.mark.timeout(90)
def test_all_gather_into_tensor_and_async_ops(duo):
    ys = _inputs(2, 10, seed=4)
    zs = [z.to(torch.bfloat16) for z in _inputs(2, 50, seed=7)]
    us, vs = [y.clone() for y in ys], [z.clone() for z in zs]
    g = torch.Generator().manual_seed(3)
    payloads = [torch.randint(0, 256, (1001,), generator=g, dtype=torch.uint8) for _ in duo]
    mats = [torch.randn(3, 4, generator=g) for _ in duo]

    def issue(c, p, m, u, v):  # four async ops on different tags, waited in reverse order
        ha = c.all_gather_into_tensor(p.clone(), async_op=True, tag="agt")
        hm = c.all_gather_into_tensor(m.clone(), async_op=True, tag="agt32")
        hb = c.all_reduce(u, "mean", async_op=True, tag="ar2")
        hc = c.all_reduce(v, "mean", async_op=True, tag="bf16")
        for h in (hc, hb, hm, ha):
            h.wait(timeout=60)
        return ha, hm

    out = _together([lambda i=i: issue(duo[i], payloads[i], mats[i], us[i], vs[i])
                     for i in range(2)])  # fmt: skip
    ids = sorted(c.peer_id for c in duo)
    pos = [[c.peer_id for c in duo].index(p) for p in ids]  # sorted-group row -> peer index
    for ha, hm in out:
        assert ha.group == hm.group == tuple(ids) and ha.missing == hm.missing == ()
        rows, mrows = ha.wait(), hm.wait()
        assert rows.shape == (2, 1001) and rows.dtype == torch.uint8
        assert mrows.shape == (2, 3, 4) and mrows.dtype == torch.float32
        for j in range(2):
            assert torch.equal(rows[j], payloads[pos[j]]) and torch.equal(mrows[j], mats[pos[j]])
        assert ha.record.op == "all_gather_into_tensor" and ha.record.algorithm == "direct"
    _check_direct_ledger([ha for ha, _ in out], [b"x" * 1001] * 2)
    _check_direct_ledger([hm for _, hm in out], [b"x" * 48] * 2)
    for u in us:
        torch.testing.assert_close(u.double(), _mean64(ys), rtol=0, atol=1e-6)
    for v in vs:  # averaged in fp32, rounded once to bf16 (unit roundoff 2^-8)
        assert v.dtype == torch.bfloat16
        torch.testing.assert_close(v.double(), _mean64(zs), rtol=2.0**-8, atol=1e-6)


@pytest.mark.timeout(90)
def test_all_gather_into_tensor_wrong_size_gets_zero_row(duo):
    # peer 1 passes one byte more: each side keeps its own row, zeroes the other, names it missing
    ts = [torch.full((5 + k,), 7 + k, dtype=torch.uint8) for k in range(2)]
    hs = _together([lambda c=c, t=t: _waited(c.all_gather_into_tensor(t, async_op=True, tag="bad"))
                    for c, t in zip(duo, ts, strict=True)])  # fmt: skip
    ids = sorted(c.peer_id for c in duo)
    for k, (c, h) in enumerate(zip(duo, hs, strict=True)):
        rows, me = h.wait(), ids.index(c.peer_id)
        other = ids[1 - me]
        assert rows.shape == (2, 5 + k) and torch.equal(rows[me], ts[k])
        assert not rows[1 - me].any() and h.missing == (other,)
        rec = h.record  # neither side fetches the other's payload
        assert rec.sizes[me] == 5 + k and rec.sent == rec.recv == 0


def _three_peer_butterfly(peers, codec, op, numel, seed, uniform=False):
    xs = _inputs(3, numel, seed, uniform)
    ts = [x.clone() for x in xs]
    _together([lambda c=c, t=t: c.all_reduce(t, op, codec=codec, tag=f"b{codec}{op}")
               for c, t in zip(peers, ts, strict=True)])  # fmt: skip
    recs = [c.ledger.records[-1] for c in peers]
    return xs, ts, recs


def _oracle_part_lengths(numel: int, P: int, codec) -> list[list[int]]:
    """hivemind's own partitioner (the engine's code, not thinwire's) for equal fractions."""
    import hivemind.compression as hc
    from hivemind.averaging.load_balancing import load_balance_peers
    from hivemind.averaging.partition import TensorPartContainer

    comp = {
        None: hc.NoCompression,
        "fp16": hc.Float16Compression,
        "int8": hc.Uniform8BitQuantization,
    }
    fractions = load_balance_peers(numel, [None] * P)
    tpc = TensorPartContainer([torch.zeros(numel)], fractions, compression=comp[codec]())
    return [[len(part) for part, _ in tpc._input_parts_by_peer[i]] for i in range(P)]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "codec,op,wire",
    [
        # numel 300001, P 3: pivots 100001/200001/300001. fp32 parts 2^17 -> shares
        # 131072/131072/37857 elements; fp16 parts 2^18 -> 262144 to peer 0 (overlap 100001 vs
        # 100000 on peer 1), 37857 to peer 2; uint8 parts 2^19 -> one part, one reducer (+1024 B)
        (None, "mean", [4 * 131072, 4 * 131072, 4 * 37857]),
        (None, "sum", [4 * 131072, 4 * 131072, 4 * 37857]),
        ("fp16", "mean", [2 * 262144, 0, 2 * 37857]),
        ("int8", "mean", [300001 + 1024, 0, 0]),
    ],
)
def test_three_peer_butterfly_values_and_ledger(trio, codec, op, wire):
    numel, P = 300_001, 3
    xs, ts, recs = _three_peer_butterfly(trio, codec, op, numel, seed=5, uniform=codec == "int8")
    ref = _mean64(xs) * (P if op == "sum" else 1)
    for t in ts:
        if codec is None:  # fp32 rounding of a 3-term mean, and of x3 for sum
            torch.testing.assert_close(
                t.double(), ref, rtol=0, atol=1e-6 * (P if op == "sum" else 1)
            )
        elif codec == "fp16":
            # result = avg(fp16(x_i)) + (x_own - fp16(x_own)) + rounding of the fp16 delta, so
            # |err| <= u (mean|x_i| + |x_own| + |delta|) <= 4u max_i|x_i|, u = 2^-11 (fp16)
            bound = 4 * 2.0**-11 * torch.stack(xs).abs().amax(0).double() + 1e-7
            assert bool(((t.double() - ref).abs() <= bound).all())
        else:
            # uint8: error within 2 % of the std (RMS). Worst case per element: half a bin
            # for the averaged codes, for the own-part requantization and for the delta, each
            # bin 6 sigma / 256 wide (Uniform8BitQuantization's +-3 sigma in 256 bins)
            err, sigma = t.double() - ref, torch.stack(xs).double().std().item()
            assert err.pow(2).mean().sqrt().item() <= 0.02 * sigma
            assert err.abs().max().item() <= 1.5 * 6 * sigma / 256
    oracle = _oracle_part_lengths(numel, P, codec)
    per_part = {None: lambda n: 4 * n, "fp16": lambda n: 2 * n, "int8": lambda n: n + 1024}[codec]
    oracle_wire = [sum(per_part(n) for n in parts) for parts in oracle]
    assert sorted(oracle_wire) == sorted(wire)  # hand-derived shares == hivemind's partitioner
    for rec in recs:
        assert rec.P == P and sorted(rec.sizes) == sorted(wire) and rec.sizes == recs[0].sizes
        W, r = rec.sizes, rec.rank
        assert rec.sent == rec.recv == sum(W[j] for j in range(P) if j != r) + (P - 1) * W[r]
    assert sorted(rec.rank for rec in recs) == [0, 1, 2]
    assert sum(r.sent for r in recs) == sum(r.recv for r in recs)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_three_peer_gather_broadcast_control(trio):
    g = torch.Generator().manual_seed(6)
    payloads = [
        b"",
        b"abc",
        bytes(torch.randint(0, 256, (1_200_000,), generator=g, dtype=torch.uint8).tolist()),
    ]
    hs = _together([lambda c=c, p=p: _rec(c, lambda: c.all_gather_bytes(p, tag="g3"))
                    for c, p in zip(trio, payloads, strict=True)])  # fmt: skip
    ids = sorted(c.peer_id for c in trio)
    order = [payloads[[c.peer_id for c in trio].index(p)] for p in ids]
    handles = [
        c.all_gather_bytes(p, async_op=True, tag="g3b") for c, p in zip(trio, payloads, strict=True)
    ]
    for h in handles:
        assert h.wait(timeout=60) == order and h.group == tuple(ids)
    _check_direct_ledger(handles, order)
    assert all(rec.sizes == tuple(len(p) for p in order) for rec in hs)

    for src in (0, 2):
        ts = [torch.full((5, 7), float(k + 10 * src)) for k in range(3)]
        want = ts[[c.peer_id for c in trio].index(ids[src])].clone()
        _together(
            [
                lambda c=c, t=t, s=src: c.broadcast(t, s, tag="bc")
                for c, t in zip(trio, ts, strict=True)
            ]
        )
        for c, t in zip(trio, ts, strict=True):
            assert torch.equal(t, want)
            rec = c.ledger.records[-1]
            S = 5 * 7 * 4  # pull: src sends (P-1)(8+S), others receive 8+S
            assert (rec.sent, rec.recv) == (((2 * (8 + S)), 0) if rec.rank == src else (0, 8 + S))
    outs = _together(
        [
            lambda c=c, k=k: c.control_max([float(k), -float(k)], tag="cm")
            for k, c in enumerate(trio)
        ]
    )
    assert outs == [[2.0, 0.0]] * 3
    assert all(c.ledger.records[-1].control_sent == 8 * 2 * 2 for c in trio)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_killed_peers_give_partial_group_then_a_group_of_one():
    peers = _swarm(3, "tw-kill", round_wait_timeout=10.0)
    try:
        a, b, c = peers
        # a clean leave: the tombstone removes d from the table at once, not after 3 heartbeats
        d = HivemindCommunicator.create("tw-kill", initial_peers=a.visible_maddrs(), **KW)
        assert d.peer_id in [p.peer_id for p in a.peers()]
        epoch = a.epoch
        d.close()
        assert d.peer_id not in [p.peer_id for p in a.peers()] and a.epoch > epoch
        assert (
            _together([lambda p=p: p.control_max([1.0], tag="warm") for p in peers]) == [[1.0]] * 3
        )
        epoch = a.epoch
        # crash c: its DHT, p2p daemon and averagers die without a goodbye
        _kill([c._dht.pid] + _descendants(c._dht.pid) + [av.pid for av in c._slots.values()])
        hs = _together([lambda p=p, m=m: _waited(p.all_gather_bytes(m, async_op=True, tag="k"))
                        for p, m in ((a, b"A"), (b, b"BB"))])  # fmt: skip
        assert all(not isinstance(h, Exception) for h in hs), hs
        ab = tuple(sorted((a.peer_id, b.peer_id)))
        want = [{a.peer_id: b"A", b.peer_id: b"BB"}[p] for p in ab]
        for h in hs:  # a partial group, reported: c was a live member when the op began
            assert h.group == ab and h.missing == (c.peer_id,) and h.wait() == want
            assert h.record.P == 2
        h = a.all_gather_bytes(b"A2", async_op=True, tag="k2")
        hb = b.all_gather_bytes(b"B2", async_op=True, tag="k2")
        assert h.wait(timeout=60) == hb.wait(timeout=60)
        assert h.group == ab
        assert c.peer_id not in [p.peer_id for p in a.peers()] and a.epoch > epoch
        # then b crashes as well: once b's heartbeats expire a is alone. By default (alone=
        # "continue") an op completes as a group of one (the mean of one is the tensor itself);
        # with alone="raise" it raises AllPeersLeft and leaves the tensor untouched.
        _kill([b._dht.pid] + _descendants(b._dht.pid) + [av.pid for av in b._slots.values()])
        x = torch.arange(4.0)
        h = a.all_reduce(x, tag="alone", async_op=True)
        assert torch.equal(h.wait(timeout=60), torch.arange(4.0)) and h.group == (a.peer_id,)
        assert h.missing == (b.peer_id,)
        a._o["alone"] = "raise"  # the setting create(alone="raise") stores
        with pytest.raises(AllPeersLeft, match="every other peer .* left"):
            a.all_reduce(x, tag="alone2")
        assert torch.equal(x, torch.arange(4.0))
    finally:
        _close(peers)


@pytest.mark.timeout(60)
def test_solo_world_and_validation():
    with pytest.raises(ValueError, match="request_timeout must be in"):
        HivemindCommunicator.create("v", matchmaking_time=1.0, request_timeout=1.0, start=False)
    with pytest.raises(ValueError, match="run_id"):
        HivemindCommunicator.create("", start=False)
    idle = HivemindCommunicator.create("v", start=False)
    with pytest.raises(TypeError, match="t.dtype"):
        idle.all_reduce(torch.arange(3), "sum")
    with pytest.raises(ValueError, match="codec"):
        idle.all_reduce(torch.zeros(3), codec="int4")
    with pytest.raises(CommError, match="closed or not started"):
        idle.all_reduce(torch.zeros(3))
    (solo,) = _swarm(1, "tw-solo", expected_world_size=1)
    try:
        x = torch.arange(5.0)
        assert solo.all_reduce(x, "sum") is x and torch.equal(x, torch.arange(5.0))
        assert solo.all_gather_bytes(b"only") == [b"only"]
        rows = solo.all_gather_into_tensor(torch.arange(6.0).view(2, 3))
        assert torch.equal(rows, torch.arange(6.0).view(1, 2, 3))
        assert solo.control_max([3.0]) == [3.0]
        assert all(r.P == 1 and r.sent == r.recv == 0 for r in solo.ledger.records)
        assert [p.peer_id for p in solo.peers()] == [solo.peer_id]
    finally:
        solo.close()
    with pytest.raises(CommError, match="closed"):
        solo.all_gather_bytes(b"late")


@pytest.mark.timeout(60)
def test_import_does_not_load_hivemind():
    code = (
        "import sys, thinwire.collectives, thinwire.collectives.hivemind\n"
        "assert 'hivemind' not in sys.modules, 'hivemind imported eagerly'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
