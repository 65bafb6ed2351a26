"""DigitSum end to end: one learner, async, two learners (DiLoCo, DeMo), bytes against DDP-GRPO.

The 400-step runs are marked ``slow`` (each well under 3 min on 2 cores); a reduced
two-learner DiLoCo run and the learner-to-learner byte ratios against DDP-GRPO stay in the
default suite. Thresholds sit below what the runs of ``benchmarks/RESULTS.md`` ("GRPO across
WAN links") reached; the DeMo one is tightened to what the tuned run reaches (see
``benchmarks/grpo.py`` for the sweep).
"""

from __future__ import annotations

import pytest
import torch

from thinwire.rl.config import GRPOConfig
from thinwire.rl.runtime import SyncOptions, run_local

# reference configuration (per learner: 32 prompts x G = 32; 16 x 32 for 2 learners)
REF = dict(group_size=32, prompts_per_step=32, max_completion_length=3, epsilon_low=0.2, epsilon_high=0.28,
           beta=0.0, scale_rewards="group", loss_aggregation="token_mean", lr=1e-3, temperature=1.0)  # fmt: skip
# DeMo on DigitSum: Psyche's sign values over two flat buckets (two payloads per step instead of
# thirty, whose headers would dominate), lr 3e-3 from the sweep in benchmarks/grpo.py
DEMO = SyncOptions(demo_lr=3e-3, demo_topk=32, demo_values="sign", demo_bucket=True)
SPARSELOCO = SyncOptions(sync_every=10, sparse_topk=128, sparse_bits=2)
DILOCO_INT4 = SyncOptions(compressor="quant(int4, block=128)")
P = 69_390


def _cfg(**kw):
    return GRPOConfig(**{**REF, "max_staleness": 0, **kw})


@pytest.mark.slow
def test_single_learner_reaches_085():
    res = run_local(_cfg(), 1, "none", steps=400, num_threads=1)
    assert res.rewards[0] <= 0.06  # uniform policy: 0.0175 (DigitSumEnv.uniform_baseline)
    assert res.window(351, 400) >= 0.85
    assert res.learners[0].greedy >= 17


@pytest.mark.slow
def test_async_max_staleness_2_reaches_080():
    # every step trains on groups sampled by the version 2 steps back, ratio
    # against the recorded behaviour log-probs
    res = run_local(
        _cfg(max_staleness=2, sync="push_pull"),
        1,
        "none",
        steps=400,
        pipeline="lagged",
        num_threads=1,
    )
    last = res.learners[0].history[-1]
    assert last["staleness/s=2"] == 398 * 32 and last["rollouts/dropped_stale"] == 0
    assert res.window(301, 400) >= 0.80


@pytest.mark.slow
def test_two_learners_diloco_rl_default_reaches_080():
    res = run_local(_cfg(prompts_per_step=16), 2, "diloco", steps=400, num_threads=1)
    assert res.window(301, 400) >= 0.80
    assert all(lr.greedy >= 17 for lr in res.learners)
    # fp32 ring all-reduce of the pseudo-gradient every H = 10 steps: 40 syncs per learner
    assert res.bytes("learners/sync") == 2 * 40 * 2 * -(-P // 2) * 4


@pytest.mark.slow
def test_two_learners_demo_reaches_080():
    # >= 0.70 was the provisional bar before tuning: the tuned run (lr 3e-3,
    # benchmarks/grpo.py sweep) reaches 0.85 over steps 301-400, greedy 17/20
    res = run_local(_cfg(prompts_per_step=16), 2, "demo", steps=400, num_threads=1, options=DEMO)
    assert res.window(301, 400) >= 0.80
    a, b = (lr.policy.state_dict() for lr in res.learners)
    assert all(torch.equal(a[k], b[k]) for k in a)  # DeMo applies one aggregate everywhere


def test_reduced_two_learner_diloco_over_wan_learns():
    # 2 learners x (8 prompts x 16), DiLoCo at the RL default (outer lr 1, momentum 0, H = 10),
    # 80 steps: the uniform policy scores 0.0175 (uniform_baseline); learning must be visible.
    res = run_local(_cfg(group_size=16, prompts_per_step=8), 2, "diloco", steps=80, num_threads=1)
    assert res.window(1, 10) < 0.06
    assert res.window(61, 80) > 2 * res.window(1, 20)
    a, b = (lr.policy.state_dict() for lr in res.learners)
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 80 is a merge: replicas agree
    assert res.bytes("learners/sync") == 2 * 8 * 2 * -(-P // 2) * 4
    assert all(lr.sim_clock_s > 0 for lr in res.learners)


def test_learner_bytes_vs_ddp_grpo_of_the_same_length():
    # learner-to-learner bytes (sent + received, both learners) over 20 steps (2 DiLoCo and
    # SparseLoCo syncs); the batch is tiny because bytes do not depend on it (DDP sends the
    # gradient, DiLoCo the pseudo-gradient, DeMo/SparseLoCo compressed payloads)
    cfg, steps = _cfg(group_size=2, prompts_per_step=2), 20

    def wire(res):
        return res.bytes("learners/", "sent") + res.bytes("learners/", "recv")

    ddp = wire(run_local(cfg, 2, "ddp", steps=steps, num_threads=1))
    assert ddp == 2 * 2 * steps * (2 * -(-P // 2) * 4 + 16)  # gradient ring + normaliser
    ratios = {
        name: ddp / wire(run_local(cfg, 2, kind, steps=steps, num_threads=1, options=opts))
        for name, kind, opts in (
            ("diloco-int4", "diloco", DILOCO_INT4),
            ("demo", "demo", DEMO),
            ("sparseloco", "sparseloco", SPARSELOCO),
        )  # fmt: skip
    }
    assert ratios["diloco-int4"] >= 50, ratios
    assert ratios["demo"] >= 100, ratios
    assert ratios["sparseloco"] >= 100, ratios
