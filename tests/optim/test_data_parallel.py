"""DataParallel and the method table against independent oracles.

(a) On real gloo processes (world sizes 2 and 3, so ring chunks are uneven) every rank's
    parameters after each step equal a float64 single-process replay that averages the ranks'
    gradients by hand and takes the SGD-with-momentum step itself (the update rule written out);
(b) bytes: the ledger's ``ddp/grads`` traffic per step equals the ring all-reduce formula
    ``2(M − 1) ceil(N/M) 4`` per bucket, whatever the bucket size;
(c) ``init_sync="broadcast"`` starts every rank from rank 0's parameters;
(d) a non-finite gradient raises before anything is sent, naming group, param and step;
(e) the method table builds each entry's optimizer class with its settings, and refuses an
    unknown name (listing the table) or a setting the optimizer does not take.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _optim_db import run_ranks
from torch import nn

from thinwire.collectives import InprocCommunicator
from thinwire.optim import (
    METHODS,
    DataParallel,
    DeMo,
    DiLoCo,
    SparseLoCo,
    StreamingDiLoCo,
    build_optimizer,
)

STEPS, LR, MU = 4, 0.05, 0.9


def _model(seed: int = 1234, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Tanh MLP (163 params) drawn from a seeded generator."""
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model.to(dtype)


def _batch(rank: int, step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * rank + step)
    return torch.randn(8, 6, generator=g).to(dtype), torch.randn(8, 3, generator=g).to(dtype)


def _sgd(groups: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=LR, momentum=MU)


def _oracle(world: int, steps: int) -> list[list[torch.Tensor]]:
    """float64 replay: mean of the ranks' gradients, then p ← p − lr·(μ b + ḡ) by hand."""
    model = _model(dtype=torch.float64)
    bufs: list[torch.Tensor | None] = [None] * len(list(model.parameters()))
    out = []
    for step in range(steps):
        mean = [torch.zeros_like(p) for p in model.parameters()]
        for r in range(world):
            model.zero_grad()
            x, y = _batch(r, step, torch.float64)
            nn.functional.mse_loss(model(x), y).backward()
            for m, p in zip(mean, model.parameters(), strict=True):
                m += p.grad / world
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(model.parameters(), mean, strict=True)):
                bufs[i] = g.clone() if bufs[i] is None else MU * bufs[i] + g
                p -= LR * bufs[i]
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def _gloo_worker(rank: int, world: int, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    from thinwire.collectives import TorchDistCommunicator

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        comm = TorchDistCommunicator(timeout_s=60.0)
        # every rank but 0 starts elsewhere: the constructor's broadcast must fix that
        model = _model(seed=1234 if rank == 0 else 99 + rank)
        opt = DataParallel(model.parameters(), _sgd, comm=comm, bucket_cap_mb=2e-4)
        start = [p.detach().clone() for p in model.parameters()]
        params, sent = [], []
        for step in range(STEPS):
            before = comm.ledger.totals("ddp/grads")["sent"]
            opt.zero_grad()
            x, y = _batch(rank, step, torch.float32)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            params.append([p.detach().clone() for p in model.parameters()])
            sent.append(comm.ledger.totals("ddp/grads")["sent"] - before)
        torch.save({"start": start, "params": params, "sent": sent, "sync_step": opt.sync_step},
                   f"{tmp}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ranks_follow_the_float64_replay_and_the_ring_formula(world: int, tmp_path: Path):
    mp.spawn(_gloo_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    oracle = _oracle(world, STEPS)
    first = _model()
    # bucket_cap_mb=2e-4 holds 52 float32 values: the buckets below, one all_reduce each
    sizes, cap, cur = [], int(2e-4 * 2**20 / 4), 0
    for p in first.parameters():
        if cur and cur + p.numel() > cap:
            sizes.append(cur)
            cur = 0
        cur += p.numel()
    sizes.append(cur)
    ring = sum(2 * (world - 1) * math.ceil(n / world) * 4 for n in sizes)
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for a, b in zip(got["start"], first.parameters(), strict=True):
            assert torch.equal(a, b.detach())  # rank 0's parameters everywhere
        for step, (mine, ref) in enumerate(zip(got["params"], oracle, strict=True)):
            for a, b in zip(mine, ref, strict=True):
                # float32 forward/backward and mean against float64: a few ulps of |p| per step
                assert torch.allclose(a.double(), b, rtol=0, atol=1e-5), (r, step)
        assert got["sent"] == [ring] * STEPS
        assert got["sync_step"] == STEPS


def test_inproc_float64_gradients_reduce_in_float64() -> None:
    # float64 params: the reduction keeps float64, so the replay matches to float64 rounding
    def run(comm: Any, rank: int) -> list[torch.Tensor]:
        model = _model(dtype=torch.float64)
        opt = DataParallel(model.parameters(), _sgd, comm=comm)
        for step in range(STEPS):
            opt.zero_grad()
            x, y = _batch(rank, step, torch.float64)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    oracle = _oracle(3, STEPS)[-1]
    for got in run_ranks(3, run):
        for a, b in zip(got, oracle, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_nonfinite_gradient_raises_before_sending() -> None:
    model = _model()
    comm = InprocCommunicator.group(1)[0]
    opt = DataParallel(model.parameters(), _sgd, comm=comm)
    x, y = _batch(0, 0, torch.float32)
    nn.functional.mse_loss(model(x), y).backward()
    model[2].bias.grad[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"gradient of group 0, param 3 is non-finite"):
        opt.step()
    assert comm.ledger.totals("ddp/grads")["ops"] == 0


def test_method_table_builds_every_entry() -> None:
    expected = {"ddp": DataParallel, "diloco-fp32": DiLoCo, "streaming-diloco": StreamingDiLoCo,
                "demo": DeMo, "demo-sign": DeMo, "sparseloco": SparseLoCo}  # fmt: skip
    for name, method in METHODS.items():
        opt = build_optimizer(name, _model(), sync_every=8)
        assert isinstance(opt, method.optimizer)
        if name in expected:
            assert type(opt) is expected[name]
    int4 = build_optimizer("diloco-int4", _model(), sync_every=8)
    assert int4.param_groups[0]["compressor"] == "quant(int4, block=128)"
    assert int4.param_groups[0]["error_feedback"] is True and int4.sync_every == 8
    sign = build_optimizer("demo-sign", _model(), sync_every=8, overrides={"lr": 1e-2})
    assert sign.param_groups[0]["lr"] == 1e-2 and sign.param_groups[0]["values"] == "sign"
    ddp = build_optimizer("ddp", _model(), sync_every=1, overrides={"inner_lr": 0.25})
    assert ddp.param_groups[0]["lr"] == 0.25


def test_method_table_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"method must be in \{ddp, diloco-fp32, .*\}, got 'adam'"):
        build_optimizer("adam", _model(), sync_every=1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'outer_lrr'"):
        build_optimizer("diloco-fp32", _model(), sync_every=1, overrides={"outer_lrr": 1.0})
    with pytest.raises(ValueError, match=r"sync_every must be in \[1, inf\), got 0"):
        build_optimizer("ddp", _model(), sync_every=0)
    with pytest.raises(ValueError, match=r"inner_lr.*pass inner=None"):
        build_optimizer("ddp", _model(), sync_every=1, inner=_sgd, overrides={"inner_lr": 0.1})
