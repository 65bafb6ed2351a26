"""GRPO whose learners sit on different machines over WAN links.

* objective (DeepSeekMath arXiv:2402.03300v3 §4.1, DAPO arXiv:2503.14476): :class:`GRPOConfig`,
  :func:`compute_advantages`, :class:`GRPOLoss`;
* policies and sampling: :class:`Policy`, :class:`TinyCausalLM`, :class:`HFCausalLMPolicy`,
  :func:`sample`, :func:`sequence_logprobs`;
* environments: :class:`Environment`, :class:`SingleTurnEnv`, :class:`MultiTurnEnv`,
  :class:`Rubric`, :class:`GymAdapter`, the built-in :class:`DigitSumEnv`;
* the versioned pipeline: :class:`Rollout` / :class:`RolloutGroup` (each carries the policy
  version and weight fingerprint that made it), :class:`StalenessFilter`, :class:`PolicyStore`,
  :class:`RolloutWorker`, :class:`Learner`, :class:`RolloutVerifier`, :class:`RolloutSharing`;
* :func:`run_local`: learners and workers in one process over the simulated WAN, syncing
  through the thinwire optimizers (DiLoCo, Streaming DiLoCo, DeMo, SparseLoCo).
"""

from __future__ import annotations

from thinwire.rl.config import GRPOConfig
from thinwire.rl.env import Environment, GymAdapter, MultiTurnEnv, Rubric, SingleTurnEnv
from thinwire.rl.learner import Learner
from thinwire.rl.objective import GRPOLoss, compute_advantages, k3
from thinwire.rl.policy import HFCausalLMPolicy, Policy, TinyCausalLM, sample, sequence_logprobs
from thinwire.rl.rollout import Rollout, RolloutGroup, decode, encode
from thinwire.rl.runtime import SyncOptions, run_local
from thinwire.rl.sampling import LocalSampler, SamplingClient
from thinwire.rl.sharing import RolloutSharing
from thinwire.rl.staleness import StalenessFilter
from thinwire.rl.store import PolicyStore
from thinwire.rl.tasks import DigitSumEnv
from thinwire.rl.verify import RolloutVerifier
from thinwire.rl.worker import RolloutWorker

__all__ = [
    "DigitSumEnv",
    "Environment",
    "GRPOConfig",
    "GRPOLoss",
    "GymAdapter",
    "HFCausalLMPolicy",
    "Learner",
    "LocalSampler",
    "MultiTurnEnv",
    "Policy",
    "PolicyStore",
    "Rollout",
    "RolloutGroup",
    "RolloutSharing",
    "RolloutVerifier",
    "RolloutWorker",
    "Rubric",
    "SamplingClient",
    "SingleTurnEnv",
    "StalenessFilter",
    "SyncOptions",
    "TinyCausalLM",
    "compute_advantages",
    "decode",
    "encode",
    "k3",
    "run_local",
    "sample",
    "sequence_logprobs",
]
