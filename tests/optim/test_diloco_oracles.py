"""DiLoCo family (arXiv:2311.08105v3, Alg. 1) against independent oracles (single process + inproc).

Oracles: the bare inner optimizer, float64 model averaging with plain ``torch.optim.SGD`` workers,
``torch.optim.SGD(nesterov=True)`` on a clone, the closed form of quadratic losses, the first-round
overshoot, consistency and float64 reduction of decoded payloads, error-feedback conservation,
non-finite handling, the Streaming schedule and merge (arXiv:2501.18512v1 §2) and ledger bytes
against the formulas of ``docs/design.md``, "Byte formulas". Multi-worker cases run on
:class:`InprocCommunicator` groups of 2 and 3 (threads: models are built once and deep-copied per
rank; data come from per-rank ``torch.Generator`` seeds). Observation uses public torch hooks:
``opt.inner``'s step post-hook sees θ_i right before a sync, ``opt.outer``'s step pre-hook sees Δ̄.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import pytest
import torch
from _optim_db import (
    F32,
    F64,
    U32,
    U64,
    RecordingComm,
    anchors,
    batches,
    capture,
    flat,
    frame_values,
    loss_fn,
    run_ranks,
    step,
    tiny_model,
)
from torch import nn

from thinwire.collectives import InprocCommunicator
from thinwire.compression import build_codec
from thinwire.optim import DiLoCo, LocalSGD, StreamingDiLoCo

__all__: list[str] = []

SGD = torch.optim.SGD
INNER_SGD = partial(SGD, lr=0.1)


def run_workers(
    M: int,
    make: Any,
    *,
    H: int,
    R: int = 1,
    dtype: torch.dtype = F32,
    base: nn.Module | None = None,
    grad_hook: Any = None,
) -> list[dict[str, Any]]:
    """Train ``M`` inproc workers (0: no communicator) for ``R`` rounds of ``H`` steps.

    ``make(params, comm)`` builds the optimizer; ``grad_hook(model, rank, i)`` may edit grads
    before step ``i``. Per rank: the :func:`capture` record plus, after each sync, θ_g
    (``after``), outer momentum buffers (``bufs``), ``consistency_digest`` and ``last_sync``;
    and at the end the params, residuals and the payloads this rank all-gathered.
    """
    base = tiny_model(dtype=dtype) if base is None else base

    def rank(comm: Any, r: int) -> dict[str, Any]:
        model = copy.deepcopy(base)
        opt = make(model.parameters(), comm)
        rec = capture(opt)
        for key in ("after", "bufs", "digest", "last"):
            rec[key] = []
        for i, b in enumerate(batches(H * R, seed=r, dtype=dtype)):
            opt.zero_grad()
            loss_fn(model, b).backward()
            if grad_hook is not None:
                grad_hook(model, r, i)
            opt.step()
            if (i + 1) % H == 0:
                rec["after"].append(anchors(opt))
                st = [opt.outer.state.get(a, {}) for a in anchors(opt, live=True)]
                rec["bufs"].append([x["momentum_buffer"].clone() for x in st if x])
                rec["digest"].append(opt.consistency_digest())
                rec["last"].append(dict(opt.last_sync))
        rec["params"] = [p.detach().clone() for p in model.parameters()]
        rec["residual"] = [opt.state[p].get("residual") for p in model.parameters()]
        rec["payloads"] = list(getattr(comm, "payloads", []))
        return rec

    return run_ranks(M, rank, comm_cls=RecordingComm)


def unit_outer(wrapper: str, inner: Any, H: int) -> Any:
    """LocalSGD, or DiLoCo with outer lr 1 and momentum 0 (the same thing)."""
    if wrapper == "LocalSGD":
        return lambda ps, comm: LocalSGD(ps, inner, sync_every=H, comm=comm)
    return lambda ps, comm: DiLoCo(
        ps, inner, outer_lr=1.0, outer_momentum=0.0, sync_every=H, comm=comm
    )


def nesterov_reference(theta_g: list[torch.Tensor], dbars: list[list[torch.Tensor]]) -> Any:
    """``torch.optim.SGD(nesterov=True)`` with DiLoCo's defaults stepped on clones of θ_g."""
    clones = [t.detach().clone() for t in theta_g]
    ref = SGD(clones, lr=0.7, momentum=0.9, nesterov=True)
    out = []
    for dbar in dbars:
        for c, d in zip(clones, dbar, strict=True):
            c.grad = d
        ref.step()
        out.append(
            ([c.clone() for c in clones], [ref.state[c]["momentum_buffer"].clone() for c in clones])
        )
    return out


# ------------------------------------------------------------------ inner-optimizer identity
INNERS = {
    "sgd": partial(SGD, lr=0.05),
    "sgd_momentum": partial(SGD, lr=0.05, momentum=0.9),
    "sgd_nesterov": partial(SGD, lr=0.05, momentum=0.9, nesterov=True),
    "adamw": partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.01),
}


@pytest.mark.parametrize("H,comm", [(1, "inproc1"), (3, None)])
@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("wrapper", ["DiLoCo", "LocalSGD"])
def test_one_worker_unit_outer_step_is_the_bare_inner_optimizer(
    wrapper: str, inner: str, H: int, comm: Any
) -> None:
    model = tiny_model(dtype=F64)
    ref_model = copy.deepcopy(model)
    opt = unit_outer(wrapper, INNERS[inner], H)(
        model.parameters(), InprocCommunicator.group(1)[0] if comm else None
    )
    ref = INNERS[inner](ref_model.parameters())
    for i, b in enumerate(batches(12, seed=0, dtype=F64)):
        step(opt, model, b)
        step(ref, ref_model, b)
        # A sync maps θ_i to fl(θ_g − fl(θ_g − θ_i)): exact when θ_g, θ_i are within 2x (Sterbenz),
        # else ≤ 2 ulps of max|θ|; later inner steps carry it on, so allow 4 ulps per sync so far.
        for x, y in zip(model.parameters(), ref_model.parameters(), strict=True):
            tol = 4 * ((i + 1) // H) * 2 * U64 * float(y.detach().abs().max())
            assert float((x - y).detach().abs().max()) <= tol, (i, tol)


# ------------------------------------------------------------------ model averaging
@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("wrapper", ["LocalSGD", "DiLoCo"])
def test_unit_outer_step_is_float64_model_averaging(wrapper: str, M: int) -> None:
    H, R = 3, 3
    base = tiny_model(dtype=F64)
    res = run_workers(M, unit_outer(wrapper, INNER_SGD, H), H=H, R=R, dtype=F64, base=base)
    # Independent oracle: M plain float64 SGD workers, averaged by hand every H steps.
    workers = [copy.deepcopy(base) for _ in range(M)]
    sgds = [INNER_SGD(w.parameters()) for w in workers]
    data = [batches(H * R, seed=r, dtype=F64) for r in range(M)]
    for t in range(R):
        s = (t + 1) * H - 1
        for r in range(M):
            for i in range(t * H, s + 1):
                step(sgds[r], workers[r], data[r][i])
        local = [[p.detach().clone() for p in w.parameters()] for w in workers]
        mean = [sum(ps[j] for ps in local) / M for j in range(4)]
        # The run's own θ_i right before the sync, averaged in float64.
        direct = [sum(res[q]["theta"][s][j] for q in range(M)) / M for j in range(4)]
        for r in range(M):
            for j in range(4):
                scale = float(mean[j].abs().max())
                # θ_i: the same float64 ops from the same θ_g, up to θ_g's rounding so far.
                drift = 64 * (t + 1) * U64 * scale
                assert torch.allclose(res[r]["theta"][s][j], local[r][j], rtol=0, atol=drift)
                # θ_g: ring sum in rank order, /M, θ_g − Δ̄: M + 2 roundings; bitwise on all ranks.
                got = res[r]["after"][t][j]
                assert torch.allclose(got, direct[j], rtol=0, atol=(M + 4) * U64 * scale)
                assert torch.allclose(got, mean[j], rtol=0, atol=drift)
                assert torch.equal(got, res[0]["after"][t][j])
        with torch.no_grad():
            for w in workers:
                for p, m in zip(w.parameters(), mean, strict=True):
                    p.copy_(m)


# ------------------------------------------------------------------ outer step, first-round overshoot
def diloco(**kw: Any) -> Any:
    return lambda ps, comm: DiLoCo(ps, INNER_SGD, comm=comm, **kw)


@pytest.mark.parametrize("M", [0, 2, 3])
def test_outer_step_is_torch_sgd_nesterov_on_a_clone(M: int) -> None:
    H, R = 2, 3
    base = tiny_model()
    res = run_workers(M, diloco(sync_every=H), H=H, R=R, base=base)
    n = max(M, 1)
    dbars = []
    for t in range(R):
        s = (t + 1) * H - 1
        # Δ̄ by hand: Δ_i = θ_g − θ_i in float32, summed in rank order, then divided.
        deltas = [
            [a - th for a, th in zip(res[r]["anchor"][s], res[r]["theta"][s], strict=True)]
            for r in range(n)
        ]
        dbar = [d.clone() for d in deltas[0]]
        for d in deltas[1:]:  # rank order: ((Δ_0 + Δ_1) + Δ_2)
            dbar = [x + y for x, y in zip(dbar, d, strict=True)]
        dbar = [d / M for d in dbar] if M else dbar  # no communicator: Δ̄ = Δ, no divide
        for r in range(n):
            assert all(torch.equal(res[r]["dbar"][t][j], dbar[j]) for j in range(4))
        dbars.append(dbar)
    for t, (theta_g, bufs) in enumerate(nesterov_reference(list(base.parameters()), dbars)):
        for r in range(n):
            assert all(torch.equal(x, y) for x, y in zip(res[r]["after"][t], theta_g, strict=True))
            assert all(torch.equal(x, y) for x, y in zip(res[r]["bufs"][t], bufs, strict=True))


def test_first_round_overshoots_the_average_by_a_third() -> None:
    H = 3
    res = run_workers(2, diloco(sync_every=H), H=H)
    for j in range(4):
        g0 = res[0]["anchor"][H - 1][j].to(F64)
        mean_local = sum(res[r]["theta"][H - 1][j].to(F64) for r in range(2)) / 2
        dbar = g0 - mean_local
        g1 = res[0]["after"][0][j].to(F64)
        # Δ_i, the mean, Δ̄ + μb, γ·d and θ_g − γd each round once in float32.
        tol = 4 * U32 * (g0.abs() + 2 * dbar.abs()) + 1e-30
        assert bool(((g1 - g0) + 0.7 * 1.9 * dbar).abs().le(tol).all())
        tol = tol + 2 * U32 * mean_local.abs()
        assert bool(((g1 - mean_local) + 0.33 * dbar).abs().le(tol).all())


#: Shapes of :func:`tiny_model`'s parameters: one param group, so one bucket per sync.
SHAPES = [tuple(p.shape) for p in tiny_model().parameters()]


# ------------------------------------------------------------------ closed form
@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("M", [0, 2, 3])
def test_quadratic_losses_follow_the_closed_form(M: int, dtype: torch.dtype) -> None:
    n, eta, H, R, lr, mu = 6, 0.1, 4, 4, 0.7, 0.9
    g = torch.Generator().manual_seed(7)
    theta0 = torch.randn(n, generator=g, dtype=F64).to(dtype)
    c = (2 * torch.randn(max(M, 1), n, generator=g, dtype=F64)).to(dtype)

    def rank(comm: Any, r: int) -> Any:
        theta = nn.Parameter(theta0.clone())
        opt = DiLoCo([theta], partial(SGD, lr=eta), sync_every=H, comm=comm)
        out = []
        for i in range(H * R):
            opt.zero_grad()
            (0.5 * ((theta - c[r]) ** 2).sum()).backward()
            opt.step()
            if (i + 1) % H == 0:
                out.append(opt.state[theta]["anchor"].to(F64, copy=True))
        return out

    res = run_ranks(M, rank)
    # θ_i = c_i + (1−η)^H (θ_g − c_i) ⇒ Δ̄ = (1 − (1−η)^H)(θ_g − c̄); Nesterov outer step.
    cbar = c.to(F64).mean(0)
    shrink = 1 - (1 - eta) ** H
    tg, b = theta0.to(F64), None
    u = U64 if dtype == F64 else U32
    for t in range(R):
        d = shrink * (tg - cbar)
        b = d if b is None else mu * b + d
        tg = tg - lr * (d + mu * b)
        # Each round: 3 roundings per inner step, M + 1 in the mean, 4 in the outer step; earlier
        # errors are scaled by at most 1 + γ(1+μ)(1+μ) < 4 per round.
        tol = 4 ** (t + 1) * (3 * H + M + 5) * u * float(max(tg.abs().max(), cbar.abs().max()))
        for r in range(max(M, 1)):
            assert float((res[r][t] - tg).abs().max()) <= tol, (t, r)


# ------------------------------------------------------------------ consistency, reduction
COMPRESSORS = [None, "fp16", "bf16", "quant(int8, block=16)", "quant(int4, block=16)",
               "quant(fp4_e3m0, block=16)", "quant(2)"]  # fmt: skip


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("ef", [False, True], ids=["noef", "ef"])
@pytest.mark.parametrize("compressor", COMPRESSORS, ids=str)
def test_consistency_and_float64_mean_of_decoded_payloads(
    compressor: Any, ef: bool, M: int
) -> None:
    H, R = 2, 3
    make = diloco(sync_every=H, compressor=compressor, error_feedback=ef)
    res = run_workers(M, make, H=H, R=R)
    assert all(rec["digest"] == res[0]["digest"] for rec in res)
    assert len(set(res[0]["digest"])) == R  # the digest follows θ_g
    codec = build_codec(compressor) if compressor else None
    for t in range(R):
        s = (t + 1) * H - 1
        dbar = flat(res[0]["dbar"][t])
        assert all(torch.equal(flat(rec["dbar"][t]), dbar) for rec in res)
        if codec is None:
            sent = [flat(rec["anchor"][s]) - flat(rec["theta"][s]) for rec in res]
        else:
            assert all(len(rec["payloads"]) == R for rec in res)  # one payload per sync
            sent = [frame_values(codec, rec["payloads"][t], SHAPES).to(F64) for rec in res]
        # float32 fold of M terms then a divide: ≤ (M + 1) roundings of the largest term.
        tol = (M + 1) * U32 * max(float(x.abs().max()) for x in sent)
        assert float((dbar - sum(sent) / M).abs().max()) <= tol


# ------------------------------------------------------------------ error feedback
@pytest.mark.parametrize("decay", [1.0, 0.5])
@pytest.mark.parametrize(
    "compressor", ["quant(int4, block=16)", "quant(2)", "quant(fp4_e3m0, block=16)"]
)
def test_error_feedback_conserves_what_was_not_sent(compressor: str, decay: float) -> None:
    H, R = 2, 4
    make = diloco(sync_every=H, compressor=compressor, error_feedback=True, ef_decay=decay)
    codec = build_codec(compressor)
    for rec in run_workers(2, make, H=H, R=R, dtype=F64):
        res_t = torch.zeros_like(flat(rec["params"]))
        sum_sent, sum_delta, peak = torch.zeros_like(res_t), torch.zeros_like(res_t), 0.0
        for t in range(R):
            s = (t + 1) * H - 1
            delta = flat(rec["anchor"][s]) - flat(rec["theta"][s])  # float64 model: exact Δ
            sent = frame_values(codec, rec["payloads"][t], SHAPES).to(F64)  # what peers decoded
            peak = max(peak, float((decay * res_t + delta).abs().max()))
            res_t = decay * res_t + delta - sent
            sum_sent += sent
            sum_delta += delta
        got = flat(rec["residual"])
        # float64 bookkeeping on both sides: 2 roundings per sync of the sent vector.
        tol = 4 * R * U64 * peak
        assert float((got - res_t).abs().max()) <= tol
        if decay == 1.0:
            assert float((sum_sent + got - sum_delta).abs().max()) <= tol
        assert float(got.abs().max()) > 0  # the codecs are lossy here: something was held back


# ------------------------------------------------------------------ non-finite pseudo-gradients
def test_nan_raises_naming_group_param_and_step_before_sending() -> None:
    H = 3

    def rank(comm: Any, r: int) -> Any:
        model = tiny_model()
        ps = list(model.parameters())
        opt = DiLoCo([{"params": ps[:2]}, {"params": ps[2:]}], INNER_SGD, sync_every=H, comm=comm)
        data = batches(2 * H, seed=r)
        for b in data[: 2 * H - 1]:
            step(opt, model, b)
        syncs = lambda: [x for x in comm.ledger.records if "/init" not in x.tag]  # noqa: E731
        n_before = len(syncs())
        opt.zero_grad()
        loss_fn(model, data[-1]).backward()
        ps[2].grad[0, 1] = float("nan")
        with pytest.raises(
            FloatingPointError, match=r"group 1, param 0 is non-finite at inner step 6"
        ):
            opt.step()
        return n_before, len(syncs())

    # Both ranks hit the NaN (a lone raising rank would leave its partner waiting); with P = 1
    # nothing is ever sent, so P = 2 is the smallest group where "nothing sent" can fail.
    for n_before, n_after in run_ranks(2, rank):
        assert n_before == 2  # one collective per (fragment, group) bucket at the first sync
        assert n_after == n_before  # nothing was sent for the failed sync


@pytest.mark.parametrize("compressor", [None, "quant(int8, block=16)"], ids=str)
def test_skip_gives_the_bad_worker_weight_zero(compressor: Any) -> None:
    H = 3
    base = tiny_model()

    def poison(model: nn.Module, r: int, i: int) -> None:
        if r == 1 and i == H - 1:
            model.fc1.weight.grad[0, 0] = float("inf")

    make = diloco(sync_every=H, compressor=compressor, on_nonfinite="skip")
    good, bad = run_workers(2, make, H=H, base=base, grad_hook=poison)
    delta = [a - th for a, th in zip(good["anchor"][H - 1], good["theta"][H - 1], strict=True)]
    if compressor is not None:  # what the good worker transmitted
        dec = frame_values(build_codec(compressor), good["payloads"][0], SHAPES)
        delta = [
            d.reshape(x.shape)
            for d, x in zip(dec.split([x.numel() for x in delta]), delta, strict=True)
        ]
    for rec in (good, bad):  # Δ̄ = the good worker's Δ, weight 1 of 1
        assert all(torch.equal(d, x) for d, x in zip(rec["dbar"][0], delta, strict=True))
    [(theta_g, _)] = nesterov_reference(list(base.parameters()), [delta])
    for rec in (good, bad):  # both hold the new θ_g, as global copy and as model
        assert all(torch.equal(x, y) for x, y in zip(rec["after"][0], theta_g, strict=True))
        assert all(torch.equal(x, y) for x, y in zip(rec["params"], theta_g, strict=True))
    assert (good["last"][0]["contributed"], bad["last"][0]["contributed"]) == (True, False)
    assert good["last"][0]["weight"] == bad["last"][0]["weight"] == 1.0


# ------------------------------------------------------------------ params without grad, groups
def test_param_without_grad_on_one_worker_is_averaged_with_a_zero_delta() -> None:
    H = 2
    base = tiny_model(extra=True)
    j = [n for n, _ in base.named_parameters()].index("unused")

    def pull(model: nn.Module, r: int, i: int) -> None:
        assert model.unused.grad is None  # no loss touches it
        if r == 0:
            model.unused.grad = 2 * (model.unused.detach() - 1.0)

    res = run_workers(2, diloco(sync_every=H), H=H, base=base, grad_hook=pull)
    assert torch.equal(res[1]["theta"][H - 1][j], base.unused)  # skipped by rank 1's inner steps
    dbar = (base.unused.detach() - res[0]["theta"][H - 1][j]) / 2  # rank 1 contributes Δ = 0
    [(theta_g, _)] = nesterov_reference([base.unused], [[dbar]])
    for rec in res:
        assert torch.equal(rec["params"][j], theta_g[0])


def _int4_roundtrip(v: torch.Tensor, block: int) -> torch.Tensor:
    """Absmax int4 (scale = amax/7, round half to even) written from the quant.py docstring."""
    n = v.numel()
    pad = torch.cat([v, v.new_zeros(-n % block)]).reshape(-1, block)
    scale = pad.abs().amax(1, keepdim=True) / 7
    q = torch.round(pad / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(-7, 7)
    return (q * scale).reshape(-1)[:n]


def test_groups_with_own_compressor_and_outer_lr_against_a_float64_recursion() -> None:
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    ps = list(model.parameters())
    settings = [(0.5, 0.9, None), (0.9, 0.5, 8)]  # (outer_lr, outer_momentum, int4 block)
    groups = [
        {"params": ps[:2], "outer_lr": 0.5, "compressor": None},
        {
            "params": ps[2:],
            "outer_lr": 0.9,
            "outer_momentum": 0.5,
            "compressor": "quant(int4, block=8)",
        },
    ]
    opt = DiLoCo(groups, partial(SGD, lr=0.1), sync_every=2)
    ref = SGD(ref_model.parameters(), lr=0.1)
    tg = [p.detach().to(F64) for p in ps]
    bufs: list[Any] = [None, None]
    data = batches(6, seed=5)
    for t in range(3):
        for b in data[2 * t : 2 * t + 2]:
            step(opt, model, b)
            step(ref, ref_model, b)
        local = [p.detach() for p in ref_model.parameters()]
        for gi, (lr, mu, block) in enumerate(settings):
            idx = [0, 1] if gi == 0 else [2, 3]
            d = torch.cat([(tg[j].to(F32) - local[j]).reshape(-1) for j in idx])
            if block:
                d = _int4_roundtrip(d, block)
            d = d.to(F64)
            bufs[gi] = d if bufs[gi] is None else mu * bufs[gi] + d
            step_ = lr * (d + mu * bufs[gi])
            off = 0
            for j in idx:
                n = tg[j].numel()
                tg[j] = tg[j] - step_[off : off + n].reshape(tg[j].shape)
                off += n
        for j, p in enumerate(ps):
            a = opt.state[p]["anchor"]
            # float32 outer arithmetic vs float64: a few roundings of |θ_g| + |γ(1+μ)Δ|.
            assert torch.allclose(
                a.to(F64), tg[j], rtol=0, atol=8 * U32 * float(tg[j].abs().max() + 1)
            )
            assert torch.equal(p, a)
        with torch.no_grad():  # the reference worker restarts from thinwire's θ_g
            for q, p in zip(ref_model.parameters(), ps, strict=True):
                q.copy_(p)


# ------------------------------------------------------------------ Streaming DiLoCo
@pytest.mark.parametrize("tau", [0, 1])
def test_streaming_schedule_p2_h4(tau: int) -> None:
    model = tiny_model()
    opt = StreamingDiLoCo(
        model.parameters(), partial(SGD, lr=0.1), sync_every=4, fragments=2, overlap_steps=tau
    )
    rec = capture(opt)
    seen = []
    for b in batches(12, seed=0):
        step(opt, model, b)
        seen.append(
            (opt.outer_step, opt.last_sync.get("fragment"), opt.last_sync.get("inner_step"))
        )
    # K = H/P = 2: event j completes after step 2(j+1) and serves fragment j mod 2, whatever τ.
    expected = [(0, None, None), (1, 0, 2), (1, 0, 2), (2, 1, 4), (2, 1, 4), (3, 0, 6),
                (3, 0, 6), (4, 1, 8), (4, 1, 8), (5, 0, 10), (5, 0, 10), (6, 1, 12)]  # fmt: skip
    assert seen == expected
    # Δ̄ (one worker: Δ̄ = Δ) was measured after step s − τ, not after the completing step s.
    members = [[0, 2], [1, 3]]  # strided: param i goes to fragment i mod 2
    for j in range(6):
        s = 2 * (j + 1)
        for i in members[j % 2]:
            launch = rec["anchor"][s - tau - 1][i] - rec["theta"][s - tau - 1][i]
            assert torch.equal(rec["dbar"][j][i], launch)
            if tau:
                assert not torch.equal(
                    rec["dbar"][j][i], rec["anchor"][s - 1][i] - rec["theta"][s - 1][i]
                )
        assert all(rec["dbar"][j][i] is None for i in members[1 - j % 2])


@pytest.mark.parametrize(
    "kw,first",
    [
        ({"fragment_pattern": "strided"}, {0, 2}),  # fc1.weight, fc2.weight
        ({"fragment_pattern": "sequential"}, {0, 1}),  # fc1.weight, fc1.bias
        ("explicit", {0, 3}),
    ],
    ids=["strided", "sequential", "explicit"],
)
def test_streaming_fragment_assignment(kw: Any, first: set[int]) -> None:
    model = tiny_model()
    ps = list(model.parameters())
    if kw == "explicit":
        kw = {"fragments": [[ps[0], ps[3]], [ps[1], ps[2]]]}
    kw = {"fragments": 2, **kw}
    opt = StreamingDiLoCo(ps, partial(SGD, lr=0.1), sync_every=4, overlap_steps=0, **kw)
    init = anchors(opt)
    data = batches(4, seed=1)
    for b in data[:2]:
        step(opt, model, b)
    changed = {i for i, a in enumerate(anchors(opt)) if not torch.equal(a, init[i])}
    assert changed == first  # event 0 synced fragment 0 only
    for b in data[2:]:
        step(opt, model, b)
    assert all(not torch.equal(a, init[i]) for i, a in enumerate(anchors(opt)))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau", [0, 1])
def test_streaming_merge_by_hand(tau: int, alpha: float) -> None:
    model = tiny_model(dtype=F64)
    ps = list(model.parameters())
    opt = StreamingDiLoCo(ps, partial(SGD, lr=0.1), sync_every=4, fragments=2, overlap_steps=tau,
                          mix_alpha=alpha, outer_lr=0.5, outer_momentum=0.0)  # fmt: skip
    rec = capture(opt)
    for b in batches(2, seed=2, dtype=F64):
        step(opt, model, b)
    # Event 0 (fragment 0 = params 0 and 2) completes after step 2; Δ measured after step 2 − τ.
    for i in range(4):
        g0, local = rec["anchor"][0][i], rec["theta"][1][i]
        if i in (0, 2):
            new_g = g0 - 0.5 * (g0 - rec["theta"][1 - tau][i])  # outer SGD, lr 0.5, μ 0
            merged = (1 - alpha) * new_g + alpha * local  # the merge of Streaming DiLoCo
            scale = float(max(new_g.abs().max(), local.abs().max()))
            assert torch.allclose(opt.state[ps[i]]["anchor"], new_g, rtol=0, atol=2 * U64 * scale)
            assert torch.allclose(
                ps[i].detach(), merged, rtol=0, atol=4 * U64 * scale
            )  # lerp: ≤ 3 roundings
        else:
            assert torch.equal(ps[i], local) and torch.equal(opt.state[ps[i]]["anchor"], g0)
    if alpha == 1.0:
        assert torch.equal(ps[0], rec["theta"][1][0])  # α = 1 keeps the local fragment bitwise


# ------------------------------------------------------------------ bytes
def _ledger_run(M: int, compressor: Any, **kw: Any) -> list[list[dict[str, int]]]:
    g = torch.Generator().manual_seed(11)
    base = nn.Linear(100, 200)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))

    def rank(comm: Any, r: int) -> Any:
        model = copy.deepcopy(base)
        opt = DiLoCo(
            model.parameters(),
            partial(SGD, lr=0.1),
            sync_every=1,
            comm=comm,
            compressor=compressor,
            **kw,
        )
        gen = torch.Generator().manual_seed(r)
        per_sync = []
        for _ in range(2):
            n = len(comm.ledger.records)
            opt.zero_grad()
            x, y = torch.randn(4, 100, generator=gen), torch.randn(4, 200, generator=gen)
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            recs = comm.ledger.records[n:]
            per_sync.append(
                {
                    "sent": sum(x.sent for x in recs),
                    "recv": sum(x.recv for x in recs),
                    "ops": len(recs),
                }
            )
        return per_sync

    return run_ranks(M, rank)


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize(
    "compressor,bits,block",
    [(None, 32, None), ("quant(int8, block=256)", 8, 256), ("quant(int4, block=128)", 4, 128)],
    ids=["fp32", "int8", "int4"],
)
def test_ledger_bytes_per_sync(compressor: Any, bits: int, block: Any, M: int) -> None:
    N = 100 * 200 + 200  # one param group = one bucket
    if compressor is None:
        # Ring all-reduce of float32: 2(M−1) chunks of ceil(N/M) elements (accounting's ring formula).
        expected = 2 * (M - 1) * -(-N // M) * 4
        spec = 2 * (M - 1) / M * N * 4
    else:
        # One frame per bucket: packed codes, one float32 scale per block, a 4-byte CRC32.
        # Ring all-gather of equal frames, no length exchange: (M−1) w.
        w = -(-N * bits // 8) + 4 * -(-N // block) + 4
        expected = (M - 1) * w
        spec = (M - 1) * N * (bits + 32 / block) / 8  # all-gather, blocked codec
    for per_sync in _ledger_run(M, compressor):
        for rec in per_sync:
            assert rec == {"sent": expected, "recv": expected, "ops": 1}
            assert abs(rec["sent"] - spec) / spec < 0.01  # framing < 1 %


def test_streaming_event_bytes_cover_one_fragment() -> None:
    # P = 2 strided over (weight 20000, bias 200): fragment 0 = weight, fragment 1 = bias.
    base = nn.Linear(100, 200)

    def rank(comm: Any, r: int) -> Any:
        model = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(r)
        opt = StreamingDiLoCo(
            model.parameters(),
            partial(SGD, lr=0.1),
            sync_every=2,
            fragments=2,
            overlap_steps=0,
            comm=comm,
        )
        out = []
        for _ in range(2):
            n = len(comm.ledger.records)
            opt.zero_grad()
            model(torch.randn(4, 100, generator=gen)).sum().backward()
            opt.step()
            out.append(sum(x.sent for x in comm.ledger.records[n:]))
        return out

    for sent in run_ranks(3, rank):
        assert sent == [2 * 2 * -(-20000 // 3) * 4, 2 * 2 * -(-200 // 3) * 4]


# ------------------------------------------------------------------ state_dict checks
def test_load_state_dict_rejects_foreign_or_mismatched_state() -> None:
    model = tiny_model()
    opt = DiLoCo(model.parameters(), partial(SGD, lr=0.1), sync_every=3)
    with pytest.raises(ValueError, match=r"state_dict must hold a 'thinwire' entry"):
        opt.load_state_dict(SGD(model.parameters(), lr=0.1).state_dict())
    sd = opt.state_dict()
    del sd["thinwire"]["inner_step"]
    with pytest.raises(ValueError, match=r"state_dict\['thinwire'\] is missing field 'inner_step'"):
        opt.load_state_dict(sd)
    other = DiLoCo(model.parameters(), partial(SGD, lr=0.1), sync_every=4)
    with pytest.raises(
        ValueError,
        match=r"sync_every, fragments, overlap_steps\) must be \(4, 1, 0\), got \(3, 1, 0\)",
    ):
        other.load_state_dict(opt.state_dict())
