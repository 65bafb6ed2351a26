"""Policies and sampling around the GRPO core: ``TinyCausalLM``, ``HFCausalLMPolicy``, samplers.

* :class:`TinyCausalLM`: a ~69k-parameter causal transformer for CPU runs (DigitSum);
* :class:`HFCausalLMPolicy`: any local Hugging Face causal LM (extra ``thinwire[hf]``);
* :func:`sample` / :func:`greedy_decode`: the sampling loops (behaviour log-probs recorded with
  :func:`thinwire.rl.token_logprobs`); :class:`SamplingClient` / :class:`LocalSampler` /
  :class:`SamplingArgs`: how environments ask a policy for completions.

This package reaches the core only through :mod:`thinwire.rl`'s public names.
"""

from __future__ import annotations

from thinwire.rl.policies.models import (
    HFCausalLMPolicy,
    TinyCausalLM,
    completion_mask,
    greedy_decode,
    sample,
)
from thinwire.rl.policies.sampling import LocalSampler, SamplingArgs, SamplingClient

__all__ = [
    "HFCausalLMPolicy",
    "LocalSampler",
    "SamplingArgs",
    "SamplingClient",
    "TinyCausalLM",
    "completion_mask",
    "greedy_decode",
    "sample",
]
