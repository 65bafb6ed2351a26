"""GRPO on DigitSum with two learners behind simulated home-broadband links.

Launch (2 learners as gloo processes on loopback; DiLoCo at the RL default — outer lr 1.0,
momentum 0, H = 10 — over ``home_broadband``)::

    OMP_NUM_THREADS=1 torchrun --standalone --nnodes=1 --nproc-per-node=2 examples/grpo_wan.py --sync diloco

Single learner with the same total batch (32 prompts x 32), for comparison::

    OMP_NUM_THREADS=1 python examples/grpo_wan.py --sync none --prompts 32

Without torchrun, the learners run as threads of one process (same code path, in-process
communicator)::

    python examples/grpo_wan.py --inproc 2 --sync diloco

Each learner samples 16 prompts x 32 completions per step with its own co-located worker, trains
on them with GRPO, and syncs with the other learner through ``thinwire.optim.DiLoCo`` every 10
steps. Rank 0 prints the reward curve (mean sampled reward per 50-step window), the final
greedy accuracy over the 20 targets, and the bytes of every channel from the ledger. Time on
the WAN is the virtual clock of ``WanCommunicator`` (measured compute plus modelled
communication). Expected output of the torchrun command above (the same seeds give the same
rewards on the in-process path; byte counts are exact)::

    grpo_wan: 2 learners, sync diloco, home_broadband, 16 prompts x 32 per learner, 400 steps
    steps      reward
         1-50    0.056
       51-100    0.212
      101-150    0.540
      151-200    0.714
      201-250    0.834
      251-300    0.931
      301-350    0.995
      351-400    0.998
    reward 301-400: 0.996; greedy 20/20 targets
    bytes per learner (sent / received):
      learners/sync                11102400 / 11102400
      rollouts/local                      0 / 32652800
      weights/local               111024000 / 0
    learner-to-learner: 11102400 B sent per learner; DDP-GRPO would send 111024000 B (10.0x more)
    simulated WAN clock: 51.5 s (exposed communication 11.4 s)

(45 s of wall time on 2 CPU cores, with a progress line on stderr every 10% of the steps; the
clock line includes measured compute, so it varies.)
The single-learner command reaches about 0.95 over steps 301-400 (greedy 19/20).

Options: ``--sync {none,ddp,diloco,streaming,demo,sparseloco}``, ``--compressor "quant(int4,
block=128)"`` (DiLoCo), ``--remote-workers 1`` (a WAN worker fed int8 weight deltas),
``--share 2 2`` (SAPO rollout sharing), ``--preset``, ``--steps``, ``--prompts``, ``--group``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable

import torch

from thinwire.collectives import PRESETS, TorchDistCommunicator, WanCommunicator, WanConfig
from thinwire.rl.config import GRPOConfig
from thinwire.rl.runtime import SYNC_KINDS, LearnerResult, SyncOptions, run_learner, run_local

P_TINY = 69_390  # TinyCausalLM parameters at its defaults


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, inf), got {text!r}")
        return value

    return parse


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pos, nonneg = _int_at_least(1), _int_at_least(0)
    ap.add_argument("--sync", default="diloco", choices=SYNC_KINDS)
    ap.add_argument("--steps", type=pos, default=400)
    ap.add_argument("--prompts", type=pos, default=16, help="prompts per step per learner")
    ap.add_argument("--group", type=pos, default=32, help="completions per prompt (G)")
    ap.add_argument("--preset", default="home_broadband", choices=sorted(PRESETS))
    ap.add_argument("--sync-every", type=pos, default=10, help="H of DiLoCo/SparseLoCo")
    ap.add_argument(
        "--compressor", default=None, help='DiLoCo codec, e.g. "quant(int4, block=128)"'
    )
    ap.add_argument("--demo-lr", type=float, default=3e-3)
    ap.add_argument("--remote-workers", type=nonneg, default=0)
    ap.add_argument("--share", type=int, nargs=2, default=None, metavar=("PUBLISH", "EXTERNAL"))
    ap.add_argument("--max-staleness", type=nonneg, default=0)
    ap.add_argument("--window", type=pos, default=50, help="steps per printed reward window")
    ap.add_argument(
        "--inproc", type=nonneg, default=0, help="run N learners as threads (no torchrun)"
    )
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def _report(args: argparse.Namespace, learners: list[LearnerResult], n: int) -> None:
    rewards = [
        sum(col) / len(col)
        for col in zip(*[[m["reward/mean"] for m in lr.history] for lr in learners], strict=True)
    ]
    print(f"grpo_wan: {n} learner{'s' if n > 1 else ''}, sync {args.sync}, {args.preset}, "
          f"{args.prompts} prompts x {args.group} per learner, {args.steps} steps")  # fmt: skip
    print("steps      reward")
    for a in range(0, len(rewards), args.window):
        w = rewards[a : a + args.window]
        print(f"{f'{a + 1}-{a + len(w)}':>9}    {sum(w) / len(w):.3f}")
    tail = rewards[max(0, len(rewards) - 100) :]
    print(f"reward {len(rewards) - len(tail) + 1}-{len(rewards)}: {sum(tail) / len(tail):.3f}; "
          f"greedy {learners[0].greedy}/20 targets")  # fmt: skip
    print("bytes per learner (sent / received):")
    lr0 = learners[0]
    channels: dict[str, list[int]] = {}
    for tag, v in lr0.bytes_by_tag.items():
        ch = channels.setdefault("/".join(tag.split("/")[:2]), [0, 0])
        ch[0] += v["sent"]
        ch[1] += v["recv"]
    for ch, (s, r) in sorted(channels.items()):
        if s or r:  # wan/clock carries control bytes only
            print(f"  {ch:<24} {s:>12} / {r}")
    sync = sum(v["sent"] for t, v in lr0.bytes_by_tag.items() if t.startswith("learners/"))
    if n > 1:
        ddp = args.steps * 2 * (n - 1) * -(-P_TINY // n) * 4  # ring all-reduce of fp32 gradients
        if args.sync == "ddp":  # this run is the baseline: no comparison to make
            print(
                f"learner-to-learner: {sync} B sent per learner "
                "(DDP-GRPO: fp32 gradients ring all-reduced every step)"
            )
        elif not sync:
            print(f"learner-to-learner: 0 B (no sync); DDP-GRPO would send {ddp} B")
        else:
            print(
                f"learner-to-learner: {sync} B sent per learner; "
                f"DDP-GRPO would send {ddp} B ({ddp / sync:.1f}x more)"
            )
    print(
        f"simulated WAN clock: {lr0.sim_clock_s:.1f} s (exposed communication {lr0.exposed_comm_s:.1f} s)"
    )


def _progress(args: argparse.Namespace, show: bool) -> Callable[[int, dict[str, float]], None]:
    """``on_step`` callback: a stderr line every 10% of the steps (first learner to get there),
    with that learner's mean reward since the previous line and the elapsed wall time."""
    every = max(1, args.steps // 10)
    t0 = time.perf_counter()
    lock = threading.Lock()
    printed: set[int] = set()
    rewards: dict[int, list[float]] = {}  # per learner thread

    def on_step(step: int, metrics: dict[str, float]) -> None:
        step += 1  # run_learner counts from 0; the report counts from 1
        mine = rewards.setdefault(threading.get_ident(), [])
        mine.append(metrics["reward/mean"])
        if not show or (step % every and step != args.steps):
            return
        window = mine[-every:]
        with lock:
            if step in printed:
                return
            printed.add(step)
        print(
            f"grpo_wan: step {step}/{args.steps}, reward {sum(window) / len(window):.3f} "
            f"(last {len(window)} steps), {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    return on_step


def main() -> None:
    args = _args()
    torch.set_num_threads(1)  # a 69k-parameter model: one thread per learner is fastest on CPU
    cfg = GRPOConfig(group_size=args.group, prompts_per_step=args.prompts, max_completion_length=3,
                     epsilon_high=0.28, max_staleness=args.max_staleness, seed=args.seed)  # fmt: skip
    opts = SyncOptions(sync_every=args.sync_every, compressor=args.compressor, demo_lr=args.demo_lr,
                       demo_values="sign" if args.sync == "demo" else "float",
                       demo_bucket=args.sync == "demo")  # fmt: skip
    site = dict(options=opts, remote_workers=args.remote_workers, verify_remote=args.remote_workers > 0,
                share=tuple(args.share) if args.share else None)  # fmt: skip
    if args.inproc or "WORLD_SIZE" not in os.environ:
        site["on_step"] = _progress(args, show=True)
        res = run_local(
            cfg, max(1, args.inproc), args.sync, steps=args.steps, wan_preset=args.preset, **site
        )
        _report(args, res.learners, len(res.learners))
        return
    comm = TorchDistCommunicator(backend="gloo")  # reads torchrun's RANK, WORLD_SIZE, MASTER_*
    wan = WanCommunicator(comm, WanConfig.from_preset(args.preset, comm.world_size))
    site["on_step"] = _progress(args, show=comm.rank == 0)
    try:
        mine = run_learner(cfg, wan, steps=args.steps, sync=args.sync, **site)
        # rank 0 reports every learner's reward curve: gather them (small strict JSON, tag
        # "report"; a non-finite reward travels as null)
        rs = [m["reward/mean"] for m in mine.history]
        blob = json.dumps([r if math.isfinite(r) else None for r in rs], allow_nan=False).encode()
        curves = [
            [math.nan if r is None else r for r in json.loads(b)]
            for b in comm.all_gather_bytes(blob, tag="report")
        ]
        if comm.rank == 0:
            peers = [LearnerResult(i, [{"reward/mean": r} for r in c], None, {}, 0.0, 0.0, mine.policy)
                     for i, c in enumerate(curves)]  # fmt: skip
            peers[0] = mine
            _report(args, peers, comm.world_size)
    finally:
        comm.close()


if __name__ == "__main__":
    main()
