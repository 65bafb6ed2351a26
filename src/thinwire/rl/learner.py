"""The GRPO learner: admits rollout groups, computes the loss, steps a thinwire optimizer.

One :class:`Learner` holds a trainable replica. It talks to other learners only through its
optimizer — any method of :data:`thinwire.optim.METHODS`, built by :func:`build_learner_optimizer`
from the one method table — and, for methods that sync every step (``ddp``, DeMo), through one
16-byte all-reduce of the loss normaliser ``(N_seq, N_tok)`` so the averaged gradient is the
union batch's. Its policy version is the number of ``step()`` calls: an outer merge of the
DiLoCo family always completes inside a ``step()``, so nobody samples the weights between the
inner update and the merge. It observes its optimizer's syncs through the public
``register_sync_post_hook`` (metrics, and :attr:`Learner.synced`, which a weight publisher reads
to send only merged weights).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from thinwire._validate import check_int, check_type
from thinwire.collectives import Communicator
from thinwire.optim import (
    METHODS,
    DeMo,
    DiLoCo,
    StreamingDiLoCo,
    SyncHooks,
    SyncInfo,
    build_optimizer,
)
from thinwire.rl.config import GRPOConfig
from thinwire.rl.objective import GRPOLoss, compute_advantages, informative_groups, merge_metrics
from thinwire.rl.policy import completion_logprobs, frozen_reference
from thinwire.rl.rollout import Rollout, RolloutGroup
from thinwire.rl.staleness import StalenessFilter

__all__ = ["Batch", "Learner", "RL_METHOD_SETTINGS", "build_learner_optimizer", "collate"]

#: Settings the RL layer puts over a method's own, by optimizer class: periodic averaging (outer
#: lr 1, momentum 0) for the DiLoCo family, whose pre-training outer momentum keeps pushing a
#: moving RL objective along stale directions (DigitSum measurements: docs/choosing.md).
RL_METHOD_SETTINGS: dict[type, dict[str, object]] = {
    DiLoCo: {"outer_lr": 1.0, "outer_momentum": 0.0},
    StreamingDiLoCo: {"outer_lr": 1.0, "outer_momentum": 0.0, "mix_alpha": 0.0},
}


def build_learner_optimizer(
    policy: nn.Module, cfg: GRPOConfig, comm: Communicator | None
) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.method`` over ``policy``: inner Adam at ``cfg.lr``, RL defaults.

    Built by :func:`thinwire.optim.build_optimizer` (the one method table) with
    :data:`RL_METHOD_SETTINGS` and then ``cfg.method_settings`` over the method's settings.
    """
    method = METHODS[cfg.method]
    settings = {**RL_METHOD_SETTINGS.get(method.optimizer, {}), **cfg.method_settings}
    inner = None if method.optimizer is DeMo else partial(torch.optim.Adam, lr=cfg.lr)
    return build_optimizer(method, policy, comm, sync_every=cfg.sync_every, inner=inner,
                           overrides=settings)  # fmt: skip


class Batch:
    """Padded tensors of a list of rollouts (one row each).

    ``prompt_ids [B, Tp]`` (left-padded, ``prompt_mask``), ``completion_ids [B, K]`` (right-padded
    with ``pad_id``), ``behavior_logp [B, K]`` (0 on padding), ``mask [B, K]`` (loss mask, False on
    padding), ``adv [B]``, ``external [B]`` (groups shared by peers: no behaviour log-probs of this
    learner), ``temperature``.
    """

    _ROWS = ("prompt_ids", "prompt_mask", "completion_ids", "behavior_logp", "mask", "adv",
             "external")  # fmt: skip

    def __init__(self, rollouts: Sequence[Rollout], adv: torch.Tensor, external: torch.Tensor,
                 *, pad_id: int, mask_truncated: bool) -> None:  # fmt: skip
        b = len(rollouts)
        tp = max(r.prompt_ids.shape[0] for r in rollouts)
        k = max(r.completion_ids.shape[0] for r in rollouts)
        self.prompt_ids = torch.full((b, tp), pad_id, dtype=torch.long)
        self.prompt_mask = torch.zeros((b, tp), dtype=torch.long)
        self.completion_ids = torch.full((b, k), pad_id, dtype=torch.long)
        self.behavior_logp = torch.zeros((b, k), dtype=torch.float32)
        self.mask = torch.zeros((b, k), dtype=torch.bool)
        for i, r in enumerate(rollouts):
            lp, lc = r.prompt_ids.shape[0], r.completion_ids.shape[0]
            self.prompt_ids[i, tp - lp :] = r.prompt_ids
            self.prompt_mask[i, tp - lp :] = 1
            self.completion_ids[i, :lc] = r.completion_ids
            self.behavior_logp[i, :lc] = r.behavior_logprobs
            self.mask[i, :lc] = r.loss_mask & (not (mask_truncated and r.truncated))
        self.uniform_prompts = bool(self.prompt_mask.all())
        self.adv = adv
        self.external = external
        temps = {float(r.temperature) for r in rollouts}
        if len(temps) != 1:
            raise ValueError(f"a batch must share one sampling temperature, got {sorted(temps)}")
        self.temperature = temps.pop()

    def rows(self, sl: slice) -> Batch:
        """A view of rows ``sl`` (micro-batch)."""
        out = object.__new__(Batch)
        for name in self._ROWS:
            setattr(out, name, getattr(self, name)[sl])
        out.uniform_prompts, out.temperature = self.uniform_prompts, self.temperature
        return out


def collate(
    groups: Sequence[RolloutGroup], cfg: GRPOConfig, *, learner_id: int, pad_id: int
) -> Batch:
    """Advantages per group broadcast to the members, then padded tensors."""
    rollouts: list[Rollout] = []
    adv_parts, external = [], []
    for g in groups:
        adv_parts.append(compute_advantages(g.rewards()[None], cfg.scale_rewards)[0])
        rollouts.extend(g.rollouts)
        external += [g.origin != learner_id] * g.size
    adv = torch.cat(adv_parts)
    if cfg.scale_rewards == "batch":  # σ over every scorable reward of the step, not per group
        sizes = {g.size for g in groups}
        if len(sizes) != 1:
            raise ValueError(
                f"scale_rewards='batch' needs one group size per step, got {sorted(sizes)}"
            )
        adv = compute_advantages(torch.stack([g.rewards() for g in groups]), "batch").reshape(-1)
    return Batch(rollouts, adv.to(torch.float32), torch.tensor(external, dtype=torch.bool),
                 pad_id=pad_id, mask_truncated=cfg.mask_truncated)  # fmt: skip


class Learner:
    """One GRPO learner: staleness filter, GRPO loss, one optimizer step per :meth:`step`.

    Args:
        policy: the trainable replica (``nn.Module`` following :class:`thinwire.rl.Policy`).
        optimizer: a thinwire optimizer over ``policy``'s parameters (any method of
            :data:`thinwire.optim.METHODS`; :func:`build_learner_optimizer` builds the one of
            ``cfg.method``). A plain ``torch.optim`` optimizer is one learner:
            ``DataParallel(params, factory)`` with no communicator.
        cfg: the GRPO configuration.
        learner_id: origin id of this learner's weights (its rank).
        comm: the learners' communicator, for the global normaliser.
        global_normalizer: all-reduce ``(N_seq, N_tok)`` across learners each step and scale
            the local loss by the world size, so the averaged gradient is the union batch's
            (methods that sync every step). Collective.

    Attributes:
        version: weights version (``step()`` calls so far).
        synced: whether the last ``step()`` completed a sync of the optimizer.
        last_sync: the :class:`thinwire.optim.SyncInfo` of the last sync (None before one).
    """

    def __init__(
        self,
        policy: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: GRPOConfig,
        *,
        learner_id: int = 0,
        comm: Communicator | None = None,
        global_normalizer: bool = False,
    ) -> None:
        self.policy = check_type("policy", policy, nn.Module)
        if not isinstance(optimizer, SyncHooks):
            raise TypeError(
                f"optimizer must be a thinwire optimizer (thinwire.optim: DataParallel, DiLoCo, "
                f"DeMo, ...), got {type(optimizer).__name__}; for one learner wrap the torch "
                "optimizer as thinwire.optim.DataParallel(params, factory)"
            )
        self.optimizer = optimizer
        self.cfg = check_type("cfg", cfg, GRPOConfig)
        self.learner_id = check_int("learner_id", learner_id, 0)
        self.comm = comm
        self.global_normalizer = check_type("global_normalizer", global_normalizer, bool)
        if global_normalizer and comm is None:
            raise ValueError("global_normalizer=True needs comm (the learners' communicator)")
        self.loss_fn = GRPOLoss(cfg)
        self.filter = StalenessFilter(cfg.max_staleness, cfg.stale_mode, learner_id=learner_id)
        self.ref = frozen_reference(policy) if cfg.beta > 0 else None
        self.pad_id = int(getattr(policy, "pad_id", 0))  # the Policy protocol's pad token
        self.version = 0
        self.zero_std_dropped = 0
        self.synced = False
        self.syncs = 0
        self.last_sync: SyncInfo | None = None
        optimizer.register_sync_post_hook(self._on_sync)

    def _on_sync(self, _opt: object, info: SyncInfo) -> None:
        self.synced = True
        self.syncs += int(info.committed)
        self.last_sync = info

    # ------------------------------------------------------------------ the step
    def step(self, groups: Sequence[RolloutGroup], *, admitted: bool = False) -> dict[str, float]:
        """One learner step on ``groups``: filter, loss, backward, clip, optimizer step.

        Groups go through the staleness filter (and dynamic sampling's zero-σ filter) unless
        ``admitted`` says they already did. With ``num_iterations`` μ > 1 the batch is used for
        μ optimizer steps (μ versions).

        Collective (several learners): every learner must call this once per step.
        """
        t0 = time.perf_counter()
        if not admitted:
            groups = self.filter.filter(groups, self.version)
            if self.cfg.filter_zero_std_groups:
                keep = [bool(informative_groups(g.rewards()[None])[0]) for g in groups]
                self.zero_std_dropped += keep.count(False)
                groups = [g for g, k in zip(groups, keep, strict=True) if k]
        metrics: dict[str, float] = {}
        # decoupled ratio: the learner's own log-probs at the start of the step, fixed for all μ
        old = (
            self._start_logps(groups)
            if self.cfg.ratio_reference == "decoupled" and groups
            else None
        )
        self.synced = False
        for _ in range(self.cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            metrics = self.backward(groups, old_logps=old)
            metrics["grad_norm"] = self._clip()
            self.optimizer.step()
            self.version += 1
        metrics.update(self._reward_metrics(groups))
        metrics.update(self.filter.metrics())
        metrics["rollouts/dropped_zero_std"] = float(self.zero_std_dropped)
        metrics["version"] = float(self.version)
        metrics["syncs"] = float(self.syncs)
        metrics["step_s"] = time.perf_counter() - t0
        return metrics

    def _micro_batches(self, groups: Sequence[RolloutGroup]) -> list[Batch]:
        batch = collate(groups, self.cfg, learner_id=self.learner_id, pad_id=self.pad_id)
        mb = self.cfg.micro_batch_size or batch.mask.shape[0]
        return [batch.rows(slice(s, s + mb)) for s in range(0, batch.mask.shape[0], mb)]

    def _logp(self, policy: nn.Module, part: Batch) -> torch.Tensor:
        attn = None if part.uniform_prompts else part.prompt_mask
        return completion_logprobs(policy, part.prompt_ids, part.completion_ids,  # type: ignore[arg-type]
                                   temperature=part.temperature, prompt_mask=attn)  # fmt: skip

    @torch.no_grad()
    def _start_logps(self, groups: Sequence[RolloutGroup]) -> list[torch.Tensor]:
        return [self._logp(self.policy, part) for part in self._micro_batches(groups)]

    def backward(
        self, groups: Sequence[RolloutGroup], *, old_logps: list[torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Accumulate the GRPO gradient of ``groups`` into ``.grad``; no optimizer step.

        Micro-batches contribute sums under the step-global normaliser, which spans all learners
        when ``global_normalizer`` is set (one 16-byte all-reduce, tag ``"learners/normalizer"``;
        collective then). ``old_logps`` (one tensor per micro-batch) are the decoupled ratio's
        reference; default: this pass's detached log-probs. A learner with no admitted group
        gets zero gradients, so its optimizer's collectives still run.
        """
        cfg = self.cfg
        parts = self._micro_batches(groups) if groups else []
        n_seq = sum(p.mask.shape[0] for p in parts)
        n_tok = sum(int(p.mask.sum()) for p in parts)
        scale = 1.0
        if self.global_normalizer:
            assert self.comm is not None  # internal invariant: checked in __init__
            counts = torch.tensor([float(n_seq), float(n_tok)], dtype=torch.float64)
            out = self.comm.all_reduce(counts, "sum", tag="learners/normalizer")
            assert isinstance(out, torch.Tensor)  # internal invariant: a blocking call's result
            counts = out
            n_seq, n_tok = int(counts[0]), int(counts[1])
            scale = float(self.comm.world_size)
        if not parts:
            for p in self.policy.parameters():
                p.grad = torch.zeros_like(p)
            return {"loss": 0.0, "num_tokens": 0.0, "num_sequences": 0.0}
        metrics = []
        for i, part in enumerate(parts):
            logp = self._logp(self.policy, part)
            behavior = torch.where(
                part.external[:, None], logp.detach(), part.behavior_logp.to(logp.dtype)
            )
            ref = old = None
            if self.ref is not None:
                with torch.no_grad():
                    ref = self._logp(self.ref, part)
            if cfg.ratio_reference == "decoupled":
                old = old_logps[i] if old_logps is not None else logp.detach()
            loss, m = self.loss_fn(logp, behavior, part.adv.to(logp.dtype), part.mask, ref, old,
                                   num_sequences=n_seq, num_tokens=n_tok)  # fmt: skip
            (loss * scale).backward()
            metrics.append(m)
        return merge_metrics(metrics)

    def _clip(self) -> float:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if self.cfg.max_grad_norm is None:
            return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))

    @staticmethod
    def _reward_metrics(groups: Sequence[RolloutGroup]) -> dict[str, float]:
        if not groups:
            return {"reward/mean": float("nan"), "groups": 0.0}
        rewards = torch.cat([g.rewards() for g in groups])
        scorable = rewards[~torch.isnan(rewards)]
        comps: dict[str, list[float]] = defaultdict(list)
        for g in groups:
            for r in g.rollouts:
                for k, v in r.reward_components.items():
                    comps[k].append(v)
        zero_std = sum(1 for g in groups if not bool(informative_groups(g.rewards()[None])[0]))
        out = {
            "reward/mean": float(scorable.mean()) if scorable.numel() else float("nan"),
            "reward/std": float(scorable.std()) if scorable.numel() > 1 else 0.0,
            "frac_reward_zero_std": zero_std / len(groups),
            "groups": float(len(groups)),
        }
        for k, vs in comps.items():
            t = torch.tensor(vs, dtype=torch.float64)
            t = t[~torch.isnan(t)]
            out[f"reward/{k}"] = float(t.mean()) if t.numel() else float("nan")
        return out
