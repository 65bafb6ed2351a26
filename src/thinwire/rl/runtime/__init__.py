"""The runtime around the GRPO core: :func:`train`, rollout workers, SAPO sharing.

* :func:`train`: GRPO in one call, TRL-like (``train(policy, reward_fn, prompts, config)``), for
  one learner, N learners as threads of this process, or one learner per process over a
  communicator (``torchrun``); returns a :class:`TrainResult`;
* :class:`RolloutWorker` and :class:`WorkerLink`: a worker samples scored groups; the link
  carries control, weight frames and rollouts over a two-rank communicator;
* :class:`RolloutSharing`: SAPO's exchange of scored groups between learners.

This package reaches the core only through :mod:`thinwire.rl`'s public names.
"""

from __future__ import annotations

from thinwire.rl.runtime.sharing import RolloutSharing
from thinwire.rl.runtime.trainer import LearnerResult, TrainResult, train
from thinwire.rl.runtime.worker import RolloutWorker, WorkerLink, mix_seed

__all__ = [
    "LearnerResult",
    "RolloutSharing",
    "RolloutWorker",
    "TrainResult",
    "WorkerLink",
    "mix_seed",
    "train",
]
