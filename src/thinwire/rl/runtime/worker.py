"""Rollout workers and their link to a learner, over one communicator per worker.

A :class:`RolloutWorker` holds its own copy of the policy and samples scored groups from an
environment with the weights it was last sent; every group it returns comes from one version
(weights change only between calls), and its rollouts carry that version and the fingerprint of
those weights. It never computes gradients. Randomness is explicit: each call draws from a
generator seeded from ``(seed, origin, worker_id, call counter)``.

A :class:`WorkerLink` joins a learner (rank 0) and one worker (rank 1) through a two-rank
communicator; every byte goes through its collective ops, and so through its ledger and WAN
clock. Each step the learner calls :meth:`WorkerLink.request` and the worker, in its own thread or
process, runs :meth:`WorkerLink.serve`:

1. ``broadcast`` of a 3-value int64 control tensor ``[version, groups, has_frame]`` (tag
   ``site/control``; ``groups = 0`` ends the worker);
2. when the weights changed, ``broadcast`` of one :class:`thinwire.rl.WeightPublisher` frame
   (tag ``weights/<name>``);
3. ``all_gather_bytes`` of the worker's groups, :func:`thinwire.rl.encode_groups` (tag
   ``rollouts/<name>``; the learner contributes nothing).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import torch
from torch import nn

from thinwire._validate import check_int, check_type
from thinwire.collectives import Communicator
from thinwire.rl import (
    Rollout,
    RolloutGroup,
    WeightPublisher,
    WeightReceiver,
    decode_groups,
    encode_groups,
    param_fingerprint,
)
from thinwire.rl.envs import Environment
from thinwire.rl.policies import LocalSampler, SamplingArgs

__all__ = ["RolloutWorker", "WorkerLink", "mix_seed"]


def mix_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (SHA-256 of their decimal forms)."""
    h = hashlib.sha256("/".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


class RolloutWorker:
    """Samples scored groups with one policy version per call.

    Args:
        env: the environment (:meth:`~thinwire.rl.envs.Environment.sample_groups` is called
            once per :meth:`generate`).
        policy: this worker's private copy of the policy.
        sampling: sampling settings (length, temperature, stop tokens).
        group_size: G, completions per prompt, range [2, inf).
        worker_id: id written into rollouts and mixed into the seed.
        origin: id of the learner whose weights it samples with.
        seed: root seed.
    """

    def __init__(
        self,
        env: Environment,
        policy: nn.Module,
        sampling: SamplingArgs,
        *,
        group_size: int,
        worker_id: int = 0,
        origin: int = 0,
        seed: int = 0,
    ) -> None:
        self.env = check_type("env", env, Environment)
        self.policy = check_type("policy", policy, nn.Module)
        self.sampling = check_type("sampling", sampling, SamplingArgs)
        self.group_size = check_int("group_size", group_size, 2)
        self.worker_id = check_int("worker_id", worker_id, 0)
        self.origin = check_int("origin", origin, 0)
        self.seed = check_int("seed", seed, 0)
        self.calls = 0
        self.version = 0
        self.fingerprint = param_fingerprint(policy)

    def load(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Sample with ``state`` from now on, as version ``version``."""
        self.policy.load_state_dict(state)
        self.version = check_int("version", version, 0)
        self.fingerprint = param_fingerprint(self.policy)

    def generate(self, n_groups: int) -> list[RolloutGroup]:
        """Sample and score ``n_groups`` groups of G completions with the current weights."""
        check_int("n_groups", n_groups, 1)
        gen = torch.Generator().manual_seed(
            mix_seed(self.seed, self.origin, self.worker_id, self.calls)
        )
        self.calls += 1
        with torch.no_grad():
            trajs = self.env.sample_groups(
                LocalSampler(self.policy, gen), n_groups, self.group_size, self.sampling, gen
            )
        meta = dict(policy_version=self.version, origin=self.origin, worker_id=self.worker_id,
                    temperature=self.sampling.temperature, created_at=time.time(),
                    fingerprint=self.fingerprint)  # fmt: skip
        groups = []
        for members in trajs:
            raw = torch.randint(0, 256, (16,), generator=gen, dtype=torch.uint8)
            gid = uuid.UUID(bytes=bytes(raw.tolist()), version=4).bytes
            task_id = members[0].task.task_id
            pid = task_id if isinstance(task_id, int) else mix_seed(hash(task_id)) & 0xFFFFFFFF
            rollouts = tuple(
                Rollout(group_id=gid, prompt_id=pid, sample_idx=j, prompt_ids=t.prompt_ids,
                        completion_ids=t.completion_ids, loss_mask=t.loss_mask.bool(),
                        behavior_logprobs=t.behavior_logprobs.float(), truncated=t.truncated,
                        reward=t.reward, reward_components=dict(t.reward_components), **meta)
                for j, t in enumerate(members)
            )  # fmt: skip
            groups.append(RolloutGroup(rollouts, {"answer": members[0].task.answer}))
        return groups


class WorkerLink:
    """One learner–worker link over a two-rank communicator (rank 0 learner, rank 1 worker).

    Args:
        comm: this end's communicator (``world_size`` 2).
        initial: the weights both ends start from.
        codec: the weight frames' codec (:class:`thinwire.rl.WeightPublisher`): None for fp32
            weights (co-located workers), e.g. ``"quant(int8)"`` for workers across a WAN.
        name: the link's channel name in ledger tags (``"local"``, ``"remote"``).
        keep: versions of the sent weights kept for fingerprint and verifier checks.
    """

    def __init__(
        self,
        comm: Communicator,
        initial: dict[str, torch.Tensor],
        *,
        codec: str | None = None,
        name: str = "local",
        keep: int = 8,
    ) -> None:
        if comm.world_size != 2 or comm.rank not in (0, 1):
            raise ValueError(
                f"comm must join one learner (rank 0) and one worker (rank 1), got rank "
                f"{comm.rank} of {comm.world_size}"
            )
        self.comm, self.name = comm, check_type("name", name, str)
        if comm.rank == 0:
            self.publisher: WeightPublisher | None = WeightPublisher(
                initial, codec=codec, keep=keep
            )
            self.publisher.view.publish(initial, 0)
            self.receiver: WeightReceiver | None = None
        else:
            self.publisher, self.receiver = None, WeightReceiver(initial, codec=codec)
        self.sent_version = 0

    def _nbytes(self) -> int:
        end: Any = self.publisher if self.publisher is not None else self.receiver
        return int(end.frame_nbytes)

    # ---------------------------------------------------------------- learner side
    def send(
        self, n_groups: int, state: dict[str, torch.Tensor] | None = None, version: int = 0
    ) -> None:
        """Ask for ``n_groups`` groups, first sending ``state`` as ``version`` if it is newer.

        Collective with the worker's :meth:`serve`; follow it with :meth:`receive` unless
        ``n_groups`` is 0 (which ends the worker). Sending to every link before receiving from
        any lets the workers sample in parallel.
        """
        assert self.publisher is not None  # internal invariant: rank 0 holds the publisher
        check_int("n_groups", n_groups, 0)
        send = state is not None and version > self.sent_version
        ctl = torch.tensor([version if send else self.sent_version, n_groups, int(send)])
        self.comm.broadcast(ctl, 0, tag="site/control")
        if send:
            assert state is not None  # narrowed by ``send``
            frame = self.publisher.publish(state, version)
            self.comm.broadcast(frame, 0, tag=f"weights/{self.name}")
            self.sent_version = version

    def receive(self) -> list[RolloutGroup]:
        """The groups the worker sampled for the last :meth:`send` (collective with it)."""
        rows = self.comm.all_gather_bytes(b"", tag=f"rollouts/{self.name}")
        assert isinstance(rows, list)  # internal invariant: a blocking call's result
        return decode_groups(rows[1] or b"")

    def request(
        self, n_groups: int, state: dict[str, torch.Tensor] | None = None, version: int = 0
    ) -> list[RolloutGroup]:
        """:meth:`send` then :meth:`receive`."""
        self.send(n_groups, state, version)
        return self.receive() if n_groups else []

    def close(self) -> None:
        """End the worker's :meth:`serve` loop (collective with it)."""
        self.send(0)

    # ---------------------------------------------------------------- worker side
    def serve(self, worker: RolloutWorker) -> None:
        """Answer :meth:`request` calls until one asks for 0 groups."""
        assert self.receiver is not None  # internal invariant: rank 1 holds the receiver
        while True:
            ctl = torch.zeros(3, dtype=torch.int64)
            self.comm.broadcast(ctl, 0, tag="site/control")
            version, n_groups, has_frame = (int(x) for x in ctl.tolist())
            if has_frame:
                frame = torch.zeros(self._nbytes(), dtype=torch.uint8)
                self.comm.broadcast(frame, 0, tag=f"weights/{self.name}")
                worker.load(self.receiver.apply(frame, version), version)
            if n_groups == 0:
                return
            payload = encode_groups(worker.generate(n_groups))
            self.comm.all_gather_bytes(payload, tag=f"rollouts/{self.name}")
