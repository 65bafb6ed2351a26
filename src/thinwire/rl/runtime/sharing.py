"""Sharing rollouts instead of gradients (SAPO mode).

Gensyn, "Sharing is Caring: Efficient LM Post-Training with Collective RL Experience Sharing"
(SAPO, arXiv:2509.08721v1, §3 and Table 1). Each learner publishes some of its scored groups to
its peers and builds its batch from ``I`` local and ``J`` external groups (SAPO's best setting on
8 × Qwen2.5-0.5B was 4 local / 4 external; external groups with zero advantage are discarded
before sampling). Groups travel as :func:`thinwire.rl.encode_groups` (rollout records in one
bundle) in one ``all_gather_bytes`` per step over the learners' communicator (tag
``"rollouts/shared"``), so their bytes sit in the ledger next to the optimizer's (G rollout
records per shared group, to each peer).
External groups keep the sender's ``origin``: the staleness filter admits them without a
staleness and the learner uses its own detached log-probs as the ratio reference (r ≡ 1).

Deviation: SAPO shares decoded text so heterogeneous models can re-encode it; thinwire shares token
ids (all learners here use one tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from thinwire._validate import check_int, check_type
from thinwire.collectives import Communicator
from thinwire.rl import (
    RolloutDecodeError,
    RolloutGroup,
    decode_groups,
    encode_groups,
    informative_groups,
)

__all__ = ["RolloutSharing"]


class RolloutSharing:
    """SAPO exchange of scored groups between learners.

    Args:
        comm: the learners' communicator (every learner must call :meth:`exchange` each step).
        n_publish: groups each learner publishes per step (the first ``n_publish`` informative
            local groups).
        n_external: *J*, external groups mixed into each step's batch (fewer if peers sent
            fewer informative ones).
        seed: seed of the choice among received groups (mixed with the step and rank).
        tag: ledger tag (default ``"rollouts/shared"``).
    """

    def __init__(
        self,
        comm: Communicator,
        *,
        n_publish: int,
        n_external: int,
        seed: int = 0,
        tag: str = "rollouts/shared",
    ) -> None:
        self.comm = comm
        self.n_publish = check_int("n_publish", n_publish, 0)
        self.n_external = check_int("n_external", n_external, 0)
        self.seed = check_int("seed", seed, 0)
        self.tag = check_type("tag", tag, str)
        self.steps = 0
        self.received = 0
        self.discarded_zero_std = 0
        self.dropped_payloads = 0

    def exchange(self, local: Sequence[RolloutGroup]) -> list[RolloutGroup]:
        """Publish informative local groups, gather the peers', return up to ``J`` external ones.

        Collective: every learner must call this once per step.
        """
        mine = [g for g in local if bool(informative_groups(g.rewards()[None])[0])][
            : self.n_publish
        ]
        payloads = self.comm.all_gather_bytes(encode_groups(mine), tag=self.tag)
        assert isinstance(payloads, list)  # internal invariant: a blocking call's result
        pool: list[RolloutGroup] = []
        for rank, blob in enumerate(payloads):
            if rank == self.comm.rank or blob is None:
                continue
            try:
                groups = decode_groups(bytes(blob))
            except RolloutDecodeError:
                self.dropped_payloads += 1
                continue
            self.received += len(groups)
            for g in groups:
                # SAPO discards zero-advantage external groups before sampling
                if bool(informative_groups(g.rewards()[None])[0]):
                    pool.append(g)
                else:
                    self.discarded_zero_std += 1
        gen = torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.steps * 4099 + self.comm.rank
        )
        self.steps += 1
        if len(pool) <= self.n_external:
            return pool
        pick = torch.randperm(len(pool), generator=gen)[: self.n_external].sort().values
        return [pool[int(i)] for i in pick]
