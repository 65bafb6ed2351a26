"""GRPO on DigitSum with two learners behind simulated home-broadband links.

Launch (2 learners as gloo processes on loopback; DiLoCo with 2-bit pseudo-gradients and error
feedback every 10 steps, outer lr 1, momentum 0, over ``home_broadband``)::

    OMP_NUM_THREADS=1 torchrun --standalone --nnodes=1 --nproc-per-node=2 examples/grpo_wan.py

One learner with the same rollouts per step (32 prompts x 32), for comparison::

    OMP_NUM_THREADS=1 python examples/grpo_wan.py --method ddp --prompts 32

Without torchrun, the learners run as threads of one process (same code path, in-process
communicator)::

    python examples/grpo_wan.py --inproc 2

Each learner samples 16 prompts x 32 completions per step with its own co-located worker, trains
on them with GRPO (β = 0.04), and syncs with the other learner through the method table's
``diloco-2bit``. Rank 0 prints the reward curve (mean sampled reward per 50-step window), the
greedy accuracy over the 20 targets, the bytes of every channel from the ledgers, and the
learner-to-learner bytes against DDP-GRPO's (fp32 gradients all-reduced every step). Time on the
WAN is the virtual clock of ``WanCommunicator`` (measured compute plus modelled communication).
Expected output of ``python examples/grpo_wan.py --inproc 2`` (byte counts are exact; the
torchrun command prints the same rewards and channels, and a learner-to-learner total 32 bytes
larger: gloo ends each row of the start check's all-gather with an 8-byte mark)::

    grpo_wan: 2 learners, method diloco-2bit, home_broadband, 16 prompts x 32 per learner, 400 steps
    steps      reward
         1-50    0.043
       51-100    0.107
      101-150    0.300
      151-200    0.755
      201-250    0.962
      251-300    0.975
      301-350    0.977
      351-400    0.975
    reward 301-400: 0.976; greedy 20/20 targets
    bytes of learner 0 (sent / received):
      diloco/init                    277576 / 0
      diloco/sync                    694880 / 694880
      learners/init                      24 / 24
      rollouts/local                   3200 / 33388800
      site/control                     9624 / 0
      weights/local               110748036 / 0
    learner-to-learner: 3337392 B (all tags, all learners, sent + received); DDP-GRPO sends 444728144 B (133x more)
    simulated WAN clock: 262.1 s (exposed communication 8.0 s)

(about 4 minutes of wall time on 2 shared CPU cores, a progress line on stderr every 10% of the
steps; the clock line includes measured compute, so it varies.)

Options: ``--method`` (any name of ``thinwire.optim.METHODS``), ``--sync-every``,
``--remote-workers 1`` (a WAN worker fed int8 weight frames), ``--share 2 2`` (SAPO rollout
sharing), ``--rollout-lag`` (workers trail the learner), ``--preset``, ``--steps``,
``--prompts``, ``--group``, ``--beta``.
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
from thinwire.optim import METHODS
from thinwire.rl import GRPOConfig
from thinwire.rl.envs import DigitSumEnv
from thinwire.rl.policies import TinyCausalLM
from thinwire.rl.runtime import LearnerResult, train

P_TINY = 69_390  # TinyCausalLM parameters


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
    ap.add_argument("--method", default="diloco-2bit", choices=list(METHODS))
    ap.add_argument("--steps", type=pos, default=400)
    ap.add_argument("--prompts", type=pos, default=16, help="prompts per step per learner")
    ap.add_argument("--group", type=pos, default=32, help="completions per prompt (G)")
    ap.add_argument("--beta", type=float, default=0.04, help="weight of the KL to the start")
    ap.add_argument("--preset", default="home_broadband", choices=sorted(PRESETS))
    ap.add_argument("--sync-every", type=pos, default=10, help="H of the DiLoCo family")
    ap.add_argument("--remote-workers", type=nonneg, default=0)
    ap.add_argument("--share", type=int, nargs=2, default=None, metavar=("PUBLISH", "EXTERNAL"))
    ap.add_argument("--rollout-lag", type=nonneg, default=0)
    ap.add_argument("--window", type=pos, default=50, help="steps per printed reward window")
    ap.add_argument("--inproc", type=nonneg, default=0, help="N learners as threads (no torchrun)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def _ddp_bytes(args: argparse.Namespace, n: int) -> int:
    """DDP-GRPO's learner bytes for this run length (all learners, sent + received + control).

    The ledger's formulas: a ring all-reduce of ``k`` values of ``b`` bytes moves
    ``2(n - 1) ceil(k/n) b`` bytes each way per learner. Per step: the ``P`` fp32 gradients, the
    two float64 loss normalisers, and per op the WAN clock's two float64 issue times (control).
    Once: rank 0's parameters and int64 step count broadcast to the ``n - 1`` others (two ops,
    one per dtype), and the 16-byte start check (8-byte length + fingerprint to each peer), with
    the clock exchanges of those three ops.
    """
    ring = lambda k, b: 2 * (n - 1) * -(-k // n) * b  # noqa: E731
    clock = ring(2, 8)
    per_step = 2 * ring(P_TINY, 4) + 2 * ring(2, 8) + 2 * 2 * clock  # sent + received, 2 ops
    start = 2 * (n - 1) * (4 * P_TINY + 8) + n * (2 * (n - 1) * 24 + 3 * 2 * clock)
    return n * args.steps * per_step + start


def _report(args: argparse.Namespace, learners: list[LearnerResult], n: int, total: int) -> None:
    rewards = [sum(col) / len(col)
               for col in zip(*[[m["reward/mean"] for m in lr.history] for lr in learners], strict=True)]  # fmt: skip
    print(f"grpo_wan: {n} learner{'s' if n > 1 else ''}, method {args.method}, {args.preset}, "
          f"{args.prompts} prompts x {args.group} per learner, {args.steps} steps")  # fmt: skip
    print("steps      reward")
    for a in range(0, len(rewards), args.window):
        w = rewards[a : a + args.window]
        print(f"{f'{a + 1}-{a + len(w)}':>9}    {sum(w) / len(w):.3f}")
    tail = rewards[max(0, len(rewards) - 100) :]
    lr0 = learners[0]
    print(f"reward {len(rewards) - len(tail) + 1}-{len(rewards)}: {sum(tail) / len(tail):.3f}; "
          f"greedy {DigitSumEnv().greedy_accuracy(lr0.policy)}/20 targets")  # fmt: skip
    print("bytes of learner 0 (sent / received):")
    channels: dict[str, list[int]] = {}
    for tags in (lr0.learner_bytes, lr0.site_bytes):
        for tag, v in tags.items():
            ch = channels.setdefault("/".join(tag.split("/")[:2]), [0, 0])
            ch[0] += v["sent"]
            ch[1] += v["recv"]
    for ch, (s, r) in sorted(channels.items()):
        if s or r:  # wan/clock carries control bytes only
            print(f"  {ch:<24} {s:>12} / {r}")
    if n > 1:
        ddp = _ddp_bytes(args, n)
        if args.method == "ddp":
            print(f"learner-to-learner: {total} B (all tags, all learners, sent + received); "
                  f"DDP-GRPO by formula: {ddp} B")  # fmt: skip
        else:
            print(f"learner-to-learner: {total} B (all tags, all learners, sent + received); "
                  f"DDP-GRPO sends {ddp} B ({ddp / total:.0f}x more)")  # fmt: skip
    print(f"simulated WAN clock: {lr0.sim_clock_s:.1f} s "
          f"(exposed communication {lr0.exposed_comm_s:.1f} s)")  # fmt: skip


def _progress(args: argparse.Namespace, show: bool) -> Callable[[int, dict[str, float]], None]:
    """A stderr line every 10% of the steps (first learner to get there), with that learner's
    mean reward since the previous line and the elapsed wall time."""
    every = max(1, args.steps // 10)
    t0 = time.perf_counter()
    lock = threading.Lock()
    printed: set[int] = set()
    rewards: dict[int, list[float]] = {}  # per learner thread

    def on_step(step: int, metrics: dict[str, float]) -> None:
        step += 1
        mine = rewards.setdefault(threading.get_ident(), [])
        mine.append(metrics["reward/mean"])
        if not show or (step % every and step != args.steps):
            return
        window = mine[-every:]
        with lock:
            if step in printed:
                return
            printed.add(step)
        print(f"grpo_wan: step {step}/{args.steps}, reward {sum(window) / len(window):.3f} "
              f"(last {len(window)} steps), {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)  # fmt: skip

    return on_step


def main() -> None:
    args = _args()
    torch.set_num_threads(1)  # a 69k-parameter model: one thread per learner is fastest on CPU
    cfg = GRPOConfig(group_size=args.group, prompts_per_step=args.prompts, max_completion_length=3,
                     epsilon_high=0.28, beta=args.beta, max_staleness=args.rollout_lag,
                     rollout_lag=args.rollout_lag, seed=args.seed, steps=args.steps,
                     method=args.method, sync_every=args.sync_every)  # fmt: skip
    site = dict(remote_workers=args.remote_workers, verify_remote=args.remote_workers > 0,
                share=tuple(args.share) if args.share else None)  # fmt: skip
    env, policy = DigitSumEnv(), TinyCausalLM(seed=args.seed)
    if args.inproc or "WORLD_SIZE" not in os.environ:
        res = train(policy, env, None, cfg, learners=max(1, args.inproc),
                    wan_preset=args.preset, on_step=_progress(args, True), **site)  # fmt: skip
        _report(args, res.learners, len(res.learners), res.learner_bytes())
        return
    comm = TorchDistCommunicator(backend="gloo")  # reads torchrun's RANK, WORLD_SIZE, MASTER_*
    wan = WanCommunicator(comm, WanConfig.from_preset(args.preset, comm.world_size))
    try:
        mine = train(policy, env, None, cfg, comm=wan, on_step=_progress(args, comm.rank == 0),
                     **site).learners[0]  # fmt: skip
        # rank 0 reports every learner's reward curve and byte total: gather them (small
        # strict JSON, tag "report", after training so it is not in the totals above)
        rs = [m["reward/mean"] for m in mine.history]
        total = sum(v[k] for v in mine.learner_bytes.values()
                    for k in ("sent", "recv", "control_sent", "control_recv"))  # fmt: skip
        blob = json.dumps({"r": [r if math.isfinite(r) else None for r in rs], "b": total},
                          allow_nan=False).encode()  # fmt: skip
        rows = [json.loads(b) for b in comm.all_gather_bytes(blob, tag="report")]
        if comm.rank == 0:
            peers = [dataclass_copy(mine, i, row["r"]) for i, row in enumerate(rows)]
            peers[0] = mine
            _report(args, peers, comm.world_size, sum(row["b"] for row in rows))
    finally:
        comm.close()


def dataclass_copy(mine: LearnerResult, i: int, rewards: list[float | None]) -> LearnerResult:
    """A peer's result for the report: its reward curve (its policy and bytes stay remote)."""
    curve = [{"reward/mean": math.nan if r is None else r} for r in rewards]
    return LearnerResult(i, curve, mine.policy, {}, {})


if __name__ == "__main__":
    main()
