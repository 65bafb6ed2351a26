"""The DiLoCo family on real gloo processes: averaging, outer step, consistency and bytes.

One spawned group per world size (2 and 3; 3 gives uneven ring chunks) runs every check, because
spawning costs seconds: rendezvous through a file in ``tmp_path``, gloo on loopback, one
:class:`~thinwire.collectives.TorchDistCommunicator` per rank, results saved to
``tmp_path/rank{r}.pt``. The parent then checks them against independent oracles:

(a) LocalSGD: θ_g after each sync equals the float64 mean of the workers' θ_i, recomputed here by
    replaying each worker's seeded inner steps in this process;
(b) DiLoCo (Nesterov): θ_g and the outer momentum after each sync equal a single-process
    simulation that averages the M pseudo-gradients by hand and steps ``torch.optim.SGD``;
(c) the consistency digest (θ_g and outer state) is equal on every rank after every sync, for
    every compressor, with and without error feedback;
(d) bytes per sync from the ledger equal the formulas of ``docs/design.md``, "Byte formulas" (ring
    fp32; all-gather of int8/int4 payloads with a wire size computed here from the envelope layout),
    framing < 1 % at 100k params;
(e) StreamingDiLoCo with overlap (async reductions) keeps digests equal, syncs the fragments in
    turn and moves only the served fragment's θ_g.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

U = 2.0**-24  # float32 unit roundoff
H_AVG, ROUNDS = 3, 3  # inner steps per round and rounds for (a) and (b)
SGD_INNER = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
ADAMW_INNER = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
OUTER_LR, OUTER_MU = 0.7, 0.9  # DiLoCo's outer defaults (arXiv:2311.08105v3)
COMPRESSORS = [
    (None, False),
    ("fp16", False),
    ("bf16", True),
    ("quant(int8, block=256)", False),
    ("quant(int4, block=128)", True),
    ("quant(fp4_e3m0)", True),
    ("quant(2)", True),
    ("quant(2)", False),
]
N_BYTES = 100_003  # >= 100k params for the framing check; prime, so no block or ring divides it
BYTE_CODECS = {None: None, "quant(int8, block=256)": (8, 256), "quant(int4, block=128)": (4, 128)}
#: A bucket frame's only overhead: its CRC32, keyed with the wire version, settings and shapes.
ENVELOPE = 4
STREAM_H, STREAM_P, STREAM_STEPS = 4, 2, 12


# ------------------------------------------------------------------ shared by workers and oracles
def _model() -> nn.Sequential:
    """Tanh MLP (163 params) drawn from a seeded generator, identical in every process."""
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model


def _inner_step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    """One inner step on worker ``rank``'s shard: batch drawn from seed (rank, step)."""
    g = torch.Generator().manual_seed(7919 * rank + step)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------- the worker
def _anchors(opt: Any, model: nn.Module) -> list[torch.Tensor]:
    return [opt.state[p]["anchor"].clone() for p in model.parameters()]


def _ledger_rows(comm: Any, start: int) -> list[dict[str, Any]]:
    return [
        dict(
            op=r.op,
            algorithm=r.algorithm,
            tag=r.tag,
            sent=r.sent,
            recv=r.recv,
            control=r.control_sent,
        )
        for r in comm.ledger.records[start:]
    ]


def _run_localsgd(comm: Any, rank: int) -> dict[str, Any]:
    from thinwire.optim import LocalSGD

    model = _model()
    opt = LocalSGD(model.parameters(), SGD_INNER, sync_every=H_AVG, comm=comm)
    syncs = []
    for s in range(1, H_AVG * ROUNDS + 1):
        _inner_step(model, opt, rank, s)
        if s % H_AVG == 0:
            syncs.append({"anchor": _anchors(opt, model), "local": _params(model)})
    return {"syncs": syncs}


def _run_diloco(comm: Any, rank: int) -> dict[str, Any]:
    from thinwire.optim import DiLoCo

    model = _model()
    opt = DiLoCo(
        model.parameters(),
        ADAMW_INNER,
        outer_lr=OUTER_LR,
        outer_momentum=OUTER_MU,
        sync_every=H_AVG,
        comm=comm,
    )
    syncs = []
    for s in range(1, H_AVG * ROUNDS + 1):
        _inner_step(model, opt, rank, s)
        if s % H_AVG == 0:
            bufs = [
                opt.outer.state[opt.state[p]["anchor"]]["momentum_buffer"].clone()
                for p in model.parameters()
            ]
            syncs.append(
                {"anchor": _anchors(opt, model), "buf": bufs, "digest": opt.consistency_digest()}
            )
    return {"syncs": syncs}


def _run_codecs(comm: Any, rank: int) -> list[dict[str, Any]]:
    from thinwire.optim import DiLoCo

    out = []
    for spec, ef in COMPRESSORS:
        model = _model()
        opt = DiLoCo(
            model.parameters(),
            ADAMW_INNER,
            sync_every=2,
            comm=comm,
            compressor=spec,
            error_feedback=ef,
        )
        digests, anchors = [opt.consistency_digest()], []
        for s in range(1, 7):
            _inner_step(model, opt, rank, s)
            if s % 2 == 0:
                digests.append(opt.consistency_digest())
                anchors.append(_anchors(opt, model))
        out.append({"digests": digests, "anchors": anchors, "local": _params(model)})
    return out


def _run_bytes(comm: Any, rank: int) -> dict[Any, list[dict[str, Any]]]:
    from thinwire.optim import DiLoCo

    out = {}
    for spec in BYTE_CODECS:
        w = nn.Parameter(torch.zeros(N_BYTES))
        target = torch.randn(N_BYTES, generator=torch.Generator().manual_seed(rank))
        opt = DiLoCo(
            [w],
            functools.partial(torch.optim.SGD, lr=0.1),
            sync_every=1,
            comm=comm,
            compressor=spec,
        )
        start = len(comm.ledger.records)
        for _ in range(2):  # two syncs
            opt.zero_grad()
            w.grad = w.detach() - target  # gradient of ½‖w − c_r‖²
            opt.step()
        out[spec] = _ledger_rows(comm, start)
    return out


def _run_streaming(comm: Any, rank: int) -> list[dict[str, Any]]:
    from thinwire.optim import StreamingDiLoCo

    out = []
    for spec, ef in ((None, False), ("quant(fp4_e3m0)", True)):
        model = _model()
        opt = StreamingDiLoCo(
            model.parameters(),
            ADAMW_INNER,
            sync_every=STREAM_H,
            fragments=STREAM_P,
            overlap_steps=1,
            mix_alpha=0.5,
            comm=comm,
            compressor=spec,
            error_feedback=ef,
        )
        start = len(comm.ledger.records)
        events = [
            {"anchor": _anchors(opt, model), "digest": opt.consistency_digest(), "fragment": None}
        ]
        for s in range(1, STREAM_STEPS + 1):
            _inner_step(model, opt, rank, s)
            if s % (STREAM_H // STREAM_P) == 0:
                events.append(
                    {
                        "anchor": _anchors(opt, model),
                        "digest": opt.consistency_digest(),
                        "fragment": opt.last_sync["fragment"],
                        "at": opt.last_sync["inner_step"],
                    }
                )
        out.append({"events": events, "ledger": _ledger_rows(comm, start)})
    return out


def _worker(rank: int, P: int, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    from thinwire.collectives import TorchDistCommunicator

    comm = TorchDistCommunicator(
        init_method=f"file://{tmp}/rdzv", rank=rank, world_size=P, timeout_s=60
    )
    out: dict[str, Any] = {}
    try:
        out["localsgd"] = _run_localsgd(comm, rank)
        out["diloco"] = _run_diloco(comm, rank)
        out["codecs"] = _run_codecs(comm, rank)
        out["bytes"] = _run_bytes(comm, rank)
        out["streaming"] = _run_streaming(comm, rank)
    finally:
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
        comm.close()
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------- the oracles
class _Replay:
    """Worker ``rank``'s inner optimizer, replayed in this process from a given θ_g each round."""

    def __init__(self, rank: int, inner: Any) -> None:
        self.rank = rank
        self.model = _model()
        self.opt = inner(
            self.model.parameters()
        )  # its state persists across rounds, as on a worker
        self.step = 0

    def round(self, start: list[torch.Tensor], H: int) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, v in zip(self.model.parameters(), start, strict=True):
                p.copy_(v)
        for _ in range(H):
            self.step += 1
            _inner_step(self.model, self.opt, self.rank, self.step)
        return _params(self.model)


def _check_localsgd(res: list[dict[str, Any]], P: int) -> None:
    replays = [_Replay(r, SGD_INNER) for r in range(P)]
    theta_g = _params(_model())
    for t in range(ROUNDS):
        locals_ = [rep.round(theta_g, H_AVG) for rep in replays]
        got = res[0]["localsgd"]["syncs"][t]["anchor"]
        for r in range(P):  # θ_g and θ_i bitwise identical on every rank after the sync
            sync = res[r]["localsgd"]["syncs"][t]
            assert all(torch.equal(a, b) for a, b in zip(sync["anchor"], got, strict=True))
            assert all(torch.equal(a, b) for a, b in zip(sync["local"], got, strict=True))
        for i, g_new in enumerate(got):
            g_old = theta_g[i].double()
            deltas = [g_old - loc[i].double() for loc in locals_]
            mean64 = sum(loc[i].double() for loc in locals_) / P
            dbar = sum(deltas) / P
            # fl(θ_g − Δ_i): u|Δ_i|; fp32 ring sum + divide: (M−1)u Σ|Δ_i| + u|Δ̄|; θ_g − Δ̄: u|θ'|.
            # Doubled for second-order terms.
            tol = 2 * U * (P * sum(d.abs() for d in deltas) + dbar.abs() + mean64.abs())
            err = (g_new.double() - mean64).abs()
            assert bool((err <= tol).all()), (t, i, float((err - tol).max()))
        theta_g = got  # next round starts from the synced θ_g, as on the workers


def _check_diloco(res: list[dict[str, Any]], P: int) -> None:
    replays = [_Replay(r, ADAMW_INNER) for r in range(P)]
    theta_g = _params(_model())
    bufs: list[torch.Tensor] | None = None
    for t in range(ROUNDS):
        locals_ = [rep.round(theta_g, H_AVG) for rep in replays]
        rep0 = res[0]["diloco"]["syncs"][t]
        for r in range(P):
            sync = res[r]["diloco"]["syncs"][t]
            assert all(
                torch.equal(a, b) for a, b in zip(sync["anchor"], rep0["anchor"], strict=True)
            )
            assert all(torch.equal(a, b) for a, b in zip(sync["buf"], rep0["buf"], strict=True))
            assert sync["digest"] == rep0["digest"]
        # Single-process simulation: Δ̄ by hand (float64), then torch.optim.SGD on a clone.
        clones = [v.clone().requires_grad_(True) for v in theta_g]
        sgd = torch.optim.SGD(clones, lr=OUTER_LR, momentum=OUTER_MU, nesterov=True)
        delta_err = []
        for i, c in enumerate(clones):
            deltas = [theta_g[i].double() - loc[i].double() for loc in locals_]
            dbar = sum(deltas) / P
            c.grad = dbar.float()
            if bufs is not None:
                sgd.state[c]["momentum_buffer"] = bufs[i].clone()
            # |Δ̄_worker − Δ̄_sim| ≤ u Σ|Δ_i| (fl of each Δ_i, ring sum) + u|Δ̄| (divide) + u|Δ̄| (cast).
            delta_err.append(2 * U * (P * sum(d.abs() for d in deltas) + 2 * dbar.abs()))
        sgd.step()
        for i, c in enumerate(clones):
            b_new = sgd.state[c]["momentum_buffer"].double()
            g_new = c.detach().double()
            d_dir = c.grad.double() + OUTER_MU * b_new
            # A grad error δ moves b by δ and θ by lr(1+μ)δ; each fp32 op adds u·|its result|.
            tol_b = delta_err[i] + 4 * U * b_new.abs()
            tol_g = OUTER_LR * (1 + OUTER_MU) * delta_err[i] + 4 * U * (
                g_new.abs() + OUTER_LR * d_dir.abs()
            )
            assert bool(((rep0["buf"][i].double() - b_new).abs() <= tol_b).all()), (t, i)
            assert bool(((rep0["anchor"][i].double() - g_new).abs() <= tol_g).all()), (t, i)
        theta_g, bufs = rep0["anchor"], rep0["buf"]
    # The outer step really is Nesterov with DiLoCo's defaults: on round 1 θ_g moved by
    # −lr(1+μ)Δ̄ = −1.33·Δ̄ (Nesterov as torch.optim.SGD), not by the plain average −Δ̄.
    assert not torch.equal(res[0]["diloco"]["syncs"][0]["anchor"][0], _params(_model())[0])


def _full_trajectory_m2(res: list[dict[str, Any]]) -> None:
    """M = 2: fp32 sums of two terms commute, so a plain fp32 simulation matches bit for bit."""
    replays = [_Replay(r, ADAMW_INNER) for r in range(2)]
    clones = [v.clone().requires_grad_(True) for v in _params(_model())]
    sgd = torch.optim.SGD(clones, lr=OUTER_LR, momentum=OUTER_MU, nesterov=True)
    for t in range(ROUNDS):
        start = [c.detach().clone() for c in clones]
        locals_ = [rep.round(start, H_AVG) for rep in replays]
        for i, c in enumerate(clones):
            c.grad = ((start[i] - locals_[0][i]) + (start[i] - locals_[1][i])).div_(2)
        sgd.step()
        got = res[0]["diloco"]["syncs"][t]["anchor"]
        assert all(torch.equal(a, c.detach()) for a, c in zip(got, clones, strict=True)), t


def _check_codecs(res: list[dict[str, Any]], P: int) -> None:
    init = _params(_model())
    for k, (spec, ef) in enumerate(COMPRESSORS):
        runs = [res[r]["codecs"][k] for r in range(P)]
        for r in range(1, P):  # identical θ_g and outer state everywhere
            assert runs[r]["digests"] == runs[0]["digests"], (spec, ef, r)
            for a_sync, b_sync in zip(runs[r]["anchors"], runs[0]["anchors"], strict=True):
                assert all(torch.equal(a, b) for a, b in zip(a_sync, b_sync, strict=True))
            assert all(
                torch.equal(a, b) for a, b in zip(runs[r]["local"], runs[0]["local"], strict=True)
            )
        # Every sync changed the state (a digest that never moves proves nothing).
        assert len(set(runs[0]["digests"])) == len(runs[0]["digests"]), (spec, ef)
        assert not torch.equal(runs[0]["anchors"][0][0], init[0])


def _wire_bytes(spec: str, n: int) -> int:
    """One bucket frame: the envelope, packed codes ceil(n·bits/8), one float32 scale per block."""
    bits, block = BYTE_CODECS[spec]
    return ENVELOPE + math.ceil(n * bits / 8) + 4 * math.ceil(n / block)


def _check_bytes(res: list[dict[str, Any]], P: int) -> None:
    for spec in BYTE_CODECS:
        for r in range(P):
            rows = res[r]["bytes"][spec]
            assert len(rows) == 2, rows  # one collective per sync: one bucket (fragment, group)
            for row in rows:
                assert row["tag"] == "diloco/sync/f0/g0" and row["control"] == 0
                if spec is None:
                    want = 2 * (P - 1) * math.ceil(N_BYTES / P) * 4  # ring all-reduce of float32
                    assert (row["op"], row["algorithm"]) == ("all_reduce", "ring")
                    assert row["sent"] == row["recv"] == want
                    spec3 = 2 * (P - 1) / P * N_BYTES * 4
                else:
                    bits, block = BYTE_CODECS[spec]
                    wire = _wire_bytes(spec, N_BYTES)
                    assert (row["op"], row["algorithm"]) == ("all_gather_into_tensor", "ring")
                    assert row["sent"] == row["recv"] == (P - 1) * wire
                    body = math.ceil(N_BYTES * bits / 8) + 4 * math.ceil(N_BYTES / block)
                    framing = wire - body  # the envelope; equal frames need no length exchange
                    assert framing / body < 0.01
                    spec3 = (P - 1) * N_BYTES * (bits + 32 / block) / 8  # all-gather, blocked codec
                assert abs(row["sent"] - spec3) / spec3 < 0.01


def _check_streaming(res: list[dict[str, Any]], P: int) -> None:
    model = _model()
    params = list(model.parameters())
    frags = [list(range(f, len(params), STREAM_P)) for f in range(STREAM_P)]  # strided pattern
    K = STREAM_H // STREAM_P
    for v, spec in enumerate((None, "quant(fp4_e3m0)")):
        runs = [res[r]["streaming"][v] for r in range(P)]
        events = runs[0]["events"]
        assert len(events) == STREAM_STEPS // K + 1
        for r in range(1, P):
            assert [e["digest"] for e in runs[r]["events"]] == [e["digest"] for e in events], (
                spec,
                r,
            )
        for j in range(1, len(events)):
            f = (j - 1) % STREAM_P  # event j−1 serves fragment (j−1) mod P, completing at step jK
            assert (events[j]["fragment"], events[j]["at"]) == (f, j * K)
            before, after = events[j - 1]["anchor"], events[j]["anchor"]
            for i in range(len(params)):
                moved = not torch.equal(before[i], after[i])
                assert moved == (i in frags[f]), (spec, j, i)
        # One reduction per event; bytes for that fragment's size (N = the fragment's elements).
        rows = runs[0]["ledger"]
        assert len(rows) == len(events) - 1
        for j, row in enumerate(rows):
            n = sum(params[i].numel() for i in frags[j % STREAM_P])
            assert row["tag"] == f"streaming/sync/f{j % STREAM_P}/g0"
            if spec is None:
                assert row["sent"] == 2 * (P - 1) * math.ceil(n / P) * 4
            else:
                # FP4 E3M0: 4-bit codes, one float32 scale per 128 values (its default block).
                wire = ENVELOPE + math.ceil(n * 4 / 8) + 4 * math.ceil(n / 128)
                assert row["sent"] == (P - 1) * wire


@pytest.mark.timeout(240)
@pytest.mark.parametrize("P", [2, 3])
def test_diloco_family_on_gloo(P, tmp_path):
    mp.spawn(_worker, args=(P, str(tmp_path)), nprocs=P, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(P)]
    _check_localsgd(res, P)
    _check_diloco(res, P)
    if P == 2:
        _full_trajectory_m2(res)
    _check_codecs(res, P)
    _check_bytes(res, P)
    _check_streaming(res, P)
