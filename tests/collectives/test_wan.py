"""Tests of the WAN model (docs/design.md, "The WAN model"): closed forms, jitter streams, config,
wrapper."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch

from thinwire.collectives.base import OpRecord
from thinwire.collectives.wan import (
    PRESETS,
    NodeLink,
    WanCommunicator,
    WanConfig,
    WanModel,
    halving_doubling_time,
    parameter_server_time,
    ring_rs_or_ag_time,
    suggest_timeout,
)

REL = 1e-9  # closed forms to 1e-9 relative (only float64 summation order differs)

# the preset table, typed in again here as the oracle: up, down (Mbit/s), RTT, jitter (ms)
TABLE = {
    "datacenter": (100e3, 100e3, 1.0, 0.0),
    "cross_region": (10e3, 10e3, 80.0, 1.0),
    "home_broadband": (10.0, 50.0, 40.0, 5.0),
    "home_transatlantic": (10.0, 50.0, 100.0, 5.0),
    "transpacific": (1e3, 1e3, 150.0, 5.0),
}


def _hom(preset: str) -> tuple[float, float, float, float]:
    """alpha (s), B = min(up, down), up, down (bytes/s) of a preset."""
    up, down, rtt, _ = TABLE[preset]
    return rtt / 2e3, min(up, down) * 1e6 / 8, up * 1e6 / 8, down * 1e6 / 8


def _model(preset: str, P: int, **kw) -> WanModel:
    return WanModel(WanConfig.from_preset(preset, P, jitter_ms=0.0, **kw), P)


def _draw(seed: int, domain: int, a: int, b: int, c: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, domain, a, b, c])))


# ---- presets and config --------------------------------------------------------------------
def test_presets_match_spec_table():
    assert set(PRESETS) == set(TABLE)
    for name, (up, down, rtt, jit) in TABLE.items():
        p = PRESETS[name]
        assert (p.up_mbps, p.down_mbps, p.rtt_ms, p.jitter_ms, p.loss) == (up, down, rtt, jit, 0.0)
        assert "[" in p.basis and "]" in p.basis  # every basis cites a source key in brackets
        cfg = WanConfig.from_preset(name, 3)
        assert cfg.base_rtt_ms == rtt and cfg.jitter_ms == jit and cfg.basis == p.basis
        assert cfg.links(3) == [NodeLink(up, down, 0.0)] * 3


def test_edge_parameters_and_caps():
    nodes = [NodeLink(10, 100, 5.0), NodeLink(100, 100, 0.0), NodeLink(50, 20, 10.0)]
    m = WanModel(WanConfig(nodes=nodes, base_rtt_ms=20.0), 3)
    # alpha_ij = base_rtt/2 + access_i + access_j; B_ij = min(up_i, down_j)
    assert m.alpha[0, 2] == pytest.approx(0.010 + 0.005 + 0.010, rel=REL)
    assert m.bw[2, 0] == pytest.approx(50e6 / 8, rel=REL)
    assert m.bw[0, 2] == pytest.approx(10e6 / 8, rel=REL)
    assert m.bw[1, 2] == pytest.approx(20e6 / 8, rel=REL)
    # window cap: 64 KiB over RTT 2*alpha
    w = WanModel(WanConfig(nodes=nodes, base_rtt_ms=20.0, tcp_window_bytes=65536), 3)
    assert w.bw[1, 2] == pytest.approx(65536 / (2 * 0.020), rel=REL)
    # Mathis bound (Mathis et al. 1997): RTT 150 ms and 1e-4 loss cap one flow near 9.5 Mbit/s
    lossy = _model("transpacific", 2, loss=1e-4)
    mathis = 1448 * math.sqrt(1.5) / (0.150 * math.sqrt(1e-4))
    assert lossy.bw[0, 1] == pytest.approx(mathis, rel=REL)
    assert 9.4 < lossy.bw[0, 1] * 8 / 1e6 < 9.5


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        ({"preset": "datacenter", "jitter_ms": -1}, ValueError, r"jitter_ms must be in \[0, inf\), got -1"),
        ({"preset": "datacenter", "loss": 1.0}, ValueError, r"loss must be in \[0, 1\), got 1.0"),
        ({"preset": "datacenter", "mode": "fast"}, ValueError, r"mode must be in \{'virtual', 'sleep'\}, got 'fast'"),
        ({"preset": "lan"}, ValueError, r"preset must be in \{'datacenter'.*\}, got 'lan'"),
        ({}, ValueError, r"nodes or preset must be given, got neither"),
        ({"preset": "datacenter", "time_scale": 0}, ValueError, r"time_scale must be in \(0, inf\), got 0"),
        ({"preset": "datacenter", "seed": -2}, ValueError, r"seed must be in \[0, inf\), got -2"),
        ({"preset": "datacenter", "straggler_prob": 1.5}, ValueError, r"straggler_prob must be in \[0, 1\], got 1.5"),
        ({"preset": "datacenter", "tcp_window_bytes": 0}, ValueError, r"tcp_window_bytes must be in \[1, inf\), got 0"),
        ({"preset": "datacenter", "world_size": 2, "compute_slowdown": {2: 2.0}}, ValueError, r"compute_slowdown rank must be in \[0, 1\], got 2"),
        ({"preset": "datacenter", "compute_slowdown": {0: 0.0}}, ValueError, r"compute_slowdown\[0\] must be in \(0, inf\), got 0.0"),
        ({"nodes": [NodeLink(1, 1)], "world_size": 2}, ValueError, r"world_size must be in \[1, 1\]"),
        ({"nodes": [(1, 1)]}, TypeError, r"nodes\[0\] must be NodeLink"),
        ({"preset": "datacenter", "mss": 1.5}, TypeError, r"mss must be int"),
    ],
)  # fmt: skip
def test_config_validation(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        WanConfig(**kwargs)


def test_nodelink_validation():
    with pytest.raises(ValueError, match=r"up_mbps must be in \(0, inf\), got 0"):
        NodeLink(0, 10)
    with pytest.raises(ValueError, match=r"access_latency_ms must be in \[0, inf\), got -1"):
        NodeLink(10, 10, -1)


def test_json_roundtrip(tmp_path):
    cfg = WanConfig(
        nodes=[NodeLink(10, 50, 2.5), NodeLink(100, 100)],
        base_rtt_ms=33.0,
        jitter_ms=1.5,
        compute_slowdown={1: 2.0},
        seed=7,
        mode="sleep",
        time_scale=0.5,
    )
    path = tmp_path / "topo.json"
    cfg.to_json(path)
    back = WanConfig.from_json(path)
    assert back == cfg
    path.write_text('{"preset": "datacenter", "latency": 3}')
    with pytest.raises(ValueError, match=r"topology key must be in .*got \['latency'\]"):
        WanConfig.from_json(path)


# ---- closed forms, jitter off ---------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(TABLE))
@pytest.mark.parametrize("P", [2, 3, 4, 5])
@pytest.mark.parametrize("numel", [1, 7, 1000, 100003])
def test_ring_all_reduce_closed_form(preset, P, numel):
    alpha, B, _, _ = _hom(preset)
    c = -(-numel // P) * 4  # ceil(numel/P) fp32 elements
    want = 2 * (P - 1) * (alpha + c / B)
    got = _model(preset, P).estimate("all_reduce", "ring", numel=numel, itemsize=4)
    assert got == pytest.approx(want, rel=REL)


def test_spec_examples():
    # home_broadband, P=4, 1e6 fp32: 2*3*(0.020 + 1e6*4/4/(10e6/8)) = 4.92 s
    got = _model("home_broadband", 4).estimate("all_reduce", "ring", numel=10**6, itemsize=4)
    assert got == pytest.approx(4.92, rel=REL)
    # DDP of 100M fp32 params at 10 Mbit/s upload is ~480 s per all-reduce (P=4)
    big = _model("home_broadband", 4).estimate("all_reduce", "ring", numel=10**8, itemsize=4)
    assert big == pytest.approx(480.12, rel=REL)
    assert suggest_timeout(big) == pytest.approx(3 * 480.12 + 30, rel=REL)
    assert _model("transpacific", 1).estimate("all_reduce", "ring", numel=10**6, itemsize=4) == 0.0


@pytest.mark.parametrize("P", [2, 3, 5])
def test_all_gather_closed_forms(P):
    alpha, B, up, down = _hom("home_transatlantic")
    m = _model("home_transatlantic", P)
    sizes = tuple(1000 * (r + 1) + 3 * r for r in range(P))
    big = max(sizes)
    ring = m.estimate("all_gather_bytes", "ring", sizes=sizes)
    assert ring == pytest.approx(2 * (P - 1) * alpha + (P - 1) * (8 + big) / B, rel=REL)
    direct = m.estimate("all_gather_bytes", "direct", sizes=sizes)
    worst = max(
        max((P - 1) * (8 + sizes[r]) / up, sum(8 + sizes[j] for j in range(P) if j != r) / down)
        for r in range(P)
    )
    assert direct == pytest.approx(alpha + worst, rel=REL)
    # a record as an engine fills it gives the same time as the explicit arguments
    rec = OpRecord("all_gather_bytes", "ring", "inproc", P=P, sizes=sizes, sent=(P - 1) * (8 + big))
    assert m.op_time(rec) == ring
    # equal-size tensor gather: no length phase, P-1 ring steps of one nbytes block
    nbytes = 12345
    agt = m.estimate("all_gather_into_tensor", "ring", sizes=(nbytes,) * P)
    assert agt == pytest.approx((P - 1) * (alpha + nbytes / B), rel=REL)
    assert agt == pytest.approx(ring_rs_or_ag_time(P * nbytes, P, alpha, B), rel=REL)
    assert m.estimate("all_gather_into_tensor", "ring", nbytes=nbytes) == agt
    rec = OpRecord("all_gather_into_tensor", "ring", "gloo", P=P, numel=nbytes, itemsize=1,
                   payload_bytes=nbytes, sizes=(nbytes,) * P, sent=(P - 1) * nbytes)  # fmt: skip
    assert m.op_time(rec) == agt and m.is_complete(rec)
    empty = OpRecord("all_gather_into_tensor", "ring", "gloo", P=P, itemsize=4, sizes=(0,) * P)
    assert m.op_time(empty) == 0.0  # engines move nothing for an empty tensor
    # hivemind gathers the same tensor over its direct pulls, length headers included
    hm = m.estimate("all_gather_into_tensor", "direct", sizes=(nbytes,) * P)
    assert hm == m.estimate("all_gather_bytes", "direct", sizes=(nbytes,) * P)
    assert hm == pytest.approx(alpha + (P - 1) * (8 + nbytes) / min(up, down), rel=REL)
    pending = OpRecord("all_gather_into_tensor", "direct", "hivemind", P=P)
    assert not m.is_complete(pending)  # sizes arrive with the group


@pytest.mark.parametrize("P", [2, 3, 4, 5, 8, 9])
def test_broadcast_binomial_closed_form(P):
    alpha, B, _, _ = _hom("cross_region")
    S = 4 * 4099
    for src in (0, P - 1):
        got = _model("cross_region", P).estimate(
            "broadcast", "binomial", numel=4099, itemsize=4, src=src
        )
        assert got == pytest.approx(math.ceil(math.log2(P)) * (alpha + S / B), rel=REL)


def test_butterfly_closed_form():
    P, mm = 3, 2.0
    alpha, _, up, down = _hom("home_broadband")
    shares = (4 * 2**17, 4 * 2**17, 4 * 1000)  # w(e_j): two full fp32 parts and a short one
    m = _model("home_broadband", P, matchmaking_s=mm)
    got = m.estimate("all_reduce", "butterfly", sizes=shares)
    out1 = [sum(shares[j] for j in range(P) if j != r) for r in range(P)]
    in1 = [(P - 1) * shares[r] for r in range(P)]
    ph1 = alpha + max(max(out1[r] / up, in1[r] / down) for r in range(P))
    ph2 = alpha + max(max(in1[r] / up, out1[r] / down) for r in range(P))
    assert got == pytest.approx(mm + 2 * (2 * alpha) + ph1 + ph2, rel=REL)


def test_reference_formulas():
    # hand-computed: S = 1e6 B, P = 4, alpha = 20 ms, B = 1.25e6 B/s (10 Mbit/s)
    assert ring_rs_or_ag_time(1e6, 4, 0.02, 1.25e6) == pytest.approx(0.66, rel=REL)
    assert halving_doubling_time(1e6, 4, 0.02, 1.25e6) == pytest.approx(1.28, rel=REL)
    assert parameter_server_time(1e6, 4, 0.02, 1.25e6) == pytest.approx(6.44, rel=REL)
    # ring all-reduce = reduce-scatter + all-gather when P divides the vector
    m = _model("home_broadband", 4)
    assert m.estimate("all_reduce", "ring", numel=250000, itemsize=4) == pytest.approx(
        2 * ring_rs_or_ag_time(1e6, 4, 0.02, 1.25e6), rel=REL
    )


# ---- heterogeneous links ---------------------------------------------------------------------
NODES = [NodeLink(10, 100, 5.0), NodeLink(100, 100, 0.0), NodeLink(50, 20, 10.0)]


def test_heterogeneous_ring_golden():
    # hand-computed (base RTT 20 ms, c = 1e5 fp32 = 4e5 B): edges 0->1: 15 ms + 4e5/1.25e6 s,
    # 1->2: 20 ms + 4e5/2.5e6 s, 2->0: 25 ms + 4e5/6.25e6 s; slowest step 0.335 s, 4 steps
    m = WanModel(WanConfig(nodes=NODES, base_rtt_ms=20.0), 3)
    assert m.estimate("all_reduce", "ring", numel=300000, itemsize=4) == pytest.approx(
        1.34, rel=REL
    )


def test_heterogeneous_direct_loops():
    m = WanModel(WanConfig(nodes=NODES, base_rtt_ms=20.0), 3)
    sizes = (1000, 0, 50000)
    up = [n.up_mbps * 1e6 / 8 for n in NODES]
    down = [n.down_mbps * 1e6 / 8 for n in NODES]
    acc = [n.access_latency_ms / 1e3 for n in NODES]
    worst, lat = 0.0, 0.0
    for r in range(3):
        sent = 2 * (8 + sizes[r])
        recv = sum(8 + sizes[j] for j in range(3) if j != r)
        worst = max(worst, sent / up[r], recv / down[r])
        for j in range(3):
            if j != r:
                lat = max(lat, 0.010 + acc[r] + acc[j])
    got = m.estimate("all_gather_bytes", "direct", sizes=sizes)
    assert got == pytest.approx(worst + lat, rel=REL)


# ---- random streams -------------------------------------------------------------------
def test_jitter_follows_seed_sequence_rule():
    P, seed, op_seq, numel = 3, 11, 4, 3000
    m = WanModel(WanConfig(nodes=NODES, base_rtt_ms=20.0, jitter_ms=5.0, seed=seed), P)
    c = 1000 * 4
    want = 0.0
    for k in range(2 * (P - 1)):
        step = 0.0
        for r in range(P):
            d = (r + 1) % P
            a = 0.010 + (NODES[r].access_latency_ms + NODES[d].access_latency_ms) / 1e3
            b = min(NODES[r].up_mbps, NODES[d].down_mbps) * 1e6 / 8
            j = _draw(seed, 1, op_seq, k, r * P + d).exponential(0.005)
            step = max(step, a + j + c / b)
        want += step
    got = m.estimate("all_reduce", "ring", numel=numel, itemsize=4, op_seq=op_seq)
    assert got == pytest.approx(want, rel=REL)
    again = WanModel(WanConfig(nodes=NODES, base_rtt_ms=20.0, jitter_ms=5.0, seed=seed), P)
    assert again.estimate("all_reduce", "ring", numel=numel, itemsize=4, op_seq=op_seq) == got
    other = WanModel(WanConfig(nodes=NODES, base_rtt_ms=20.0, jitter_ms=5.0, seed=seed + 1), P)
    assert other.estimate("all_reduce", "ring", numel=numel, itemsize=4, op_seq=op_seq) != got
    assert m.estimate("all_reduce", "ring", numel=numel, itemsize=4, op_seq=op_seq + 1) != got


def test_straggler_follows_seed_sequence_rule():
    cfg = WanConfig.from_preset(
        "datacenter", 4, straggler_prob=0.5, straggler_delay_ms=200.0, seed=3
    )
    m = WanModel(cfg, 4)
    hits = 0
    for step in range(20):
        for rank in range(4):
            g = _draw(3, 2, step, rank, 0)
            want = g.exponential(0.2) if g.random() < 0.5 else 0.0
            assert m.straggler_delay(step, rank) == want
            hits += want > 0
    assert 0 < hits < 80  # prob 0.5 over 80 draws: both outcomes occur for this seed


# ---- the clock wrapper over real in-process ranks -------------------------------------
def _ranks(P: int, cfg: WanConfig, fn, **kw) -> list:
    """Run ``fn(wan_comm)`` on P thread ranks of an InprocCommunicator group; return results."""
    from thinwire.collectives import InprocCommunicator

    comms = InprocCommunicator.group(P, timeout_s=30.0)
    out: list = [None] * P
    errs: list[BaseException] = []

    def body(r: int) -> None:
        try:
            out[r] = fn(WanCommunicator(comms[r], cfg, **{"measure_compute": False, **kw}))
        except BaseException as exc:  # re-raised in the test thread below
            errs.append(exc)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in comms:
        c.close()
    if errs:
        raise errs[0]
    return out


def _five_second_link(P: int = 2, **kw) -> WanConfig:
    # 1 Mbit/s = 125000 B/s, zero latency: a P=2 ring all-reduce of 156250 fp32 moves
    # c = 78125 * 4 = 312500 B per step, 2 steps -> exactly 5 s
    return WanConfig(nodes=[NodeLink(1.0, 1.0)] * P, base_rtt_ms=0.0, **kw)


def test_wrapper_overlap():
    def fn(w):
        h = w.all_reduce(torch.ones(156250), "sum", async_op=True)
        w.advance(3.0)
        h.wait()
        return (
            w.clock,
            w.exposed_comm_s,
            w.comm_s,
            w.compute_s,
            h.t_done_virtual,
            h.record.t_model_s,
        )

    for clock, exposed, comm, compute, t_done, t_model in _ranks(2, _five_second_link(), fn):
        assert clock == pytest.approx(5.0, rel=REL) and t_done == pytest.approx(5.0, rel=REL)
        assert exposed == pytest.approx(2.0, rel=REL)
        assert comm == pytest.approx(5.0, rel=REL) and t_model == pytest.approx(5.0, rel=REL)
        assert compute == 3.0


def test_wrapper_fifo_channel():
    # two async ops issued at t=0 share one channel: the second ends at 5 + 5 s
    def fn(w):
        a = w.all_reduce(torch.ones(156250), async_op=True)
        b = w.all_reduce(torch.ones(156250), async_op=True)
        b.wait()
        a.wait()
        return a.t_done_virtual, b.t_done_virtual, w.clock, w.exposed_comm_s

    for ta, tb, clock, exposed in _ranks(2, _five_second_link(), fn):
        assert (ta, tb) == (pytest.approx(5.0, rel=REL), pytest.approx(10.0, rel=REL))
        assert clock == pytest.approx(10.0, rel=REL) and exposed == pytest.approx(10.0, rel=REL)


def test_wrapper_slowdown_and_straggler_clocks_meet():
    P, seed = 3, 9
    cfg = _five_second_link(
        P, compute_slowdown={1: 4.0}, straggler_prob=1.0, straggler_delay_ms=50.0, seed=seed
    )
    # straggler delays from the model's straggler stream (domain 2, step 0), drawn here independently
    delay = []
    for r in range(P):
        g = _draw(seed, 2, 0, r, 0)
        g.random()
        delay.append(g.exponential(0.05))
    n = 3 * 100000  # ring P=3: c = 1e5 * 4 B, 4 steps of 4e5/125000 s
    T = 4 * (4e5 / 125000)

    def fn(w):
        w.advance(1.0)
        before = w.clock
        w.all_reduce(torch.ones(n))
        return before, w.clock, w.straggler_s

    res = _ranks(P, cfg, fn)
    for r, (before, _, strag) in enumerate(res):
        assert before == (4.0 if r == 1 else 1.0)  # straggler delay lands at the first op
        assert strag == delay[r]
    start = max(4.0 * (r == 1) + 1.0 * (r != 1) + delay[r] for r in range(P))
    for _, after, _ in res:
        assert after == pytest.approx(start + T, rel=REL)


def test_wrapper_same_times_on_every_rank_and_seed_reproducible():
    def fn(w):
        t = torch.arange(1000, dtype=torch.float32) * (w.rank + 1)
        w.all_reduce(t, "sum")
        w.all_gather_bytes(b"z" * (100 * w.rank))  # unequal -> auto picks direct
        w.broadcast(torch.ones(77), src=2)
        got = w.broadcast_bytes(b"hello" if w.rank == 1 else None, src=1)
        recs = [x for x in w.ledger.records if x.tag != "wan/clock"]
        return t, got, w.clock, [x.t_model_s for x in recs], w.ledger.totals()

    cfg = WanConfig.from_preset("home_transatlantic", 4, seed=1)
    runs = [
        _ranks(4, cfg, fn),
        _ranks(4, cfg, fn),
        _ranks(4, WanConfig.from_preset("home_transatlantic", 4, seed=2), fn),
    ]
    ref = torch.arange(1000, dtype=torch.float64) * 10  # sum over ranks of (r+1) * i
    for t, got, clock, times, totals in runs[0]:
        assert torch.equal(t.double(), ref) and got == b"hello"
        assert clock == runs[0][0][2] and times == runs[0][0][3]  # identical on every rank
        assert clock == pytest.approx(sum(times), rel=REL)  # blocking ops, no compute
        # clock sync costs control bytes only: 4 ops x ring all-reduce of one float64 (2*3*8 B)
        assert totals["control_sent"] == 4 * 48
    assert [r[2] for r in runs[1]] == [r[2] for r in runs[0]]  # same seed, same times
    assert runs[2][0][2] != runs[0][0][2]  # other seed, other jitter
    # jitter only adds: the run is never faster than the jitter-free closed forms
    alpha, B, up, down = _hom("home_transatlantic")
    floor = 6 * (alpha + 250 * 4 / B)  # ring all-reduce, c = 250 fp32
    assert runs[0][0][3][0] > floor


def test_wrapper_all_gather_into_tensor():
    P, nbytes = 3, 250_000  # 1 Mbit/s, zero latency: 2 ring steps of 250000 B -> exactly 4 s

    def fn(w):
        mine = torch.full((nbytes,), w.rank, dtype=torch.uint8)
        h = w.all_gather_into_tensor(mine, async_op=True, tag="payload")
        w.advance(1.0)
        rows = h.wait()
        return rows, w.clock, w.exposed_comm_s, h.record.t_model_s, h.record.sent

    for rows, clock, exposed, t_model, sent in _ranks(P, _five_second_link(P), fn):
        assert rows.shape == (P, nbytes)
        assert all(bool((rows[j] == j).all()) for j in range(P))
        assert t_model == pytest.approx(4.0, rel=REL) and clock == pytest.approx(4.0, rel=REL)
        assert exposed == pytest.approx(3.0, rel=REL) and sent == (P - 1) * nbytes


def test_wrapper_sleep_mode_wall_time():
    scale = 0.5
    cfg = WanConfig(nodes=[NodeLink(1.0, 1.0)] * 2, base_rtt_ms=0.0, mode="sleep", time_scale=scale)
    n = 2 * 9375  # c = 9375 * 4 = 37500 B per step, 2 steps at 125000 B/s -> T = 0.6 s
    T = 2 * 37500 / 125000

    def fn(w):
        t0 = time.perf_counter()
        w.all_reduce(torch.ones(n))
        return time.perf_counter() - t0

    for wall in _ranks(2, cfg, fn):
        # Sleep mode waits the scaled time T * scale = 0.3 s; the upper bound leaves a loaded CI
        # machine 0.2 s of scheduling slack and still fails an unscaled wait (T = 0.6 s).
        assert T * scale <= wall <= T * scale + 0.2


def test_wrapper_single_rank_and_measured_compute():
    cfg = WanConfig.from_preset("home_broadband", 1)

    def fn(w):
        w.all_reduce(torch.ones(10))
        zero = w.comm_s
        time.sleep(0.05)
        w.all_reduce(torch.ones(10))
        return zero, w.clock, w.compute_s

    zero, clock, compute = _ranks(1, cfg, fn, measure_compute=True)[0]
    assert zero == 0.0  # P = 1: local op, no modelled time
    assert clock >= 0.05 and compute >= 0.05  # the sleep counts as compute (lower bound only)


def test_wrapper_mark_step_and_validation():
    def fn(w):
        w.mark_step(3)
        w.all_reduce(torch.ones(4))
        with pytest.raises(ValueError, match=r"seconds must be in \[0, inf\), got -1"):
            w.advance(-1)
        return [x.step for x in w.ledger.records]

    for steps in _ranks(2, WanConfig.from_preset("datacenter", 2), fn):
        assert steps == [3, 3]  # clock sync record and the all-reduce
    from thinwire.collectives import Communicator, InprocCommunicator

    comms = InprocCommunicator.group(3)
    with pytest.raises(ValueError, match=r"config size must be in \[3, inf\)"):
        WanCommunicator(comms[0], WanConfig.from_preset("datacenter", 2))
    assert isinstance(
        WanCommunicator(comms[0], WanConfig.from_preset("datacenter", 3)), Communicator
    )
