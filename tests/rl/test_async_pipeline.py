"""Versioned pipeline: store and versions, remote weight deltas, workers, sync equivalence
(max_staleness 0 equals plain synchronous GRPO), push-pull threads, lagged staleness, remote
workers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _rl_common import P, _cfg, _one_thread  # noqa: F401  (_one_thread: autouse fixture)

from thinwire.collectives import ByteLedger
from thinwire.compression import build_codec
from thinwire.optim import DiLoCo
from thinwire.rl.learner import Learner
from thinwire.rl.objective import GRPOLoss, compute_advantages
from thinwire.rl.policy import TinyCausalLM, completion_logprobs, sample
from thinwire.rl.rollout import Channel, group_nbytes
from thinwire.rl.runtime import run_local
from thinwire.rl.store import (
    DeltaPublisher,
    DeltaSubscriber,
    PolicyStore,
    WeightPayloadError,
    param_fingerprint,
)
from thinwire.rl.tasks.digit_sum import DigitSumEnv
from thinwire.rl.worker import RolloutWorker, mix_seed


def test_store_versions_keep_and_fingerprints():
    ledger = ByteLedger()
    store = PolicyStore(keep=2, ledger=ledger)
    pol = TinyCausalLM(seed=1)
    s0 = store.publish(pol.state_dict(), 0)
    with torch.no_grad():
        next(pol.parameters()).view(-1)[5] += 1e-7  # one element, one ulp-scale change
    s1 = store.publish(pol.state_dict(), 3)
    assert s0.fingerprint != s1.fingerprint and len(s1.fingerprint) == 16
    assert param_fingerprint(pol) == s1.fingerprint  # same bits, same digest
    with pytest.raises(ValueError, match=r"version must be in \[4, inf\), got 3"):
        store.publish(pol.state_dict(), 3)
    store.publish(pol.state_dict(), 4)
    assert store.versions() == [3, 4] and store.version == 4
    with pytest.raises(KeyError, match="version 0 is not kept"):
        store.get(0)
    other = TinyCausalLM(seed=9)
    store.load_into(other, 3)
    assert param_fingerprint(other) == s1.fingerprint
    assert ledger.totals("weights/local")["sent"] == 4 * P  # one fp32 copy over the LAN


def test_remote_deltas_bytes_exact_mirror_and_no_drift():
    tx, rx = ByteLedger(), ByteLedger()
    ch = Channel("weights/broadcast", sender_ledger=tx, receiver_ledger=rx)
    pol = TinyCausalLM(seed=2)
    pub = DeltaPublisher([ch], codec="quant(int8)")
    sub = DeltaSubscriber(pol.state_dict(), codec="quant(int8)")
    codec = build_codec("quant(int8)")
    g = torch.Generator().manual_seed(0)
    sizes, worst = [], 0.0
    for v in range(12):
        with torch.no_grad():
            for p in pol.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
        sizes.append(pub.publish(pol.state_dict(), v))
        version, state = sub.apply(ch.recv())
        assert version == v
        assert param_fingerprint(state) == pub.view.fingerprint(v)  # receiver == sender's mirror
        err = max(float((state[k] - t).abs().max()) for k, t in pol.state_dict().items())
        worst = max(worst, err)
    # header (21 B) + body + CRC (4 B): full fp32 once, then int8 deltas only
    assert sizes[0] == 21 + 4 * P + 4
    assert sizes[1:] == [21 + codec.wire_bytes(P) + 4] * 11
    assert (
        tx.totals("weights/broadcast")["sent"]
        == rx.totals("weights/broadcast")["recv"]
        == sum(sizes)
    )
    # no drift: the error is one delta's quantization error (absmax/127 per block, deltas ~4e-2)
    assert worst < 4 * 1e-2 * 4 / 127
    assert pub.full_sent == 1 and pub.deltas_sent == 11


def test_weight_payload_rejections():
    pol = TinyCausalLM(seed=2)
    ch = Channel("weights/broadcast")
    pub = DeltaPublisher([ch])
    pub.publish(pol.state_dict(), 0)
    full = ch.recv()
    pub.publish(pol.state_dict(), 1)
    delta = ch.recv()
    with pytest.raises(WeightPayloadError, match="before the first full"):
        DeltaSubscriber(pol.state_dict()).apply(delta)
    sub = DeltaSubscriber(pol.state_dict())
    with pytest.raises(WeightPayloadError, match="CRC"):
        sub.apply(full[:-10] + bytes(10))
    with pytest.raises(WeightPayloadError, match="truncated"):
        sub.apply(full[:20])
    sub.apply(full)
    with pytest.raises(WeightPayloadError, match=r"version must be in \[1, inf\), got 0"):
        sub.apply(full)
    assert sub.apply(delta)[0] == 1


def test_learner_versions_count_inner_steps_and_merges():
    env, cfg = DigitSumEnv(), _cfg()
    pol = TinyCausalLM(seed=0)
    opt = DiLoCo(pol.parameters(), lambda g: torch.optim.Adam(g, lr=1e-3), outer_lr=1.0,
                 outer_momentum=0.0, nesterov=False, sync_every=3)  # fmt: skip
    store = PolicyStore()
    learner = Learner(pol, opt, cfg, None, store)
    worker = RolloutWorker(env, copy.deepcopy(pol), store, group_size=4)
    versions = []
    for _ in range(6):
        worker.refresh()
        versions.append(int(learner.step(worker.generate(4))["version"]))
    # +1 per inner step, +1 more at each merge (steps 3 and 6), as thinwire.rl.store defines versions
    assert versions == [1, 2, 4, 5, 6, 8] and store.version == 8


def test_worker_one_version_per_group_and_reproducible():
    env = DigitSumEnv()
    pol = TinyCausalLM(seed=0)
    store = PolicyStore()
    store.publish(pol.state_dict(), 0)
    w = RolloutWorker(env, copy.deepcopy(pol), store, group_size=4, seed=7)
    first = w.generate(3)
    with torch.no_grad():
        next(pol.parameters()).mul_(1.5)
    store.publish(pol.state_dict(), 1)  # published mid-run: the worker keeps version 0 ...
    second = w.generate(3)
    assert {g.policy_version for g in first + second} == {0}
    assert all(r.fingerprint == store.fingerprint(0) for g in second for r in g.rollouts)
    w.refresh()  # ... until it refreshes between calls
    third = w.generate(3)
    assert {g.policy_version for g in third} == {1}
    assert all(r.fingerprint == store.fingerprint(1) for g in third for r in g.rollouts)
    # (seed, worker, call) determines the sample: a twin worker reproduces call 0 exactly
    twin = RolloutWorker(env, TinyCausalLM(seed=5), store, group_size=4, seed=7)
    twin.refresh(0)
    again = twin.generate(3)
    for a, b in zip(first, again, strict=True):
        assert a.group_id == b.group_id
        for ra, rb in zip(a.rollouts, b.rollouts, strict=True):
            assert torch.equal(ra.completion_ids, rb.completion_ids)
            assert torch.equal(ra.behavior_logprobs, rb.behavior_logprobs)
    # rewards are DigitSum's: 1 iff three digits summing to the target
    for g in first:
        for r in g.rollouts:
            ids = r.completion_ids.tolist()
            assert r.reward == float(all(t <= 9 for t in ids) and sum(ids) == g.info["target"])


def test_oracle_6_8_sync_pipeline_equals_plain_grpo_loop():
    steps, n_prompts, G, seed = 20, 4, 8, 3
    cfg = _cfg(group_size=G, prompts_per_step=n_prompts, seed=seed)
    res = run_local(cfg, 1, "none", steps=steps, pipeline="sequential")
    # plain synchronous GRPO (arXiv:2402.03300v3 §4.1), written with the worker's seeding rule
    env = DigitSumEnv()
    pol = TinyCausalLM(seed=seed)
    opt = torch.optim.Adam(pol.parameters(), lr=cfg.lr)
    loss_fn = GRPOLoss(cfg)
    for t in range(steps):
        gen = torch.Generator().manual_seed(mix_seed(seed, 0, 0, t))
        prompts = env.sample_prompts(n_prompts, gen)
        ids = torch.stack([p.ids for p in prompts]).repeat_interleave(G, dim=0)
        comp, blp = sample(pol, ids, 3, 1.0, gen)
        targets = torch.tensor([p.target for p in prompts]).repeat_interleave(G)
        rewards = env.rewards(targets, comp).to(torch.float64).view(n_prompts, G)
        adv = compute_advantages(rewards, "group").reshape(-1).float()
        logp = completion_logprobs(pol, ids, comp)
        loss, _ = loss_fn(logp, blp, adv, torch.ones_like(comp, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pol.parameters(), cfg.max_grad_norm)
        opt.step()
    got = res.learners[0].policy.state_dict()
    for k, v in pol.state_dict().items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=0), k
    assert res.rewards == pytest.approx([m["reward/mean"] for m in res.learners[0].history])


def test_lagged_pipeline_samples_from_max_staleness_versions_back():
    cfg = _cfg(max_staleness=2)
    res = run_local(cfg, 1, "none", steps=6, pipeline="lagged")
    hist = res.learners[0].history
    # step t (0-based) trains at version t on groups sampled by version max(0, t - 2)
    staleness = [[int(k.split("=")[1]) for k, v in m.items() if k.startswith("staleness/s=") and v]
                 for m in hist]  # fmt: skip
    assert staleness[-1] == [0, 1, 2]
    last = hist[-1]
    assert (
        last["staleness/s=2"] == 4 * 4 and last["staleness/s=1"] == 4 and last["staleness/s=0"] == 4
    )
    assert last["rollouts/dropped_stale"] == 0


def test_push_pull_threads_never_train_on_too_stale_groups():
    cfg = _cfg(max_staleness=1, sync="push_pull", prompts_per_step=4)
    res = run_local(cfg, 1, "none", 2, steps=12, pipeline="threads")
    last = res.learners[0].history[-1]
    admitted = {int(k.split("=")[1]): v for k, v in last.items() if k.startswith("staleness/s=")}
    assert set(admitted) <= {0, 1} and sum(admitted.values()) == 12 * 4
    assert last["version"] == 12
    # the inbox and the learner saw every admitted group's bytes
    got = res.learners[0].bytes_by_tag["rollouts/local"]["recv"]
    per_group = 10 + 4 * 159 + 4
    assert got % per_group == 0 and got // per_group >= 12 * 4 + last["rollouts/dropped_stale"]


def test_remote_workers_get_deltas_and_their_rollouts_verify():
    cfg = _cfg(prompts_per_step=4)
    res = run_local(
        cfg, 1, "none", 1, steps=5, pipeline="sequential", remote_workers=1, verify_remote=True
    )
    lr = res.learners[0]
    codec = build_codec("quant(int8)")
    # initial publish (full) + one delta per version (sync "none" publishes every step)
    assert lr.bytes_by_tag["weights/broadcast"]["sent"] == (21 + 4 * P + 4) + 5 * (
        21 + codec.wire_bytes(P) + 4
    )
    remote_groups = 5 * 2  # 4 prompts per step split between the local and the remote worker
    assert lr.bytes_by_tag["rollouts/remote"]["recv"] == remote_groups * (10 + 4 * 159 + 4)
    assert lr.verifier["rejected"] == 0 and lr.verifier["rollouts"] == remote_groups * 4
    assert lr.history[-1]["rollouts/rejected_unverified"] == 0


def test_group_bytes_formula():
    env = DigitSumEnv()
    store = PolicyStore()
    store.publish(TinyCausalLM().state_dict(), 0)
    (g,) = RolloutWorker(env, TinyCausalLM(), store, group_size=5).generate(1)
    # a rollout's wire size: 4(Lp + Lc) + 4 Lc + metadata; here 159 B per DigitSum member
    # (12 header + 61 fixed + 16 fingerprint + 8 lengths + 28 ids + 1 mask + 12 logp + 4 CRC
    # + 2 component count + 15 for the "digit_sum" component: 2 + 9 name bytes + 4 value)
    assert group_nbytes(g) == 10 + 5 * 159 + 4
    comps = g.rollouts[0].reward_components
    assert list(comps) == ["digit_sum"] and not math.isnan(comps["digit_sum"])


def test_worker_on_a_generic_single_turn_environment():
    from thinwire.rl.env import Rubric, SingleTurnEnv, Task
    from thinwire.rl.sampling import SamplingArgs

    def starts_with_answer(completion_ids, answer):
        return float(completion_ids[0] == answer)

    def never(completion_ids):  # "not applicable": a logged component, NaN on the wire
        return None

    env = SingleTurnEnv([Task(prompt=[12, 0, 7, 11], answer=7, task_id=3)],
                        Rubric([starts_with_answer, never], weights=[1.0, 0.0]))  # fmt: skip
    store = PolicyStore()
    store.publish(TinyCausalLM(seed=2).state_dict(), 0)
    w = RolloutWorker(
        env, TinyCausalLM(), store, SamplingArgs(max_new_tokens=3), group_size=6, seed=4
    )
    groups = w.generate(2)
    assert [g.size for g in groups] == [6, 6] and {g.prompt_id for g in groups} == {3}
    for g in groups:
        assert g.policy_version == 0 and g.info["answer"] == 7
        for r in g.rollouts:
            assert r.reward == float(int(r.completion_ids[0]) == 7)
            assert r.reward_components["starts_with_answer"] == r.reward
            assert torch.equal(r.prompt_ids, torch.tensor([12, 0, 7, 11]))


def test_decoupled_ratio_with_two_iterations_steps_twice_per_batch():
    cfg = _cfg(ratio_reference="decoupled", num_iterations=2)
    res = run_local(cfg, 1, "none", steps=3)
    assert [m["version"] for m in res.learners[0].history] == [2.0, 4.0, 6.0]
    assert all(math.isfinite(m["loss"]) for m in res.learners[0].history)


def test_dynamic_sampling_trains_only_on_informative_groups():
    # the initial policy solves 1.75% of prompts: most groups of 8 have one reward value
    cfg = _cfg(group_size=8, prompts_per_step=4, filter_zero_std_groups=True, max_resample_rounds=3)
    res = run_local(cfg, 1, "none", steps=4)
    hist = res.learners[0].history
    assert hist[-1]["rollouts/dropped_zero_std"] > 0
    assert all(m["frac_reward_zero_std"] == 0.0 for m in hist if m["groups"] > 0)
    assert all(m["groups"] <= 4 for m in hist)
