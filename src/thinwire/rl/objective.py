"""The GRPO objective: advantages, clipped ratio loss, k3 KL, aggregation.

Reference: Shao et al., "DeepSeekMath", arXiv:2402.03300v3, §4.1 (GRPO, eq. 3 and the k3 KL
estimator); DAPO (Yu et al., arXiv:2503.14476v1, §3: clip-higher, token-level loss, dynamic
sampling, overlong filtering); Dr. GRPO (Liu et al., arXiv:2503.20783v1, §3.1: constant
normaliser, unscaled advantages); INTELLECT-2 (arXiv:2505.07291v1, §3.3: two-sided clipping δ).

The math lives in free functions (``compute_advantages``, ``k3``, ``grpo_per_token_loss``,
``aggregation_weights``); ``GRPOLoss`` binds them to a ``GRPOConfig``. Gradient accumulation is
exact: a micro-batch contributes its weighted *sum* under the step-global normaliser, so summing
the losses of the micro-batches of a step gives the full-batch loss and gradient (the bug
class of TRL #3021 and TRL PR #7249 cannot arise).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from thinwire._validate import check_choice, check_float
from thinwire.rl.config import GRPOConfig

__all__ = [
    "ADV_EPS",
    "ZERO_STD_EPS",
    "compute_advantages",
    "group_reward_std",
    "informative_groups",
    "k3",
    "apply_overlong_mask",
    "grpo_per_token_loss",
    "aggregation_weights",
    "step_counts",
    "merge_metrics",
    "GRPOLoss",
]

# Added to σ before dividing (TRL grpo_trainer; DeepSeekMath writes a bare σ).
ADV_EPS = 1e-4
# Dynamic sampling keeps groups with σ ≥ this, not σ != 0: float noise (NeMo-RL PR #4158).
ZERO_STD_EPS = 1e-6


def _float_rewards(rewards: Tensor) -> Tensor:
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a Tensor [n_groups, G], got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must have shape [n_groups, G] (one row per prompt), got {tuple(rewards.shape)}"
        )
    if rewards.shape[1] < 2:
        raise ValueError(
            f"group size G must be in [2, inf), got {rewards.shape[1]} (rewards shape "
            f"{tuple(rewards.shape)}); the advantage is relative to the other completions of the "
            "same prompt, so sample at least 2 per prompt (TRL PR #3199)"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards


def _group_stats(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NaN-aware per-group (mean, unbiased std, valid mask, constant flag) of ``[n, G]`` rewards."""
    valid = ~torch.isnan(rewards)
    n = valid.sum(dim=1)
    filled = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = filled.sum(dim=1) / n.clamp(min=1)
    dev = torch.where(valid, rewards - mean[:, None], torch.zeros_like(rewards))
    # Bessel-corrected (as TRL); fewer than 2 scorable members have no spread: σ = 0.
    var = (dev * dev).sum(dim=1) / (n - 1).clamp(min=1)
    std = torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))
    hi = torch.where(valid, rewards, torch.full_like(rewards, -math.inf)).amax(dim=1)
    lo = torch.where(valid, rewards, torch.full_like(rewards, math.inf)).amin(dim=1)
    # Equal scorable rewards (or < 2 of them) carry no signal: force A = 0 exactly, which
    # R - mean would miss by an ulp ([0.1, 0.1, 0.1] has mean 0.10000000000000002).
    constant = (n < 2) | (hi == lo)
    return mean, std, valid, constant


def compute_advantages(
    rewards: Tensor,
    mode: Literal["group", "batch", "none"] = "group",
    eps: float = ADV_EPS,
) -> Tensor:
    """Group-relative advantages, one scalar per completion (arXiv:2402.03300v3 §4.1.2).

    ``A_i = (R_i − μ_g) / (σ + eps)`` with σ the Bessel-corrected std of the group (``"group"``,
    DeepSeekMath) or of every scorable reward of the step (``"batch"``, TRL's PPO Lite);
    ``A_i = R_i − μ_g`` for ``"none"`` (Dr. GRPO). NaN rewards mark *unscorable* completions:
    they are left out of μ and σ and get ``A = 0``. A group whose scorable rewards are all equal
    (or that has fewer than two) gets exactly 0 for every member.

    Args:
        rewards: ``[n_groups, G]`` scalar rewards, NaN for unscorable members; G ≥ 2.
        mode: ``"group"``, ``"batch"`` or ``"none"`` (``GRPOConfig.scale_rewards``).
        eps: added to σ before dividing (default: 1e-4, TRL).

    Returns:
        ``[n_groups, G]`` advantages in the rewards' floating dtype (integer rewards become the
        default dtype).

    Raises:
        ValueError: ``rewards`` is not 2-D, G < 2, or ``mode``/``eps`` is invalid.

    Example: rewards ``[[1, 0, 0, 1]]`` give ``±0.865875`` (group) and ``±0.5`` (none).
    """
    check_choice("mode", mode, ("group", "batch", "none"))
    check_float("eps", eps, 0.0)
    rewards = _float_rewards(rewards)
    mean, std, valid, constant = _group_stats(rewards)
    centered = rewards - mean[:, None]
    if mode == "group":
        adv = centered / (std[:, None] + eps)
    elif mode == "batch":
        flat = rewards[valid]
        std_b = flat.std(unbiased=True) if flat.numel() >= 2 else rewards.new_zeros(())
        adv = centered / (std_b + eps)
    else:
        adv = centered
    keep = valid & ~constant[:, None]
    return torch.where(keep, adv, torch.zeros_like(adv))


def group_reward_std(rewards: Tensor) -> Tensor:
    """NaN-aware Bessel-corrected std of each group, 0 for groups with < 2 scorable rewards.

    Args:
        rewards: ``[n_groups, G]``, NaN for unscorable members.

    Returns:
        ``[n_groups]`` standard deviations (log it as ``frac_reward_zero_std``).
    """
    _, std, _, constant = _group_stats(_float_rewards(rewards))
    return torch.where(constant, torch.zeros_like(std), std)


def informative_groups(rewards: Tensor, min_std: float = ZERO_STD_EPS) -> Tensor:
    """Keep-mask of DAPO dynamic sampling: groups whose reward σ ≥ ``min_std`` (arXiv:2503.14476v1 §3).

    Filter on the scalar reward actually used for the advantages (the weighted rubric sum), not
    on a single component (verl-recipe PR #125).

    Args:
        rewards: ``[n_groups, G]``, NaN for unscorable members.
        min_std: threshold on the Bessel-corrected σ (default: 1e-6, NeMo-RL PR #4158).

    Returns:
        ``[n_groups]`` bool, True for groups that carry a learning signal.
    """
    check_float("min_std", min_std, 0.0)
    return group_reward_std(rewards) >= min_std


def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(π_θ‖π_ref) per token (DeepSeekMath eq. 4).

    ``k3 = exp(d) − d − 1`` with ``d = logπ_ref − logπ_θ``; non-negative, zero when the two
    agree, unbiased for the KL under samples from π_θ. Computed as ``expm1(d) − d`` so small
    differences keep their precision. Example: π_θ = 0.8, π_ref = 0.4 gives 0.193147.

    Args:
        logp: log-probs under the trained policy, any shape.
        ref_logp: log-probs of the same tokens under the frozen reference, same shape.

    Returns:
        Per-token k3, same shape.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"ref_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(ref_logp.shape)}"
        )
    d = ref_logp - logp
    return torch.expm1(d) - d


def apply_overlong_mask(mask: Tensor, truncated: Tensor) -> Tensor:
    """DAPO overlong filtering: zero the mask of completions cut at the length limit.

    Args:
        mask: ``[B, T]`` completion mask (bool or {0, 1}).
        truncated: ``[B]`` bool, True where a completion hit ``max_completion_length`` without EOS.

    Returns:
        The mask with truncated rows set to 0, same dtype.
    """
    if truncated.shape != mask.shape[:1]:
        raise ValueError(
            f"truncated must have shape [B] = {tuple(mask.shape[:1])}, got {tuple(truncated.shape)}"
        )
    keep = ~truncated.bool()[:, None]
    return mask & keep if mask.dtype == torch.bool else mask * keep


def _bool_mask(mask: Tensor, shape: torch.Size) -> Tensor:
    if mask.shape != shape:
        raise ValueError(f"mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            "mask must hold only 0 and 1 (it selects tokens; it is not a weight), got other values"
        )
    return mask != 0


def grpo_per_token_loss(
    logp: Tensor,
    behavior_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    old_logp: Tensor | None = None,
    tis_cap: float = 3.0,
    importance_level: Literal["token", "sequence"] = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token GRPO loss ℓ_{i,t} (0 at masked positions).

    ``r = exp(logπ_θ − logπ_ref_ratio)`` with the reference detached (the behaviour log-probs,
    or ``old_logp`` in decoupled mode), so r = 1 on-policy but keeps its gradient;
    ``ρ = min(r, δ)`` when δ is set; ``c = clamp(r, 1 − ε_low, 1 + ε_high)``;
    ``ℓ = −min(ρ·A, c·A)·w + β·k3`` where ``w = min(exp(old − behavior), tis_cap)`` (detached)
    in decoupled mode and 1 otherwise; the IS weight multiplies the policy term only, before β·k3
    is added, as TRL's ``_compute_loss`` does.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under π_θ (with grad).
        behavior_logp: ``[B, T]`` log-probs recorded by the rollout worker (π_b).
        adv: ``[B]`` advantages, broadcast to every token of the completion.
        mask: ``[B, T]`` completion mask (bool or {0, 1}).
        epsilon_low: ε_low ≥ 0. epsilon_high: ε_high ≥ 0.
        delta: δ cap on the ratio (``None``: off).
        beta: KL weight β; needs ``ref_logp`` when > 0.
        ref_logp: ``[B, T]`` log-probs under the frozen reference.
        old_logp: ``[B, T]`` learner log-probs at the start of the step: switches on the decoupled
            ratio with a truncated IS weight (TRL's vLLM mode).
        tis_cap: *C_max* of the truncated IS weight (default: 3.0, TRL).
        importance_level: ``"token"``, or ``"sequence"`` for GSPO's per-completion ratio
            ``exp(mean_t(logπ_θ − logπ_b))`` over unmasked tokens.

    Returns:
        ``(loss [B, T], stats)`` where ``stats`` holds detached ``ratio``, ``low_clipped``,
        ``high_clipped``, ``delta_capped`` (bool, active tokens only) and ``k3`` (when β > 0).
    """
    shape = logp.shape
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(shape)}")
    for name, t in (
        ("behavior_logp", behavior_logp),
        ("ref_logp", ref_logp),
        ("old_logp", old_logp),
    ):
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} must have the shape of logp {tuple(shape)}, got {tuple(t.shape)}"
            )
    if adv.shape != shape[:1]:
        raise ValueError(f"adv must have shape [B] = {tuple(shape[:1])}, got {tuple(adv.shape)}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (log-probs under the frozen reference)")
    m = _bool_mask(mask, shape)
    zeros = torch.zeros_like(logp)
    anchor = (behavior_logp if old_logp is None else old_logp).detach()
    # Masked positions may hold padding garbage (even ±inf): zero the log-ratio there so neither
    # the value nor the backward pass (0 · inf) can produce NaN.
    log_ratio = torch.where(m, logp - anchor, zeros)
    if importance_level == "sequence":
        per_seq = log_ratio.sum(dim=1) / m.sum(dim=1).clamp(min=1)
        log_ratio = per_seq[:, None].expand(shape)
    elif importance_level != "token":
        check_choice("importance_level", importance_level, ("token", "sequence"))
    ratio = torch.exp(log_ratio)
    a = adv.to(logp.dtype)[:, None]
    rho = ratio if delta is None else torch.clamp(ratio, max=delta)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = -torch.minimum(rho * a, clipped * a)
    if old_logp is not None:
        log_w = torch.where(m, old_logp.detach() - behavior_logp.detach(), zeros)
        loss = loss * torch.exp(log_w).clamp(max=tis_cap)
    stats: dict[str, Tensor] = {}
    if beta > 0 and ref_logp is not None:  # a missing ref_logp was rejected above
        d = torch.where(m, ref_logp.detach() - logp, zeros)
        kl = torch.expm1(d) - d
        loss = loss + beta * kl
        stats["k3"] = kl.detach()
    loss = torch.where(m, loss, zeros)
    r = ratio.detach()
    stats["ratio"] = r
    stats["low_clipped"] = m & (a < 0) & (r < 1.0 - epsilon_low)
    stats["high_clipped"] = m & (a > 0) & (r > 1.0 + epsilon_high)
    stats["delta_capped"] = m & (a < 0) & (r > delta) if delta is not None else torch.zeros_like(m)
    return loss, stats


def aggregation_weights(
    mask: Tensor,
    aggregation: Literal["token_mean", "sequence_mean", "constant"],
    *,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    max_completion_length: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-token weights whose dot product with ℓ is the loss of one optimizer step.

    - ``token_mean`` (DAPO): ``m / max(1, N_tok)``.
    - ``sequence_mean`` (DeepSeekMath): ``m / (N_seq · max(1, Σ_t m_i))``.
    - ``constant`` (Dr. GRPO): ``m / (N_seq · L_max)``.

    ``N_seq`` and ``N_tok`` are **step-global** counts (every micro-batch of the optimizer step,
    and every learner in per-step-synced modes); ``None`` counts this mask only. ``N_seq`` counts
    rows, including rows whose mask is all zero (truncated or withheld completions), as TRL does.

    Args:
        mask: ``[B, T]`` completion mask.
        aggregation: one of the three names above.
        num_sequences: step-global N_seq (default: B).
        num_tokens: step-global N_tok (default: ``mask.sum()``).
        max_completion_length: L_max, required for ``constant``.
        dtype: floating dtype of the result (default: the default dtype).

    Returns:
        ``[B, T]`` weights (0 where the mask is 0).
    """
    check_choice("aggregation", aggregation, ("token_mean", "sequence_mean", "constant"))
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T], got {tuple(mask.shape)}")
    m = _bool_mask(mask, mask.shape).to(dtype or torch.get_default_dtype())
    n_seq = mask.shape[0] if num_sequences is None else num_sequences
    n_tok = int(m.sum().item()) if num_tokens is None else num_tokens
    if aggregation == "token_mean":
        return m / max(1, n_tok)
    if aggregation == "sequence_mean":
        lengths = m.sum(dim=1, keepdim=True).clamp(min=1.0)
        return m / (lengths * max(1, n_seq))
    if max_completion_length is None:
        raise ValueError("aggregation 'constant' needs max_completion_length (L_max of Dr. GRPO)")
    return m / (max(1, n_seq) * max_completion_length)


def step_counts(masks: Iterable[Tensor]) -> tuple[int, int]:
    """``(N_seq, N_tok)`` over the micro-batch masks of one optimizer step.

    Pass the result to every ``GRPOLoss`` call of the step (all-reduce it first when several
    learners share one normaliser, as DeMo learners do: 16 bytes).
    """
    n_seq = 0
    n_tok = 0
    for mask in masks:
        n_seq += int(mask.shape[0])
        n_tok += int((mask != 0).sum().item())
    return n_seq, n_tok


def merge_metrics(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine the metrics of the micro-batches of one step.

    ``loss``, ``num_tokens`` and ``num_sequences`` add up; ``ratio/max`` takes the max,
    ``ratio/min`` the min; every other entry is a per-token mean, averaged with token weights.
    """
    out: dict[str, float] = {}
    if not metrics:
        return out
    tokens = [m.get("num_tokens", 0.0) for m in metrics]
    total = sum(tokens)
    for key in metrics[0]:
        vals = [m[key] for m in metrics]
        if key in ("loss", "num_tokens", "num_sequences"):
            out[key] = float(sum(vals))
        elif key == "ratio/max":
            out[key] = float(max(vals))
        elif key == "ratio/min":
            out[key] = float(min(vals))
        else:
            out[key] = float(sum(v * t for v, t in zip(vals, tokens, strict=True)) / max(1, total))
    return out


class GRPOLoss:
    """The GRPO loss of one (micro-)batch, configured by a ``GRPOConfig``.

    Call it once per micro-batch with the step-global counts and sum (or backward each) the
    results: the accumulated gradient equals the full-batch gradient exactly.

    Example::

        loss_fn = GRPOLoss(cfg)
        n_seq, n_tok = step_counts(mb.mask for mb in micro_batches)
        for mb in micro_batches:
            logp = completion_logprobs(policy, mb.prompt_ids, mb.completion_ids,
                                       temperature=cfg.temperature)
            loss, metrics = loss_fn(logp, mb.behavior_logp, mb.adv, mb.mask,
                                    num_sequences=n_seq, num_tokens=n_tok)
            loss.backward()

    The on-policy loss is ≈ 0 by construction (TRL #2703): watch reward, KL and clip ratios.
    """

    def __init__(self, cfg: GRPOConfig) -> None:
        if not isinstance(cfg, GRPOConfig):
            raise TypeError(f"cfg must be GRPOConfig, got {type(cfg).__name__}")
        self.cfg = cfg

    def __call__(
        self,
        logp: Tensor,
        behavior_logp: Tensor,
        adv: Tensor,
        mask: Tensor,
        ref_logp: Tensor | None = None,
        old_logp: Tensor | None = None,
        *,
        num_sequences: int | None = None,
        num_tokens: int | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of this micro-batch under the step-global normaliser.

        Args:
            logp: ``[B, T]`` completion-token log-probs under π_θ at ``cfg.temperature``.
            behavior_logp: ``[B, T]`` log-probs recorded by the rollout worker.
            adv: ``[B]`` advantages (``compute_advantages``).
            mask: ``[B, T]`` completion mask (0: padding, env/tool tokens, withheld or
                overlong-filtered completions).
            ref_logp: ``[B, T]`` reference log-probs; required iff ``cfg.beta > 0``.
            old_logp: ``[B, T]`` learner log-probs at the start of the step; required iff
                ``cfg.ratio_reference == "decoupled"``.
            num_sequences: step-global N_seq (default: B, i.e. this call is the whole step).
            num_tokens: step-global N_tok (default: active tokens of ``mask``).

        Returns:
            ``(loss, metrics)``: the scalar loss contribution (with grad) and floats
            ``loss``, ``clip_ratio/low``, ``clip_ratio/high``, ``clip_ratio/region``,
            ``clip_ratio/delta``, ``ratio/mean``, ``ratio/min``, ``ratio/max``, ``kl`` (β > 0),
            ``num_tokens``, ``num_sequences`` (active tokens / rows of this call; combine
            micro-batches with ``merge_metrics``).

        Raises:
            ValueError: shapes disagree, or ``ref_logp``/``old_logp`` is missing or given
                when the config does not use it.
        """
        cfg = self.cfg
        if cfg.beta > 0 and ref_logp is None:
            raise ValueError(
                f"cfg.beta = {cfg.beta} needs ref_logp (log-probs under the frozen reference); "
                "pass it or set beta=0.0"
            )
        if cfg.beta == 0 and ref_logp is not None:
            raise ValueError("ref_logp was given but cfg.beta == 0.0; drop it or set beta > 0")
        decoupled = cfg.ratio_reference == "decoupled"
        if decoupled and old_logp is None:
            raise ValueError(
                "ratio_reference='decoupled' needs old_logp (the learner's detached log-probs "
                "at the start of the step); pass it or use ratio_reference='behavior'"
            )
        if not decoupled and old_logp is not None:
            raise ValueError(
                "old_logp is only used with ratio_reference='decoupled'; drop it or change "
                "the config"
            )
        per_token, stats = grpo_per_token_loss(
            logp,
            behavior_logp,
            adv,
            mask,
            epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.clip_high_eps,
            delta=cfg.delta,
            beta=cfg.beta,
            ref_logp=ref_logp,
            old_logp=old_logp,
            tis_cap=cfg.tis_cap,
            importance_level=cfg.importance_level,
        )
        weights = aggregation_weights(
            mask,
            cfg.loss_aggregation,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            max_completion_length=cfg.max_completion_length,
            dtype=logp.dtype,
        )
        loss = (per_token * weights).sum()
        return loss, self._metrics(loss, stats, _bool_mask(mask, logp.shape))

    @staticmethod
    def _metrics(loss: Tensor, stats: dict[str, Tensor], m: Tensor) -> dict[str, float]:
        n_tok = int(m.sum().item())
        denom = max(1, n_tok)
        low = stats["low_clipped"]
        high = stats["high_clipped"]
        ratio = stats["ratio"][m]
        out = {
            "loss": float(loss.detach().item()),
            "clip_ratio/low": float(low.sum().item()) / denom,
            "clip_ratio/high": float(high.sum().item()) / denom,
            "clip_ratio/region": float((low | high).sum().item()) / denom,
            "clip_ratio/delta": float(stats["delta_capped"].sum().item()) / denom,
            "ratio/mean": float(ratio.mean().item()) if n_tok else 1.0,
            "ratio/min": float(ratio.min().item()) if n_tok else 1.0,
            "ratio/max": float(ratio.max().item()) if n_tok else 1.0,
            "num_tokens": float(n_tok),
            "num_sequences": float(m.shape[0]),
        }
        if "k3" in stats:
            out["kl"] = float(stats["k3"][m].sum().item()) / denom
        return out
