"""What GRPO needs from a model: the ``Policy`` protocol and temperature-scaled log-probs.

Log-probabilities are always those of the sampled token under the **temperature-scaled**
distribution, ``log_softmax(logits / T)[token]`` (TRL and prime-rl divide by the sampling
temperature), so the behaviour log-probs a sampler records equal the ones the learner and the
verifier recompute. Concrete policies (``TinyCausalLM``, the Hugging Face adapter) and the
sampling loop live in :mod:`thinwire.rl.policies`.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from thinwire._validate import check_float

__all__ = [
    "Policy",
    "completion_logprobs",
    "frozen_reference",
    "sequence_logprobs",
    "token_logprobs",
]


@runtime_checkable
class Policy(Protocol):
    """What GRPO needs from a model; any ``nn.Module`` with these members fits.

    Attributes:
        vocab_size: size of the logit dimension V.
        eos_id: end-of-sequence id used as the default stop token, or ``None``.
        pad_id: id written after a completion stopped (its mask is 0).
    """

    vocab_size: int
    eos_id: int | None
    pad_id: int

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Same as ``forward`` (``nn.Module.__call__`` runs hooks, then ``forward``)."""
        ...

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, V]`` of the next token at each position of ``input_ids [B, T]``;
        ``attention_mask [B, T]`` (1 = real token) marks left padding."""
        ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Weights to publish and to load into replicas."""
        ...

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load weights produced by ``state_dict``."""
        ...


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T)[tokens]`` over the last dimension, without the full softmax.

    Half-precision logits are scored in float32 (bf16 log-probs are too coarse for a ratio).

    Args:
        logits: ``[..., V]``. tokens: ``[...]`` ids. temperature: *T* > 0 (default: 1.0).
    """
    check_float("temperature", temperature, 0.0, lo_open=True)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(
    policy: Policy,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Log-prob of every token given its prefix, 0 where ``completion_mask`` is 0.

    Args:
        policy: any ``Policy``.
        input_ids: ``[B, T]`` prompt and completion tokens.
        completion_mask: ``[B, T]``, 1 at the tokens to score; position 0 has no prefix and must
            be 0.
        temperature: *T* of ``log_softmax(logits / T)`` (default: 1.0).
        attention_mask: ``[B, T]`` left-padding mask passed to the policy.

    Returns:
        ``[B, T]`` log-probs (with grad if the policy has it), 0 where the mask is 0.
    """
    if completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(completion_mask.shape)}"
        )
    mask = completion_mask.bool()
    if input_ids.shape[1] and bool(mask[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be 0: the first token has no prefix to score")
    logits = policy(input_ids, attention_mask=attention_mask)
    lp = token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)  # [B, T-1]
    lp = torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)
    return torch.where(mask, lp, torch.zeros_like(lp))


def completion_logprobs(
    policy: Policy,
    prompt_ids: Tensor,
    completion_ids: Tensor,
    *,
    temperature: float = 1.0,
    prompt_mask: Tensor | None = None,
) -> Tensor:
    """Log-probs ``[B, K]`` of ``completion_ids [B, K]`` after ``prompt_ids [B, Tp]``.

    Only the K positions that predict completion tokens go through the log-softmax. Positions
    after a stop token are scored too; ``GRPOLoss`` masks them.

    Args:
        policy: any ``Policy``. prompt_ids: ``[B, Tp]``, Tp ≥ 1. completion_ids: ``[B, K]``.
        temperature: *T* (default: 1.0).
        prompt_mask: ``[B, Tp]`` left-padding mask of the prompts (default: no padding).

    Returns:
        ``[B, K]`` log-probs under ``log_softmax(logits / T)``.
    """
    check_float("temperature", temperature, 0.0, lo_open=True)
    if prompt_ids.dim() != 2 or completion_ids.dim() != 2:
        raise ValueError("prompt_ids and completion_ids must have shapes [B, Tp] and [B, K]")
    if prompt_ids.shape[0] != completion_ids.shape[0] or prompt_ids.shape[1] < 1:
        raise ValueError(
            f"prompt_ids [B, Tp>=1] and completion_ids [B, K] must share B, got "
            f"{tuple(prompt_ids.shape)} and {tuple(completion_ids.shape)}"
        )
    tp, k = prompt_ids.shape[1], completion_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attn = None
    if prompt_mask is not None:
        attn = torch.cat([prompt_mask.long(), torch.ones_like(completion_ids)], dim=1)
    logits = policy(ids, attention_mask=attn)[:, tp - 1 : tp - 1 + k]
    return token_logprobs(logits, completion_ids, temperature)


def frozen_reference(policy: nn.Module) -> nn.Module:
    """A frozen deep copy of ``policy`` for the β·k3 term: no grads, eval mode."""
    ref = copy.deepcopy(policy)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()
