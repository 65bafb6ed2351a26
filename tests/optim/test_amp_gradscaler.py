"""``torch.amp.GradScaler`` with thinwire optimizers: a skipped step must not desynchronise ranks.

``GradScaler.step(opt)`` does not call ``opt.step()`` when it finds inf/NaN gradients, unless the
optimizer declares ``_step_supports_amp_scaling`` (``torch/amp/grad_scaler.py``). Before the fix
thinwire's optimizers did not: the rank that overflowed never counted that step, so its syncs
fell one step behind the other ranks' and the group hung until the communicator's timeout.
Now the scaler calls ``step()`` with ``found_inf`` set; the step is counted and its update is
skipped. Two in-process ranks, rank 1 overflows once (its loss times inf):

* DiLoCo family: the run equals, bit for bit, the same run without a scaler in which rank 1
  takes a step with no gradients at that iteration (a counted step that updates nothing), on
  both ranks. Power-of-two loss scales are exact in float32, so scaling changes no bit.
* DeMo: rank 1 still joins the exchange and contributes nothing; its momentum is untouched;
  both replicas stay bit-identical; and the skipped round equals rank 0 alone (a one-worker
  DeMo resumed from rank 0's state).
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from _optim_db import (
    DEFAULT_INNER,
    assert_same_state,
    batches,
    loss_fn,
    run_ranks,
    tiny_model,
)

from thinwire.optim import DeMo, DiLoCo, SparseLoCo, StreamingDiLoCo

T, BAD = 7, 2  # iterations; the one where rank 1's loss overflows
SCALE = 2.0**4  # a power of two: scaling and unscaling are exact


def _make(name: str, params: Any, comm: Any) -> Any:
    if name == "DiLoCo":
        return DiLoCo(params, DEFAULT_INNER, sync_every=3, comm=comm)
    if name == "StreamingDiLoCo":
        return StreamingDiLoCo(
            params, DEFAULT_INNER, sync_every=4, fragments=2, overlap_steps=1, comm=comm
        )
    if name == "SparseLoCo":
        return SparseLoCo(params, DEFAULT_INNER, sync_every=3, topk=4, chunk=4, comm=comm)
    return DeMo(params, lr=1e-2, topk=4, chunk=4, comm=comm, overlap=name == "DeMo-overlap")


def _snapshot(model: Any, opt: Any) -> Any:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _scaled_run(name: str, comm: Any, rank: int) -> dict[str, Any]:
    model = tiny_model()
    opt = _make(name, list(model.parameters()), comm)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    data = batches(T, seed=rank)
    out: dict[str, Any] = {"params": [], "delta": []}
    for i in range(T):
        if i == BAD:
            out["before_bad"] = _snapshot(model, opt)
        opt.zero_grad()
        loss = loss_fn(model, data[i])
        if rank == 1 and i == BAD:
            loss = loss * float("inf")  # every gradient becomes inf or NaN
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if i == BAD:
            out["after_bad"] = _snapshot(model, opt)  # waits for an overlapped exchange
        out["params"].append([p.detach().clone() for p in model.parameters()])
        if isinstance(opt, DeMo):
            out["delta"].append([opt.state[p]["delta"].clone() for p in model.parameters()])
    out["final"] = _snapshot(model, opt)
    out["scale"] = scaler.get_scale()
    out["count"] = opt.step_count if isinstance(opt, DeMo) else opt.inner_step
    return out


def _oracle_run(name: str, comm: Any, rank: int) -> dict[str, Any]:
    """No scaler; at the bad iteration rank 1 steps without gradients (updates nothing)."""
    model = tiny_model()
    opt = _make(name, list(model.parameters()), comm)
    data = batches(T, seed=rank)
    for i in range(T):
        opt.zero_grad()
        if not (rank == 1 and i == BAD):
            loss_fn(model, data[i]).backward()
        opt.step()
    return {"final": _snapshot(model, opt), "count": opt.inner_step}


@pytest.mark.parametrize("name", ["DiLoCo", "StreamingDiLoCo", "SparseLoCo"])
def test_skipped_step_keeps_the_sync_schedule(name: str) -> None:
    got = run_ranks(2, lambda comm, rank: _scaled_run(name, comm, rank))
    want = run_ranks(2, lambda comm, rank: _oracle_run(name, comm, rank))
    assert got[0]["scale"] == SCALE and got[1]["scale"] == SCALE / 2  # rank 1 really skipped
    for r in range(2):
        assert got[r]["count"] == want[r]["count"] == T
        assert_same_state(got[r]["final"], want[r]["final"], f"rank {r}")


@pytest.mark.parametrize("name", ["DeMo", "DeMo-overlap"])
def test_demo_skipped_step_joins_the_exchange_and_sends_nothing(name: str) -> None:
    got = run_ranks(2, lambda comm, rank: _scaled_run(name, comm, rank))
    assert got[1]["scale"] == SCALE / 2 and got[0]["scale"] == SCALE
    assert got[0]["count"] == got[1]["count"] == T
    for i in range(T):  # every rank applies the same aggregate: replicas stay identical
        for a, b in zip(got[0]["params"][i], got[1]["params"][i], strict=True):
            assert torch.equal(a, b), i
    for a, b in zip(got[1]["delta"][BAD - 1], got[1]["delta"][BAD], strict=True):
        assert torch.equal(a, b)  # the skipped step left rank 1's momentum as it was
    # The skipped round is rank 0's alone: a one-worker DeMo resumed from rank 0's state
    # before it ends in rank 0's state after it (parameters, momentum, pending aggregate).
    model = tiny_model(seed=3)
    opt = _make(name, list(model.parameters()), None)
    model.load_state_dict(got[0]["before_bad"]["model"])
    opt.load_state_dict(got[0]["before_bad"]["opt"])
    opt.zero_grad()
    loss_fn(model, batches(T, seed=0)[BAD]).backward()
    opt.step()
    assert_same_state(_snapshot(model, opt), got[0]["after_bad"])


def test_unscaled_updates_equal_a_run_without_scaler() -> None:
    # Steps the scaler does not skip are unscaled by the optimizer itself (the scaler hands
    # it the scale): bit for bit the run without a scaler, also after scaler.unscale_().
    def run(mode: str) -> Any:
        model = tiny_model()
        opt = DiLoCo(model.parameters(), DEFAULT_INNER, sync_every=2)
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        for batch in batches(5, seed=0):
            opt.zero_grad()
            loss = loss_fn(model, batch)
            if mode == "plain":
                loss.backward()
                opt.step()
                continue
            scaler.scale(loss).backward()
            if mode == "unscale_":
                scaler.unscale_(opt)  # e.g. to clip gradients first
            scaler.step(opt)
            scaler.update()
        return _snapshot(model, opt)

    plain = run("plain")
    assert_same_state(run("scaler"), plain)
    assert_same_state(run("unscale_"), plain)
