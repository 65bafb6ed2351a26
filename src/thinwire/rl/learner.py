"""The GRPO learner: admits rollout groups, computes the loss, steps a thinwire optimizer, publishes.

One :class:`Learner` holds a trainable replica; it talks to other learners only through its
optimizer (``DiLoCo``, ``StreamingDiLoCo``, ``DeMo``, ``SparseLoCo``, or a plain ``torch.optim``
optimizer for one learner) and, in per-step-synced modes, through one 16-byte all-reduce of the loss
normaliser ``(N_seq, N_tok)`` (``global_normalizer=True``; DeMo). Every step adds ``1 + merges`` to
the policy version (see :mod:`thinwire.rl.store`) and publishes the new weights to the
:class:`~thinwire.rl.store.PolicyStore`.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from thinwire._validate import check_int, check_type
from thinwire.collectives import Communicator
from thinwire.rl.config import GRPOConfig
from thinwire.rl.objective import GRPOLoss, compute_advantages, informative_groups, merge_metrics
from thinwire.rl.policy import completion_logprobs, frozen_reference
from thinwire.rl.rollout import ChannelClosed, Rollout, RolloutGroup
from thinwire.rl.staleness import StalenessFilter
from thinwire.rl.store import DeltaPublisher, PolicyStore, merge_count

__all__ = ["Batch", "Inbox", "Learner", "collate"]

logger = logging.getLogger(__name__)


class Inbox(Protocol):
    """Where a learner takes groups from: a :class:`~thinwire.rl.rollout.Channel` or a queue."""

    def recv(self, timeout: float | None = None) -> Any: ...


class Batch:
    """Padded tensors of a list of rollouts (one row each).

    ``prompt_ids [B, Tp]`` (left-padded, ``prompt_mask``), ``completion_ids [B, K]`` (right-padded
    with ``pad_id``), ``behavior_logp [B, K]`` (0 on padding), ``mask [B, K]`` (loss mask, False on
    padding), ``adv [B]``, ``external [B]`` (groups shared by peers: no behaviour log-probs of this
    learner), ``temperature``.
    """

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
        for name in (
            "prompt_ids",
            "prompt_mask",
            "completion_ids",
            "behavior_logp",
            "mask",
            "adv",
            "external",
        ):
            setattr(out, name, getattr(self, name)[sl])
        out.uniform_prompts, out.temperature = self.uniform_prompts, self.temperature
        return out


def collate(
    groups: Sequence[RolloutGroup], cfg: GRPOConfig, *, learner_id: int, pad_id: int
) -> Batch:
    """Advantages per group broadcast to members, then padded tensors."""
    rollouts: list[Rollout] = []
    adv_parts = []
    external = []
    for g in groups:
        adv_parts.append(compute_advantages(g.rewards()[None], cfg.scale_rewards)[0])
        rollouts.extend(g.rollouts)
        external += [g.origin != learner_id] * g.size
    adv = torch.cat(adv_parts)
    if cfg.scale_rewards == "batch":  # σ over every scorable reward of the step, not per group
        sizes = {g.size for g in groups}
        if len(sizes) == 1:
            adv = compute_advantages(torch.stack([g.rewards() for g in groups]), "batch").reshape(
                -1
            )
        else:
            raise ValueError(
                f"scale_rewards='batch' needs one group size per step, got {sorted(sizes)}"
            )
    return Batch(rollouts, adv.to(torch.float32), torch.tensor(external, dtype=torch.bool),
                 pad_id=pad_id, mask_truncated=cfg.mask_truncated)  # fmt: skip


class Learner:
    """One GRPO learner.

    Args:
        policy: the trainable replica (``nn.Module`` following the ``Policy`` protocol).
        optimizer: a ``torch.optim`` optimizer over ``policy``'s parameters, or a thinwire one
            (DiLoCo / StreamingDiLoCo / SparseLoCo / DeMo) whose ``comm`` links the learners.
        cfg: the GRPO configuration.
        inbox: where admitted groups come from (a ``Channel`` of ``RolloutGroup``); None when
            groups are passed to :meth:`step` directly.
        store: where new weights are published (every version).
        learner_id: origin id of this learner's weights.
        comm: communicator for the global normaliser (per-step-synced modes).
        global_normalizer: all-reduce ``(N_seq, N_tok)`` across learners each step and scale the
            local loss by ``R`` so the averaged gradient is the union-batch gradient (DeMo).
        remote: optional :class:`DeltaPublisher` to remote workers.
        remote_every: publish to remote workers every this many versions (or at each merge of a
            DiLoCo-family optimizer when None; every step otherwise).
        collect_timeout: seconds :meth:`step` waits for groups before raising ``TimeoutError``.
        grad_hook: called after the backward pass, before clipping (the DDP baseline all-reduces
            the gradients there). Collective if it communicates.
    """

    def __init__(
        self,
        policy: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: GRPOConfig,
        inbox: Inbox | None,
        store: PolicyStore,
        *,
        learner_id: int = 0,
        comm: Communicator | None = None,
        global_normalizer: bool = False,
        remote: DeltaPublisher | None = None,
        remote_every: int | None = None,
        collect_timeout: float = 300.0,
        grad_hook: Callable[[], None] | None = None,
    ) -> None:
        self.policy = check_type("policy", policy, nn.Module)
        self.optimizer = check_type("optimizer", optimizer, torch.optim.Optimizer)
        self.cfg = check_type("cfg", cfg, GRPOConfig)
        self.inbox = inbox
        self.store = check_type("store", store, PolicyStore)
        self.learner_id = check_int("learner_id", learner_id, 0)
        self.comm = comm
        self.global_normalizer = check_type("global_normalizer", global_normalizer, bool)
        if global_normalizer and comm is None:
            raise ValueError("global_normalizer=True needs comm (the learners' communicator)")
        self.remote = remote
        self.remote_every = (
            None if remote_every is None else check_int("remote_every", remote_every, 1)
        )
        self.collect_timeout = collect_timeout
        self.grad_hook = grad_hook
        self.loss_fn = GRPOLoss(cfg)
        self.filter = StalenessFilter(cfg.max_staleness, cfg.stale_mode, learner_id=learner_id)
        self.ref = frozen_reference(policy) if cfg.beta > 0 else None
        self.pad_id = int(getattr(policy, "pad_id", 0))
        self.version = 0
        self.steps = 0
        self.zero_std_dropped = 0
        self._last_remote = -1
        self.store.publish(policy.state_dict(), self.version)
        self._publish_remote(force=True)

    # ------------------------------------------------------------------ collection
    def collect(self, n_groups: int | None = None) -> list[RolloutGroup]:
        """Take admissible groups from the inbox until the step has ``prompts_per_step``.

        Dynamic sampling (``filter_zero_std_groups``): groups with reward σ < 1e-6 are dropped
        and replaced, for up to ``max_resample_rounds`` extra rounds (DAPO's dynamic sampling).

        Raises:
            TimeoutError: nothing admissible arrived within ``collect_timeout``.
        """
        if self.inbox is None:
            raise RuntimeError("this learner has no inbox: pass groups to step(groups)")
        want = self.cfg.prompts_per_step if n_groups is None else n_groups
        got: list[RolloutGroup] = []
        rounds, deadline = 0, time.monotonic() + self.collect_timeout
        while len(got) < want:
            try:
                g = self.inbox.recv(timeout=max(0.0, deadline - time.monotonic()))
            except (queue.Empty, ChannelClosed) as exc:
                raise TimeoutError(
                    f"learner {self.learner_id}: {len(got)} of {want} groups admitted within "
                    f"{self.collect_timeout} s ({type(exc).__name__})"
                ) from None
            kept = self.filter.admit(g, self.version)
            if kept is None:
                continue
            if self.cfg.filter_zero_std_groups and not bool(
                informative_groups(kept.rewards()[None])[0]
            ):
                self.zero_std_dropped += 1
                if rounds < self.cfg.max_resample_rounds * want:
                    rounds += 1
                    continue
            got.append(kept)
        return got

    # ------------------------------------------------------------------ the step
    def step(
        self, groups: Sequence[RolloutGroup] | None = None, *, admitted: bool = False
    ) -> dict[str, float]:
        """One learner step: collect (unless given), loss, backward, optimizer step, publish.

        Groups passed in go through the staleness filter too, unless ``admitted`` says they
        already did (they came from :meth:`collect`). With ``num_iterations`` μ > 1 the batch is
        used for μ optimizer steps (μ versions).

        Collective (multi-learner): every learner must call this once per step.
        """
        t0 = time.perf_counter()
        if groups is None:
            groups = self.collect()
        elif not admitted:
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
        for _ in range(self.cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            loss_metrics = self.backward(groups, old_logps=old)
            if self.grad_hook is not None:
                self.grad_hook()
            grad_norm = self._clip()
            before = merge_count(self.optimizer)
            self.optimizer.step()
            merges = merge_count(self.optimizer) - before
            self.version += 1 + merges
            metrics = dict(loss_metrics)
            metrics["grad_norm"] = grad_norm
            metrics["merges"] = float(merges)
        self.steps += 1
        self.store.publish(self.policy.state_dict(), self.version)
        self._publish_remote(force=False, merged=metrics.get("merges", 0.0) > 0)
        metrics.update(self._reward_metrics(groups))
        metrics.update(self.filter.metrics())
        metrics["rollouts/dropped_zero_std"] = float(self.zero_std_dropped)
        metrics["version"] = float(self.version)
        metrics["step_s"] = time.perf_counter() - t0
        return metrics

    def _micro_batches(self, groups: Sequence[RolloutGroup]) -> list[Batch]:
        batch = collate(groups, self.cfg, learner_id=self.learner_id, pad_id=self.pad_id)
        mb = self.cfg.micro_batch_size or batch.mask.shape[0]
        return [batch.rows(slice(s, s + mb)) for s in range(0, batch.mask.shape[0], mb)]

    def _logp(self, policy: nn.Module, part: Batch) -> torch.Tensor:
        attn = None if part.uniform_prompts else part.prompt_mask
        return completion_logprobs(policy, part.prompt_ids, part.completion_ids,
                                   temperature=part.temperature, prompt_mask=attn)  # fmt: skip

    @torch.no_grad()
    def _start_logps(self, groups: Sequence[RolloutGroup]) -> list[torch.Tensor]:
        return [self._logp(self.policy, part) for part in self._micro_batches(groups)]

    def backward(
        self, groups: Sequence[RolloutGroup], *, old_logps: list[torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Accumulate the GRPO gradient of ``groups`` into ``.grad``; no step.

        Micro-batches contribute sums under the step-global normaliser, which spans all
        learners when ``global_normalizer`` is set (one 16-byte all-reduce, tag
        ``"learners/normalizer"``). Collective in that case. ``old_logps`` (one tensor per
        micro-batch) are the decoupled ratio's reference; default: this pass's detached log-probs.
        A learner of a group with no admitted groups gets zero gradients, so the optimizer's
        collectives still run on every learner.
        """
        cfg = self.cfg
        parts = self._micro_batches(groups) if groups else []
        n_seq = sum(p.mask.shape[0] for p in parts)
        n_tok = sum(int(p.mask.sum()) for p in parts)
        scale = 1.0
        if self.global_normalizer:
            assert self.comm is not None  # internal invariant: checked in __init__
            counts = torch.tensor([float(n_seq), float(n_tok)], dtype=torch.float64)
            counts = self.comm.all_reduce(counts, "sum", tag="learners/normalizer")
            n_seq, n_tok = int(counts[0]), int(counts[1])
            scale = float(self.comm.world_size)
        if not parts:
            if self.comm is not None and self.comm.world_size > 1:
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
        # the optimizer's parameters: the policy's, or the flat bucket a grad hook filled
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return 0.0
        if self.cfg.max_grad_norm is None:
            return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))

    def _publish_remote(self, *, force: bool, merged: bool = False) -> None:
        if self.remote is None:
            return
        if self.remote_every is not None:
            due = self.version - self._last_remote >= self.remote_every
        elif hasattr(self.optimizer, "outer_step"):
            due = merged  # DiLoCo family: remote workers get the merged weights only
        else:
            due = True
        if force or due:
            self.remote.publish(self.policy.state_dict(), self.version)
            self._last_remote = self.version

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
