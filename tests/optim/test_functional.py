"""The functional forms of the update rules (``thinwire.optim.functional``).

Three oracles per rule:

* a float64 reference written from the papers' pseudo-code as plain Python loops over scalars:
  DiLoCo (Douillard et al., arXiv:2311.08105v3, Algorithm 1, OuterOpt = SGD with Nesterov
  momentum, as the ``torch.optim.SGD`` documentation writes it: ``b ← μ b + g`` with ``b = g``
  on the first step, ``g' = g + μ b`` (Nesterov) or ``b``, ``θ ← θ − lr g'``) and DeMo (Peng et
  al., arXiv:2411.19870v1, Algorithm 1, ``x ← x − η sign(Q)``);
* ``torch.optim.SGD`` itself on one tensor (the functional form must equal it bit for bit);
* the optimizers: the state after a sync must be what the free function computes from the
  state before it, bit for bit (captured through public hooks).
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import Any

import pytest
import torch
from _optim_db import DEFAULT_INNER, batches, loss_fn, tiny_model, train

import thinwire.optim as optim
from thinwire.optim import DeMo, DiLoCo, StreamingDiLoCo, demo_update, diloco_outer_step
from thinwire.optim import functional as F

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff


def _rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _oracle_outer(
    theta: list[float], grads: list[list[float]], lr: float, mu: float, nesterov: bool
) -> tuple[list[float], list[float] | None]:
    """SGD with (Nesterov) momentum over a sequence of outer gradients, one scalar at a time."""
    theta = list(theta)
    buf: list[float] | None = None
    for g in grads:
        if mu != 0:
            buf = list(g) if buf is None else [mu * b + gi for b, gi in zip(buf, g, strict=True)]
            d = [gi + mu * b for gi, b in zip(g, buf, strict=True)] if nesterov else list(buf)
        else:
            d = list(g)
        theta = [t - lr * di for t, di in zip(theta, d, strict=True)]
    return theta, buf


def test_exports_and_docstrings() -> None:
    for name in ("diloco_outer_step", "demo_update"):
        assert name in optim.__all__ and name in F.__all__
        assert getattr(optim, name) is getattr(F, name)
        assert getattr(F, name).__doc__
    assert F.__doc__


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("mu", [0.9, 0.0])
def test_diloco_outer_step_float64_oracle(mu: float, nesterov: bool) -> None:
    shapes = [(7,), (3, 5)]
    lr, steps = 0.7, 4
    anchors = [_rand(s, i) for i, s in enumerate(shapes)]
    grads = [[_rand(s, 100 * t + i) for i, s in enumerate(shapes)] for t in range(steps)]
    start = [a.clone() for a in anchors]
    bufs: list[torch.Tensor | None] = [None] * len(shapes)
    for t in range(steps):
        diloco_outer_step(anchors, grads[t], bufs, lr=lr, momentum=mu, nesterov=nesterov)
    for i in range(len(shapes)):
        want, want_buf = _oracle_outer(
            start[i].flatten().tolist(),
            [grads[t][i].flatten().tolist() for t in range(steps)],
            lr,
            mu,
            nesterov,
        )
        got = anchors[i].flatten().tolist()
        # Both are float64, but torch may fuse a·x + y (one rounding) where Python rounds twice:
        # 4 steps x 3 operations, each differing by at most 2 u of the largest magnitude M in
        # play (θ, b, Δ̄); later steps carry an earlier difference with a factor below 1 + lr.
        mags = [abs(v) for v in start[i].flatten().tolist() + want]
        mags += [abs(v) for t in range(steps) for v in grads[t][i].flatten().tolist()]
        mags += [abs(v) for v in want_buf or []]
        tol = 2 * 12 * (1 + lr) * U64 * max(mags)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= tol
        if mu == 0:
            assert bufs[i] is None  # no buffer without momentum, as torch.optim.SGD
        else:
            got_b = bufs[i].flatten().tolist()
            assert max(abs(a - b) for a, b in zip(got_b, want_buf, strict=True)) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mu,nesterov", [(0.9, True), (0.8, False), (0.0, False)])
def test_diloco_outer_step_equals_torch_sgd(dtype: torch.dtype, mu: float, nesterov: bool) -> None:
    """Bit for bit what ``torch.optim.SGD`` does on the same tensor (its single-tensor path)."""
    a = _rand((33, 17), 1, dtype)
    ref = a.clone().requires_grad_(True)
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=mu, nesterov=nesterov, foreach=False)
    bufs: list[torch.Tensor | None] = [None]
    for t in range(5):
        g = _rand((33, 17), 10 + t, dtype)
        ref.grad = g.clone()
        sgd.step()
        diloco_outer_step([a], [g], bufs, lr=0.7, momentum=mu, nesterov=nesterov)
        assert torch.equal(a, ref.detach()), t
        if mu:
            assert torch.equal(bufs[0], sgd.state[ref]["momentum_buffer"])


def test_diloco_outer_step_float32_within_bound_of_float64() -> None:
    # float32 against the float64 oracle: each op rounds once (relative U32); a few ops per step.
    a64 = _rand((50,), 3)
    g64 = [_rand((50,), 20 + t) * 0.1 for t in range(3)]
    a32 = [a64.float()]
    bufs: list[torch.Tensor | None] = [None]
    for g in g64:
        diloco_outer_step(a32, [g.float()], bufs, lr=0.7, momentum=0.9, nesterov=True)
    want, _ = _oracle_outer(a64.tolist(), [g.tolist() for g in g64], 0.7, 0.9, True)
    want_t = torch.tensor(want, dtype=torch.float64)
    # float32 rounds the 4 inputs and each of its 3 x 3 operations once, each by at most U32
    # of a magnitude below 1 + |θ| (the Δ̄ are 0.1-sized, so |b| < 1): 13 U32 (1 + |θ|), and 16.
    assert ((a32[0].double() - want_t).abs() <= 16 * U32 * (1 + want_t.abs())).all()


def test_diloco_outer_step_validates_lengths() -> None:
    with pytest.raises(ValueError, match=r"tensor lists must have the same length"):
        diloco_outer_step(
            [torch.zeros(2)],
            [torch.zeros(2), torch.zeros(2)],
            [None],
            lr=1,
            momentum=0,
            nesterov=False,
        )
    with pytest.raises(ValueError, match=r"tensor lists must have the same length"):
        demo_update([torch.zeros(2)], [], lr=0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_demo_update_oracle(dtype: torch.dtype) -> None:
    p = _rand((40,), 5, dtype)
    u = _rand((40,), 6)
    u[::7] = 0.0  # sign(0) = 0 leaves the coordinate alone
    start = p.clone()
    lr = 0.01
    demo_update([p], [u], lr=lr)
    sgn = [0.0 if x == 0 else math.copysign(1.0, x) for x in u.tolist()]
    want = [t - lr * s for t, s in zip(start.double().tolist(), sgn, strict=True)]
    want_t = torch.tensor(want, dtype=torch.float64)
    if dtype == torch.float64:
        # lr * (±1 or 0) is exact, so the float64 update rounds once, as the oracle does.
        assert torch.equal(p.double(), want_t)
    else:
        # One rounding of the result to the param's dtype (u |p'|) and of lr to the float32
        # the kernel computes in (u lr): u (|p'| + lr), u the dtype's unit roundoff.
        u_dt = 2.0**-24 if dtype == torch.float32 else 2.0**-8
        assert ((p.double() - want_t).abs() <= u_dt * (want_t.abs() + lr)).all()
    assert torch.equal(p[::7], start[::7])


# ------------------------------------------------------------------ optimizers use them
def _outer_sgd_matches(opt: Any, model: torch.nn.Module, data: list[Any], steps: int) -> int:
    """Run ``steps`` inner steps; at every outer step check θ_g against the free function."""
    checked = 0
    anchors = [opt.state[p]["anchor"] for g in opt.param_groups for p in g["params"]]
    pending: dict[str, Any] = {}

    def pre(outer: Any, *_: Any) -> None:
        live = [a for g in outer.param_groups for a in g["params"] if a.grad is not None]
        pending["before"] = [a.detach().clone() for a in live]
        pending["grads"] = [a.grad.clone() for a in live]
        pending["bufs"] = [
            outer.state[a]["momentum_buffer"].clone()
            if "momentum_buffer" in outer.state[a]
            else None
            for a in live
        ]
        pending["live"] = live
        g = outer.param_groups[0]
        pending["hyper"] = dict(lr=g["lr"], momentum=g["momentum"], nesterov=g["nesterov"])

    def post(outer: Any, *_: Any) -> None:
        nonlocal checked
        want = pending["before"]
        bufs = pending["bufs"]
        diloco_outer_step(want, pending["grads"], bufs, **pending["hyper"])
        for a, w, b in zip(pending["live"], want, bufs, strict=True):
            assert torch.equal(a, w)
            if b is not None:
                assert torch.equal(outer.state[a]["momentum_buffer"], b)
        checked += 1

    opt.outer.register_step_pre_hook(pre)
    opt.outer.register_step_post_hook(post)
    train(opt, model, data, 0, steps)
    assert all(a.grad is None for a in anchors)
    return checked


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: DiLoCo(ps, DEFAULT_INNER, sync_every=2),
        lambda ps: DiLoCo(ps, DEFAULT_INNER, sync_every=2, nesterov=False, outer_momentum=0.5),
        lambda ps: StreamingDiLoCo(ps, DEFAULT_INNER, sync_every=4, fragments=2, overlap_steps=1),
    ],
    ids=["diloco-nesterov", "diloco-heavy-ball", "streaming"],
)
def test_optimizer_outer_step_is_the_free_function(make: Any) -> None:
    model = tiny_model()
    opt = make(list(model.parameters()))
    assert isinstance(opt.outer, torch.optim.SGD)  # its state_dict stays SGD's
    checked = _outer_sgd_matches(opt, model, batches(9, seed=0), 9)
    assert checked >= 4


def test_demo_step_applies_demo_update() -> None:
    """DeMo's parameter change is exactly ``demo_update`` of the aggregate (captured from state)."""
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    kw = dict(lr=1e-2, topk=2, chunk=4, overlap=True)
    opt = DeMo(model.parameters(), **kw)
    data = batches(3, seed=1)
    for i in range(2):  # with overlap the aggregate of step i is applied at step i + 1
        opt.zero_grad()
        loss_fn(model, data[i]).backward()
        opt.step()
    ref_opt = DeMo(ref_model.parameters(), **kw)
    ref_opt.load_state_dict(opt.state_dict())  # saves the pending aggregate in state
    ref_model.load_state_dict(model.state_dict())
    ps = list(ref_model.parameters())
    aggregates = [ref_opt.state[p]["pending"].clone() for p in ps]
    want = [p.detach().clone() for p in ps]
    demo_update(want, aggregates, lr=kw["lr"])
    opt.zero_grad()
    for p in model.parameters():  # no gradient: only the pending aggregate is applied
        p.grad = None
    opt.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), want, strict=True))


def test_functional_round_trip_keeps_sgd_state_dict() -> None:
    # The default outer optimizer stays a torch.optim.SGD: its state_dict loads into plain SGD.
    model = tiny_model()
    opt = DiLoCo(model.parameters(), partial(torch.optim.SGD, lr=0.1), sync_every=2)
    train(opt, model, batches(4, seed=2), 0, 4)
    sd = opt.outer.state_dict()
    anchors = [opt.state[p]["anchor"].clone() for p in model.parameters()]
    plain = torch.optim.SGD(anchors, lr=0.7, momentum=0.9, nesterov=True)
    plain.load_state_dict(sd)
    assert all("momentum_buffer" in plain.state[a] for a in anchors)
