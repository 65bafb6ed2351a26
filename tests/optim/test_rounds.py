"""Rounds an elastic engine does not commit: the optimizers discard them and go on.

The engine is the real in-process one with two faults injected, as an elastic engine reports them:
``end_round`` returning False on every rank for one round (torchft's ``should_commit`` after a
member failed), and every rank's all-gather raising :class:`GroupTooSmall` in one round (hivemind
when no group forms). Oracles: the state before the round — θ_g, the outer optimizer's state, the
error-feedback residuals and the sync counter are bitwise what they were, every parameter of the
round's fragment is back at θ_g — and the next rounds commit as usual.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _optim_db import DEFAULT_INNER, batches, run_ranks, tiny_model, train

from thinwire.collectives import GroupTooSmall, InprocCommunicator
from thinwire.optim import DataParallel, DeMo, DiLoCo, SparseLoCo

H = 3
BAD_ROUND = 1


class ElasticInproc(InprocCommunicator):
    """The in-process engine, elastic, failing round ``BAD_ROUND`` as ``how`` says."""

    elastic = True
    how = "uncommitted"

    _opened = 0  # begin_round calls so far: the second one opens round BAD_ROUND

    def begin_round(self, round: int) -> Any:
        self._opened += 1
        return super().begin_round(round)

    def _bad(self) -> bool:  # only the first attempt at BAD_ROUND fails; its retry commits
        return self._opened == BAD_ROUND + 1

    def end_round(self, ok: bool) -> bool:
        return ok and not (self.how == "uncommitted" and self._bad())

    def all_gather_into_tensor(self, t: torch.Tensor, **kw: Any) -> Any:
        if self.how == "no_group" and self._bad():
            raise GroupTooSmall(f"round {BAD_ROUND}: no group formed (injected)")
        return super().all_gather_into_tensor(t, **kw)

    def all_reduce(self, t: torch.Tensor, *args: Any, **kw: Any) -> Any:
        if self.how == "no_group" and self._bad():
            raise GroupTooSmall(f"round {BAD_ROUND}: no group formed (injected)")
        return super().all_reduce(t, *args, **kw)


def _snapshot(opt: Any, model: torch.nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in opt._global_state().items()},
        "residual": [
            opt.state[p].get("residual", torch.zeros(0)).clone() for p in model.parameters()
        ]
        if not isinstance(opt, DeMo)
        else [],
        "params": [p.detach().clone() for p in model.parameters()],
        "sync": opt.sync_step,
    }


MAKERS = {
    "diloco_int8_ef": lambda ps, c: DiLoCo(
        ps, DEFAULT_INNER, sync_every=H, comm=c, compressor="quant(int8, block=8)",
        error_feedback=True,
    ),
    "diloco_dense": lambda ps, c: DiLoCo(ps, DEFAULT_INNER, sync_every=H, comm=c),
    "sparseloco": lambda ps, c: SparseLoCo(ps, DEFAULT_INNER, sync_every=H, comm=c, topk=4, chunk=4),
}  # fmt: skip


@pytest.mark.parametrize("how", ["uncommitted", "no_group"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_failed_round_is_discarded_and_training_goes_on(kind: str, how: str) -> None:
    def rank(comm: Any, r: int) -> dict[str, Any]:
        comm.how = how
        model = tiny_model(0)
        opt = MAKERS[kind](list(model.parameters()), comm)
        infos: list[Any] = []
        opt.register_sync_post_hook(lambda o, info: infos.append(info))
        data = batches(4 * H, r)
        train(opt, model, data, 0, (BAD_ROUND + 1) * H - 1)  # up to the step before round 1
        before = _snapshot(opt, model)
        train(opt, model, data, (BAD_ROUND + 1) * H - 1, (BAD_ROUND + 1) * H)
        after = _snapshot(opt, model)
        train(opt, model, data, (BAD_ROUND + 1) * H, 4 * H)
        return {"before": before, "after": after, "infos": infos, "final": opt.sync_step}

    for o in run_ranks(2, rank, comm_cls=ElasticInproc):
        b, a = o["before"], o["after"]
        assert a["sync"] == b["sync"] == BAD_ROUND
        assert all(
            torch.equal(b["state"][k], a["state"][k]) for k in b["state"] if k != "step counters"
        )
        assert all(torch.equal(x, y) for x, y in zip(b["residual"], a["residual"], strict=True))
        anchors = [v for k, v in a["state"].items() if k.startswith("group") and " outer " not in k]
        assert all(torch.equal(p.float(), t) for p, t in zip(a["params"], anchors, strict=True))
        committed = [i.committed for i in o["infos"]]
        assert committed == [True, False, True, True], committed
        assert o["final"] == 3  # rounds 0, 1 (retried) and 2 were applied


def _every_step_bad_round(make: Any, how: str) -> list[dict[str, Any]]:
    """Two ranks of an every-step optimizer whose sync at step BAD_ROUND fails as ``how`` says:
    the parameters before and after that step, every SyncInfo and the final sync step."""

    def rank(comm: Any, r: int) -> dict[str, Any]:
        comm.how = how
        model = tiny_model(0)
        opt = make(list(model.parameters()), comm)
        infos: list[Any] = []
        opt.register_sync_post_hook(lambda o, info: infos.append(info))
        data = batches(4, r)
        train(opt, model, data, 0, BAD_ROUND)
        before = [p.detach().clone() for p in model.parameters()]
        train(opt, model, data, BAD_ROUND, BAD_ROUND + 1)
        after = [p.detach().clone() for p in model.parameters()]
        train(opt, model, data, BAD_ROUND + 1, 4)
        return {"before": before, "after": after, "infos": infos, "final": opt.sync_step}

    return run_ranks(2, rank, comm_cls=ElasticInproc)


def test_demo_discards_an_uncommitted_step() -> None:
    def make(ps: list[torch.Tensor], comm: Any) -> DeMo:
        return DeMo(ps, 1e-2, topk=4, chunk=4, comm=comm)

    for o in _every_step_bad_round(make, "uncommitted"):
        assert all(torch.equal(x, y) for x, y in zip(o["before"], o["after"], strict=True))
        assert [i.committed for i in o["infos"]] == [True, False, True, True]


@pytest.mark.parametrize("how", ["uncommitted", "no_group"])
def test_data_parallel_discards_a_failed_step(how: str) -> None:
    def make(ps: list[torch.Tensor], comm: Any) -> DataParallel:
        return DataParallel(ps, DEFAULT_INNER, comm=comm)

    for o in _every_step_bad_round(make, how):
        assert all(torch.equal(x, y) for x, y in zip(o["before"], o["after"], strict=True))
        assert [i.committed for i in o["infos"]] == [True, False, True, True]
        assert all(i.weight == 2.0 for i in o["infos"] if i.committed)
        assert o["final"] == 3
