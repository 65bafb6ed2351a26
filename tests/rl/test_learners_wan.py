"""Learners over simulated WAN links: DiLoCo reduction (one learner, H = 1, outer lr 1, momentum 0
equals the inner optimizer), DeMo's global loss normaliser, bytes per channel and SAPO sharing."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
from _rl_common import P, _cfg, _one_thread  # noqa: F401  (_one_thread: autouse fixture)

from thinwire.collectives import InprocCommunicator, WanCommunicator, WanConfig
from thinwire.rl.learner import Learner
from thinwire.rl.policy import TinyCausalLM
from thinwire.rl.runtime import SyncOptions, build_optimizer, run_local
from thinwire.rl.sharing import RolloutSharing, pack_groups, unpack_groups
from thinwire.rl.store import PolicyStore
from thinwire.rl.tasks.digit_sum import DigitSumEnv
from thinwire.rl.worker import RolloutWorker


def _relabel(groups, origin):
    return [
        g.with_rollouts(dataclasses.replace(r, origin=origin) for r in g.rollouts) for g in groups
    ]


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


def test_oracle_6_9_diloco_h1_lr1_m0_equals_inner_optimizer():
    cfg = _cfg()
    a = run_local(cfg, 1, "diloco", steps=8, options=SyncOptions(sync_every=1))
    b = run_local(cfg, 1, "none", steps=8)
    sa, sb = a.learners[0].policy.state_dict(), b.learners[0].policy.state_dict()
    for k in sb:
        # θ_g − 1·(θ_g − θ) rounds once per step in fp32: far below 1e-6
        assert torch.allclose(sa[k], sb[k], atol=1e-6, rtol=0), k
    assert a.rewards == b.rewards  # same samples: the workers saw the same weights


def test_oracle_6_9_two_learners_on_identical_data_equal_one():
    env = DigitSumEnv()
    opts = SyncOptions(sync_every=2)
    base = TinyCausalLM(seed=4)
    data_store = PolicyStore()
    data_store.publish(base.state_dict(), 0)
    worker = RolloutWorker(env, copy.deepcopy(base), data_store, group_size=4, seed=2)
    batches = [worker.generate(4) for _ in range(4)]  # fixed data, fed to every learner

    def train(comm, rank):
        pol = copy.deepcopy(base)
        opt, _, _ = build_optimizer("diloco", pol, _cfg(max_staleness=100), comm, opts)
        lr = Learner(
            pol, opt, _cfg(max_staleness=100), None, PolicyStore(learner_id=rank), learner_id=rank
        )
        for b in batches:
            lr.step(_relabel(b, rank))
        return pol.state_dict(), lr.version

    comms = _wan_group(2)
    two = _threads(2, lambda r: train(comms[r], r))
    one = train(None, 0)
    assert one[1] == two[0][1] == two[1][1] == 4 + 2  # 4 inner steps and 2 merges
    for k in one[0]:
        assert torch.allclose(two[0][0][k], one[0][k], atol=1e-6, rtol=0), k
        assert torch.equal(two[0][0][k], two[1][0][k])  # replicas agree bit for bit
    assert (
        comms[0].ledger.totals("learners/sync")["sent"] == 2 * 2 * 1 * (P // 2) * 4
    )  # 2 ring syncs


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_oracle_6_10_global_normaliser_equals_union_batch_gradient(aggregation):
    cfg = _cfg(loss_aggregation=aggregation, max_staleness=100, beta=0.04)
    env = DigitSumEnv()
    base = TinyCausalLM(seed=6).double()
    store = PolicyStore()
    store.publish(base.state_dict(), 0)
    groups = RolloutWorker(env, copy.deepcopy(base), store, group_size=4, seed=3).generate(7)
    with torch.no_grad():  # move the weights so the ratio and k3 terms are not trivial
        for p in base.parameters():
            p.add_(
                torch.randn(
                    p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype
                )
                * 0.02
            )
    parts = [groups[:2], groups[2:]]  # uneven split: 2 and 5 groups

    comms = _wan_group(2)

    def local(r):
        pol = copy.deepcopy(base)
        lr = Learner(pol, torch.optim.SGD(pol.parameters(), lr=0.0), cfg, None, PolicyStore(learner_id=r),
                     learner_id=r, comm=comms[r], global_normalizer=True)  # fmt: skip
        lr.ref.load_state_dict(TinyCausalLM(seed=8).double().state_dict())  # a distinct reference
        lr.backward(_relabel(parts[r], r))
        return [p.grad.clone() for p in pol.parameters()]

    per = _threads(2, local)
    pol = copy.deepcopy(base)
    union = Learner(pol, torch.optim.SGD(pol.parameters(), lr=0.0), cfg, None, PolicyStore())
    union.ref.load_state_dict(TinyCausalLM(seed=8).double().state_dict())
    union.backward(groups)
    for g0, g1, gu in zip(per[0], per[1], [p.grad for p in pol.parameters()], strict=True):
        assert torch.allclose((g0 + g1) / 2, gu, atol=1e-10, rtol=0)
    # the normaliser exchange is one float64 pair: 2(R-1) ceil(2/R) 8 = 16 bytes per learner
    assert comms[0].ledger.totals("learners/normalizer")["sent"] == 16


def test_oracle_6_11_bytes_per_channel_match_formulas():
    cfg = _cfg()
    ring = 2 * (2 - 1) * -(-P // 2) * 4  # ring all-reduce of P fp32 values, R = 2 (ring formula)
    ddp = run_local(cfg, 2, "ddp", steps=3)
    dil = run_local(cfg, 2, "diloco", steps=4, options=SyncOptions(sync_every=2))
    q4 = run_local(
        cfg,
        2,
        "diloco",
        steps=4,
        options=SyncOptions(sync_every=2, compressor="quant(int4, block=128)"),
    )
    # int4 sync: one bucket frame of 4-bit codes, a float32 scale per 128 values, a CRC32.
    int4 = -(-P * 4 // 8) + 4 * -(-P // 128) + 4
    for res, per_learner in ((ddp, 3 * ring), (dil, 2 * ring), (q4, 2 * int4)):
        for lr in res.learners:
            assert (
                sum(v["sent"] for t, v in lr.bytes_by_tag.items() if t.startswith("learners/sync"))
                == per_learner
            )
            assert (
                lr.bytes_by_tag["weights/local"]["sent"] == len(lr.history) * 4 * P
            )  # one pull per step
            assert lr.bytes_by_tag["rollouts/local"]["recv"] == len(lr.history) * 4 * (
                10 + 4 * 159 + 4
            )
    assert ddp.bytes("learners/normalizer") == 2 * 3 * 16
    assert "learners/normalizer" not in dil.learners[0].bytes_by_tag  # DiLoCo's normaliser is local
    # DDP replicas stay identical; DiLoCo replicas agree after each merge
    for res in (ddp, dil):
        a, b = (lr.policy.state_dict() for lr in res.learners)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_sapo_sharing_exchange_bytes_and_choice():
    env = DigitSumEnv()
    store = PolicyStore()
    store.publish(TinyCausalLM(seed=1).state_dict(), 0)
    local = [
        _relabel(RolloutWorker(env, TinyCausalLM(), store, group_size=4, seed=r).generate(6), r)
        for r in range(2)
    ]
    # make exactly 3 informative groups per learner (a zero-variance group is never shared)
    for r in range(2):
        for i, g in enumerate(local[r]):
            rewards = [1.0, 0.0, 0.0, 1.0] if i % 2 == 0 else [0.0] * 4
            local[r][i] = g.with_rollouts(
                dataclasses.replace(m, reward=x) for m, x in zip(g.rollouts, rewards, strict=True)
            )
    comms = _wan_group(2)
    shares = [RolloutSharing(comms[r], n_publish=3, n_external=2, seed=5) for r in range(2)]
    got = _threads(2, lambda r: shares[r].exchange(local[r]))
    for r in range(2):
        assert len(got[r]) == 2 and {g.origin for g in got[r]} == {1 - r}
        peer_ids = {g.group_id for g in local[1 - r][0::2]}
        assert {g.group_id for g in got[r]} <= peer_ids
        m = len(pack_groups(local[r][0::2]))
        assert comms[r].ledger.totals("rollouts/shared")["sent"] == 8 + m  # (R-1)(8 + m)
    back = unpack_groups(pack_groups(local[0]))
    assert [g.group_id for g in back] == [g.group_id for g in local[0]]


class _FirstTokenIsDigit(DigitSumEnv):
    """Dense reward (p = 10/14 per sample) so that almost every group is informative."""

    def rewards(self, targets, completion_ids):
        return (completion_ids[:, 0] <= 9).to(torch.get_default_dtype())


def test_sapo_mode_run_trains_on_external_groups():
    cfg = _cfg(prompts_per_step=4)
    res = run_local(cfg, 2, "none", steps=3, share=(2, 2), env=_FirstTokenIsDigit())
    for lr in res.learners:
        # 2 local groups per step (4 - 2 external); peers publish up to 2 informative ones
        assert all(m["groups"] <= 4 for m in lr.history)
        assert lr.history[-1]["rollouts/external"] == sum(m["groups"] - 2 for m in lr.history) > 0
        assert lr.bytes_by_tag["rollouts/shared"]["sent"] > 0


def test_flat_bucket_views_and_gradients():
    from thinwire.rl.runtime import FlatBucket

    pol = TinyCausalLM(seed=2)
    ref = copy.deepcopy(pol)
    x = torch.randint(0, 14, (5, 7))
    bucket = FlatBucket(pol, 64)
    assert torch.equal(pol(x), ref(x))  # same values after re-homing the storage
    big, small = bucket.flats
    # the 8 [out, 64]-shaped multiples of 64x64 (qkv, proj, fc, out per block) go first
    assert big.shape == (2 * (192 + 64 + 128 + 128), 64)
    assert small.numel() >= P - big.numel() and small.shape[1] == 64
    pol(x).square().sum().backward()
    ref(x).square().sum().backward()
    bucket.gather_grads()
    flat_grads = torch.cat([big.grad.reshape(-1)[: big.numel()], small.grad.reshape(-1)])
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    order = [
        n for part in bucket.parts for n, p in pol.named_parameters() if any(p is q for q in part)
    ]
    want = torch.cat([ref_grads[n].reshape(-1) for n in order])
    assert torch.equal(flat_grads[: want.numel()], want) and not flat_grads[want.numel() :].any()
    assert all(p.grad is None for p in pol.parameters())  # moved, so nothing accumulates
    with torch.no_grad():
        big.data.view(-1)[0] += 1.0  # an optimizer step on the bucket moves the module's weight
    first = bucket.parts[0][0]
    before = dict(ref.named_parameters())[order[0]].detach().view(-1)[0]
    assert torch.equal(first.detach().view(-1)[0], before + 1.0)  # float32 arithmetic on both sides
