"""Staleness filter and admission rule (thinwire.rl.staleness)."""

from __future__ import annotations

import uuid

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.rl.objective import compute_advantages
from thinwire.rl.rollout import Rollout, RolloutGroup
from thinwire.rl.staleness import StalenessFilter, staleness


def _group(versions, rewards=None, *, origin=0, key=0) -> RolloutGroup:
    if isinstance(versions, int):
        versions = [versions] * 4
    rewards = rewards or [1.0, 0.0, 0.0, 1.0][: len(versions)]
    gid = uuid.UUID(int=key + 1).bytes
    return RolloutGroup(tuple(
        Rollout(gid, key, i, torch.tensor([12, 1, 5, 11]), torch.tensor([3, 4, 8]),
                torch.ones(3, dtype=torch.bool), torch.full((3,), -1.0), v, origin=origin, reward=r)
        for i, (v, r) in enumerate(zip(versions, rewards, strict=True))
    ))  # fmt: skip


def test_oracle_6_7_drop_whole_group():
    f = StalenessFilter(2)
    groups = [_group(v, key=v) for v in (10, 9, 8, 7)]
    kept = f.filter(groups, version_now=10)
    assert [g.policy_version for g in kept] == [10, 9, 8]
    assert all(a is b for a, b in zip(kept, groups[:3], strict=False))  # admitted untouched
    assert f.dropped_groups == 1 and f.dropped_rollouts == 4
    assert dict(f.histogram) == {0: 1, 1: 1, 2: 1}
    m = f.metrics()
    assert m["rollouts/dropped_stale"] == 1 and m["staleness/s=2"] == 1


def test_oracle_6_7_withhold_keeps_reward_in_group_mean():
    f = StalenessFilter(2, "withhold")
    (kept,) = f.filter([_group(7)], version_now=10)
    assert all(not bool(r.loss_mask.any()) for r in kept.rollouts)
    assert kept.rewards().tolist() == [1.0, 0.0, 0.0, 1.0] and f.withheld_rollouts == 4
    # mixed group: member 0 (reward 1) is stale. Withheld, its reward still sets mu and sigma:
    # mu = 0.25, sigma = sqrt(((0.75)^2 + 3 (0.25)^2) / 3) = 0.5 -> A_fresh = -0.25 / (0.5 + 1e-4)
    (mixed,) = StalenessFilter(2, "withhold").filter(
        [_group([6, 10, 10, 10], [1.0, 0.0, 0.0, 0.0])], version_now=10
    )
    assert [bool(r.loss_mask.any()) for r in mixed.rollouts] == [False, True, True, True]
    adv = compute_advantages(mixed.rewards()[None], "group")[0]
    assert torch.allclose(
        adv[1:], torch.full((3,), -0.25 / 0.5001, dtype=torch.float64), atol=1e-12
    )
    # drop mode removes the whole mixed group instead
    assert StalenessFilter(2).filter([_group([6, 10, 10, 10])], 10) == []


def test_max_staleness_zero_is_on_policy_only():
    f = StalenessFilter(0)
    assert [g.policy_version for g in f.filter([_group(5), _group(4), _group(5)], 5)] == [5, 5]


def test_external_and_future_groups():
    f = StalenessFilter(1, learner_id=0)
    assert f.admit(_group(0, origin=1), version_now=50) is not None  # a peer's group: no staleness
    assert f.admit(_group(51), version_now=50) is None  # claims a version the learner never had
    assert f.external_groups == 1 and f.dropped_future == 1 and f.dropped_groups == 0


def test_staleness_is_version_difference():
    assert staleness(10, 7) == 3 and staleness(10, 10) == 0 and staleness(9, 10) == -1


def test_validation_messages():
    with pytest.raises(ValueError, match=r"max_staleness must be in \[0, inf\), got -1"):
        StalenessFilter(-1)
    with pytest.raises(ValueError, match="mode must be in"):
        StalenessFilter(1, "discard")


@settings(deadline=None, max_examples=50, derandomize=True)
@given(data=st.lists(st.integers(0, 30), min_size=1, max_size=20), v_now=st.integers(0, 30),
       max_s=st.integers(0, 6))  # fmt: skip
def test_admits_exactly_the_fresh_enough_groups(data, v_now, max_s):
    f = StalenessFilter(max_s)
    kept = f.filter([_group(v, key=i) for i, v in enumerate(data)], v_now)
    expect = [v for v in data if 0 <= v_now - v <= max_s]
    assert [g.policy_version for g in kept] == expect
    assert f.dropped_groups == sum(1 for v in data if v_now - v > max_s)
    assert f.dropped_future == sum(1 for v in data if v > v_now)
    assert sum(f.histogram.values()) == len(expect)
