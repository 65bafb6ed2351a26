"""Train the built-in tiny GPT with any thinwire method under torchrun, over a simulated WAN.

Launch (one machine, 4 ranks, gloo over loopback, simulated home broadband)::

    OMP_NUM_THREADS=1 torchrun --standalone --nnodes=1 --nproc-per-node=4 \\
        examples/train_tiny.py --method diloco-int8 --preset home_broadband --steps 200

Two machines (node 0 shown; node 1 runs the same line with --node-rank=1; 203.0.113.10 stands
for node 0's reachable address; use --preset none on a real WAN)::

    GLOO_SOCKET_IFNAME=eth0 torchrun --nnodes=2 --nproc-per-node=1 --node-rank=0 \\
        --master-addr=203.0.113.10 --master-port=29500 examples/train_tiny.py --method diloco-int8 --preset none

Expected output (rank 0 prints; figures vary with the CPU, bytes do not)::

    method diloco-int8 on 4 ranks (gloo), preset home_broadband, 200 steps, H=20
    step   20  train 2.30  eval 1.93  sent 330,090 B  sim 3.1 s
    ...
    done: eval 1.1x (floor 1.058), sent/rank 3,300,900 B, simulated ~50 s (exposed comm ~13 s)

Methods: ddp, diloco-fp32, diloco-int8, diloco-int4, streaming-diloco, demo, demo-sign, sparseloco.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.distributed as dist

from thinwire.bench import METHODS, MarkovLanguage, TinyGPT, build_optimizer
from thinwire.collectives import TorchDistCommunicator, WanCommunicator, WanConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="diloco-int8", choices=list(METHODS))
    ap.add_argument(
        "--preset", default="home_broadband", help="WAN preset, or 'none' on a real network"
    )
    ap.add_argument("--wan-mode", default="virtual", choices=["virtual", "sleep"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    comm = TorchDistCommunicator()
    rank, world = comm.rank, comm.world_size
    wan = None
    if args.preset != "none":
        wan = WanCommunicator(
            comm,
            WanConfig.from_preset(args.preset, world, mode=args.wan_mode, seed=args.seed),
            measure_compute=False,
        )
    method = METHODS[args.method]
    model = TinyGPT(seed=args.seed)
    opt = build_optimizer(method, model, wan or comm, inner_steps=args.inner_steps)
    lang = MarkovLanguage(seed=args.seed)
    stream = lang.shard(rank, args.seed)
    eval_set = lang.eval_set(64, model.cfg.context + 1, args.seed)
    params = list(model.parameters())
    if rank == 0:
        print(
            f"method {args.method} on {world} ranks (gloo), preset {args.preset}, {args.steps} steps, "
            f"H={args.inner_steps}",
            flush=True,
        )
    for step in range(1, args.steps + 1):
        x = lang.sample(args.batch, model.cfg.context + 1, stream)
        t0 = time.perf_counter()
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        if wan is not None:
            wan.advance(time.perf_counter() - t0)  # modelled time = measured compute
        if method.kind == "ddp":  # plain data parallel: average gradients every step
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            (wan or comm).all_reduce(flat, "mean", tag="ddp/grads")
            torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
        opt.step()
        if step % args.inner_steps == 0 and rank == 0:
            with torch.no_grad():
                if method.kind == "outer":
                    with opt.global_params():
                        ev = float(model(eval_set[:, :-1], eval_set[:, 1:]))
                else:
                    ev = float(model(eval_set[:, :-1], eval_set[:, 1:]))
            sent = comm.ledger.totals()["sent"]
            sim = wan.clock if wan is not None else float("nan")
            print(
                f"step {step:4d}  train {float(loss.detach()):.2f}  eval {ev:.2f}  sent {sent:,} B  sim {sim:.1f} s",
                flush=True,
            )
    if rank == 0:
        exposed = wan.exposed_comm_s if wan is not None else float("nan")
        print(
            f"done: eval {ev:.2f} (floor {lang.entropy_rate():.3f}), sent/rank {comm.ledger.totals()['sent']:,} B, "
            f"simulated {wan.clock if wan else float('nan'):.1f} s (exposed comm {exposed:.1f} s)",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
