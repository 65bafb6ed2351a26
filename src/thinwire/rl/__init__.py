"""GRPO whose learners sit on different machines over WAN links: the core.

* the objective (DeepSeekMath arXiv:2402.03300v3 §4.1, DAPO arXiv:2503.14476v1 §3):
  :class:`GRPOConfig`, :func:`compute_advantages`, :func:`k3`, :class:`GRPOLoss`, and the
  temperature-scaled log-probs of any :class:`Policy` (:func:`completion_logprobs`);
* the record: :class:`Rollout` / :class:`RolloutGroup` carry the policy version and the
  fingerprint of the weights that made them (:func:`encode` / :func:`decode`, the one byte
  format of this package);
* :class:`StalenessFilter`, :class:`Learner` (one step of GRPO on a thinwire optimizer built
  from the method table, :func:`build_learner_optimizer`), :class:`RolloutVerifier`;
* weights for rollout workers: :class:`PolicyStore`, :func:`param_fingerprint`,
  :class:`WeightPublisher` / :class:`WeightReceiver` (library codec frames with error feedback).

Around the core, reaching it only through these names: :mod:`thinwire.rl.envs` (environments,
rubrics, the DigitSum task), :mod:`thinwire.rl.policies` (``TinyCausalLM``, the Hugging Face
adapter, sampling) and :mod:`thinwire.rl.runtime` (rollout workers, SAPO sharing and
:func:`thinwire.rl.runtime.train`, the TRL-like entry point).
"""

from __future__ import annotations

from thinwire.rl.config import GRPOConfig
from thinwire.rl.learner import RL_METHOD_SETTINGS, Learner, build_learner_optimizer
from thinwire.rl.objective import GRPOLoss, compute_advantages, informative_groups, k3
from thinwire.rl.policy import (
    Policy,
    completion_logprobs,
    frozen_reference,
    sequence_logprobs,
    token_logprobs,
)
from thinwire.rl.rollout import (
    Rollout,
    RolloutDecodeError,
    RolloutGroup,
    decode,
    decode_groups,
    encode,
    encode_groups,
    groups_nbytes,
    wire_nbytes,
)
from thinwire.rl.staleness import StalenessFilter
from thinwire.rl.verify import RolloutVerifier
from thinwire.rl.weights import (
    PolicySnapshot,
    PolicyStore,
    WeightPublisher,
    WeightReceiver,
    param_fingerprint,
)

__all__ = [
    "GRPOConfig",
    "GRPOLoss",
    "Learner",
    "Policy",
    "PolicySnapshot",
    "PolicyStore",
    "RL_METHOD_SETTINGS",
    "Rollout",
    "RolloutDecodeError",
    "RolloutGroup",
    "RolloutVerifier",
    "StalenessFilter",
    "WeightPublisher",
    "WeightReceiver",
    "build_learner_optimizer",
    "completion_logprobs",
    "compute_advantages",
    "decode",
    "decode_groups",
    "encode",
    "encode_groups",
    "frozen_reference",
    "groups_nbytes",
    "informative_groups",
    "k3",
    "param_fingerprint",
    "sequence_logprobs",
    "token_logprobs",
    "wire_nbytes",
]
