"""DeMo and SparseLoCo on real gloo ranks: float64 references, ledger bytes, threads vs processes.

One ``torch.multiprocessing.spawn`` of 3 processes (FileStore rendezvous in ``tmp_path``, gloo on
loopback, as ``tests/collectives/test_torch_dist.py``) runs every scenario on a 2-rank and a 3-rank
group and saves per-step snapshots, the bytes each rank handed to the all-gather and its ledger. The
parent checks them against the float64 references of ``test_demo.py`` / ``test_sparseloco.py``,
checks that every rank holds the same bits, that the ledger matches the byte formulas of
``docs/design.md``, and that the same scenario on in-process threads gives the same bits.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_demo import (
    check_demo_step,
    demo_rank,
    frame_bytes,
    group_cfg,
    payload_bytes,
    ref_k_density,
    run_ranks,
    tiny_model,
)
from test_sparseloco import check_run, slc_rank

from thinwire.compression import build_codec
from thinwire.optim import demo_compressor, sparseloco_compressor

NPROCS = 3
GROUPS = {2: [0, 1], 3: [0, 1, 2]}
STEPS = 4
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo_float": ("demo", dict(lr=1e-2, momentum_decay=0.9, topk=4, chunk=8, weight_decay=0.05)),
    "demo_sign": (
        "demo",
        dict(
            lr=1e-2,
            momentum_decay=0.9,
            topk=4,
            chunk=8,
            values="sign",
            subtract="quantized",
            index_coding="fixed",
        ),
    ),
    "slc_entropy": ("slc", dict(outer_lr=0.8, sync_every=2, error_decay=0.9, topk=4, chunk=8)),
    "slc_fixed": (
        "slc",
        dict(
            outer_lr=0.8,
            sync_every=2,
            error_decay=0.9,
            topk=4,
            chunk=8,
            index_coding="fixed",
            aggregate="global_mean",
        ),
    ),
}
CASES = [(P, name) for P in GROUPS for name in SCENARIOS]


def _run(kind: str, rank: int, comm: Any, kw: dict, model: torch.nn.Module) -> tuple[list, list]:
    fn = demo_rank if kind == "demo" else slc_rank
    hist, _ = fn(rank, comm, model, STEPS, kw=kw)
    return hist, [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, nprocs: int, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    from thinwire.collectives import TorchDistCommunicator

    world = TorchDistCommunicator(
        init_method=f"file://{tmp}/rdzv", rank=rank, world_size=nprocs, timeout_s=60
    )
    out: dict[Any, Any] = {}
    try:
        # new_group is collective over the world: every rank creates every group, in one order.
        groups = {case: dist.new_group(GROUPS[case[0]]) for case in CASES}
        for case in CASES:
            if rank not in GROUPS[case[0]]:
                continue
            comm = TorchDistCommunicator(groups[case], timeout_s=60)
            kind, kw = SCENARIOS[case[1]]
            # tiny_model() seeds the global RNG: the same initial parameters in every process
            hist, final = _run(kind, comm.rank, comm, kw, tiny_model())
            out[case] = {
                "rank": comm.rank,
                "hist": hist,
                "final": final,
                "records": [dataclasses.asdict(r) for r in comm.ledger.records],
            }
    finally:
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
        world.close()


@pytest.fixture(scope="module")
def gloo(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    tmp = tmp_path_factory.mktemp("sparse_gloo")
    mp.spawn(_worker, args=(NPROCS, str(tmp)), nprocs=NPROCS, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(NPROCS)]


def _ranks(gloo: list, case: tuple[int, str]) -> list[dict]:
    res = [gloo[g][case] for g in GROUPS[case[0]]]
    assert [o["rank"] for o in res] == list(range(case[0]))
    return res


def _bundle(kind: str, kw: dict) -> int:
    """Frame size (one bucket) for the tiny model under this scenario's codec."""
    shapes = [tuple(p.shape) for p in tiny_model().parameters()]
    coding = kw.get("index_coding", "entropy")
    if kind == "demo":
        values = kw.get("values", "float")
        k_of, vfmt = (lambda C: min(kw["topk"], C)), ("fp32" if values == "float" else "sign")
    else:
        k_of, vfmt = (lambda C: ref_k_density(C, kw["topk"], kw["chunk"])), "2bit"
    return frame_bytes(
        [payload_bytes(s, s=kw["chunk"], k_of=k_of, values=vfmt, coding=coding) for s in shapes]
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", CASES, ids=[f"P{P}-{n}" for P, n in CASES])
def test_gloo_against_reference_ledger_and_inproc(gloo, case):
    P, name = case
    kind, kw = SCENARIOS[name]
    res = _ranks(gloo, case)
    hists = [o["hist"] for o in res]
    if kind == "demo":
        codec = demo_compressor(
            topk=kw["topk"],
            chunk=kw["chunk"],
            values=kw.get("values", "float"),
            index_coding=kw.get("index_coding", "entropy"),
        )
        amb = tot = 0
        for t in range(STEPS):
            a, n = check_demo_step(
                [h[t] for h in hists], group_cfg(kw, 4), codec_of=lambda j: codec
            )
            amb, tot = amb + a, tot + n
        assert amb <= 0.05 * tot
        n_ops = STEPS
    else:
        codec = build_codec(
            sparseloco_compressor(
                topk=kw["topk"], chunk=kw["chunk"], index_coding=kw.get("index_coding", "entropy")
            )
        )
        n_ops = check_run([(h, None) for h in hists], kw, kw["sync_every"], codec=codec)
        assert n_ops == STEPS // kw["sync_every"]
    # every rank holds the same bits
    for o in res[1:]:
        assert all(torch.equal(a, b) for a, b in zip(res[0]["final"], o["final"], strict=True))
    # ledger: one all-gather per step (DeMo) / sync (SparseLoCo), (P-1) * frame each way
    M = _bundle(kind, kw)
    for o in res:
        rows = [
            (x["op"], x["algorithm"], x["engine"], x["sent"], x["recv"])
            for x in o["records"]
            if not x["tag"].endswith("/init")  # the start-state broadcast, tested elsewhere
        ]
        assert (
            rows == [("all_gather_into_tensor", "ring", "gloo", (P - 1) * M, (P - 1) * M)] * n_ops
        )
        assert all(b.numel() == M for rec in o["hist"] for b in rec["blobs"])
    # the same scenario on in-process threads: the same bits
    # (threads share the global RNG, so the model is built once and copied per rank)
    base = tiny_model()
    models = [copy.deepcopy(base) for _ in range(P)]
    inproc = run_ranks(P, lambda r, c: _run(kind, r, c, kw, models[r]))
    for (_, final), o in zip(inproc, res, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(final, o["final"], strict=True))
