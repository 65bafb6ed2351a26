"""``GRPOConfig``: every knob of a thinwire GRPO run, validated once.

Every invalid field raises ``ValueError`` (or ``TypeError`` for a wrong type) whose message keeps
the uniform ``name must be in RANGE, got VALUE`` shape of ``thinwire._validate`` and then says how
to fix the config, as every ``__post_init__`` error of TRL's ``grpo_config.py`` does.
The dataclass is frozen: derive variants with ``dataclasses.replace(cfg, field=value)``, which
validates again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

from thinwire._validate import check_choice, check_float, check_int, check_type
from thinwire.optim import METHODS

__all__ = ["GRPOConfig"]

ScaleRewards = Literal["group", "batch", "none"]
LossAggregation = Literal["token_mean", "sequence_mean", "constant"]


def _fix(check: Callable[..., Any], hint: str, *args: Any, **kwargs: Any) -> Any:
    """Run a ``_validate`` check and append ``hint`` (how to fix it) to its message."""
    try:
        return check(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{err}; {hint}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """Configuration of the GRPO objective and of the asynchronous pipeline.

    Batches are specified as ``prompts_per_step`` prompts × ``group_size`` completions, so the
    "batch size must be divisible by num_generations" error of TRL (#2858) cannot arise.

    Args:
        group_size: completions sampled per prompt; *G* of GRPO (DeepSeekMath, "DSM" below,
            arXiv:2402.03300v3 §4.1; TRL's ``num_generations``, also readable as
            ``cfg.num_generations``). Must be ≥ 2: the
            advantage is relative to the group (TRL PR #3199). (default: 8, TRL; DigitSum uses 32)
        prompts_per_step: groups consumed by one optimizer step (per learner). (default: 32)
        micro_batch_size: completions per forward/backward pass; ``None`` runs the whole step in
            one pass. Any value gives the same gradient (exact accumulation). (default: None)
        scale_rewards: advantage scaling, ``"group"`` (DSM, TRL default), ``"batch"`` (TRL's
            "PPO Lite") or ``"none"`` (Dr. GRPO, prime-rl). (default: "group")
        epsilon_low: lower clip ε_low; ratios below 1 − ε_low stop pushing down. (default: 0.2)
        epsilon_high: upper clip ε_high; ``None`` means equal to ``epsilon_low`` (PPO/TRL);
            DAPO's clip-higher uses 0.28. (default: None)
        delta: two-sided cap δ on the ratio for negative advantages (INTELLECT-2 uses 4);
            ``None`` disables it. Must exceed 1 + ε_high. (default: None)
        beta: weight β of the k3 KL to a frozen copy of the starting policy. It keeps a prompt
            whose completions all failed from collapsing onto one wrong answer (a group with
            one reward value has zero advantage, so without the KL nothing ever moves it): on
            DigitSum, β = 0 left 1-4 of the 20 targets stuck at reward 0 in 6 of 12 runs (one
            learner or two, compressed or not), β = 0.04 in none of 15 (``benchmarks/grpo.py``,
            ``benchmarks/RESULTS.md``). Costs a reference forward per step and a copy of the
            weights; 0 needs no reference model. (default: 0.04, DeepSeekMath arXiv:2402.03300v3
            §4.2; TRL uses 0.0)
        loss_aggregation: ``"token_mean"`` (DAPO; TRL ``dapo``), ``"sequence_mean"`` (DSM;
            TRL ``grpo``) or ``"constant"`` (Dr. GRPO; TRL ``dr_grpo``). (default: "token_mean")
        num_iterations: optimizer passes over one batch; μ of DSM Algorithm 1. (default: 1)
        temperature: sampling temperature *T*; log-probs are of ``log_softmax(logits / T)``.
            (default: 1.0)
        max_completion_length: most tokens per completion; *L_max* of the ``constant``
            normaliser. (default: 512, TRL)
        max_staleness: largest accepted ``v_now − v_b`` of a group; 0 is synchronous
            on-policy GRPO. (default: 2, prime-rl ``async_level``)
        stale_mode: ``"drop"`` removes too-stale groups whole; ``"withhold"`` keeps their rewards
            in the group statistics but masks their tokens (prime-rl PR #2960). (default: "drop")
        rollout_lag: versions the rollout workers trail the learner by: each step's groups are
            sampled by the weights of ``rollout_lag`` steps earlier (0: synchronous on-policy
            GRPO; ``max_staleness``: the steady state of an asynchronous pipeline whose
            workers never wait). Must not exceed ``max_staleness``. (default: 0)
        seed: root of every generator of the run. (default: 0)
        lr: learning rate of the inner optimizer. (default: 1e-3, the DigitSum value;
            TRL and DSM use 1e-6 for LLMs)
        max_grad_norm: gradient-norm clip before each step; ``None`` disables it.
            (default: 1.0, transformers/TRL)
        importance_level: ``"token"`` ratios, or ``"sequence"`` (GSPO: one ratio per completion,
            the exp of the mean log-ratio). (default: "token")
        ratio_reference: ``"behavior"`` (ratio against the worker's recorded log-probs) or
            ``"decoupled"`` (ratio against the learner's own log-probs at the start of the step,
            times a truncated IS weight, TRL's vLLM mode). (default: "behavior")
        tis_cap: *C_max* of the truncated IS weight in ``"decoupled"`` mode. (default: 3.0, TRL)
        filter_zero_std_groups: DAPO dynamic sampling: drop groups whose reward σ < 1e-6 and
            resample. (default: False)
        max_resample_rounds: resampling rounds of dynamic sampling. (default: 3)
        mask_truncated: DAPO overlong filtering: completions that hit
            ``max_completion_length`` without EOS get mask 0. (default: False)
        steps: optimizer steps per learner (TRL's ``max_steps``). (default: 400)
        method: how learners synchronise, a name of :data:`thinwire.optim.METHODS`; ``"ddp"``
            averages gradients every step (with one learner: the inner optimizer alone).
            (default: "ddp")
        sync_every: *H*, inner steps between syncs of the DiLoCo family. (default: 10)
        method_settings: settings that replace the method's (and the RL defaults: outer
            learning rate 1 with momentum 0 for DiLoCo and Streaming DiLoCo), e.g.
            ``{"compressor": "quant(int4, block=128)"}``. (default: {})

    Raises:
        ValueError: a field is out of range or two fields contradict; the message says which
            value to change.
        TypeError: a field has the wrong type.
    """

    group_size: int = 8
    prompts_per_step: int = 32
    micro_batch_size: int | None = None
    scale_rewards: ScaleRewards = "group"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.04
    loss_aggregation: LossAggregation = "token_mean"
    num_iterations: int = 1
    temperature: float = 1.0
    max_completion_length: int = 512
    max_staleness: int = 2
    stale_mode: Literal["drop", "withhold"] = "drop"
    rollout_lag: int = 0
    seed: int = 0
    lr: float = 1e-3
    max_grad_norm: float | None = 1.0
    importance_level: Literal["token", "sequence"] = "token"
    ratio_reference: Literal["behavior", "decoupled"] = "behavior"
    tis_cap: float = 3.0
    filter_zero_std_groups: bool = False
    max_resample_rounds: int = 3
    mask_truncated: bool = False
    steps: int = 400
    method: str = "ddp"
    sync_every: int = 10
    method_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        try:  # the delta bound; a bad epsilon is reported by its own check, which runs first
            upper = 1.0 + self.clip_high_eps
        except (TypeError, ValueError):
            upper = float("nan")
        optional = {"micro_batch_size", "epsilon_high", "delta", "max_grad_norm"}
        # fmt: off
        checks: list[tuple[Callable[..., Any], str, tuple[Any, ...], dict[str, Any], str]] = [
            (check_int, "group_size", (2,), {},
             "GRPO's advantage is relative to the other completions of the same prompt, so "
             "sample at least 2 per prompt: set group_size >= 2 (TRL PR #3199)"),
            (check_int, "prompts_per_step", (1,), {},
             "set prompts_per_step to the number of prompts (groups) per optimizer step"),
            (check_int, "micro_batch_size", (1,), {},
             "micro_batch_size counts completions per forward pass; use None for one pass "
             "over the whole step"),
            (check_choice, "scale_rewards", (("group", "batch", "none"),), {},
             "use 'group' (DeepSeekMath), 'batch' (PPO Lite) or 'none' (Dr. GRPO)"),
            (check_float, "epsilon_low", (0.0, 1.0), {"hi_open": True},
             "epsilon_low is the PPO clip below 1; typical values are 0.1-0.3 (default 0.2)"),
            (check_float, "epsilon_high", (0.0,), {},
             "epsilon_high is the clip above 1 (DAPO uses 0.28); None means = epsilon_low"),
            (check_float, "delta", (upper,), {"lo_open": True},
             f"delta caps the ratio of negative-advantage tokens and must lie above the upper "
             f"clip bound 1 + epsilon_high = {upper!r} (INTELLECT-2 uses 4), or be None to "
             "disable the cap"),
            (check_float, "beta", (0.0,), {},
             "beta weighs the KL to the reference; use 0.0 to train without a reference model"),
            (check_choice, "loss_aggregation", (("token_mean", "sequence_mean", "constant"),), {},
             "use 'token_mean' (DAPO), 'sequence_mean' (DeepSeekMath) or 'constant' (Dr. GRPO); "
             "TRL's names 'dapo', 'grpo', 'dr_grpo' map to these"),
            (check_int, "num_iterations", (1,), {},
             "num_iterations is the number of optimizer passes per batch (mu); 1 is standard"),
            (check_float, "temperature", (0.0,), {"lo_open": True},
             "sampling needs a positive temperature (1.0 samples the model's distribution)"),
            (check_int, "max_completion_length", (1,), {},
             "set max_completion_length to the most tokens a completion may have"),
            (check_int, "max_staleness", (0,), {},
             "max_staleness is how many policy versions a group may lag; 0 is synchronous GRPO"),
            (check_choice, "stale_mode", (("drop", "withhold"),), {},
             "use 'drop' to discard too-stale groups or 'withhold' to keep only their rewards"),
            (check_int, "rollout_lag", (0, self.max_staleness), {},
             f"rollout_lag is how many versions the workers trail the learner by; groups older "
             f"than max_staleness = {self.max_staleness} would all be dropped, so lower "
             "rollout_lag or raise max_staleness"),
            (check_int, "seed", (0,), {}, "seed must be a non-negative int"),
            (check_float, "lr", (0.0,), {"lo_open": True},
             "lr must be positive (DigitSum 1e-3; LLMs 1e-6)"),
            (check_float, "max_grad_norm", (0.0,), {"lo_open": True},
             "use a positive clip norm, or None to disable gradient clipping"),
            (check_choice, "importance_level", (("token", "sequence"),), {},
             "use 'token' (GRPO) or 'sequence' (GSPO)"),
            (check_choice, "ratio_reference", (("behavior", "decoupled"),), {},
             "use 'behavior' (ratio against the recorded sampler log-probs) or 'decoupled' "
             "(ratio against the learner's own log-probs times a truncated IS weight)"),
            (check_float, "tis_cap", (1.0,), {},
             "tis_cap truncates the IS weight of 'decoupled' mode; it must be >= 1 (TRL: 3.0)"),
            (check_type, "filter_zero_std_groups", (bool,), {}, "pass True or False"),
            (check_int, "max_resample_rounds", (0,), {},
             "max_resample_rounds bounds dynamic sampling's extra rounds; 0 only filters"),
            (check_type, "mask_truncated", (bool,), {}, "pass True or False"),
            (check_int, "steps", (1,), {}, "steps counts optimizer steps per learner"),
            (check_choice, "method", (tuple(METHODS),), {},
             "pick a method of thinwire.optim.METHODS ('ddp' averages gradients every step; "
             "'diloco-2bit' sends 2-bit pseudo-gradients every sync_every steps)"),
            (check_int, "sync_every", (1,), {},
             "sync_every is H, the inner steps between syncs (10 on DigitSum)"),
            (check_type, "method_settings", (Mapping,), {},
             "pass a dict of the method's settings, e.g. {'compressor': 'quant(int4, block=128)'}"),
        ]
        # fmt: on
        for check, name, args, kwargs, hint in checks:
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            _fix(check, hint, name, value, *args, **kwargs)

    @property
    def num_generations(self) -> int:
        """TRL's name for ``group_size`` (*G*)."""
        return self.group_size

    @property
    def clip_high_eps(self) -> float:
        """ε_high actually used: ``epsilon_high``, or ``epsilon_low`` when it is ``None``."""
        return self.epsilon_low if self.epsilon_high is None else float(self.epsilon_high)

    @property
    def completions_per_step(self) -> int:
        """Completions consumed by one optimizer step: ``prompts_per_step × group_size``."""
        return self.prompts_per_step * self.group_size
