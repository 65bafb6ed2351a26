"""Sync post-hooks and ``sync_step`` on every optimizer of the table.

Oracle: the schedule itself. A DiLoCo-family optimizer with ``sync_every = H`` and ``P`` fragments
completes a sync after every ``H / P`` inner steps; DeMo after every step (one step later with
``overlap``). At each hook call the parameters already hold the sync's result: for the DiLoCo
family without mixing they equal the global copy θ_g bit for bit.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from _optim_db import OPTIM_DB, OptimInfo, batches, run_ranks, tiny_model, train

from thinwire.optim import DataParallel, DeMo, SyncInfo

BY_NAME = [pytest.param(info, id=info.name) for info in OPTIM_DB]
STEPS = 9


def _syncs_after(opt: Any, steps: int) -> int:
    """Syncs the schedule completes in ``steps`` inner steps (the oracle)."""
    if isinstance(opt, DeMo):
        return max(steps - 1, 0) if opt.overlap else steps
    if isinstance(opt, DataParallel):
        return steps
    k = opt.sync_every // len(opt._fragments)
    return steps // k


def _run(info: OptimInfo, comm: Any, rank: int) -> dict[str, Any]:
    model = tiny_model(0)
    opt = info.make(list(model.parameters()), comm=comm, **info.group_kwargs)
    seen: list[tuple[SyncInfo, int, bool]] = []

    def hook(o: Any, sync: SyncInfo) -> None:
        at_anchor = True
        if not isinstance(o, DeMo | DataParallel) and getattr(o, "mix_alpha", 0.0) == 0.0:
            at_anchor = all(
                torch.equal(p.detach().float(), o.state[p]["anchor"]) for p in model.parameters()
            )
        seen.append((sync, o.sync_step, at_anchor))

    handle = opt.register_sync_post_hook(hook)
    train(opt, model, batches(STEPS, rank), 0, STEPS)
    handle.remove()
    train(opt, model, batches(STEPS + 2, rank), STEPS, STEPS + 2)  # removed: no more calls
    return {"seen": seen, "expected": _syncs_after(opt, STEPS), "final": opt.sync_step,
            "final_expected": _syncs_after(opt, STEPS + 2)}  # fmt: skip


@pytest.mark.parametrize("info", BY_NAME)
def test_hooks_run_once_per_sync_with_the_result_applied(info: OptimInfo) -> None:
    for out in run_ranks(2, lambda comm, r: _run(info, comm, r)):
        seen = out["seen"]
        assert len(seen) == out["expected"] > 0
        assert [s.sync_step for s, _, _ in seen] == list(range(1, len(seen) + 1))
        assert all(s.sync_step == counter for s, counter, _ in seen)  # property agrees
        assert all(at_anchor for _, _, at_anchor in seen)
        assert all(s.committed and s.contributed and s.weight == 2.0 for s, _, _ in seen)
        assert out["final"] == out["final_expected"]


@pytest.mark.parametrize("info", BY_NAME)
def test_sync_step_survives_a_state_dict_round_trip(info: OptimInfo) -> None:
    model = tiny_model(0)
    opt = info.make(list(model.parameters()), **info.group_kwargs)
    data = batches(STEPS, 0)
    train(opt, model, data, 0, 7)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = tiny_model(0)
    model2.load_state_dict(model.state_dict())
    opt2 = info.make(list(model2.parameters()), **info.group_kwargs)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    assert opt2.sync_step == opt.sync_step == _syncs_after(opt, 7)


@pytest.mark.parametrize("info", BY_NAME)
def test_hook_contract_errors(info: OptimInfo) -> None:
    model = tiny_model(0)
    opt = info.make(list(model.parameters()), **info.group_kwargs)
    with pytest.raises(TypeError, match=r"hook must be callable .* got 3"):
        opt.register_sync_post_hook(3)
    opt.register_sync_post_hook(lambda o, s: "a value")
    with pytest.raises(RuntimeError, match=r"must return None, got str"):
        train(opt, model, batches(STEPS, 0), 0, STEPS)


@pytest.mark.parametrize("info", [p for p in BY_NAME if p.id not in ("DeMo", "DataParallel")])
def test_no_reduction_result_outlives_its_sync(info: OptimInfo) -> None:
    # After the last sync applied, no parameter keeps the reduced update or its weight (they
    # would be saved by state_dict and carried into every checkpoint).
    model = tiny_model(0)
    opt = info.make(list(model.parameters()), **info.group_kwargs)
    k = opt.sync_every // len(opt._fragments)
    train(opt, model, batches(3 * k, 0), 0, 3 * k)
    assert opt.sync_step == 3
    left = {key for st in opt.state.values() for key in st if key.startswith("inflight")}
    assert left == set(), left
