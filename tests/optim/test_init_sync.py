"""Start-state agreement (``init_sync``) on every optimizer of the table, in-process and on gloo.

Oracles: rank 0's initial parameters (what DDP broadcasts), the binomial broadcast's byte count
(rank 0 of two sends the state once: 4 bytes per fp32 parameter element plus the int64 step
counters), and, for ``"check"``, which parameter was made to differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from _optim_db import OPTIM_DB, OptimInfo, batches, run_ranks, tiny_model, train

from thinwire.optim import DeMo, DiLoCo

BY_NAME = [pytest.param(info, id=info.name) for info in OPTIM_DB]


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("info", BY_NAME)
def test_broadcast_by_default_starts_every_rank_from_rank0(info: OptimInfo) -> None:
    def rank(comm: Any, r: int) -> dict[str, Any]:
        model = tiny_model(seed=r)  # a different start on every rank
        opt = info.make(list(model.parameters()), comm=comm, **info.group_kwargs)
        start = _params(model)
        train(opt, model, batches(8, r), 0, 8)
        init = [x for x in comm.ledger.records if x.tag.endswith("/init")]
        final = {k: v.clone() for k, v in opt._global_state().items()}  # θ_g (DeMo: θ)
        return {"start": start, "final": final, "init": init, "sync": opt.sync_step}

    out = run_ranks(2, rank)
    want = _params(tiny_model(seed=0))
    numel = sum(p.numel() for p in want)
    # int64 [step] (DeMo, DataParallel) or [inner_step, outer_step] (the DiLoCo family)
    counters = 8 if info.name in ("DeMo", "DataParallel") else 16
    for r, o in enumerate(out):
        assert all(torch.equal(a, b) for a, b in zip(o["start"], want, strict=True))
        assert all(torch.equal(v, out[0]["final"][k]) for k, v in o["final"].items())
        assert o["sync"] > 0
        sent = sum(x.sent for x in o["init"])
        recv = sum(x.recv for x in o["init"])
        assert (sent, recv) == ((4 * numel + counters, 0) if r == 0 else (0, 4 * numel + counters))


@pytest.mark.parametrize("info", BY_NAME)
def test_check_names_the_first_differing_parameter(info: OptimInfo) -> None:
    def rank(comm: Any, r: int) -> str:
        model = tiny_model(seed=0)
        if r == 1:
            with torch.no_grad():
                list(model.parameters())[2].add_(1e-6)  # fc2.weight, group 0 param 2
        with pytest.raises(ValueError) as err:
            info.make(list(model.parameters()), comm=comm, init_sync="check", **info.group_kwargs)
        return str(err.value)

    for msg in run_ranks(2, rank):
        assert "init_sync='check': group 0 param 2 differs between rank 0 and rank 1" in msg


@pytest.mark.parametrize("info", BY_NAME)
def test_check_passes_and_off_sends_nothing_when_starts_agree(info: OptimInfo) -> None:
    def rank(comm: Any, r: int) -> tuple[int, int]:
        model = tiny_model(seed=0)
        info.make(list(model.parameters()), comm=comm, init_sync="check", **info.group_kwargs)
        checked = len(comm.ledger.records)
        info.make(list(model.parameters()), comm=comm, init_sync="off", **info.group_kwargs)
        return checked, len(comm.ledger.records) - checked

    assert run_ranks(2, rank) == [(1, 0), (1, 0)]  # one digest all-gather, then nothing


def test_init_sync_is_validated() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"init_sync must be in .*'broadcast'.*got 'rank0'"):
        DiLoCo(model.parameters(), torch.optim.SGD, init_sync="rank0")
    with pytest.raises(ValueError, match=r"init_sync must be in .*got 'yes'"):
        DeMo(model.parameters(), 1e-3, init_sync="yes")


def _global_state_cases(opt: Any) -> list[tuple[str, dict[str, torch.Tensor], str]]:
    good = {k: v.clone() for k, v in opt._global_state().items()}
    name = next(iter(good))
    bad_shape = dict(good, **{name: torch.zeros(3)})
    nan = dict(good, **{name: torch.full_like(good[name], float("nan"))})
    extra = dict(good, **{"group 9 param 0": torch.zeros(1)})
    missing = {k: v for k, v in good.items() if k != name}
    return [
        ("shape", bad_shape, "must be .* of shape"),
        ("nan", nan, "non-finite"),
        ("extra", extra, "group 9 param 0"),
        ("missing", missing, "missing|does not fit"),
    ]


@pytest.mark.parametrize("info", BY_NAME)
def test_a_bad_global_state_is_refused_before_anything_changes(info: OptimInfo) -> None:
    model = tiny_model(seed=0)
    opt = info.make(list(model.parameters()), **info.group_kwargs)
    train(opt, model, batches(7, 0), 0, 7)
    before = ({k: v.clone() for k, v in opt._global_state().items()}, _params(model))
    for _what, state, match in _global_state_cases(opt):
        with pytest.raises(ValueError, match=match):
            opt._load_global_state(state)
        after = opt._global_state()
        assert all(torch.equal(before[0][k], after[k]) for k in before[0])
        assert all(torch.equal(a, b) for a, b in zip(before[1], _params(model), strict=True))


@pytest.mark.parametrize("info", BY_NAME)
def test_global_state_hand_off_reproduces_the_donor(info: OptimInfo) -> None:
    donor_model, joiner_model = tiny_model(seed=0), tiny_model(seed=5)
    donor = info.make(list(donor_model.parameters()), **info.group_kwargs)
    joiner = info.make(list(joiner_model.parameters()), **info.group_kwargs)
    train(donor, donor_model, batches(9, 0), 0, 9)
    joiner._load_global_state({k: v.clone() for k, v in donor._global_state().items()})
    got, want = joiner._global_state(), donor._global_state()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert joiner.sync_step == donor.sync_step
    if hasattr(donor, "global_params"):  # the joiner's parameters restart from θ_g
        with donor.global_params():
            ref = _params(donor_model)
        assert all(torch.equal(a, b) for a, b in zip(_params(joiner_model), ref, strict=True))
    else:
        assert all(
            torch.equal(a, b)
            for a, b in zip(_params(joiner_model), _params(donor_model), strict=True)
        )


# ---------------------------------------------------------------------------------- gloo
def _gloo_worker(rank: int, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    from thinwire.collectives import TorchDistCommunicator

    comm = TorchDistCommunicator(
        init_method=f"file://{tmp}/rdzv", rank=rank, world_size=2, timeout_s=60
    )
    out: dict[str, Any] = {}
    try:
        model = tiny_model(seed=rank)  # seeded by rank: different starts
        opt = DiLoCo(model.parameters(), torch.optim.SGD, sync_every=2, comm=comm)
        out["start"] = _params(model)
        train(opt, model, batches(8, rank), 0, 8)
        out["digest"] = opt.consistency_digest()
        try:
            DiLoCo(
                tiny_model(seed=rank).parameters(), torch.optim.SGD, comm=comm, init_sync="check"
            )
        except ValueError as exc:
            out["check"] = str(exc)
    finally:
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
        comm.close()


@pytest.mark.timeout(120)
def test_gloo_ranks_seeded_differently_end_identical_or_check_raises(tmp_path: Path) -> None:
    mp.spawn(_gloo_worker, args=(str(tmp_path),), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    want = _params(tiny_model(seed=0))
    for o in out:
        assert all(torch.equal(a, b) for a, b in zip(o["start"], want, strict=True))
        assert o["digest"] == out[0]["digest"]
        assert "group 0 param 0 differs between rank 0 and rank 1" in o["check"]
