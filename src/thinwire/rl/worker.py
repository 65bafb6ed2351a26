"""Rollout workers: sample groups from an environment with one policy version per group.

A :class:`RolloutWorker` holds its own copy of the policy, refreshes it from a weight source (a
learner's :class:`~thinwire.rl.store.PolicyStore` over the LAN, or :class:`RemoteWeights` fed by
compressed deltas over the WAN), samples groups, scores them with the environment and emits
:class:`~thinwire.rl.rollout.RolloutGroup` records tagged with the version, origin and fingerprint
of the weights that produced them. It never computes gradients.

Weights change only *between* calls to :meth:`RolloutWorker.generate`, so every member of every
group it returns comes from one version (a worker that receives new weights mid-group finishes the
group on the old weights; versions are defined in :mod:`thinwire.rl.store`). Randomness is explicit:
each call draws from a generator seeded from ``(seed, worker_id, call counter)``, so a run is
reproducible given the config and the arrival order.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from thinwire._validate import check_int, check_type
from thinwire.rl.rollout import (
    Channel,
    ChannelClosed,
    Rollout,
    RolloutGroup,
    encode_group,
    group_nbytes,
)
from thinwire.rl.sampling import LocalSampler, SamplingArgs
from thinwire.rl.staleness import needs_refresh
from thinwire.rl.store import DeltaSubscriber, PolicySnapshot, param_fingerprint

__all__ = ["RemoteWeights", "RolloutWorker", "WeightSource", "mix_seed"]

logger = logging.getLogger(__name__)


def mix_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (SHA-256 of their decimal forms)."""
    h = hashlib.sha256("/".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


class WeightSource(Protocol):
    """Where a worker refreshes its weights: ``PolicyStore`` or :class:`RemoteWeights`."""

    @property
    def version(self) -> int: ...

    def latest(self) -> PolicySnapshot: ...

    def get(self, version: int) -> PolicySnapshot: ...


class RemoteWeights:
    """Weight source of a remote worker: applies the payloads of a ``DeltaPublisher`` channel.

    ``version`` drains the channel without blocking, so the worker always sees the newest weights
    that have arrived; only the newest snapshot is kept.

    Args:
        channel: the ``"weights/broadcast"`` channel of this worker.
        like: a state dict of the architecture (names, shapes, dtypes).
        codec: the publisher's codec pipeline string.
    """

    def __init__(
        self, channel: Channel, like: Mapping[str, torch.Tensor], *, codec: str = "quant(int8)"
    ) -> None:
        self.channel = check_type("channel", channel, Channel)
        self.subscriber = DeltaSubscriber(like, codec=codec)
        self._snap: PolicySnapshot | None = None

    def poll(self, timeout: float | None = 0.0) -> int:
        """Apply every payload that has arrived (waiting up to ``timeout`` for the first one)."""
        first = True
        while True:
            try:
                payload = self.channel.recv(timeout=timeout if first else 0.0)
            except (queue.Empty, ChannelClosed):
                break
            first = False
            version, state = self.subscriber.apply(payload)
            self._snap = PolicySnapshot(version, state, param_fingerprint(state), time.time())
        return self._snap.version if self._snap is not None else -1

    @property
    def version(self) -> int:
        """Newest version received so far (−1 before the first payload)."""
        return self.poll()

    def latest(self) -> PolicySnapshot:
        """The newest rebuilt weights.

        Raises:
            LookupError: no payload has arrived yet.
        """
        self.poll()
        if self._snap is None:
            raise LookupError("no weights received yet: the learner has not published")
        return self._snap

    def get(self, version: int) -> PolicySnapshot:
        """The snapshot of ``version`` if it is the newest one (remote workers keep only that)."""
        snap = self.latest()
        if snap.version != version:
            raise KeyError(f"remote weights hold only version {snap.version}, not {version}")
        return snap


class RolloutWorker:
    """Samples scored groups with one policy version per call.

    Args:
        env: the environment. Environments with ``sample_prompts(n, generator)`` and
            ``rewards(targets, completion_ids)`` or ``reward(prompt, completion_ids)``
            (``DigitSumEnv``) are sampled in one batched call; any other
            :class:`thinwire.rl.env.Environment` goes through ``env.run_group`` per task.
        policy: this worker's private copy of the policy (its weights are overwritten on refresh).
        store: weight source (``PolicyStore`` or ``RemoteWeights``).
        sampling: sampling settings (default: ``env.sampling_args``).
        group_size: G, completions per prompt (≥ 2).
        worker_id: id written into rollouts and mixed into the seed.
        origin: learner id written into rollouts (default: ``store.learner_id`` or 0).
        seed: root seed.
    """

    def __init__(
        self,
        env: Any,
        policy: nn.Module,
        store: WeightSource,
        sampling: SamplingArgs | None = None,
        *,
        group_size: int,
        worker_id: int = 0,
        origin: int | None = None,
        seed: int = 0,
    ) -> None:
        self.env = env
        self.policy = check_type("policy", policy, nn.Module)
        self.store = store
        if sampling is None:
            sampling = getattr(env, "sampling_args", None)
            if sampling is None:
                raise ValueError("sampling must be given for an environment without sampling_args")
        self.sampling = check_type("sampling", sampling, SamplingArgs)
        self.group_size = check_int("group_size", group_size, 2)
        self.worker_id = check_int("worker_id", worker_id, 0)
        self.origin = (
            getattr(store, "learner_id", 0) if origin is None else check_int("origin", origin, 0)
        )
        self.seed = check_int("seed", seed, 0)
        self.calls = 0
        self.refreshes = 0
        self.snapshot: PolicySnapshot | None = None
        self._batched = hasattr(env, "sample_prompts") and (
            hasattr(env, "rewards") or hasattr(env, "reward")
        )

    @property
    def version(self) -> int:
        """Version of the weights this worker samples with (−1 before the first refresh)."""
        return -1 if self.snapshot is None else self.snapshot.version

    def refresh(self, version: int | None = None) -> bool:
        """Load ``version`` (default: the newest) if it differs from the current one."""
        snap = self.store.latest() if version is None else self.store.get(version)
        if self.snapshot is not None and snap.version == self.snapshot.version:
            return False
        if hasattr(self.store, "load_into"):
            self.store.load_into(self.policy, snap.version)  # a PolicyStore counts the LAN pull
        else:
            self.policy.load_state_dict(snap.state)
        self.snapshot = snap
        self.refreshes += 1
        return True

    def generate(self, n_groups: int) -> list[RolloutGroup]:
        """Sample and score ``n_groups`` groups of G completions with the current weights."""
        check_int("n_groups", n_groups, 1)
        if self.snapshot is None:
            self.refresh()
        assert self.snapshot is not None  # internal invariant: refresh sets it or raises
        gen = torch.Generator().manual_seed(
            mix_seed(self.seed, self.origin, self.worker_id, self.calls)
        )
        self.calls += 1
        with torch.no_grad():
            if self._batched:
                return self._generate_batched(n_groups, gen)
            return self._generate_env(n_groups, gen)

    def _meta(self) -> dict[str, Any]:
        snap = self.snapshot
        assert snap is not None  # internal invariant
        return dict(policy_version=snap.version, origin=self.origin, worker_id=self.worker_id,
                    temperature=self.sampling.temperature, created_at=time.time(),
                    fingerprint=snap.fingerprint)  # fmt: skip

    def _group_id(self, gen: torch.Generator) -> bytes:
        raw = torch.randint(0, 256, (16,), generator=gen, dtype=torch.uint8)
        return uuid.UUID(bytes=bytes(raw.tolist()), version=4).bytes

    def _generate_batched(self, n_groups: int, gen: torch.Generator) -> list[RolloutGroup]:
        from thinwire.rl.policy import sample

        env, g_size, sa = self.env, self.group_size, self.sampling
        prompts = env.sample_prompts(n_groups, gen)
        prompt_ids = torch.stack([p.ids for p in prompts]).repeat_interleave(g_size, dim=0)
        ids, logp = sample(self.policy, prompt_ids, sa.max_new_tokens, sa.temperature, gen,
                           stop_ids=list(sa.stop_ids) or None)  # fmt: skip
        targets = torch.tensor([p.target for p in prompts]).repeat_interleave(g_size)
        if hasattr(env, "rewards"):
            rewards = env.rewards(targets, ids).tolist()
        else:
            rewards = [env.reward(prompts[i // g_size], ids[i]) for i in range(ids.shape[0])]
        name = getattr(getattr(env, "rubric", None), "names", ["reward"])
        name = name[0] if len(name) == 1 else "reward"
        meta = self._meta()
        stops = torch.tensor(list(sa.stop_ids), dtype=torch.long)
        groups = []
        for gi, p in enumerate(prompts):
            gid = self._group_id(gen)
            members = []
            for j in range(g_size):
                row = gi * g_size + j
                comp = ids[row]
                hit = torch.isin(comp, stops).nonzero() if stops.numel() else []
                length = int(hit[0]) + 1 if len(hit) else comp.numel()
                members.append(Rollout(
                    group_id=gid, prompt_id=int(getattr(p, "prompt_id", gi)), sample_idx=j,
                    prompt_ids=p.ids, completion_ids=comp[:length].clone(),
                    loss_mask=torch.ones(length, dtype=torch.bool),
                    behavior_logprobs=logp[row, :length].clone(),
                    truncated=bool(stops.numel()) and not len(hit), reward=float(rewards[row]),
                    reward_components={name: float(rewards[row])}, **meta,
                ))  # fmt: skip
            groups.append(RolloutGroup(tuple(members), {"target": getattr(p, "target", None)}))
        return groups

    def _generate_env(self, n_groups: int, gen: torch.Generator) -> list[RolloutGroup]:
        tasks = self.env.dataset("train")
        client = LocalSampler(self.policy, gen)
        meta = self._meta()
        groups = []
        for _ in range(n_groups):
            task = tasks[int(torch.randint(0, len(tasks), (), generator=gen))]
            trajs = self.env.run_group(client, task, self.group_size, self.sampling)
            gid = self._group_id(gen)
            pid = (
                task.task_id
                if isinstance(task.task_id, int)
                else mix_seed(hash(task.task_id)) & 0xFFFFFFFF
            )
            members = tuple(
                Rollout(
                    group_id=gid,
                    prompt_id=pid,
                    sample_idx=j,
                    prompt_ids=t.prompt_ids,
                    completion_ids=t.completion_ids,
                    loss_mask=t.loss_mask.bool(),
                    behavior_logprobs=t.behavior_logprobs.float(),
                    truncated=t.truncated,
                    reward=t.reward,
                    reward_components=dict(t.reward_components),
                    **meta,
                )  # fmt: skip
                for j, t in enumerate(trajs)
            )
            groups.append(RolloutGroup(members, {"answer": task.answer}))
        return groups

    # ------------------------------------------------------------------ asynchronous loop
    def run(
        self,
        outbox: Channel,
        stop: threading.Event,
        *,
        groups_per_call: int,
        learner_version: Callable[[], int],
        max_staleness: int,
        wire: bool = False,
        refresh_gap: int = 1,
    ) -> None:
        """Push-pull loop: keep generating until ``stop`` is set.

        Before each call: refresh if a version at least ``refresh_gap`` newer is available
        (cheap on the LAN: ``refresh_gap=1``; remote workers refresh when payloads arrive), and
        never start a group on weights older than ``learner_version() − max_staleness``
        (admission control: wait for newer weights instead). Each group goes to ``outbox``
        (blocks while it is full: the queue is bounded); ``wire=True`` sends the encoded
        record (remote workers), else the object with its wire size counted.
        """
        check_int("refresh_gap", refresh_gap, 1)
        while not stop.is_set():
            try:
                if self.snapshot is None or self.store.version - self.version >= refresh_gap:
                    self.refresh()
                if needs_refresh(self.version, learner_version(), max_staleness):
                    time.sleep(0.002)  # admission control: wait for newer weights to arrive
                    continue
                groups = self.generate(groups_per_call)
            except LookupError:
                time.sleep(0.002)
                continue
            for g in groups:
                try:
                    if wire:
                        outbox.send(encode_group(g), timeout=None)
                    else:
                        outbox.send_object(g, group_nbytes(g))
                except ChannelClosed:
                    return
