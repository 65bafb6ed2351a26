"""GRPO across WAN links on DigitSum: acceptance runs, bytes vs DDP-GRPO, DeMo lr sweep, verifier.

Run::

    .venv/bin/python benchmarks/grpo.py                          # everything (~45 min, 2 cores)
    .venv/bin/python benchmarks/grpo.py --only runs --steps 400  # the acceptance configurations
    .venv/bin/python benchmarks/grpo.py --only sweep             # DeMo learning-rate sweep
    .venv/bin/python benchmarks/grpo.py --only verify            # verifier detection and cost

Prints one markdown block for ``benchmarks/RESULTS.md``. Configurations (per learner: 32 prompts x G
= 32 for one learner, 16 x 32 each for two; Adam 1e-3, ε 0.2/0.28, β 0, token_mean, temperature 1),
every learner link simulated as ``home_broadband``. "learner bytes" are the ledger's ``learners/*``
bytes (optimizer exchange and loss normaliser), sent + received, summed over both learners; the
DDP-GRPO baseline of the same length all-reduces fp32 gradients every step. Rewards are the mean
sampled reward of a step window; greedy is the greedy accuracy over the 20 targets after the last
step.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import subprocess
import time

import torch

from thinwire.rl.config import GRPOConfig
from thinwire.rl.policy import TinyCausalLM, sample
from thinwire.rl.rollout import Rollout
from thinwire.rl.runtime import RunResult, SyncOptions, run_local
from thinwire.rl.store import PolicyStore
from thinwire.rl.tasks.digit_sum import DigitSumEnv
from thinwire.rl.verify import RolloutVerifier
from thinwire.rl.worker import RolloutWorker

REF = dict(group_size=32, max_completion_length=3, epsilon_high=0.28, lr=1e-3)
DEMO = SyncOptions(demo_lr=3e-3, demo_topk=32, demo_values="sign", demo_bucket=True)
# name, learners, sync, options, config overrides, pipeline
RUNS = [
    ("single learner", 1, "none", SyncOptions(), dict(prompts_per_step=32), "sequential"),
    ("async, max_staleness 2", 1, "none", SyncOptions(), dict(prompts_per_step=32, max_staleness=2), "lagged"),
    ("DDP-GRPO (fp32 grads every step)", 2, "ddp", SyncOptions(), dict(prompts_per_step=16), "sequential"),
    ("DiLoCo fp32 (lr 1, m 0, H 10)", 2, "diloco", SyncOptions(), dict(prompts_per_step=16), "sequential"),
    ("DiLoCo int4 (lr 1, m 0, H 10)", 2, "diloco", SyncOptions(compressor="quant(int4, block=128)"),
     dict(prompts_per_step=16), "sequential"),
    ("DeMo (sign, top-32, bucketed, lr 3e-3)", 2, "demo", DEMO, dict(prompts_per_step=16), "sequential"),
    ("SparseLoCo (k128, 2-bit, H 10)", 2, "sparseloco", SyncOptions(), dict(prompts_per_step=16), "sequential"),
]  # fmt: skip


def _learner_bytes(res: RunResult) -> int:
    return res.bytes("learners/", "sent") + res.bytes("learners/", "recv")


def _window(res: RunResult, a: int, b: int) -> str:
    n = len(res.rewards)
    return f"{res.window(a, min(b, n)):.3f}" if a <= n else "-"


def runs(steps: int) -> list[str]:
    """The acceptance configurations (table) and the bytes per channel of each."""
    out = [
        "| run | learners | reward 1-50 | 101-200 | 301-400 | last 50 | greedy/20 | learner bytes | vs DDP | wall s | WAN clock s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results = {}
    for name, n, sync, opts, over, pipe in RUNS:
        cfg = GRPOConfig(**{**REF, **over})
        t0 = time.perf_counter()
        res = run_local(cfg, n, sync, steps=steps, options=opts, pipeline=pipe, num_threads=1)
        results[name] = (res, time.perf_counter() - t0)
    ddp = _learner_bytes(results[RUNS[2][0]][0])
    for name, n, *_ in RUNS:
        res, wall = results[name]
        lb = _learner_bytes(res)
        ratio = f"{ddp / lb:,.0f}x" if lb and n > 1 else "-"
        greedy = "/".join(str(lr.greedy) for lr in res.learners)
        clock = max(lr.sim_clock_s for lr in res.learners)
        out.append(
            f"| {name} | {n} | {_window(res, 1, 50)} | {_window(res, 101, 200)} | {_window(res, 301, 400)} "
            f"| {_window(res, steps - 49, steps)} | {greedy} | {lb:,} | {ratio} | {wall:.0f} | {clock:.0f} |"
        )
    out += ["", "Bytes per channel (sent / received, summed over learners):", "",
            "| run | channel | sent | received |", "|---|---|---:|---:|"]  # fmt: skip
    for name, *_ in RUNS:
        for ch, v in results[name][0].bytes_per_channel().items():
            if v["sent"] or v["recv"]:
                out.append(f"| {name} | `{ch}` | {v['sent']:,} | {v['recv']:,} |")
    return out


def sweep(steps: int, lrs: list[float]) -> list[str]:
    """DeMo learning-rate sweep on DigitSum, two learners."""
    out = [f"DeMo learning-rate sweep (2 learners x 16 x 32, sign values, top-32 per 64x64 tile, bucketed, {steps} steps):", "",
           "| lr | reward 1-50 | 101-200 | 301-400 | last 50 | greedy/20 |", "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for lr in lrs:
        res = run_local(GRPOConfig(**{**REF, "prompts_per_step": 16}), 2, "demo", steps=steps, num_threads=1,
                        options=dataclasses.replace(DEMO, demo_lr=lr))  # fmt: skip
        out.append(f"| {lr:g} | {_window(res, 1, 50)} | {_window(res, 101, 200)} | {_window(res, 301, 400)} "
                   f"| {_window(res, steps - 49, steps)} | {res.learners[0].greedy} |")  # fmt: skip
    return out


def verify(trials: int = 1000) -> list[str]:
    """Detection rates of the verifier on DigitSum rollouts and its cost."""
    env, cfg = (
        DigitSumEnv(),
        GRPOConfig(**{**REF, "group_size": 8, "prompts_per_step": 8, "max_staleness": 0}),
    )
    from thinwire.rl.learner import Learner

    pol = TinyCausalLM(seed=3)
    store = PolicyStore(keep=16)
    learner = Learner(pol, torch.optim.Adam(pol.parameters(), lr=1e-3), cfg, None, store)
    w = RolloutWorker(env, copy.deepcopy(pol), store, group_size=8, seed=1)
    for _ in range(4):
        w.refresh()
        learner.step(w.generate(8))

    def made(version, *, weights=None, seed):
        src = store
        if weights is not None:
            src = PolicyStore()
            src.publish(weights, version)
        wk = RolloutWorker(env, TinyCausalLM(), src, group_size=32, seed=seed)
        wk.refresh(version)
        t0 = time.perf_counter()
        rs = [r for g in wk.generate(-(-trials // 32)) for r in g.rollouts][:trials]
        return rs, time.perf_counter() - t0

    key = b"benchmark-verifier-key"
    honest, t_gen = made(4, seed=11)
    fp4 = store.fingerprint(4)
    gen = torch.Generator().manual_seed(0)

    def edit_tok(r):
        ids = r.completion_ids.clone()
        j = int(torch.randint(0, 3, (), generator=gen))
        ids[j] = (ids[j] + int(torch.randint(1, 14, (), generator=gen))) % 14
        return dataclasses.replace(r, completion_ids=ids)

    def edit_lp(r):
        lp = r.behavior_logprobs.clone()
        lp[int(torch.randint(0, 3, (), generator=gen))] += 0.01
        return dataclasses.replace(r, behavior_logprobs=lp)

    cases = {
        "honest (false positives)": honest,
        "other weights, forged fingerprint": [dataclasses.replace(r, fingerprint=fp4)
                                              for r in made(4, weights=TinyCausalLM(seed=77).state_dict(), seed=13)[0]],
        "stale by 1 version, claimed fresh, forged fingerprint": [
            dataclasses.replace(r, policy_version=4, fingerprint=fp4) for r in made(3, seed=14)[0]],
        "one token edited": [edit_tok(r) for r in honest],
        "one log-prob edited by +0.01": [edit_lp(r) for r in honest],
    }  # fmt: skip
    out = [f"Verifier on DigitSum ({trials} rollouts per case, 3 PRF positions = all of Lc = 3, atol 1e-4):", "",
           "| case | flagged | rate |", "|---|---:|---:|"]  # fmt: skip
    cost = None
    for name, rs in cases.items():
        ver = RolloutVerifier(TinyCausalLM(), store, key=key, n_positions=3)
        t0 = time.perf_counter()
        flagged = sum(not v.ok for v in ver.verify(rs))
        if cost is None:
            cost = (ver.cost, time.perf_counter() - t0)
        out.append(f"| {name} | {flagged} | {flagged / len(rs):.3f} |")
    c, t_ver = cost
    out += ["", f"Cost per rollout: {c.tokens_fed / c.rollouts:.1f} token positions fed (full teacher-forced "
            f"recomputation {c.full_recompute_tokens / c.rollouts:.1f}, regeneration {c.regenerate_tokens / c.rollouts:.1f}): "
            f"{c.fraction_of_full():.2f} of a full recomputation, {c.fraction_of_regeneration():.2f} of regenerating; "
            f"wall time {t_ver:.3f} s vs {t_gen:.3f} s to generate them ({t_ver / t_gen:.2f}).", ""]  # fmt: skip
    # long completions: the spot check's cost and single-edit detection scale with n_positions / Lc
    lc = 32
    lpol = TinyCausalLM(context=40, seed=4)
    lstore = PolicyStore()
    lstore.publish(lpol.state_dict(), 0)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 10, (trials, 4), generator=g)
    t0 = time.perf_counter()
    ids, lp = sample(lpol, prompts, lc, 1.0, g)
    t_gen = time.perf_counter() - t0
    fp = lstore.fingerprint(0)
    rows = ["| n_positions | tokens fed / full recompute | / regeneration | one log-prob edited: caught | other weights: caught |",
            "|---:|---:|---:|---:|---:|"]  # fmt: skip
    ids_o, lp_o = sample(
        TinyCausalLM(context=40, seed=5), prompts, lc, 1.0, torch.Generator().manual_seed(2)
    )

    def mk(i, toks, logp):
        return Rollout(i.to_bytes(16, "little"), 0, 0, prompts[i], toks[i], torch.ones(lc, dtype=torch.bool),
                       logp, 0, fingerprint=fp)  # fmt: skip

    for k in (1, 4, 16, lc):
        edited = []
        for i in range(trials):
            e = lp[i].clone()
            e[int(torch.randint(0, lc, (), generator=g))] += 0.01
            edited.append(mk(i, ids, e))
        ver = RolloutVerifier(TinyCausalLM(context=40), lstore, key=key, n_positions=k)
        caught = sum(not v.ok for v in ver.verify(edited))
        frac_full, frac_regen = ver.cost.fraction_of_full(), ver.cost.fraction_of_regeneration()
        # another model's samples with its own log-probs and a forged fingerprint
        ver2 = RolloutVerifier(TinyCausalLM(context=40), lstore, key=key, n_positions=k)
        caught_o = sum(
            not v.ok for v in ver2.verify([mk(i, ids_o, lp_o[i]) for i in range(trials)])
        )
        rows.append(f"| {k} | {frac_full:.2f} | {frac_regen:.3f} | {caught / trials:.3f} (k/Lc = {k / lc:.3f}) "
                    f"| {caught_o / trials:.3f} |")  # fmt: skip
    out += [
        f"Long completions (Lp = 4, Lc = {lc}, TinyCausalLM context 40; generating {trials} took {t_gen:.2f} s):",
        "",
    ]
    return out + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="runs,sweep,verify")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--sweep-steps", type=int, default=400)
    ap.add_argument("--sweep-lrs", default="1e-3,2e-3,3e-3,1e-2")
    args = ap.parse_args()
    parts = args.only.split(",")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    lines = ["<!-- grpo.py:begin -->",
             f"CPU: {platform.machine()}, 1 torch thread per learner (learners are threads); torch {torch.__version__}; "
             f"commit {commit}; command: `python benchmarks/grpo.py --only {args.only} --steps {args.steps}`", ""]  # fmt: skip
    if "runs" in parts:
        lines += runs(args.steps) + [""]
    if "sweep" in parts:
        lines += sweep(args.sweep_steps, [float(x) for x in args.sweep_lrs.split(",")]) + [""]
    if "verify" in parts:
        lines += verify() + [""]
    lines.append("<!-- grpo.py:end -->")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
