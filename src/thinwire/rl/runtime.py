"""Drivers: one learner site on any communicator (:func:`run_learner`), and :func:`run_local`.

A *site* is one learner with its co-located rollout workers, its
optional remote workers (weights as compressed deltas over the WAN, rollouts back as wire
records) and optional SAPO sharing. :func:`run_learner` runs one site on a communicator that links
it to the other learners — ``TorchDistCommunicator`` under ``torchrun`` (gloo), or one rank of an
``InprocCommunicator`` group — always wrapped in ``WanCommunicator`` by the caller or here.
:func:`run_local` runs ``n_learners`` sites as thread ranks of an in-process group in one process
(tests, the CPU demo) and merges their results.

Channels and their ledger tags: ``learners/sync/...`` (the optimizer's exchange, and the DDP
gradient all-reduce of the baseline), ``learners/normalizer`` (16-byte ``(N_seq, N_tok)``
all-reduce of per-step-synced modes), ``weights/local`` (LAN pulls by co-located workers),
``weights/broadcast`` (remote workers), ``rollouts/local``, ``rollouts/remote``,
``rollouts/shared`` (SAPO), ``wan/clock`` (control bytes of the WAN model).

Pipelines: ``"sequential"`` (``cfg.sync == "pull"``: each worker pulls the newest weights before
each step's groups; ``max_staleness = 0`` is synchronous on-policy GRPO), ``"threads"``
(``cfg.sync == "push_pull"``: worker threads keep generating into a bounded inbox, learners
consume at their pace) and ``"lagged"`` (a deterministic stand-in for the steady state of
push-pull: each step's groups are sampled with the oldest kept version ``≥ v_now −
max_staleness``, so every step trains on rollouts ``max_staleness`` versions old).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from thinwire._validate import check_choice, check_int
from thinwire.collectives import (
    ByteLedger,
    CommError,
    Communicator,
    InprocCommunicator,
    WanCommunicator,
    WanConfig,
)
from thinwire.optim import DeMo, DiLoCo, SparseLoCo, StreamingDiLoCo
from thinwire.rl.config import GRPOConfig
from thinwire.rl.learner import Learner
from thinwire.rl.objective import informative_groups
from thinwire.rl.policy import TinyCausalLM
from thinwire.rl.rollout import Channel, RolloutGroup, decode_group, encode_group, group_nbytes
from thinwire.rl.sampling import SamplingArgs
from thinwire.rl.sharing import RolloutSharing
from thinwire.rl.store import DeltaPublisher, PolicyStore
from thinwire.rl.verify import RolloutVerifier
from thinwire.rl.worker import RemoteWeights, RolloutWorker

__all__ = ["FlatBucket", "LearnerResult", "RunResult", "SYNC_KINDS", "SyncOptions", "TaggedComm", "build_optimizer",
           "run_learner", "run_local"]  # fmt: skip

logger = logging.getLogger(__name__)

SYNC_KINDS = ("none", "ddp", "diloco", "streaming", "demo", "sparseloco")


@dataclass(frozen=True)
class SyncOptions:
    """How learners synchronise. Defaults are the ``thinwire.rl`` RL defaults.

    Args:
        sync_every: *H*, inner steps between merges (DiLoCo family; default 10).
        outer_lr / outer_momentum: outer SGD (default 1.0 / 0.0: periodic averaging, which
            learned DigitSum better than the pre-training values in the runs behind this default);
            :meth:`diloco_pretraining` gives the DiLoCo paper's 0.7 / 0.9 Nesterov, H = 500.
        compressor: pseudo-gradient codec of DiLoCo/Streaming (e.g. ``"quant(int4, block=128)"``).
        error_feedback: keep the compression residual (DiLoCo/Streaming).
        fragments / overlap_steps: Streaming DiLoCo fragments and overlap τ (default 2 / 1).
        demo_lr / demo_topk / demo_chunk / demo_values: DeMo settings (lr tuned on DigitSum).
        demo_bucket: run DeMo on a :class:`FlatBucket` of all parameters (two payloads per step).
        demo_small_topk: top-k per tile of the bucket of small tensors (default: ``demo_topk``).
        demo_decay: DeMo's momentum decay β (default 0.999, as bloc97/DeMo).
        demo_lr_final: cosine-decay DeMo's lr from ``demo_lr`` to this over the run (None: constant).
        sparse_topk / sparse_chunk / sparse_bits: SparseLoCo settings.
    """

    sync_every: int = 10
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    compressor: str | None = None
    error_feedback: bool = False
    fragments: int = 2
    overlap_steps: int = 1
    demo_lr: float = 1e-3
    demo_topk: int = 32
    demo_chunk: int = 64
    demo_values: str = "float"
    demo_bucket: bool = False
    demo_small_topk: int | None = None
    demo_decay: float = 0.999
    demo_lr_final: float | None = None
    sparse_topk: int = 128
    sparse_chunk: int = 64
    sparse_bits: int = 2

    @classmethod
    def diloco_pretraining(cls, **kw: Any) -> SyncOptions:
        """DiLoCo's pre-training values (outer lr 0.7, Nesterov momentum 0.9, H = 500)."""
        return cls(**{"sync_every": 500, "outer_lr": 0.7, "outer_momentum": 0.9, **kw})


class TaggedComm:
    """A communicator whose every op tag is prefixed (``"learners/sync/" + tag``).

    The thinwire optimizers tag their ops ``diloco/...``, ``demo/...``; the prefix files them
    under the channel name the RL report uses. Everything else is the inner communicator's.
    """

    def __init__(self, inner: Communicator, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def all_reduce(self, t: torch.Tensor, op: str = "mean", *, tag: str = "", **kw: Any) -> Any:
        """Inner ``all_reduce`` with a prefixed tag."""
        return self.inner.all_reduce(t, op, tag=self.prefix + tag, **kw)

    def all_gather_bytes(self, payload: Any, *, tag: str = "", **kw: Any) -> Any:
        """Inner ``all_gather_bytes`` with a prefixed tag."""
        return self.inner.all_gather_bytes(payload, tag=self.prefix + tag, **kw)

    def all_gather_into_tensor(self, t: torch.Tensor, *, tag: str = "", **kw: Any) -> Any:
        """Inner ``all_gather_into_tensor`` with a prefixed tag."""
        return self.inner.all_gather_into_tensor(t, tag=self.prefix + tag, **kw)

    def broadcast(self, t: torch.Tensor, src: int = 0, *, tag: str = "", **kw: Any) -> Any:
        """Inner ``broadcast`` with a prefixed tag."""
        return self.inner.broadcast(t, src, tag=self.prefix + tag, **kw)

    def broadcast_bytes(self, payload: Any, src: int = 0, *, tag: str = "", **kw: Any) -> Any:
        """Inner ``broadcast_bytes`` with a prefixed tag."""
        return self.inner.broadcast_bytes(payload, src, tag=self.prefix + tag, **kw)


class FlatBucket:
    """The parameters of a module as views into two float32 ``[rows, width]`` buckets.

    DDP-style bucketing for per-step compressed optimizers: DeMo then sends two payloads per
    step instead of one per tensor, whose ~80-byte headers dominate on a 69k-parameter model
    (30 tensors: 2.4 kB of headers against 277 kB of fp32 gradient). ``flats[0]`` holds the
    matrices whose size is a multiple of ``width²`` (row-major, so DeMo's ``width × width`` DCT
    tiles fall on whole tiles of one matrix — for ``[out, width]`` weights exactly the tiles DeMo
    uses per tensor); ``flats[1]`` holds everything else (embeddings, head, biases, norms), which
    would otherwise share one tile's top-k with unrelated rows and starve; give it its own top-k.
    :meth:`gather_grads` copies the gradients into the buckets' ``.grad`` (the learner's grad hook).
    """

    def __init__(self, module: nn.Module, width: int = 64) -> None:
        check_int("width", width, 1)
        ps = list(module.parameters())
        aligned = [p for p in ps if p.dim() == 2 and p.numel() % (width * width) == 0]
        rest = [p for p in ps if not any(p is q for q in aligned)]
        self.parts = [part for part in (aligned, rest) if part]
        self.flats: list[nn.Parameter] = []
        with torch.no_grad():
            for part in self.parts:
                n = sum(p.numel() for p in part)
                flat = nn.Parameter(torch.zeros(-(-n // width), width))
                flat1, off = flat.data.view(-1), 0
                for p in part:
                    flat1[off : off + p.numel()].copy_(p.reshape(-1))
                    p.data = flat1[off : off + p.numel()].view_as(p)  # shares the bucket's storage
                    off += p.numel()
                self.flats.append(flat)

    def gather_grads(self) -> None:
        """Move the parameters' gradients into the buckets' ``.grad`` (0 for padding).

        The parameters' own ``.grad`` are cleared: the optimizer only zeroes the buckets, so
        gradients left on the parameters would accumulate over steps.
        """
        for flat, part in zip(self.flats, self.parts, strict=True):
            g, off = torch.zeros(flat.numel(), dtype=flat.dtype), 0
            for p in part:
                if p.grad is not None:
                    g[off : off + p.numel()] = p.grad.reshape(-1)
                    p.grad = None
                off += p.numel()
            flat.grad = g.view_as(flat)


def build_optimizer(
    kind: str, policy: nn.Module, cfg: GRPOConfig, comm: Communicator | None, opts: SyncOptions
) -> tuple[torch.optim.Optimizer, bool, Callable[[], None] | None]:
    """The optimizer of one learner for sync ``kind``.

    Returns:
        ``(optimizer, global_normalizer, grad_hook)``: whether the learner must use the global
        loss normaliser (per-step-synced modes), and a hook to run after backward (the DDP
        gradient all-reduce, or filling a :class:`FlatBucket`), or None.
    """
    check_choice("sync", kind, SYNC_KINDS)
    multi = comm is not None and comm.world_size > 1
    tagged = TaggedComm(comm, "learners/sync/") if multi else None
    params = list(policy.parameters())
    inner = partial(torch.optim.Adam, lr=cfg.lr)
    if kind == "none":
        return torch.optim.Adam(params, lr=cfg.lr), False, None
    if kind == "ddp":
        return (
            torch.optim.Adam(params, lr=cfg.lr),
            True,
            (_ddp_hook(comm, policy) if multi else None),
        )
    if kind == "diloco":
        return DiLoCo(params, inner, outer_lr=opts.outer_lr, outer_momentum=opts.outer_momentum,
                      nesterov=opts.outer_momentum > 0, sync_every=opts.sync_every, comm=tagged,
                      compressor=opts.compressor, error_feedback=opts.error_feedback), False, None  # fmt: skip
    if kind == "streaming":
        return StreamingDiLoCo(params, inner, outer_lr=opts.outer_lr, outer_momentum=opts.outer_momentum,
                               nesterov=opts.outer_momentum > 0, sync_every=opts.sync_every,
                               fragments=opts.fragments, overlap_steps=opts.overlap_steps, mix_alpha=0.0,
                               comm=tagged, compressor=opts.compressor,
                               error_feedback=opts.error_feedback), False, None  # fmt: skip
    if kind == "demo":
        hook = None
        groups: list[Any] = params
        if opts.demo_bucket:
            bucket = FlatBucket(policy, opts.demo_chunk)
            small = {} if opts.demo_small_topk is None else {"topk": opts.demo_small_topk}
            groups = [{"params": [bucket.flats[0]]}] + [
                {"params": [f], **small} for f in bucket.flats[1:]
            ]
            hook = bucket.gather_grads
        return DeMo(groups, opts.demo_lr, momentum_decay=opts.demo_decay, topk=opts.demo_topk,
                    chunk=opts.demo_chunk, values=opts.demo_values, comm=tagged), True, hook  # fmt: skip
    return SparseLoCo(params, inner, outer_lr=opts.outer_lr, sync_every=opts.sync_every, topk=opts.sparse_topk,
                      chunk=opts.sparse_chunk, bits=opts.sparse_bits, comm=tagged), False, None  # fmt: skip


def _ddp_hook(comm: Communicator, policy: nn.Module) -> Callable[[], None]:
    """The DDP-GRPO baseline: ring all-reduce (mean) of the fp32 gradients every step."""

    def sync() -> None:
        ps = [p for p in policy.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        out = comm.all_reduce(flat, "mean", tag="learners/sync/ddp")
        off = 0
        for p in ps:
            p.grad.copy_(out[off : off + p.numel()].view_as(p))
            off += p.numel()

    return sync


@dataclass
class LearnerResult:
    """What one site reports: per-step metrics, final greedy accuracy, ledger totals by tag."""

    learner_id: int
    history: list[dict[str, float]]
    greedy: int | None
    bytes_by_tag: dict[str, dict[str, int]]
    sim_clock_s: float
    exposed_comm_s: float
    policy: nn.Module
    verifier: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    """Merged result of :func:`run_local`.

    ``rewards[t]`` is the mean sampled reward of step ``t + 1`` averaged over learners.
    """

    learners: list[LearnerResult]
    wall_s: float

    @property
    def rewards(self) -> list[float]:
        """Mean sampled reward per step, averaged over learners."""
        per = [[m["reward/mean"] for m in lr.history] for lr in self.learners]
        return [sum(col) / len(col) for col in zip(*per, strict=True)]

    def window(self, first: int, last: int) -> float:
        """Mean reward over steps ``first..last`` (1-based, inclusive)."""
        r = self.rewards[first - 1 : last]
        return sum(r) / max(1, len(r))

    def bytes(self, prefix: str, key: str = "sent") -> int:
        """``key`` bytes summed over learners and every tag starting with ``prefix``."""
        return sum(
            v[key]
            for lr in self.learners
            for t, v in lr.bytes_by_tag.items()
            if t.startswith(prefix)
        )

    def bytes_per_channel(self) -> dict[str, dict[str, int]]:
        """Sent/received bytes per channel (tags folded to their first two components)."""
        out: dict[str, dict[str, int]] = {}
        for lr in self.learners:
            for tag, v in lr.bytes_by_tag.items():
                ch = "/".join(tag.split("/")[:2])
                d = out.setdefault(ch, {"sent": 0, "recv": 0, "control_sent": 0, "ops": 0})
                for k in d:
                    d[k] += v.get(k, 0)
        return dict(sorted(out.items()))


class _Inbox:
    """Learner inbox over several channels; decodes wire records, verifies remote ones."""

    def __init__(self, channels: list[Channel], verifier: RolloutVerifier | None) -> None:
        self.channels, self.verifier = channels, verifier
        self.rejected = 0
        self._i = 0

    def accept(self, item: Any) -> RolloutGroup | None:
        if isinstance(item, RolloutGroup):
            return item
        group = decode_group(item)
        if self.verifier is not None and not all(
            v.ok for v in self.verifier.verify(group.rollouts)
        ):
            self.rejected += 1
            return None
        return group

    def recv(self, timeout: float | None = None) -> RolloutGroup:
        import queue

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for _ in range(len(self.channels)):
                ch = self.channels[self._i % len(self.channels)]
                self._i += 1
                item = ch.recv_nowait()
                if item is not None:
                    g = self.accept(item)
                    if g is not None:
                        return g
            if deadline is not None and time.monotonic() > deadline:
                raise queue.Empty("no group arrived")
            time.sleep(0.001)


def run_learner(
    cfg: GRPOConfig,
    comm: Communicator,
    *,
    steps: int,
    sync: str = "none",
    options: SyncOptions | None = None,
    env: Any = None,
    policy: nn.Module | None = None,
    pipeline: str | None = None,
    workers: int = 1,
    remote_workers: int = 0,
    remote_codec: str = "quant(int8)",
    share: tuple[int, int] | None = None,
    verify_remote: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> LearnerResult:
    """Run one learner site for ``steps`` steps.

    Collective: every learner of ``comm`` must call this with the same settings.

    Args:
        cfg: GRPO configuration (``prompts_per_step`` is per learner).
        comm: links this learner to the others (already WAN-wrapped; world size 1 is fine).
        steps: optimizer steps.
        sync: ``"none"``, ``"ddp"`` (baseline: fp32 gradient all-reduce every step),
            ``"diloco"``, ``"streaming"``, ``"demo"`` or ``"sparseloco"``.
        options: :class:`SyncOptions` (default: RL defaults).
        env: environment (default: ``DigitSumEnv()``).
        policy: initial policy, identical on every learner (default: ``TinyCausalLM(seed=cfg.seed)``).
        pipeline: ``"sequential"``, ``"lagged"`` or ``"threads"`` (default: from ``cfg.sync``).
        workers: co-located rollout workers.
        remote_workers: remote workers (weights as ``remote_codec`` deltas; rollouts as wire
            records over ``rollouts/remote``; verified when ``verify_remote``).
        share: ``(n_publish, n_external)`` for SAPO sharing; local groups per step become
            ``prompts_per_step − n_external``.
        on_step: callback ``(step, metrics)`` after each step.
    """
    from thinwire.rl.tasks.digit_sum import DigitSumEnv

    check_int("steps", steps, 1)
    check_int("workers", workers, 1)
    check_int("remote_workers", remote_workers, 0)
    pipeline = pipeline or ("sequential" if cfg.sync == "pull" else "threads")
    check_choice("pipeline", pipeline, ("sequential", "lagged", "threads"))
    opts = options or SyncOptions()
    env = env if env is not None else DigitSumEnv()
    policy = policy if policy is not None else TinyCausalLM(seed=cfg.seed)
    lid, ledger = comm.rank, comm.ledger
    optimizer, global_norm, grad_hook = build_optimizer(sync, policy, cfg, comm, opts)
    store = PolicyStore(keep=max(8, 2 * cfg.max_staleness + 4), learner_id=lid, ledger=ledger)
    n_external = share[1] if share else 0
    n_local = cfg.prompts_per_step - n_external
    if n_local < 1:
        raise ValueError(
            f"share n_external must be in [0, {cfg.prompts_per_step - 1}], got {n_external}"
        )
    local_ch = Channel(
        "rollouts/local", capacity=max(1, cfg.max_staleness) * n_local, receiver_ledger=ledger
    )
    remote_ch, weight_chs, remote_ledgers = None, [], []
    if remote_workers:
        remote_ledgers = [ByteLedger() for _ in range(remote_workers)]
        weight_chs = [
            Channel("weights/broadcast", sender_ledger=ledger, receiver_ledger=rl)
            for rl in remote_ledgers
        ]
        remote_ch = Channel("rollouts/remote", capacity=max(1, cfg.max_staleness) * n_local,
                            receiver_ledger=ledger)  # fmt: skip
    publisher = (
        DeltaPublisher(weight_chs, codec=remote_codec, learner_id=lid) if remote_workers else None
    )
    verifier = None
    if verify_remote and publisher is not None:
        verifier = RolloutVerifier(
            copy.deepcopy(policy),
            publisher.view,
            key=secrets.token_bytes(32),  # the workers never see it (positions unpredictable)
        )
    inbox = _Inbox([local_ch] + ([remote_ch] if remote_ch else []), verifier)
    learner = Learner(policy, optimizer, cfg, inbox, store, learner_id=lid, comm=comm,
                      global_normalizer=global_norm, remote=publisher, grad_hook=grad_hook)  # fmt: skip
    sa = getattr(env, "sampling_args", None)  # the task's length/stop tokens, cfg's temperature
    sa = dataclasses.replace(sa, temperature=cfg.temperature) if sa is not None else SamplingArgs(
        max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature)  # fmt: skip
    local = [RolloutWorker(env, copy.deepcopy(policy), store, sa, group_size=cfg.group_size, worker_id=i,
                           origin=lid, seed=cfg.seed) for i in range(workers)]  # fmt: skip
    remote = [RolloutWorker(env, copy.deepcopy(policy),
                            RemoteWeights(ch, policy.state_dict(), codec=remote_codec), sa,
                            group_size=cfg.group_size, worker_id=workers + i, origin=lid, seed=cfg.seed)
              for i, ch in enumerate(weight_chs)]  # fmt: skip
    sharing = (
        RolloutSharing(comm, n_publish=share[0], n_external=n_external, seed=cfg.seed)
        if share
        else None
    )
    all_workers = local + remote
    quota = [
        n_local // len(all_workers) + (1 if i < n_local % len(all_workers) else 0)
        for i in range(len(all_workers))
    ]
    stop = threading.Event()
    threads: list[threading.Thread] = []
    if pipeline == "threads":
        for w, q in zip(all_workers, quota, strict=True):
            if q == 0:
                continue
            is_remote = w in remote
            t = threading.Thread(
                target=w.run, daemon=True, name=f"worker-{lid}-{w.worker_id}",
                args=(remote_ch if is_remote else local_ch, stop),
                kwargs=dict(groups_per_call=q, learner_version=lambda: learner.version,
                            max_staleness=cfg.max_staleness, wire=is_remote),
            )  # fmt: skip
            t.start()
            threads.append(t)
    sched = None
    if sync == "demo" and opts.demo_lr_final is not None:
        lo, hi = opts.demo_lr_final, opts.demo_lr
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda t: (lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * min(t, steps) / steps))) / hi,
        )

    def produce(w: RolloutWorker, q: int) -> list[RolloutGroup]:
        """One worker's groups for this step, through its channel (sequential pipelines)."""
        if pipeline == "lagged" and w in local:  # the oldest kept version within the bound
            w.refresh(min(v for v in store.versions() if v >= learner.version - cfg.max_staleness))
        else:
            w.refresh()
        out = []
        for g in w.generate(q):
            if w in remote:  # encoded, over the WAN, verified on arrival
                remote_ch.send(encode_group(g))  # type: ignore[union-attr]
                got = inbox.accept(remote_ch.recv())  # type: ignore[union-attr]
            else:
                local_ch.send_object(g, group_nbytes(g))
                got = local_ch.recv()
            if got is not None:
                out.append(got)
        return out

    history: list[dict[str, float]] = []
    try:
        for step in range(steps):
            if hasattr(comm, "mark_step"):
                comm.mark_step(step)
            if pipeline == "threads":
                groups = learner.collect(n_local)
            else:
                groups = [
                    g for w, q in zip(all_workers, quota, strict=True) if q for g in produce(w, q)
                ]
                if cfg.filter_zero_std_groups:  # dynamic sampling (DAPO): resample what was dropped
                    keep = [g for g in groups if bool(informative_groups(g.rewards()[None])[0])]
                    for _ in range(cfg.max_resample_rounds):
                        if len(keep) >= n_local:
                            break
                        more = produce(local[0], n_local - len(keep))
                        keep += [g for g in more if bool(informative_groups(g.rewards()[None])[0])]
                    learner.zero_std_dropped += len(groups) - len(keep)
                    groups = keep[:n_local]
            external = sharing.exchange(groups) if sharing is not None else []
            if pipeline == "threads":  # collect() already applied the staleness filter
                metrics = learner.step(
                    list(groups) + learner.filter.filter(external, learner.version), admitted=True
                )
            else:
                metrics = learner.step(list(groups) + external)
            metrics["rollouts/rejected_unverified"] = float(inbox.rejected)
            for tag, v in ledger.by_tag().items():  # cumulative bytes per channel
                ch = "/".join(tag.split("/")[:2])
                for k in ("sent", "recv"):
                    metrics[f"bytes/{ch}/{k}"] = metrics.get(f"bytes/{ch}/{k}", 0.0) + v[k]
            if sched is not None:
                sched.step()
            history.append(metrics)
            if on_step is not None:
                on_step(step, metrics)
    finally:
        stop.set()
        local_ch.close()
        if remote_ch is not None:
            remote_ch.close()
        for t in threads:
            t.join(timeout=10)
    greedy = None
    if hasattr(env, "greedy_accuracy"):
        if hasattr(optimizer, "global_params"):
            with optimizer.global_params():
                greedy = env.greedy_accuracy(policy)
        else:
            greedy = env.greedy_accuracy(policy)
    ver = {}
    if verifier is not None:
        c = verifier.cost
        ver = {
            "rollouts": c.rollouts,
            "fraction_of_full": c.fraction_of_full(),
            "rejected": inbox.rejected,
        }
    return LearnerResult(lid, history, greedy, ledger.by_tag(), getattr(comm, "clock", 0.0),
                         getattr(comm, "exposed_comm_s", 0.0), policy, ver)  # fmt: skip


def run_local(
    cfg: GRPOConfig,
    n_learners: int = 1,
    sync: str = "none",
    workers_per_learner: int = 1,
    *,
    steps: int = 400,
    wan_preset: str = "home_broadband",
    num_threads: int | None = None,
    timeout_s: float = 600.0,
    **site: Any,
) -> RunResult:
    """Run ``n_learners`` learner sites as thread ranks of an in-process group.

    Every learner starts from the same initial policy (built once, deep-copied), has its own
    ``workers_per_learner`` co-located workers, and all learner-to-learner traffic goes through
    ``WanCommunicator(inproc rank, WanConfig.from_preset(wan_preset, n_learners))``.

    Args:
        cfg: GRPO configuration (``prompts_per_step`` per learner).
        n_learners: R ≥ 1.
        sync: see :func:`run_learner`.
        workers_per_learner: co-located workers per learner.
        steps: optimizer steps per learner (default: 400).
        wan_preset: WAN preset of the learner links.
        num_threads: ``torch.set_num_threads`` for the run (restored after); None leaves it.
        timeout_s: seconds a learner waits for its peers in one collective.
        **site: forwarded to :func:`run_learner` (``options``, ``env``, ``policy``, ``pipeline``,
            ``remote_workers``, ``remote_codec``, ``share``, ``verify_remote``, ``on_step``).

    Raises:
        RuntimeError: a learner failed (its traceback is chained).
    """
    check_int("n_learners", n_learners, 1)
    check_choice("sync", sync, SYNC_KINDS)
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(check_int("num_threads", num_threads, 1))
    base = site.pop("policy", None) or TinyCausalLM(seed=cfg.seed)
    comms = InprocCommunicator.group(n_learners, timeout_s=timeout_s)
    wan_cfg = WanConfig.from_preset(wan_preset, n_learners)
    results: list[LearnerResult | None] = [None] * n_learners
    errors: list[BaseException | None] = [None] * n_learners

    def body(rank: int) -> None:
        wan = WanCommunicator(comms[rank], wan_cfg)
        try:
            results[rank] = run_learner(cfg, wan, steps=steps, sync=sync, workers=workers_per_learner,
                                        policy=copy.deepcopy(base), **site)  # fmt: skip
        except BaseException as exc:  # re-raised in the caller with the rank named
            errors[rank] = exc
            comms[rank].close()  # peers waiting on this rank fail fast with PeerLost

    t0 = time.perf_counter()
    try:
        if n_learners == 1:
            body(0)
        else:
            threads = [
                threading.Thread(target=body, args=(r,), name=f"learner-{r}")
                for r in range(n_learners)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        torch.set_num_threads(old_threads)
    # the root cause, not the PeerLost/CommTimeout it caused on the other ranks
    first = next((e for e in errors if e is not None and not isinstance(e, CommError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        rank = errors.index(first)
        raise RuntimeError(f"learner {rank} failed: {type(first).__name__}: {first}") from first
    return RunResult([r for r in results if r is not None], time.perf_counter() - t0)
