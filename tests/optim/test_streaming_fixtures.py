"""Streaming DiLoCo schedule against torchft's regression fixtures.

The model is torchft's mock (``torchft/diloco_regression_test.py``): two fragments of one 1x1
weight each, initialised to 1.0; every inner step sets ``grad = 2`` and the inner optimizer does
``p -= 1 * grad``; the outer optimizer is plain SGD with lr 2 (``p -= 2 * Δ̄``); ``H = 6``, so
``K = H / P = 3``. With two replicas holding identical data the averaged Δ equals each replica's,
so one worker (``comm=None``) must reproduce the fixtures exactly: every value is a small dyadic
number, exact in float32.

Oracles: the expected trajectories in ``fixtures/torchft_diloco_regression.json`` (numbers copied
from torchft's fixture files; source and commits named there) and, for the case missing from the
stored fixtures (τ = 1, α = 0), a plain-float recursion of the schedule in ``StreamingDiLoCo``'s
docstring (Streaming DiLoCo, arXiv:2501.18512v1 §2, as torchft's ``_StreamingDiLoCoFragment`` runs
it) written below, which is first checked to reproduce all five stored fixtures, plus the same
trajectory worked out by hand.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from thinwire.optim import StreamingDiLoCo

FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "torchft_diloco_regression.json").read_text()
)
CASES = {c["name"]: c for c in FIXTURE["cases"]}
H = FIXTURE["sync_every"]
P = FIXTURE["n_fragments"]
GRAD = FIXTURE["grad"]
INNER_LR = FIXTURE["inner_lr"]
OUTER_LR = FIXTURE["outer_lr"]
STEPS = 15  # torchft's loop records 16 states (steps 0..15): 5 events at steps 3, 6, 9, 12, 15

# τ = 1, α = 0 by hand from the schedule (K = 3; Δ taken after step 3j + 2, applied after
# 3j + 3; the local fragment adopts θ_g):
#   event 0, fragment 0: Δ = 1 - (-3) = 4,   θ_g0 = 1 - 2*4 = -7    -> w0(3) = -7
#   event 1, fragment 1: Δ = 1 - (-9) = 10,  θ_g1 = 1 - 20 = -19    -> w1(6) = -19
#   event 2, fragment 0: Δ = -7 - (-17) = 10, θ_g0 = -27            -> w0(9) = -27
#   event 3, fragment 1: Δ = -19 - (-29) = 10, θ_g1 = -39           -> w1(12) = -39
#   event 4, fragment 0: Δ = -27 - (-37) = 10, θ_g0 = -47           -> w0(15) = -47
# Between events each weight drops by 2 per step.
HAND_TAU1_ALPHA0 = FIXTURE["derived_by_hand"][0]  # the trajectory worked out above, as data


def _recursion(tau: int, alpha: float, steps: int = STEPS) -> dict[str, Any]:
    """The schedule as plain Python floats: the oracle for it (one worker)."""
    K = H // P
    local = [1.0] * P
    glob = [1.0] * P
    delta: list[float | None] = [None] * P
    history = [list(local)]
    globals_ = {"0": list(glob)}
    for s in range(1, steps + 1):
        local = [w - INNER_LR * GRAD for w in local]
        if (s + tau) % K == 0:  # prepare: event j = (s + τ)/K - 1 serves fragment j mod P
            f = ((s + tau) // K - 1) % P
            delta[f] = glob[f] - local[f]
        if s % K == 0:  # apply the event prepared τ steps ago, then merge
            f = (s // K - 1) % P
            d = delta[f]
            assert d is not None  # the recursion always prepares before it applies
            glob[f] = glob[f] - OUTER_LR * d
            local[f] = (1.0 - alpha) * glob[f] + alpha * local[f]
            delta[f] = None
            globals_[str(s)] = list(glob)
        history.append(list(local))
    return {"history": history, "global": globals_}


class _PlainStep(torch.optim.Optimizer):
    """``p -= lr * grad`` and nothing else: torchft's mock outer optimizer, as a factory target."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-g["lr"])


def _run(tau: int, alpha: float, outer: str, fragments: str) -> dict[str, Any]:
    w = [torch.nn.Parameter(torch.ones(1, 1)) for _ in range(P)]
    kw: dict[str, Any] = {}
    if outer == "builtin":
        kw = {"outer_lr": OUTER_LR, "outer_momentum": 0.0}
    else:
        kw = {"outer": lambda groups: _PlainStep(groups, lr=OUTER_LR)}
    frag: Any = [[w[0]], [w[1]]] if fragments == "explicit" else P
    opt = StreamingDiLoCo(
        w,
        functools.partial(torch.optim.SGD, lr=INNER_LR),
        sync_every=H,
        fragments=frag,
        fragment_pattern="sequential",
        overlap_steps=tau,
        mix_alpha=alpha,
        **kw,
    )
    history = [[p.item() for p in w]]
    globals_ = {"0": [opt.state[p]["anchor"].item() for p in w]}
    served = []
    for s in range(1, STEPS + 1):
        for p in w:
            p.grad = torch.full_like(p, GRAD)
        opt.step()
        history.append([p.item() for p in w])
        if s % (H // P) == 0:
            globals_[str(s)] = [opt.state[p]["anchor"].item() for p in w]
            served.append((opt.last_sync["fragment"], opt.last_sync["inner_step"]))
    return {"history": history, "global": globals_, "served": served, "outer_step": opt.outer_step}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recursion_reproduces_stored_fixtures(name):
    case = CASES[name]
    want = _recursion(case["fragment_sync_delay"], case["fragment_update_alpha"])
    assert want["history"] == case["history"]
    for s, vals in case["global"].items():
        assert want["global"][s] == vals, s


def test_recursion_matches_hand_worked_missing_case():
    case = HAND_TAU1_ALPHA0
    assert (case["fragment_sync_delay"], case["fragment_update_alpha"]) == (1, 0.0)
    want = _recursion(1, 0.0)
    assert want["history"] == case["history"]
    assert want["global"] == case["global"]


@pytest.mark.parametrize("fragments", ["explicit", "int"])
@pytest.mark.parametrize("outer", ["builtin", "factory"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_reproduces_torchft_fixture(name, outer, fragments):
    case = CASES[name]
    got = _run(case["fragment_sync_delay"], case["fragment_update_alpha"], outer, fragments)
    # Exact: every value is a small dyadic number, representable in float32.
    assert got["history"] == case["history"]
    for s, vals in case["global"].items():
        assert got["global"][s] == vals, s
    # First event serves fragment 0; events alternate and complete every K = 3 steps.
    assert got["served"] == [(j % P, 3 * (j + 1)) for j in range(5)]
    assert got["outer_step"] == 5


@pytest.mark.parametrize("outer", ["builtin", "factory"])
def test_streaming_missing_case_tau1_alpha0(outer):
    got = _run(1, 0.0, outer, "explicit")
    assert got["history"] == HAND_TAU1_ALPHA0["history"]
    assert got["global"] == HAND_TAU1_ALPHA0["global"]
    assert got["served"] == [(j % P, 3 * (j + 1)) for j in range(5)]


@pytest.mark.parametrize("tau", [0, 1])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_streaming_matches_recursion_longer(tau, alpha):
    """Beyond the fixtures' 15 steps: 8 rounds of both fragments, and α = 0.25 (not in torchft's set)."""
    steps = 8 * H
    want = _recursion(tau, alpha, steps)
    w = [torch.nn.Parameter(torch.ones(1, 1, dtype=torch.float64)) for _ in range(P)]
    opt = StreamingDiLoCo(
        w,
        functools.partial(torch.optim.SGD, lr=INNER_LR),
        outer_lr=OUTER_LR,
        outer_momentum=0.0,
        sync_every=H,
        fragments=[[w[0]], [w[1]]],
        overlap_steps=tau,
        mix_alpha=alpha,
    )
    for s in range(1, steps + 1):
        for p in w:
            p.grad = torch.full_like(p, GRAD)
        opt.step()
        # float64 params keep float64 anchors; the recursion is float64 too, op for op, except
        # the merge (torch.lerp vs (1-α)g + αl): 1 ulp per merge, far below 1e-9 at |w| < 1e4.
        assert [p.item() for p in w] == pytest.approx(want["history"][s], rel=0, abs=1e-9), s
        if str(s) in want["global"]:
            got_g = [opt.state[p]["anchor"].item() for p in w]
            assert got_g == pytest.approx(want["global"][str(s)], rel=0, abs=1e-9), s
