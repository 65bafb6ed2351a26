"""DiLoCo on sharded (DTensor) parameters: 2 sites x 2 shards on real gloo processes.

The layout of FSDP inside a site and DiLoCo across sites, without FSDP itself: four processes form
a ``(site, shard)`` device mesh of shape (2, 2); every parameter is a DTensor sharded on dim 0 over
the ``shard`` dimension (uneven shards included: 7 rows over 2 ranks are 4 + 3), and each rank's
optimizer reduces over ``mesh["site"]``, the group of the ranks that hold the same shard in each
site. One spawn runs every check (spawning costs seconds); the parent compares what the ranks
saved against independent oracles:

(a) the DTensor run equals, bit for bit, the same optimizer run on plain tensors that are this
    rank's local shards (parameters, θ_g, outer momentum and error-feedback residuals after every
    sync), for fp32 and for int8 with error feedback, and for SparseLoCo;
(b) fp32 without compression: the two shards of a site, concatenated, equal an unsharded DiLoCo
    run of the full model over the same two sites, bit for bit (each shard's sums are the sums
    of the full model's elements);
(c) after every sync the two sites hold bitwise equal shards, and equal consistency digests;
(d) the optimizer state stays DTensor with the parameter's placements (so
    ``torch.distributed.checkpoint`` can save it sharded);
(e) ``init_sync="broadcast"`` gives site 1 site 0's start, shard by shard; ``"check"`` names the
    tensor that differs;
(f) ``state_dict``/``load_state_dict`` into a fresh optimizer continue bit-exactly, and
    ``global_params()`` swaps θ_g in and restores the local shards;
(g) ``torch.distributed.checkpoint`` over the ranks of one site gives each rank back its own
    residuals; over all four ranks it stores a shard that both sites hold once, so one site
    gets the other's residuals back (why the example saves one checkpoint per site).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from thinwire.collectives import TorchDistCommunicator
from thinwire.optim import DiLoCo, SparseLoCo

SHAPES = [(7, 5), (3,), (5, 2, 2), (1, 4)]  # uneven shards, and one rank with an empty shard
H, ROUNDS = 3, 3
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
CASES: dict[str, dict[str, Any]] = {
    "fp32": dict(cls=DiLoCo, kw={}),
    "int8-ef": dict(cls=DiLoCo, kw=dict(compressor="quant(int8, block=8)", error_feedback=True)),
    "sparseloco": dict(cls=SparseLoCo, kw=dict(topk=2, chunk=4)),
}


def _full(site: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + site)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _grad(site: int, step: int, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * site + 101 * step + i)
    return torch.randn(SHAPES[i], generator=g)


def _snapshot(opt: Any, params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Local shards of params, θ_g, outer momentum and residuals (plain tensors, cloned)."""

    def loc(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.detach()
        return (t.to_local() if hasattr(t, "to_local") else t).clone()

    anchors = [opt.state[p]["anchor"] for p in params]
    return {
        "params": [loc(p) for p in params],
        "anchor": [loc(a) for a in anchors],
        "momentum": [loc(opt.outer.state.get(a, {}).get("momentum_buffer")) for a in anchors],
        "residual": [loc(opt.state[p].get("residual")) for p in params],
    }


def _train(opt: Any, params: list[torch.Tensor], grads: Any, steps: range) -> list[dict]:
    """Run ``steps`` with ``grads(step, i)`` as gradients; a snapshot after every sync."""
    snaps: list[dict] = []
    handle = opt.register_sync_post_hook(lambda o, info: snaps.append(_snapshot(o, params)))
    for step in steps:
        for i, p in enumerate(params):
            p.grad = grads(step, i)
        opt.step()
    handle.remove()
    return snaps


def _dcp_residuals(opt: Any, path: Path, group: Any) -> list[torch.Tensor]:
    """Save ``opt.state_dict()`` with DCP over ``group`` (None: every rank), load it into a
    zeroed copy, and return the local shards of the residuals that come back."""
    from torch.distributed import checkpoint as dcp

    saved = opt.state_dict()
    dcp.save({"optim": saved}, checkpoint_id=path, process_group=group)
    template = copy.deepcopy(saved)
    for st in template["state"].values():
        for t in st.values():
            t.zero_()
    dcp.load({"optim": template}, checkpoint_id=path, process_group=group)
    return [template["state"][i]["residual"].to_local().clone() for i in range(len(SHAPES))]


def _worker(rank: int, tmp: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("site", "shard"))
    site = mesh.get_local_rank("site")
    site_group = mesh["site"].get_group()

    def shard(t: torch.Tensor) -> torch.Tensor:  # the local split, no communication
        return distribute_tensor(t, mesh["shard"], [Shard(0)], src_data_rank=None)

    def dparams(seed: int) -> list[torch.Tensor]:
        return [torch.nn.Parameter(shard(t)) for t in _full(site, seed)]

    out: dict[str, Any] = {"site": site, "shard": mesh.get_local_rank("shard")}
    steps = range(1, H * ROUNDS + 1)
    for name, case in CASES.items():
        comm = TorchDistCommunicator(site_group, timeout_s=60)
        # Site 1 starts from other weights: init_sync="broadcast" gives it site 0's.
        params = dparams(seed=1)
        opt = case["cls"](params, ADAMW, sync_every=H, comm=comm, **case["kw"])
        start = [p.detach().to_local().clone() for p in params]
        snaps = _train(opt, params, lambda s, i: shard(_grad(site, s, i)), steps)
        st = opt.state[params[0]]
        kinds = [st["anchor"], opt.outer.state.get(st["anchor"], {}).get("momentum_buffer")]
        kinds += [st.get("residual")] + [v for v in opt.inner.state[params[0]].values()]
        placements = {
            type(t).__name__ + str(getattr(t, "placements", ""))
            for t in kinds
            if t is not None and t.dim() > 0
        }
        digest = opt.consistency_digest()

        # (a) the same optimizer on plain tensors: this rank's shards of the same start.
        ref_comm = TorchDistCommunicator(site_group, timeout_s=60)
        ref = [torch.nn.Parameter(s.clone()) for s in start]
        ref_opt = case["cls"](ref, ADAMW, sync_every=H, comm=ref_comm, **case["kw"])
        ref_snaps = _train(
            ref_opt, ref, lambda s, i: shard(_grad(site, s, i)).to_local().clone(), steps
        )
        out[name] = dict(
            start=start,
            snaps=snaps,
            ref_snaps=ref_snaps,
            placements=placements,
            digest=digest,
        )

        if name == "int8-ef":
            # (g) torch.distributed.checkpoint over all four ranks vs one per site.
            out["dcp"] = {
                "own": [opt.state[p]["residual"].to_local().clone() for p in params],
                "world": _dcp_residuals(opt, Path(tmp) / "dcp-world", None),
                "site": _dcp_residuals(
                    opt, Path(tmp) / f"dcp-site{site}", mesh["shard"].get_group()
                ),
            }
            # (f) a state_dict round trip into a fresh optimizer, then one more round each.
            sd = copy.deepcopy(opt.state_dict())  # torch.optim shares tensors with a live one
            fresh = dparams(seed=2)
            with torch.no_grad():
                for f, p in zip(fresh, params, strict=True):
                    f.copy_(p)
            comm2 = TorchDistCommunicator(site_group, timeout_s=60)
            opt2 = case["cls"](
                fresh, ADAMW, sync_every=H, comm=comm2, init_sync="off", **case["kw"]
            )
            opt2.load_state_dict(sd)
            more = range(steps.stop, steps.stop + H)
            a = _train(opt, params, lambda s, i: shard(_grad(site, s, i)), more)
            b = _train(opt2, fresh, lambda s, i: shard(_grad(site, s, i)), more)
            out["resume"] = dict(a=a, b=b)
            # global_params(): θ_g in, local shards back after.
            before = [p.detach().to_local().clone() for p in params]
            with torch.no_grad():
                params[0].add_(1.0)  # local progress, so θ_i != θ_g
                moved = [p.detach().to_local().clone() for p in params]
                with opt.global_params():
                    inside = [p.detach().to_local().clone() for p in params]
                after = [p.detach().to_local().clone() for p in params]
            out["global_params"] = dict(
                before=before,
                moved=moved,
                inside=inside,
                after=after,
                anchors=[opt.state[p]["anchor"].to_local().clone() for p in params],
                is_dtensor=all(isinstance(opt.state[p]["anchor"], DTensor) for p in params),
            )

    # (b) an unsharded DiLoCo of the full model over the same two sites (fp32).
    full_comm = TorchDistCommunicator(site_group, timeout_s=60)
    full = [torch.nn.Parameter(t) for t in _full(0, seed=1)]
    full_opt = DiLoCo(full, ADAMW, sync_every=H, comm=full_comm)
    out["full"] = _train(full_opt, full, lambda s, i: _grad(site, s, i), steps)

    # (e) init_sync="check" with different starts on the two sites names the first tensor.
    check_comm = TorchDistCommunicator(site_group, timeout_s=60)
    try:
        DiLoCo(dparams(seed=3), ADAMW, sync_every=H, comm=check_comm, init_sync="check")
        out["check_error"] = None
    except ValueError as exc:
        out["check_error"] = str(exc)
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dtensor")
    mp.spawn(_worker, args=(str(tmp),), nprocs=4, join=True)
    return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(4)]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a is None and b is None


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(CASES))
def test_dtensor_run_equals_plain_run_on_the_local_shards(results, case):
    for r, res in enumerate(results):
        got, ref = res[case]["snaps"], res[case]["ref_snaps"]
        assert len(got) == ROUNDS == len(ref)
        for n, (a, b) in enumerate(zip(got, ref, strict=True)):
            assert _equal(a, b), f"rank {r}, {case}, sync {n + 1}: DTensor run != plain shards"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(CASES))
def test_sites_hold_equal_shards_after_every_sync(results, case):
    for j in range(2):  # shard index: rank j in site 0, rank 2 + j in site 1
        s0, s1 = results[j], results[2 + j]
        assert (s0["site"], s0["shard"], s1["site"], s1["shard"]) == (0, j, 1, j)
        assert _equal(s0[case]["start"], s1[case]["start"]), "init_sync broadcast"
        for n, (a, b) in enumerate(zip(s0[case]["snaps"], s1[case]["snaps"], strict=True)):
            assert _equal(a["params"], b["params"]), f"shard {j}, sync {n + 1}"
            assert _equal(a["anchor"], b["anchor"]), f"shard {j}, sync {n + 1}"
            assert _equal(a["momentum"], b["momentum"]), f"shard {j}, sync {n + 1}"
        assert s0[case]["digest"] == s1[case]["digest"]
    assert results[0][case]["digest"] != results[1][case]["digest"]  # shards differ


@pytest.mark.timeout(240)
def test_fp32_shards_concatenate_to_the_unsharded_run(results):
    for j in range(2):
        assert results[j]["shard"] == j
    full = results[0]["full"]
    for n in range(ROUNDS):
        for key in ("params", "anchor", "momentum"):
            for i in range(len(SHAPES)):
                cat = torch.cat([results[j]["fp32"]["snaps"][n][key][i] for j in range(2)])
                assert torch.equal(cat, full[n][key][i]), f"sync {n + 1}, {key} {i}"
    # The empty shard really is empty: (1, 4) over 2 ranks is 1 + 0 rows.
    assert results[1]["fp32"]["snaps"][0]["params"][3].shape == (0, 4)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(CASES))
def test_state_stays_sharded_like_the_parameter(results, case):
    for res in results:
        assert res[case]["placements"] == {"DTensor(Shard(dim=0),)"}


@pytest.mark.timeout(240)
def test_init_sync_check_names_the_tensor_that_differs(results):
    for res in results:
        msg = res["check_error"]
        assert msg is not None and "group 0 param 0 differs between rank 0 and rank 1" in msg


@pytest.mark.timeout(240)
def test_state_dict_round_trip_continues_bit_exactly(results):
    for r, res in enumerate(results):
        a, b = res["resume"]["a"], res["resume"]["b"]
        assert len(a) == 1 == len(b)
        assert _equal(a, b), f"rank {r}: resumed optimizer diverged"
        assert a[0]["residual"][0] is not None and bool(a[0]["residual"][0].abs().sum() > 0)


@pytest.mark.timeout(240)
def test_global_params_swaps_the_anchor_shards_in_and_out(results):
    for res in results:
        gp = res["global_params"]
        assert gp["is_dtensor"]
        assert _equal(gp["inside"], gp["anchors"])
        assert _equal(gp["after"], gp["moved"])
        assert not _equal(gp["moved"], gp["before"]) or gp["before"][0].numel() == 0


@pytest.mark.timeout(240)
def test_dcp_keeps_per_site_state_only_in_a_checkpoint_per_site(results):
    lost = 0
    for r, res in enumerate(results):
        d, other = res["dcp"], results[(r + 2) % 4]["dcp"]  # same shard, other site
        assert _equal(d["site"], d["own"]), f"rank {r}: per-site checkpoint lost residuals"
        for i, (got, own, theirs) in enumerate(
            zip(d["world"], d["own"], other["own"], strict=True)
        ):
            assert torch.equal(got, own) or torch.equal(got, theirs), f"rank {r}, param {i}"
            lost += not torch.equal(got, own)
        assert not _equal(d["own"], other["own"])  # the sites' residuals differ
    assert lost > 0, "a checkpoint over all ranks kept every site's residuals"
