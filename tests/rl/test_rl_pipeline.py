"""The learner, the workers and ``train`` against independent oracles.

* versions count ``step()`` calls; the learner sees its optimizer's syncs through the public hook
  (oracle: the DiLoCo schedule, one sync every H steps);
* one version per group, reproducible workers (a twin worker with the same seed);
* ``rollout_lag = 0`` equals a plain synchronous GRPO loop written out here (DeepSeekMath
  arXiv:2402.03300v3 §4.1), and ``rollout_lag = 2`` trains on groups exactly 2 versions old;
* DiLoCo with H = 1, outer lr 1, momentum 0 equals the inner optimizer alone; two learners fed
  identical data equal one; the global normaliser gives the union batch's gradient (float64);
* every byte is in a ledger and matches its formula: the optimizer's ring all-reduce, the
  16-byte normaliser and start check, weight frames, rollout bundles, control tensors;
* remote workers get int8 frames with error feedback and their rollouts pass the verifier;
  SAPO sharing exchanges informative groups.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
from functools import partial

import pytest
import torch
from _rl_common import P, _cfg, _one_thread  # noqa: F401  (_one_thread: autouse fixture)

from thinwire.collectives import InprocCommunicator, WanCommunicator, WanConfig
from thinwire.optim import DataParallel
from thinwire.rl import (
    GRPOLoss,
    Learner,
    build_learner_optimizer,
    completion_logprobs,
    compute_advantages,
    encode_groups,
    groups_nbytes,
    param_fingerprint,
)
from thinwire.rl.envs import DigitSumEnv, Rubric, SingleTurnEnv, Task
from thinwire.rl.policies import SamplingArgs, TinyCausalLM, sample
from thinwire.rl.runtime import RolloutSharing, RolloutWorker, mix_seed, train

ENV = DigitSumEnv()
RING2 = 2 * (2 - 1) * -(-P // 2) * 4  # ring all-reduce of P fp32 values, 2 learners
RECORD = 159  # one DigitSum rollout record (rollout.py layout, "digit_sum" component)


def _worker(seed=0, origin=0, g=4):
    return RolloutWorker(ENV, TinyCausalLM(seed=5), ENV.sampling_args, group_size=g,
                         origin=origin, seed=seed)  # fmt: skip


def _relabel(groups, origin):
    return [g.with_rollouts(dataclasses.replace(r, origin=origin) for r in g.rollouts)
            for g in groups]  # fmt: skip


def _threads(n, fn):
    out, errs = [None] * n, []

    def run(r):
        try:
            out[r] = fn(r)
        except BaseException as exc:  # surfaced below
            errs.append(exc)

    ts = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        raise errs[0]
    return out


def _wan_group(n):
    comms = InprocCommunicator.group(n, timeout_s=60)
    cfg = WanConfig.from_preset("home_broadband", n)
    return [WanCommunicator(c, cfg, measure_compute=False) for c in comms]


def test_versions_count_steps_and_the_hook_sees_each_diloco_sync():
    pol = TinyCausalLM(seed=0)
    learner = Learner(pol, build_learner_optimizer(pol, _cfg(method="diloco-fp32", sync_every=3),
                                                   None), _cfg(max_staleness=10))  # fmt: skip
    w = _worker()
    seen = []
    for _ in range(7):
        w.load(pol.state_dict(), learner.version)
        m = learner.step(w.generate(4))
        seen.append((int(m["version"]), int(m["syncs"]), learner.synced))
    assert seen == [(1, 0, False), (2, 0, False), (3, 1, True), (4, 1, False), (5, 1, False),
                    (6, 2, True), (7, 2, False)]  # fmt: skip
    assert learner.last_sync is not None and learner.last_sync.sync_step == 2
    with pytest.raises(TypeError, match=r"optimizer must be a thinwire optimizer .*got Adam"):
        Learner(pol, torch.optim.Adam(pol.parameters()), _cfg())


def test_worker_one_version_per_group_and_reproducible():
    pol = TinyCausalLM(seed=0)
    w = _worker(seed=7)
    w.load(pol.state_dict(), 0)
    first = w.generate(3)
    assert {g.policy_version for g in first} == {0}
    assert all(r.fingerprint == param_fingerprint(pol) for g in first for r in g.rollouts)
    with torch.no_grad():
        next(pol.parameters()).mul_(1.5)
    w.load(pol.state_dict(), 1)  # weights change only between calls
    assert {g.policy_version for g in w.generate(3)} == {1}
    # (seed, origin, worker, call) determines the sample: a twin reproduces call 0 exactly
    twin = _worker(seed=7)
    twin.load(TinyCausalLM(seed=0).state_dict(), 0)
    for a, b in zip(first, twin.generate(3), strict=True):
        assert a.group_id == b.group_id
        for ra, rb in zip(a.rollouts, b.rollouts, strict=True):
            assert torch.equal(ra.completion_ids, rb.completion_ids)
            assert torch.equal(ra.behavior_logprobs, rb.behavior_logprobs)
    for g in first:  # DigitSum's reward: 1 iff three digits summing to the target
        for r in g.rollouts:
            ids = r.completion_ids.tolist()
            assert r.reward == float(all(t <= 9 for t in ids) and sum(ids) == g.info["answer"])


def test_rollout_lag_0_equals_a_plain_synchronous_grpo_loop():
    steps, n_prompts, G, seed = 12, 4, 8, 3
    cfg = _cfg(group_size=G, prompts_per_step=n_prompts, seed=seed, steps=steps)
    res = train(TinyCausalLM(seed=seed), ENV, None, cfg)
    env, pol = DigitSumEnv(), TinyCausalLM(seed=seed)
    opt = torch.optim.Adam(pol.parameters(), lr=cfg.lr)
    loss_fn = GRPOLoss(cfg)
    for t in range(steps):  # the worker's seeding rule: (seed, origin 0, worker 0, call t)
        gen = torch.Generator().manual_seed(mix_seed(seed, 0, 0, t))
        prompts = env.sample_prompts(n_prompts, gen)
        ids = torch.stack([p.ids for p in prompts]).repeat_interleave(G, dim=0)
        comp, blp = sample(pol, ids, 3, 1.0, gen)
        targets = torch.tensor([p.target for p in prompts]).repeat_interleave(G)
        rewards = env.rewards(targets, comp).to(torch.float64).view(n_prompts, G)
        adv = compute_advantages(rewards, "group").reshape(-1).float()
        loss, _ = loss_fn(completion_logprobs(pol, ids, comp), blp, adv,
                          torch.ones_like(comp, dtype=torch.bool))  # fmt: skip
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pol.parameters(), cfg.max_grad_norm)
        opt.step()
    got = res.learners[0].policy.state_dict()
    for k, v in pol.state_dict().items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=0), k
    # one learner, one co-located worker: an fp32 frame per new version, a bundle of records back
    site = res.learners[0].site_bytes
    assert site["weights/local"]["sent"] == (steps - 1) * (4 * P + 4)  # versions 1..steps-1
    # each step's groups: one all_gather_bytes row (8-byte length header) holding one bundle
    # (8-byte header, then a 4-byte length and the record per rollout)
    assert site["rollouts/local"]["recv"] == steps * (8 + 8 + n_prompts * G * (4 + RECORD))
    assert site["site/control"]["sent"] == steps * 3 * 8 + 3 * 8  # + the closing request
    assert res.learner_bytes() == 0  # one learner: no learner-to-learner traffic


def test_rollout_lag_2_trains_on_groups_two_versions_old():
    res = train(TinyCausalLM(seed=0), ENV, None,
                _cfg(max_staleness=2, rollout_lag=2, steps=6))  # fmt: skip
    hist = res.learners[0].history
    last = hist[-1]
    # step t (0-based) trains at version t on groups sampled by version max(0, t - 2)
    assert (last["staleness/s=0"], last["staleness/s=1"], last["staleness/s=2"]) == (4, 4, 16)
    assert last["rollouts/dropped_stale"] == 0 and last["rollouts/rejected_fingerprint"] == 0
    # versions sent at steps 0..5: 0, 0, 0, 1, 2, 3; a frame only for a new one (1, 2, 3)
    assert res.learners[0].site_bytes["weights/local"]["sent"] == 3 * (4 * P + 4)


def test_diloco_h1_lr1_m0_equals_the_inner_optimizer():
    a = train(TinyCausalLM(seed=0), ENV, None, _cfg(method="diloco-fp32", sync_every=1, steps=6))
    b = train(TinyCausalLM(seed=0), ENV, None, _cfg(steps=6))
    sa, sb = a.learners[0].policy.state_dict(), b.learners[0].policy.state_dict()
    for k in sb:  # θ_g − 1·(θ_g − θ) rounds once per step in fp32: far below 1e-6
        assert torch.allclose(sa[k], sb[k], atol=1e-6, rtol=0), k


def test_two_learners_on_identical_data_equal_one():
    base = TinyCausalLM(seed=4)
    w = _worker(seed=2)
    w.load(base.state_dict(), 0)
    batches = [w.generate(4) for _ in range(4)]  # fixed data, fed to every learner
    cfg = _cfg(max_staleness=100, method="diloco-fp32", sync_every=2)

    def run(comm, rank):
        pol = copy.deepcopy(base)
        lr = Learner(pol, build_learner_optimizer(pol, cfg, comm), cfg, learner_id=rank)
        for b in batches:
            lr.step(_relabel(b, rank))
        return pol.state_dict(), lr.syncs

    comms = _wan_group(2)
    two = _threads(2, lambda r: run(comms[r], r))
    one = run(None, 0)
    assert one[1] == two[0][1] == two[1][1] == 2
    for k in one[0]:
        assert torch.allclose(two[0][0][k], one[0][k], atol=1e-6, rtol=0), k
        assert torch.equal(two[0][0][k], two[1][0][k])  # replicas agree bit for bit
    assert comms[0].ledger.totals("diloco/sync")["sent"] == 2 * RING2  # 2 ring syncs


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_global_normaliser_equals_union_batch_gradient(aggregation):
    cfg = _cfg(loss_aggregation=aggregation, max_staleness=100, beta=0.04)
    base = TinyCausalLM(seed=6).double()
    w = RolloutWorker(ENV, copy.deepcopy(base), ENV.sampling_args, group_size=4, seed=3)
    groups = w.generate(7)
    with torch.no_grad():  # move the weights so the ratio and k3 terms are not trivial
        for p in base.parameters():
            gen = torch.Generator().manual_seed(p.numel())
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
    parts = [groups[:2], groups[2:]]  # uneven split: 2 and 5 groups
    sgd = partial(torch.optim.SGD, lr=0.0)
    comms = _wan_group(2)

    def local(r):
        pol = copy.deepcopy(base)
        lr = Learner(pol, DataParallel(pol.parameters(), sgd, init_sync="off"), cfg,
                     learner_id=r, comm=comms[r], global_normalizer=True)  # fmt: skip
        lr.ref.load_state_dict(TinyCausalLM(seed=8).double().state_dict())  # a distinct reference
        lr.backward(_relabel(parts[r], r))
        return [p.grad.clone() for p in pol.parameters()]

    per = _threads(2, local)
    pol = copy.deepcopy(base)
    union = Learner(pol, DataParallel(pol.parameters(), sgd), cfg)
    union.ref.load_state_dict(TinyCausalLM(seed=8).double().state_dict())
    union.backward(groups)
    for g0, g1, gu in zip(per[0], per[1], [p.grad for p in pol.parameters()], strict=True):
        assert torch.allclose((g0 + g1) / 2, gu, atol=1e-10, rtol=0)
    # the normaliser exchange is one float64 pair: 2(R-1) ceil(2/R) 8 = 16 bytes per learner
    assert comms[0].ledger.totals("learners/normalizer")["sent"] == 16


def test_learner_to_learner_bytes_match_the_formulas():
    steps = 4
    ddp = train(TinyCausalLM(seed=0), ENV, None, _cfg(steps=steps), learners=2)
    dil = train(TinyCausalLM(seed=0), ENV, None, _cfg(steps=steps, method="diloco-fp32",
                                                      sync_every=2), learners=2)  # fmt: skip
    q4 = train(TinyCausalLM(seed=0), ENV, None, _cfg(steps=steps, method="diloco-int4",
                                                     sync_every=2), learners=2)  # fmt: skip
    # rank 0's parameters and int64 step count, broadcast to the other learner when the
    # optimizer is built
    init = 4 * P + 8
    check = 16 + 8  # the start check: a 16-byte fingerprint all-gather (+ 8-byte length header)
    int4 = -(-P * 4 // 8) + 4 * -(-P // 128) + 4  # 4-bit codes, a scale per 128 values, CRC32
    normaliser = steps * 16
    for kind, run, sync in (("ddp", ddp, steps * RING2), ("diloco", dil, 2 * RING2),
                            ("diloco", q4, 2 * int4)):  # fmt: skip
        for lr in run.learners:
            b = lr.learner_bytes
            if kind == "ddp":  # (the DiLoCo family's start-state agreement is its own)
                assert b["ddp/init"]["sent"] == (init if lr.learner_id == 0 else 0)
            syncs = sum(v["sent"] for t, v in b.items() if t.startswith(kind) and "init" not in t)
            assert syncs == sync
            assert b["learners/init"]["sent"] == check
            assert b.get("learners/normalizer", {"sent": 0})["sent"] == (
                normaliser if kind == "ddp" else 0  # DiLoCo's normaliser is local
            )
            assert lr.site_bytes["weights/local"]["sent"] == (steps - 1) * (4 * P + 4)
    for res in (ddp, dil):  # DDP replicas stay equal; DiLoCo replicas agree after each merge
        a, b = (lr.policy.state_dict() for lr in res.learners)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_remote_workers_get_int8_frames_and_their_rollouts_verify():
    steps = 4
    res = train(TinyCausalLM(seed=0), ENV, None, _cfg(steps=steps), remote_workers=1,
                verify_remote=True)  # fmt: skip
    lr = res.learners[0]
    frame = P + 4 * -(-P // 256) + 4  # int8 codes, a float32 scale per 256 values, CRC32
    assert lr.site_bytes["weights/remote"]["sent"] == (steps - 1) * frame  # versions 1..3
    groups = steps * 2  # 4 prompts per step split between the local and the remote worker
    assert lr.site_bytes["rollouts/remote"]["recv"] == steps * 16 + groups * 4 * (4 + RECORD)
    assert lr.verifier["rejected"] == 0 and lr.verifier["rollouts"] == groups * 4
    assert lr.history[-1]["rollouts/rejected_fingerprint"] == 0


def test_remote_workers_on_sync_get_only_the_merged_weights():
    # DiLoCo, H = 2: the sync hook fires after steps 2 and 4, so the remote worker gets the
    # merged weights of version 2 before step 3 and samples with them for two steps
    cfg = _cfg(steps=5, method="diloco-fp32", sync_every=2, max_staleness=1)
    res = train(TinyCausalLM(seed=0), ENV, None, cfg, workers=0, remote_workers=1,
                remote_on_sync=True)  # fmt: skip
    lr = res.learners[0]
    frame = P + 4 * -(-P // 256) + 4
    assert lr.site_bytes["weights/remote"]["sent"] == 2 * frame  # versions 2 and 4
    last = lr.history[-1]
    assert last["syncs"] == 2 and last["staleness/s=1"] == 2 * 4  # steps 2, 4 (1-based): 1 behind
    with pytest.raises(ValueError, match="share needs at least 2 learners"):
        train(TinyCausalLM(), ENV, None, _cfg(steps=1), share=(1, 1))


def test_trl_style_reward_function_on_text_free_prompts():
    calls = []

    def starts_with_answer(prompts, completions, completion_ids, answer, **kw):
        calls.append(len(completion_ids))
        return [float(c[0] == a) for c, a in zip(completion_ids, answer, strict=True)]

    prompts = [{"prompt": [12, 0, 7, 11], "answer": 7}, {"prompt": [12, 1, 2, 11], "answer": 2}]
    res = train(TinyCausalLM(seed=2), starts_with_answer, prompts,
                _cfg(steps=2, group_size=6, prompts_per_step=2))  # fmt: skip
    assert calls == [6] * 4  # one call per group
    assert all(math.isfinite(m["reward/mean"]) for m in res.learners[0].history)
    with pytest.raises(ValueError, match="prompts must be None when reward is an Environment"):
        train(TinyCausalLM(), ENV, prompts, _cfg(steps=1))
    with pytest.raises(ValueError, match=r"learners must be 1 with a communicator"):
        train(TinyCausalLM(), ENV, None, _cfg(), comm=_wan_group(1)[0], learners=2)


def test_generic_single_turn_environment_groups():
    def starts_with_answer(completion_ids, answer):
        return float(completion_ids[0] == answer)

    def never(completion_ids):  # "not applicable": a logged component, NaN on the wire
        return None

    env = SingleTurnEnv([Task(prompt=[12, 0, 7, 11], answer=7, task_id=3)],
                        Rubric([starts_with_answer, never], weights=[1.0, 0.0]))  # fmt: skip
    w = RolloutWorker(env, TinyCausalLM(seed=2), SamplingArgs(max_new_tokens=3), group_size=6)
    groups = w.generate(2)
    assert [g.size for g in groups] == [6, 6] and {g.prompt_id for g in groups} == {3}
    for g in groups:
        for r in g.rollouts:
            assert r.reward == float(int(r.completion_ids[0]) == 7)
            assert r.reward_components["starts_with_answer"] == r.reward
            assert math.isnan(r.reward_components["never"])


def test_sapo_sharing_exchange_bytes_and_choice():
    local = []
    for r in range(2):
        groups = _relabel(_worker(seed=r).generate(6), r)
        for i, g in enumerate(groups):  # exactly 3 informative groups per learner
            rewards = [1.0, 0.0, 0.0, 1.0] if i % 2 == 0 else [0.0] * 4
            groups[i] = g.with_rollouts(dataclasses.replace(m, reward=x)
                                        for m, x in zip(g.rollouts, rewards, strict=True))  # fmt: skip
        local.append(groups)
    comms = _wan_group(2)
    shares = [RolloutSharing(comms[r], n_publish=3, n_external=2, seed=5) for r in range(2)]
    got = _threads(2, lambda r: shares[r].exchange(local[r]))
    for r in range(2):
        assert len(got[r]) == 2 and {g.origin for g in got[r]} == {1 - r}
        assert {g.group_id for g in got[r]} <= {g.group_id for g in local[1 - r][0::2]}
        m = groups_nbytes(local[r][0::2])
        assert m == len(encode_groups(local[r][0::2]))
        assert comms[r].ledger.totals("rollouts/shared")["sent"] == 8 + m  # (R-1)(8 + m)


class _FirstTokenIsDigit(DigitSumEnv):
    """Dense reward (p = 10/14 per sample) so that almost every group is informative."""

    def rewards(self, targets, completion_ids):
        return (completion_ids[:, 0] <= 9).to(torch.get_default_dtype())


def test_sapo_mode_trains_on_external_groups():
    res = train(TinyCausalLM(seed=0), _FirstTokenIsDigit(), None, _cfg(steps=3), learners=2,
                share=(2, 2))  # fmt: skip
    for lr in res.learners:
        # 2 local groups per step (4 - 2 external); peers publish up to 2 informative ones
        assert all(m["groups"] <= 4 for m in lr.history)
        assert lr.history[-1]["rollouts/external"] == sum(m["groups"] - 2 for m in lr.history) > 0
        assert lr.learner_bytes["rollouts/shared"]["sent"] > 0


def test_decoupled_ratio_with_two_iterations_steps_twice_per_batch():
    res = train(TinyCausalLM(seed=0), ENV, None,
                _cfg(ratio_reference="decoupled", num_iterations=2, steps=3))  # fmt: skip
    assert [m["version"] for m in res.learners[0].history] == [2.0, 4.0, 6.0]
    assert all(math.isfinite(m["loss"]) for m in res.learners[0].history)


def test_dynamic_sampling_trains_only_on_informative_groups():
    # the initial policy solves 1.75% of prompts: most groups of 8 have one reward value
    cfg = _cfg(group_size=8, filter_zero_std_groups=True, max_resample_rounds=3, steps=4)
    hist = train(TinyCausalLM(seed=0), ENV, None, cfg).learners[0].history
    assert hist[-1]["rollouts/dropped_zero_std"] > 0
    assert all(m["frac_reward_zero_std"] == 0.0 for m in hist if m["groups"] > 0)
