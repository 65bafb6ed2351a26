"""Train the built-in tiny GPT with any thinwire method under torchrun, over a simulated WAN.

Launch (one machine, 4 ranks, gloo over loopback, simulated home broadband)::

    OMP_NUM_THREADS=1 torchrun --standalone --nnodes=1 --nproc-per-node=4 \\
        examples/train_tiny.py --method diloco-int8 --preset home_broadband --steps 200

Two machines (node 0 shown; node 1 runs the same line with --node-rank=1; 203.0.113.10 stands
for node 0's reachable address; use --preset none on a real WAN)::

    GLOO_SOCKET_IFNAME=eth0 torchrun --nnodes=2 --nproc-per-node=1 --node-rank=0 \\
        --master-addr=203.0.113.10 --master-port=29500 examples/train_tiny.py --method diloco-int8 --preset none

Without torchrun the ranks run as threads of one process (same code path, in-process
communicator; ``--inproc N`` ranks, default 1)::

    python examples/train_tiny.py --inproc 2 --method diloco-int8 --steps 40

Expected output (rank 0 prints; figures vary with the CPU, bytes do not)::

    method diloco-int8 on 4 ranks (gloo), preset home_broadband, 200 steps, H=20
    step   20  train 2.30  eval 1.93  sent 330,090 B  sim 3.1 s
    ...
    done: eval 1.1x (floor 1.058), sent/rank 3,300,900 B, simulated ~50 s (exposed comm ~13 s)

Methods (the table of thinwire.optim.METHODS): ddp, diloco-fp32, diloco-int8, diloco-int4, diloco-2bit,
streaming-diloco, demo, demo-sign, sparseloco.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from thinwire.bench import MarkovLanguage, TinyGPT
from thinwire.collectives import (
    PRESETS,
    Communicator,
    InprocCommunicator,
    TorchDistCommunicator,
    WanCommunicator,
    WanConfig,
)
from thinwire.optim import METHODS, build_optimizer


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
    ap.add_argument("--method", default="diloco-int8", choices=list(METHODS), help="method")
    ap.add_argument(
        "--preset",
        default="home_broadband",
        choices=["none", *PRESETS],
        help="WAN preset, or 'none' on a real network",
    )
    ap.add_argument("--wan-mode", default="virtual", choices=["virtual", "sleep"], help="WAN clock")
    ap.add_argument("--steps", type=_positive, default=200, help="training steps")
    ap.add_argument("--inner-steps", type=_positive, default=20, help="steps between syncs (H)")
    ap.add_argument("--batch", type=_positive, default=16, help="sequences per rank per step")
    ap.add_argument("--seed", type=int, default=0, help="seed of model, data and WAN jitter")
    ap.add_argument(
        "--inproc",
        type=_positive,
        default=None,
        metavar="N",
        help="run N ranks as threads of this process (the default without torchrun: 1)",
    )
    args = ap.parse_args()
    if args.steps % args.inner_steps:
        ap.error(
            f"argument --steps: must be a multiple of --inner-steps ({args.inner_steps}), "
            f"got {args.steps}"
        )
    return args


def train(comm: Communicator, args: argparse.Namespace, engine: str) -> None:
    """Train on this rank of ``comm``; rank 0 prints."""
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
    opt = build_optimizer(method, model, wan or comm, sync_every=args.inner_steps)
    # bytes of training: after the optimizer's one-off start-up agreement (rank 0's parameters)
    start = comm.ledger.totals()["sent"]
    lang = MarkovLanguage(seed=args.seed)
    stream = lang.shard(rank, args.seed)
    eval_set = lang.eval_set(64, model.cfg.context + 1, args.seed)
    t_start = time.perf_counter()
    if rank == 0:
        print(
            f"method {args.method} on {world} rank{'s' if world > 1 else ''} ({engine}), preset {args.preset}, {args.steps} steps, "
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
        opt.step()  # ddp (DataParallel) averages the gradients first
        if step % args.inner_steps == 0 and rank == 0:
            with torch.no_grad():
                if method.kind == "outer":
                    with opt.global_params():
                        ev = float(model(eval_set[:, :-1], eval_set[:, 1:]))
                else:
                    ev = float(model(eval_set[:, :-1], eval_set[:, 1:]))
            sent = comm.ledger.totals()["sent"] - start
            # With a WAN model the clock is simulated; without one (--preset none) it is the wall.
            clock = (
                f"sim {wan.clock:.1f} s"
                if wan is not None
                else f"wall {time.perf_counter() - t_start:.1f} s"
            )
            print(
                f"step {step:4d}  train {float(loss.detach()):.2f}  eval {ev:.2f}  sent {sent:,} B  {clock}",
                flush=True,
            )
    if rank == 0:  # --steps is a multiple of --inner-steps: the last step evaluated
        time_text = (
            f"simulated {wan.clock:.1f} s (exposed comm {wan.exposed_comm_s:.1f} s)"
            if wan is not None
            else f"wall time {time.perf_counter() - t_start:.1f} s (no WAN model)"
        )
        print(
            f"done: eval {ev:.2f} (floor {lang.entropy_rate():.3f}), sent/rank {comm.ledger.totals()['sent'] - start:,} B, "
            f"{time_text}",
            flush=True,
        )


def _run_inproc(args: argparse.Namespace, n: int) -> None:
    """``n`` ranks as threads of this process; the first failure is re-raised."""
    comms = InprocCommunicator.group(n, timeout_s=600.0)
    errors: list[BaseException] = []

    def body(r: int) -> None:
        try:
            train(comms[r], args, "inproc")
        except BaseException as exc:  # re-raised below
            errors.append(exc)
            comms[r].close()  # peers waiting on this rank fail fast

    threads = [threading.Thread(target=body, args=(r,), name=f"rank-{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def main() -> None:
    args = _args()
    torch.set_num_threads(1)
    if args.inproc or "RANK" not in os.environ:
        if not args.inproc:
            print(
                "train_tiny: no torchrun environment (RANK unset): running 1 rank in this process; "
                "use --inproc N for N ranks as threads, or launch with torchrun (see --help)",
                file=sys.stderr,
                flush=True,
            )
        _run_inproc(args, args.inproc or 1)
        return
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    try:
        train(TorchDistCommunicator(), args, "gloo")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
