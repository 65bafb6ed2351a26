"""GRPO across WAN links on DigitSum: acceptance runs, the high-compression sweep, the verifier.

Run (2-core CPU; one torch thread per learner, learners are threads)::

    python benchmarks/grpo.py --only runs    # 1 vs 2 vs 4 learners, 3 seeds (~40 min)
    python benchmarks/grpo.py --only sweep   # why compressed learners lost reward (~45 min)
    python benchmarks/grpo.py --only verify  # verifier detection rates and cost (~1 min)

Prints markdown for ``benchmarks/RESULTS.md``. Protocol: DigitSum, 400 steps, per step 1,024
completions in total (one learner 32 prompts x G = 32; two learners 16 x 32 each; four 8 x 32),
Adam 1e-3, ε 0.2/0.28, token_mean, temperature 1, every learner link simulated as
``home_broadband``. "reward" is the mean sampled reward of steps 301-400, mean ± std over the
seeds; "stuck" counts, summed over seeds, the targets whose greedy answer is wrong after the
last step (the reward of a target that collapsed onto a wrong answer is 0 from then on, so each
costs 1/20 of the reward). "learner bytes" is everything on the learners' communicator (every
tag: optimizer syncs, start-up broadcast and check, loss normaliser, WAN clock control), sent +
received, summed over learners, from its ledger; "vs DDP" divides the DDP-GRPO run's (same
learner count, fp32 gradients all-reduced every step) by it.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from typing import Any

import torch
from _provenance import git_commit

from thinwire.rl import GRPOConfig, PolicyStore, Rollout, RolloutVerifier
from thinwire.rl.envs import DigitSumEnv
from thinwire.rl.policies import TinyCausalLM, sample
from thinwire.rl.runtime import RolloutWorker, TrainResult, train

ENV = DigitSumEnv()
REF = dict(group_size=32, max_completion_length=3, epsilon_high=0.28, lr=1e-3, max_staleness=0)


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration: learners, GRPO settings (over :data:`REF`), ``train`` keywords."""

    name: str
    learners: int
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    site: dict[str, Any] = dataclasses.field(default_factory=dict)

    def config(self, seed: int, steps: int) -> GRPOConfig:
        per = 32 // self.learners
        return GRPOConfig(**{**REF, "prompts_per_step": per, "seed": seed, "steps": steps,
                             **self.settings})  # fmt: skip


def _one(run: Run, seed: int, steps: int) -> tuple[TrainResult, float]:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = train(TinyCausalLM(seed=seed), ENV, None, run.config(seed, steps),
                learners=run.learners, **run.site)  # fmt: skip
    return res, time.perf_counter() - t0


def _stat(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _ddp_bytes(learners: int, steps: int) -> int:
    """Learner bytes of DDP-GRPO over ``steps`` steps (a tiny batch: bytes do not depend on it)."""
    cfg = GRPOConfig(**{**REF, "group_size": 2, "prompts_per_step": 1, "steps": steps})
    return train(TinyCausalLM(), ENV, None, cfg, learners=learners).learner_bytes()


def table(runs: list[Run], seeds: list[int], steps: int, ddp: dict[int, int]) -> list[str]:
    """One row per run: reward 301-400 over seeds, stuck targets, bytes, ratio vs DDP."""
    out = ["| run | learners | reward 101-200 | reward 301-400 | per seed | stuck | learner bytes | vs DDP | wall s |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for run in runs:
        early, late, stuck, walls, lb = [], [], 0, [], 0
        for seed in seeds:
            res, wall = _one(run, seed, steps)
            early.append(res.window(101, 200))
            late.append(res.window(steps - 99, steps))
            stuck += 20 - ENV.greedy_accuracy(res.learners[0].policy)
            walls.append(wall)
            lb = res.learner_bytes()
            print(f"  {run.name} seed {seed}: {late[-1]:.3f}, {wall:.0f} s", flush=True)
        if run.learners > 1 and run.learners not in ddp:
            ddp[run.learners] = _ddp_bytes(run.learners, steps)
        ratio = f"{ddp[run.learners] / lb:,.0f}x" if run.learners > 1 else "-"
        out.append(f"| {run.name} | {run.learners} | {_stat(early)} | {_stat(late)} | "
                   f"{', '.join(f'{x:.3f}' for x in late)} | {stuck} | {lb:,} | {ratio} | "
                   f"{statistics.mean(walls):.0f} |")  # fmt: skip
    return out


BETA = {"beta": 0.04}
RUNS = [
    Run("one learner", 1, BETA),
    Run("DDP-GRPO", 2, BETA),
    Run("DiLoCo 2-bit EF (H 10)", 2, {**BETA, "method": "diloco-2bit"}),
    Run("DDP-GRPO", 4, BETA),
    Run("DiLoCo 2-bit EF (H 10)", 4, {**BETA, "method": "diloco-2bit"}),
    Run("DiLoCo 2-bit EF (H 20)", 2, {**BETA, "method": "diloco-2bit", "sync_every": 20}),
    Run("DiLoCo 2-bit EF (H 20)", 4, {**BETA, "method": "diloco-2bit", "sync_every": 20}),
]
SWEEP = [
    Run("one learner, β 0", 1),
    Run("DiLoCo fp32, β 0", 2, {"method": "diloco-fp32"}),
    Run("DiLoCo int4, no EF, β 0", 2, {"method": "diloco-int4", "method_settings": {"error_feedback": False}}),
    Run("DiLoCo int4 EF, β 0", 2, {"method": "diloco-int4"}),
    Run("DiLoCo 2-bit EF, β 0", 2, {"method": "diloco-2bit"}),
    Run("DiLoCo 2-bit EF, H 20, β 0.04", 2, {**BETA, "method": "diloco-2bit", "sync_every": 20}),
    Run("DiLoCo 2-bit EF, outer lr 0.7, β 0.04", 2,
        {**BETA, "method": "diloco-2bit", "method_settings": {"outer_lr": 0.7}}),
    Run("DiLoCo 2-bit EF, lag 2, β 0.04", 2,
        {**BETA, "method": "diloco-2bit", "max_staleness": 2, "rollout_lag": 2}),
    Run("DiLoCo 2-bit EF, int8 remote worker, β 0.04", 2, {**BETA, "method": "diloco-2bit"},
        {"workers": 0, "remote_workers": 1}),
    Run("DeMo sign, β 0.04", 2, {**BETA, "method": "demo-sign"}),
    Run("DiLoCo 2-bit EF, outer lr 0.7, Nesterov 0.9, β 0.04", 2,
        {**BETA, "method": "diloco-2bit",
         "method_settings": {"outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}}),
]  # fmt: skip


def verify(trials: int = 1000) -> list[str]:
    """Detection rates of the verifier on DigitSum rollouts (3 PRF positions = all of Lc)."""
    pol = TinyCausalLM(seed=3)
    store = PolicyStore(keep=16)
    for v in range(5):  # five versions a few optimizer steps apart
        store.publish(pol, v)
        with torch.no_grad():
            for p in pol.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(v)) * 1e-2)

    def made(version: int, *, weights: Any = None, seed: int) -> list[Rollout]:
        w = RolloutWorker(ENV, TinyCausalLM(), ENV.sampling_args, group_size=32, seed=seed)
        w.load(store.get(version).state if weights is None else weights, version)
        return [r for g in w.generate(-(-trials // 32)) for r in g.rollouts][:trials]

    honest = made(4, seed=11)
    fp4 = store.fingerprint(4)
    gen = torch.Generator().manual_seed(0)

    def edit_tok(r: Rollout) -> Rollout:
        ids = r.completion_ids.clone()
        j = int(torch.randint(0, 3, (), generator=gen))
        ids[j] = (ids[j] + int(torch.randint(1, 14, (), generator=gen))) % 14
        return dataclasses.replace(r, completion_ids=ids)

    def edit_lp(r: Rollout) -> Rollout:
        lp = r.behavior_logprobs.clone()
        lp[int(torch.randint(0, 3, (), generator=gen))] += 0.01
        return dataclasses.replace(r, behavior_logprobs=lp)

    cases = {
        "honest (false positives)": honest,
        "other weights, forged fingerprint": [dataclasses.replace(r, fingerprint=fp4) for r in
                                              made(4, weights=TinyCausalLM(seed=77).state_dict(), seed=13)],
        "stale by 1 version, claimed fresh, forged fingerprint": [
            dataclasses.replace(r, policy_version=4, fingerprint=fp4) for r in made(3, seed=14)],
        "one token edited": [edit_tok(r) for r in honest],
        "one log-prob edited by +0.01": [edit_lp(r) for r in honest],
    }  # fmt: skip
    out = [f"Verifier on DigitSum ({trials} rollouts per case, 3 PRF positions = all of Lc = 3, "
           "atol 1e-4):", "", "| case | flagged | rate |", "|---|---:|---:|"]  # fmt: skip
    for name, rs in cases.items():
        ver = RolloutVerifier(TinyCausalLM(), store, key=b"benchmark-verifier-key", n_positions=3)
        flagged = sum(not v.ok for v in ver.verify(rs))
        out.append(f"| {name} | {flagged} | {flagged / len(rs):.3f} |")
    return out


def _long_completion_cost(trials: int = 1000, lc: int = 32) -> list[str]:
    """Spot-check cost and single-edit detection on 32-token completions (k of Lc positions)."""
    pol = TinyCausalLM(context=40, seed=4)
    store = PolicyStore()
    store.publish(pol, 0)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 10, (trials, 4), generator=g)
    ids, lp = sample(pol, prompts, lc, 1.0, g)
    rows = ["| n_positions | tokens fed / full recompute | one log-prob edited: caught |",
            "|---:|---:|---:|"]  # fmt: skip
    for k in (1, 4, 16, lc):
        edited = []
        for i in range(trials):
            e = lp[i].clone()
            e[int(torch.randint(0, lc, (), generator=g))] += 0.01
            edited.append(Rollout(i.to_bytes(16, "little"), 0, 0, prompts[i], ids[i],
                                  torch.ones(lc, dtype=torch.bool), e, 0,
                                  fingerprint=store.fingerprint(0)))  # fmt: skip
        ver = RolloutVerifier(
            TinyCausalLM(context=40), store, key=b"benchmark-key-0123", n_positions=k
        )
        caught = sum(not v.ok for v in ver.verify(edited))
        rows.append(f"| {k} | {ver.cost.fraction_of_full():.2f} | {caught / trials:.3f} |")
    return [f"Long completions (Lp = 4, Lc = {lc}):", "", *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="runs,sweep,verify")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pick", default="", help="comma-separated row numbers (0-based) to run")
    args = ap.parse_args()
    parts, seeds = args.only.split(","), [int(s) for s in args.seeds.split(",")]
    pick = [int(i) for i in args.pick.split(",")] if args.pick else None
    commit = git_commit()
    lines = [f"CPU: {platform.machine()}, 1 torch thread per learner (learners are threads); "
             f"torch {torch.__version__}; commit {commit}; command: `python benchmarks/grpo.py "
             f"--only {args.only} --steps {args.steps} --seeds {args.seeds}`", ""]  # fmt: skip
    ddp: dict[int, int] = {}
    if "runs" in parts:
        runs = RUNS if pick is None else [RUNS[i] for i in pick]
        lines += table(runs, seeds, args.steps, ddp) + [""]
    if "sweep" in parts:
        runs = SWEEP if pick is None else [SWEEP[i] for i in pick]
        lines += table(runs, seeds, args.steps, ddp) + [""]
    if "verify" in parts:
        lines += verify() + [""] + _long_completion_cost() + [""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
