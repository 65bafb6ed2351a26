"""Staleness: which groups a learner may still train on.

The staleness of a group consumed by a learner at version ``v_now`` is
``s = v_now − v_b`` (prime-rl: the version the batch trains on minus the version that generated
the rollout, queue time included). :class:`StalenessFilter` applies it at consumption. Groups with ``s > max_staleness`` are dropped whole, because advantages are relative
to the group; ``mode="withhold"`` (prime-rl PR #2960) keeps a stale member's reward in the group
statistics but masks its tokens.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import torch

from thinwire._validate import check_choice, check_int
from thinwire.rl.rollout import RolloutGroup, replace_mask

__all__ = ["StalenessFilter", "staleness"]

logger = logging.getLogger(__name__)


def staleness(version_now: int, version_behavior: int) -> int:
    """``s = v_now − v_b`` (versions as defined in :mod:`thinwire.rl.learner`)."""
    return int(version_now) - int(version_behavior)


class StalenessFilter:
    """Drop (or withhold) groups whose staleness exceeds ``max_staleness``.

    Only groups sampled by this learner's own weights (``origin == learner_id``) have a staleness;
    groups shared by peers (SAPO, :mod:`thinwire.rl.runtime`) carry another learner's versions and
    are admitted as ``external``. A group claiming a version newer than ``v_now`` cannot come from
    this learner and is dropped as ``future``.

    Args:
        max_staleness: largest accepted ``s``; 0 admits only on-policy groups.
        mode: ``"drop"`` (default; drop whole groups, prime-rl and TRL-async) or ``"withhold"``
            (keep the group, mask the tokens of stale members, keep their rewards).
        learner_id: origin id of this learner's weights.

    Attributes:
        histogram: admitted groups by staleness (``Counter``).
        dropped_groups / dropped_rollouts: counted in ``rollouts/dropped_stale``.
        withheld_rollouts: members whose tokens were masked (withhold mode).
        dropped_future: groups claiming a version newer than the learner's.
        external_groups: groups admitted without a staleness (other origins).
    """

    def __init__(self, max_staleness: int, mode: str = "drop", *, learner_id: int = 0) -> None:
        self.max_staleness = check_int("max_staleness", max_staleness, 0)
        self.mode = check_choice("mode", mode, ("drop", "withhold"))
        self.learner_id = check_int("learner_id", learner_id)
        self.histogram: Counter[int] = Counter()
        self.admitted_groups = 0
        self.dropped_groups = 0
        self.dropped_rollouts = 0
        self.withheld_rollouts = 0
        self.dropped_future = 0
        self.external_groups = 0

    def admit(self, group: RolloutGroup, version_now: int) -> RolloutGroup | None:
        """The group as it may be trained on at ``version_now``, or None when it is dropped."""
        if group.origin != self.learner_id:
            self.external_groups += 1
            self.admitted_groups += 1
            return group
        stal = [staleness(version_now, v) for v in group.versions]
        if min(stal) < 0:
            self.dropped_future += 1
            logger.warning(
                "dropping group %s: version %d is newer than the learner's %d",
                group.group_id.hex(), max(group.versions), version_now,
            )  # fmt: skip
            return None
        too_old = [s > self.max_staleness for s in stal]
        if self.mode == "drop" and any(too_old):
            self.dropped_groups += 1
            self.dropped_rollouts += group.size
            return None
        if any(too_old):
            members = [
                replace_mask(r, torch.zeros_like(r.loss_mask)) if old else r
                for r, old in zip(group.rollouts, too_old, strict=True)
            ]
            self.withheld_rollouts += sum(too_old)
            group = group.with_rollouts(members)
        self.histogram[max(stal)] += 1
        self.admitted_groups += 1
        return group

    def filter(self, groups: Iterable[RolloutGroup], version_now: int) -> list[RolloutGroup]:
        """Apply :meth:`admit` to each group; keep the admitted ones in order."""
        out = []
        for g in groups:
            kept = self.admit(g, version_now)
            if kept is not None:
                out.append(kept)
        return out

    def metrics(self) -> dict[str, float]:
        """Counters as a flat dict (``rollouts/dropped_stale``, ``staleness/s=k``, ...)."""
        out: dict[str, float] = {
            "rollouts/admitted_groups": self.admitted_groups,
            "rollouts/dropped_stale": self.dropped_groups,
            "rollouts/dropped_stale_rollouts": self.dropped_rollouts,
            "rollouts/withheld": self.withheld_rollouts,
            "rollouts/dropped_future": self.dropped_future,
            "rollouts/external": self.external_groups,
        }
        for s, n in sorted(self.histogram.items()):
            out[f"staleness/s={s}"] = n
        return out
