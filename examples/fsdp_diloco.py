"""FSDP2 inside each site, DiLoCo across sites: the built-in tiny GPT on a (site, shard) mesh.

The layout of INTELLECT-1 and of torchft's HSDP: the ranks of one site shard the model with FSDP2
(``fully_shard`` over ``mesh["shard"]``) and reduce gradients every step, as FSDP does; between
sites nothing moves but DiLoCo's sync every ``--inner-steps`` steps. Each rank's ``DiLoCo`` holds
θ_g, the outer momentum and the error-feedback residual of its own shard only (DTensors laid out
like the parameters) and syncs that shard over ``mesh["site"]``, the group of the ranks that hold
the same shard in each site.

Launch (one machine, 2 sites x 2 ranks, gloo over loopback; save a checkpoint after step 10)::

    OMP_NUM_THREADS=1 torchrun --standalone --nnodes=1 --nproc-per-node=4 \\
        examples/fsdp_diloco.py --sites 2 --steps 20 --inner-steps 5 --save-at 10 --checkpoint ckpt

Resume in fresh processes; the syncs after step 10 equal the uninterrupted run's bit for bit::

    OMP_NUM_THREADS=1 torchrun --standalone --nnodes=1 --nproc-per-node=4 \\
        examples/fsdp_diloco.py --sites 2 --steps 20 --inner-steps 5 --resume ckpt

Two machines, one site each (node 0 shown; node 1 runs the same line with --node-rank=1;
203.0.113.10 stands for node 0's reachable address). torchrun numbers ranks node by node and the
mesh is (site, shard) in row-major order, so site n is node n: FSDP's per-step collectives stay
inside a machine and only DiLoCo's syncs cross between them. With ``--save-at`` and
``--checkpoint ckpt`` each site writes ``ckpt/site{n}`` on its own machine::

    GLOO_SOCKET_IFNAME=eth0 OMP_NUM_THREADS=1 torchrun --nnodes=2 --nproc-per-node=2 \\
        --node-rank=0 --master-addr=203.0.113.10 --master-port=29500 \\
        examples/fsdp_diloco.py --sites 2 --steps 20 --inner-steps 5

Expected output of the first command (rank 0 prints; the bytes are exact, the losses may vary in
the last digit with the CPU)::

    2 sites x 2 ranks (gloo): FSDP2 over mesh['shard'], DiLoCo over mesh['site'], int8, H=5
    sync  1  step    5  train 3.58  eval 3.43  cross-site sent 54,996 B  sites equal: yes
    sync  2  step   10  train 3.00  eval 2.75  cross-site sent 109,992 B  sites equal: yes
    saved ckpt/site*/ after step 10
    sync  3  step   15  train 2.33  eval 2.16  cross-site sent 164,988 B  sites equal: yes
    sync  4  step   20  train 1.91  eval 1.83  cross-site sent 219,984 B  sites equal: yes
    done: eval 1.83, cross-site bytes sent by rank 0: 219,984 B

Rank 0 holds 54,144 of the model's 108,288 parameters and sends only those across sites: one
int8 frame of 54,996 B per sync (a byte per value, a float32 scale per 256, a 4-byte check).

``--dump DIR`` writes each rank's local shards of the parameters and of every optimizer state
tensor after every sync (``DIR/sync{n}_rank{r}.pt``) and right after a resume
(``DIR/loaded{step}_rank{r}.pt``): ``tests/test_example_fsdp.py`` checks from them that the sites
agree after every sync and that a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from thinwire.bench import MarkovLanguage, TinyGPT
from thinwire.collectives import TorchDistCommunicator
from thinwire.optim import DiLoCo, inner_adamw

COMPRESSORS = {"none": {}, "int8": {"compressor": "quant(int8, block=256)", "error_feedback": True}}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, inf), got {text!r}")
    return value


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--sites", type=_positive, default=2, help="sites (DiLoCo workers)")
    ap.add_argument("--steps", type=_positive, default=20, help="training steps")
    ap.add_argument("--inner-steps", type=_positive, default=5, help="steps between syncs (H)")
    ap.add_argument("--batch", type=_positive, default=8, help="sequences per rank per step")
    ap.add_argument("--seed", type=int, default=0, help="seed of model and data")
    ap.add_argument("--compressor", default="int8", choices=list(COMPRESSORS), help="Δ codec")
    ap.add_argument("--checkpoint", type=Path, help="directory of the checkpoint --save-at writes")
    ap.add_argument("--save-at", type=_positive, help="save a checkpoint after this step")
    ap.add_argument("--resume", type=Path, help="checkpoint directory to resume from")
    ap.add_argument("--dump", type=Path, help="write every rank's shards after every sync here")
    args = ap.parse_args()
    H = args.inner_steps
    for name in ("steps", "save_at"):
        value = getattr(args, name)
        if value is not None and value % H:
            ap.error(
                f"--{name.replace('_', '-')} must be a multiple of --inner-steps ({H}), got {value}"
            )
    if (args.save_at is None) != (args.checkpoint is None):
        ap.error("--save-at and --checkpoint go together")
    return args


def _batch(
    lang: MarkovLanguage, args: argparse.Namespace, length: int, step: int, rank: int, world: int
) -> torch.Tensor:
    """This rank's ``(batch, length)`` tokens of ``step``: a stream of its own per (step, rank),
    so a resumed run reads the same batches without saving any generator state."""
    return lang.sample(args.batch, length, lang.shard(step * world + rank, args.seed))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict, by path (a DTensor as it is)."""
    out: dict[str, torch.Tensor] = {}
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    for k, v in items:
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        else:
            out.update(_tensors(v, f"{prefix}{k}."))
    return out


def _dump(path: Path, model: torch.nn.Module, opt: DiLoCo, site: int, shard: int) -> None:
    """Write this rank's shards of the parameters and of every optimizer state tensor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _tensors(opt.state_dict())
    torch.save(
        {
            "site": site,
            "shard": shard,
            "params": {n: _local(p).detach().clone() for n, p in model.named_parameters()},
            "optim": {k: _local(v).detach().clone() for k, v in state.items()},
            # "DTensor(Shard(dim=0),)" for a tensor sharded like FSDP's parameters
            "layout": {
                k: f"{type(v).__name__}{getattr(v, 'placements', '')}" for k, v in state.items()
            },
        },
        path,
    )


# ---------------------------------------------------------------------------- checkpointing
def save_checkpoint(
    path: Path, model: torch.nn.Module, opt: DiLoCo, site_group: dist.ProcessGroup
) -> None:
    """Save this site's model and optimizer with ``torch.distributed.checkpoint``.

    Each site writes a checkpoint of its own, over its own ranks (``site_group``: the ranks of
    ``mesh["shard"]``), each rank its shards: nothing crosses between sites, and the state that
    is the site's own (the inner AdamW moments, the error-feedback residuals) is kept. One
    checkpoint over all ranks would lose it: DCP saves a chunk that several ranks hold (the
    same shard in two sites, at the same offsets) only once, as if it were replicated.
    ``opt.state_dict()`` goes in as it is: its per-parameter state (θ_g, residuals, the inner
    and outer optimizers' buffers) is DTensors, saved sharded; plain values (step counters,
    settings) are the same on every rank of the site and saved once.
    """
    state = {"model": get_model_state_dict(model), "optim": opt.state_dict()}
    dcp.save(state, checkpoint_id=path, process_group=site_group)


def load_checkpoint(
    path: Path, model: torch.nn.Module, opt: DiLoCo, site_group: dist.ProcessGroup
) -> None:
    """Load what :func:`save_checkpoint` wrote into a freshly built model and optimizer.

    ``dcp.load`` fills the tensors of the state dict it is given, in place, so that state dict
    must already hold every tensor to load. A fresh optimizer's ``state_dict()`` lacks the state
    torch optimizers create at their first step (AdamW's moments, the outer momentum, the
    residuals); :func:`_with_lazy_state` adds an empty tensor for each that the checkpoint holds.
    """
    reader = dcp.FileSystemReader(path)
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {
        "model": get_model_state_dict(model),
        "optim": _with_lazy_state(opt.state_dict(), params, reader.read_metadata()),
    }
    dcp.load(state, storage_reader=reader, process_group=site_group)
    set_model_state_dict(model, state["model"])
    opt.load_state_dict(state["optim"])


def _with_lazy_state(
    sd: dict[str, Any], params: list[torch.Tensor], metadata: dcp.Metadata
) -> dict[str, Any]:
    """``sd`` plus a zero tensor for every per-parameter state tensor the checkpoint holds and
    ``sd`` does not: laid out like its parameter (a DTensor) when it has the parameter's shape,
    else a plain tensor (a step count). Per-parameter state sits under ``...state.<index>.<key>``,
    with the index of the parameter in ``param_groups`` order (the outer optimizer numbers its
    θ_g copies in the same order)."""
    for key, meta in metadata.state_dict_metadata.items():
        path = key.split(".")
        if path[0] != "optim" or not isinstance(meta, dcp.TensorStorageMetadata):
            continue
        if len(path) < 4 or path[-3] != "state":
            continue
        node = sd
        for part in path[1:-3]:
            node = node[int(part) if isinstance(node, list) else part]
        entry = node["state"].setdefault(int(path[-2]), {})
        if path[-1] in entry:
            continue
        p, dtype = params[int(path[-2])], meta.properties.dtype
        if tuple(meta.size) == tuple(p.shape):
            entry[path[-1]] = torch.zeros_like(p.detach(), dtype=dtype)
        else:
            entry[path[-1]] = torch.zeros(meta.size, dtype=dtype)
    return sd


# ---------------------------------------------------------------------------- training
def main() -> None:
    args = _args()
    H = args.inner_steps
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.sites:
        raise SystemExit(f"--sites must divide the number of ranks ({world}), got {args.sites}")
    mesh = init_device_mesh(
        "cpu", (args.sites, world // args.sites), mesh_dim_names=("site", "shard")
    )
    site, shard = mesh.get_local_rank("site"), mesh.get_local_rank("shard")

    model = TinyGPT(seed=args.seed)
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])  # the embeddings (tied to the output) and final norm
    comm = TorchDistCommunicator(mesh["site"].get_group(), timeout_s=120)
    opt = DiLoCo(
        model.parameters(), inner_adamw(), sync_every=H, comm=comm, **COMPRESSORS[args.compressor]
    )
    first = 1
    if args.resume is not None:
        load_checkpoint(args.resume / f"site{site}", model, opt, mesh["shard"].get_group())
        first = opt.inner_step + 1
        if args.dump is not None:  # what was loaded, to compare with what was saved
            _dump(args.dump / f"loaded{first - 1}_rank{rank}.pt", model, opt, site, shard)
    start_bytes = comm.ledger.totals()["sent"]

    lang = MarkovLanguage(seed=args.seed)
    eval_set = lang.eval_set(32, model.cfg.context + 1, args.seed)
    if rank == 0:
        print(
            f"{args.sites} sites x {world // args.sites} ranks (gloo): FSDP2 over mesh['shard'], "
            f"DiLoCo over mesh['site'], {args.compressor}, H={H}"
            + (f", resumed after step {first - 1}" if first > 1 else ""),
            flush=True,
        )
    ev = float("nan")
    for step in range(first, args.steps + 1):
        x = _batch(lang, args, model.cfg.context + 1, step, rank, world)
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()  # FSDP reduce-scatters the gradients inside the site
        opt.step()  # every H steps: DiLoCo's sync of this rank's shard across sites
        if step % H:
            continue
        sync = step // H
        with torch.no_grad(), opt.global_params():  # every rank: FSDP's forward is collective
            ev = float(model(eval_set[:, :-1], eval_set[:, 1:]))
            # FSDP keeps the root module's parameters gathered after a forward without backward,
            # and its next forward would reuse these θ_g values; free them, so that it gathers
            # the local parameters global_params() restores.
            model.reshard()
        # θ_g and the outer momentum of every shard, compared with site 0's (ranks 0, 1, ...).
        digests: list[Any] = [None] * world
        dist.all_gather_object(digests, (shard, opt.consistency_digest()))
        same = all(d == digests[d[0]] for d in digests)
        if args.dump is not None:
            _dump(args.dump / f"sync{sync}_rank{rank}.pt", model, opt, site, shard)
        if rank == 0:
            sent = comm.ledger.totals()["sent"] - start_bytes
            print(
                f"sync {sync:2d}  step {step:4d}  train {float(loss.detach()):.2f}  eval {ev:.2f}  "
                f"cross-site sent {sent:,} B  sites equal: {'yes' if same else 'NO'}",
                flush=True,
            )
        if not same:
            raise SystemExit(f"rank {rank}: θ_g differs between sites after sync {sync}")
        if args.save_at == step:
            save_checkpoint(args.checkpoint / f"site{site}", model, opt, mesh["shard"].get_group())
            if rank == 0:
                print(f"saved {args.checkpoint}/site*/ after step {step}", flush=True)
    if rank == 0:
        print(
            f"done: eval {ev:.2f}, cross-site bytes sent by rank 0: "
            f"{comm.ledger.totals()['sent'] - start_bytes:,} B",
            flush=True,
        )
    opt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
