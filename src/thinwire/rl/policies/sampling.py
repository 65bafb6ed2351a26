"""Sampling clients: how an environment asks a policy for completions.

``SamplingClient`` is the protocol environments talk to (a remote inference server can implement
it); ``LocalSampler`` runs a local ``Policy`` with :func:`sample`. No top-k/top-p:
the recorded behaviour log-probs are exactly those of the distribution that was sampled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from thinwire._validate import check_float, check_int
from thinwire.rl import Policy
from thinwire.rl.policies.models import sample

__all__ = ["SamplingArgs", "SamplingClient", "LocalSampler"]


@dataclasses.dataclass(frozen=True)
class SamplingArgs:
    """Per-request sampling settings.

    Args:
        max_new_tokens: most tokens per model turn (``max_completion_length`` for single turn).
        temperature: *T* > 0 (default: 1.0).
        stop_ids: tokens that end a turn; empty means always ``max_new_tokens`` tokens
            (DigitSum). HF policies usually pass ``policy.stop_ids``. (default: ())
    """

    max_new_tokens: int
    temperature: float = 1.0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_float("temperature", self.temperature, 0.0, lo_open=True)
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))


@runtime_checkable
class SamplingClient(Protocol):
    """Anything that turns prompt token ids into sampled completions with their log-probs."""

    def sample(
        self,
        prompt_ids: Tensor,
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        stop_ids: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample ``n`` completions per prompt.

        Args:
            prompt_ids: ``[Tp]`` one prompt, or ``[B, Tp]`` prompts of equal length.
            n: completions per prompt.
            max_new_tokens: K. temperature: *T*. stop_ids: tokens ending a completion.

        Returns:
            ``(completion_ids [B·n, K], behavior_logprobs [B·n, K], truncated [B·n] bool)``,
            rows grouped by prompt (prompt-major); positions after a stop hold the pad id and
            log-prob 0; ``truncated`` is True for rows with no stop token when ``stop_ids`` is
            non-empty (always False without stop tokens: the length is then the intended one).
        """
        ...


class LocalSampler:
    """``SamplingClient`` over an in-process ``Policy``.

    Args:
        policy: the policy to sample from; swap weights with ``policy.load_state_dict``.
        generator: the randomness source; seed it from (seed, worker_id, group counter) for a
            reproducible run. (default: a new generator seeded with ``seed``)
        seed: seed of the default generator (default: 0).
    """

    def __init__(
        self, policy: Policy, generator: torch.Generator | None = None, *, seed: int = 0
    ) -> None:
        self.policy = policy
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    def sample(
        self,
        prompt_ids: Tensor,
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        stop_ids: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """See ``SamplingClient.sample``."""
        check_int("n", n, 1)
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must have shape [Tp] or [B, Tp], got {prompt_ids.shape}")
        batch = prompt_ids.long().repeat_interleave(n, dim=0)  # prompt-major rows
        ids, logp = sample(
            self.policy, batch, max_new_tokens, temperature, self.generator, stop_ids=stop_ids
        )
        if stop_ids:
            stops = torch.tensor(list(stop_ids), device=ids.device)
            truncated = ~torch.isin(ids, stops).any(dim=1)
        else:
            truncated = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        return ids, logp, truncated
