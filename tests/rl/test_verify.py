"""Verifiable rollouts: fingerprint + PRF-position log-prob checks.

1,000 honest DigitSum rollouts must pass; rollouts made by other weights, a stale version claimed
as fresh, edited tokens and edited log-probs must each be caught in >= 999 of 1,000 trials.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import pytest
import torch

from thinwire.optim import DataParallel
from thinwire.rl import (
    GRPOConfig,
    Learner,
    PolicyStore,
    Rollout,
    RolloutVerifier,
    completion_logprobs,
)
from thinwire.rl.envs import DigitSumEnv
from thinwire.rl.policies import TinyCausalLM, sample
from thinwire.rl.runtime import RolloutWorker
from thinwire.rl.verify import prf_positions

KEY = b"verifier-secret-key-0123"
N = 1000


@pytest.fixture(scope="module")
def trained():
    """A store with versions 0..4 of a DigitSum policy after 4 real GRPO steps."""
    torch.manual_seed(0)  # unused by the code under test; pins any stray global draw
    cfg = GRPOConfig(group_size=8, prompts_per_step=8, max_completion_length=3, max_staleness=0)
    env = DigitSumEnv()
    pol = TinyCausalLM(seed=3)
    store = PolicyStore(keep=16)
    store.publish(pol, 0)
    learner = Learner(pol, DataParallel(pol.parameters(), partial(torch.optim.Adam, lr=1e-3)), cfg)
    worker = RolloutWorker(env, copy.deepcopy(pol), env.sampling_args, group_size=8, seed=1)
    for v in range(4):
        worker.load(store.get(v).state, v)
        learner.step(worker.generate(8))
        store.publish(pol, learner.version)
    return env, store


def _rollouts(env, store, version, *, seed, weights=None, n=N):
    """``n`` rollouts sampled with ``weights`` (default: the store's ``version``)."""
    w = RolloutWorker(env, TinyCausalLM(), env.sampling_args, group_size=32, seed=seed)
    w.load(store.get(version).state if weights is None else weights, version)
    return [r for g in w.generate(-(-n // 32)) for r in g.rollouts][:n]


def _verifier(store, **kw):
    return RolloutVerifier(TinyCausalLM(), store, key=KEY, n_positions=3, **kw)


def _caught(verdicts):
    return sum(not v.ok for v in verdicts)


def test_honest_rollouts_pass_and_cost(trained):
    env, store = trained
    rs = _rollouts(env, store, 4, seed=11)
    ver = _verifier(store)
    verdicts = ver.verify(rs)
    assert _caught(verdicts) == 0
    assert max(v.max_abs_err for v in verdicts) < 1e-5  # float32 sampling loop vs prefill
    # every DigitSum position is checked (n_positions = Lc = 3); fed: <bos> d d = c0 c1 (6 tokens)
    assert all(v.positions == (0, 1, 2) for v in verdicts)
    c = ver.cost
    assert c.tokens_fed == N * 6 and c.full_recompute_tokens == N * 6
    assert c.regenerate_tokens == N * (4 + 5 + 6)
    assert c.fraction_of_regeneration() == pytest.approx(0.4)


def test_recomputed_logprobs_equal_learner_logprobs(trained):
    env, store = trained
    rs = _rollouts(env, store, 4, seed=12, n=64)
    pol = TinyCausalLM()
    pol.load_state_dict(store.get(4).state)
    ref = completion_logprobs(pol, torch.stack([r.prompt_ids for r in rs]),
                              torch.stack([r.completion_ids for r in rs]))  # fmt: skip
    rec = torch.stack([r.behavior_logprobs for r in rs])
    assert torch.allclose(ref, rec, atol=1e-5, rtol=0)


def test_other_weights_caught(trained):
    env, store = trained
    other = TinyCausalLM(seed=77).state_dict()
    rs = _rollouts(env, store, 4, seed=13, weights=other)
    honest_fp = _verifier(store).verify(rs)
    assert all(v.reason == "fingerprint_mismatch" for v in honest_fp)
    forged = [dataclasses.replace(r, fingerprint=store.fingerprint(4)) for r in rs]
    verdicts = _verifier(store).verify(forged)
    assert _caught(verdicts) >= 999
    assert {v.reason for v in verdicts if not v.ok} == {"logprob_mismatch"}


def test_stale_version_claimed_as_fresh_caught(trained):
    env, store = trained
    rs = _rollouts(env, store, 3, seed=14)  # made with version 3, one step stale
    claimed = [dataclasses.replace(r, policy_version=4) for r in rs]
    assert all(v.reason == "fingerprint_mismatch" for v in _verifier(store).verify(claimed))
    forged = [dataclasses.replace(r, fingerprint=store.fingerprint(4)) for r in claimed]
    assert _caught(_verifier(store).verify(forged)) >= 999
    # the same rollouts, honestly labelled, pass
    assert _caught(_verifier(store).verify(rs)) == 0


def test_edited_tokens_caught(trained):
    env, store = trained
    rs = _rollouts(env, store, 4, seed=15)
    g = torch.Generator().manual_seed(5)
    edited = []
    for r in rs:
        ids = r.completion_ids.clone()
        j = int(torch.randint(0, 3, (), generator=g))
        ids[j] = (ids[j] + int(torch.randint(1, 14, (), generator=g))) % 14  # a different token
        edited.append(dataclasses.replace(r, completion_ids=ids))
    assert _caught(_verifier(store).verify(edited)) >= 999


def test_edited_logprobs_caught(trained):
    env, store = trained
    rs = _rollouts(env, store, 4, seed=16)
    g = torch.Generator().manual_seed(6)
    edited = []
    for r in rs:
        lp = r.behavior_logprobs.clone()
        j = int(torch.randint(0, 3, (), generator=g))
        sign = 1.0 if bool(torch.rand((), generator=g) < 0.5) else -1.0
        lp[j] += sign * (1e-3 + 0.5 * float(torch.rand((), generator=g)))
        edited.append(dataclasses.replace(r, behavior_logprobs=lp))
    assert _caught(_verifier(store).verify(edited)) >= 999


def test_unknown_version_and_key_checks(trained):
    env, store = trained
    r = _rollouts(env, store, 4, seed=17, n=1)[0]
    assert (
        _verifier(store).verify([dataclasses.replace(r, policy_version=99)])[0].reason
        == "unknown_version"
    )
    with pytest.raises(ValueError, match=r"key length must be in \[16, inf\)"):
        RolloutVerifier(TinyCausalLM(), store, key=b"short")


def test_prf_positions_are_keyed_and_uniform():
    ids = [i.to_bytes(20, "little") for i in range(3000)]
    cand = list(range(12))
    picks = [prf_positions(KEY, rid, cand, 3) for rid in ids]
    assert picks == [prf_positions(KEY, rid, cand, 3) for rid in ids]  # deterministic
    assert all(len(set(p)) == 3 and p == sorted(p) for p in picks)
    other = [prf_positions(b"another-secret-key!!", rid, cand, 3) for rid in ids]
    assert sum(a != b for a, b in zip(picks, other, strict=True)) > 2500  # 1 - 1/220 expected
    counts = torch.bincount(torch.tensor([t for p in picks for t in p]), minlength=12)
    # each position is chosen with p = 3/12: mean 750, sd sqrt(3000 * 3/12 * 9/12 ... ) < 24
    assert int(counts.min()) > 750 - 5 * 24 and int(counts.max()) < 750 + 5 * 24
    assert prf_positions(KEY, ids[0], [4, 9], 3) == [4, 9]  # fewer candidates than k: all


def test_single_edited_logprob_on_long_completion_is_caught_at_rate_k_over_lc():
    # Lc = 8 loss-bearing positions, n_positions = 2: one edited log-prob is seen with p = 2/8
    lc = 8
    pol = TinyCausalLM(context=4 + lc, seed=4)
    store = PolicyStore()
    store.publish(pol.state_dict(), 0)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 10, (N, 4), generator=g)
    ids, lp = sample(pol, prompts, lc, 1.0, g)
    fp = store.fingerprint(0)
    rs = []
    for i in range(N):
        edited = lp[i].clone()
        edited[int(torch.randint(0, lc, (), generator=g))] += 0.3
        rs.append(Rollout(i.to_bytes(16, "little"), 0, 0, prompts[i], ids[i],
                          torch.ones(lc, dtype=torch.bool), edited, 0, fingerprint=fp))  # fmt: skip
    ver = RolloutVerifier(TinyCausalLM(context=4 + lc), store, key=KEY, n_positions=2)
    caught = _caught(ver.verify(rs))
    # binomial(1000, 0.25): sd 13.7; 5 sd either side
    assert 250 - 69 < caught < 250 + 69
    # a rollout is fed only up to its last checked position: E[max of 2 of 8] = 6 (0-based 5),
    # so about 4 + 5 = 9 of the 4 + 8 - 1 = 11 positions of a full recomputation
    assert ver.cost.tokens_fed < ver.cost.full_recompute_tokens
    assert ver.cost.tokens_fed == sum(4 + max(ver.positions(r)) for r in rs)
