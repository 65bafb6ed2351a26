"""``train``: GRPO in one call, one learner or N learners over a communicator (TRL-like).

``train(policy, reward, prompts, config)`` is the entry point TRL users know from
``GRPOTrainer(model, reward_funcs, args, train_dataset).train()``. It runs one learner *site*
per learner: the :class:`thinwire.rl.Learner`, its co-located rollout workers and optional remote
workers, each behind a :class:`~thinwire.rl.runtime.WorkerLink` (its own two-rank communicator,
so weights and rollouts go through the same byte ops, ledger and WAN clock as the learners'
sync), and optional SAPO sharing over the learners' communicator. Learners meet only through
their optimizer (``config.method``, from the one method table), the 16-byte loss normaliser of
per-step methods, shared rollouts and a 16-byte fingerprint check of the starting weights, all
on the learners' communicator, whose ledger is therefore the learner-to-learner traffic.

Steps are lockstep: each step every worker receives the weights of ``config.rollout_lag``
versions back and returns its groups (``rollout_lag = max_staleness`` is the steady state of an
asynchronous pipeline, deterministically).
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from thinwire._validate import check_choice, check_int, check_type
from thinwire.collectives import (
    PRESETS,
    CommError,
    Communicator,
    InprocCommunicator,
    WanCommunicator,
    WanConfig,
)
from thinwire.optim import METHODS
from thinwire.rl import (
    GRPOConfig,
    Learner,
    PolicyStore,
    RolloutGroup,
    RolloutVerifier,
    build_learner_optimizer,
    informative_groups,
    param_fingerprint,
)
from thinwire.rl.envs import Environment, Rubric, SingleTurnEnv, Task
from thinwire.rl.policies import SamplingArgs
from thinwire.rl.runtime.sharing import RolloutSharing
from thinwire.rl.runtime.worker import RolloutWorker, WorkerLink

__all__ = ["LearnerResult", "TrainResult", "train"]

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]
_LINK_PRESET = "datacenter"  # co-located workers: the LAN of one site


@dataclass
class LearnerResult:
    """One learner's run: per-step metrics, final policy, ledgers and WAN clock.

    Attributes:
        learner_bytes: totals per tag of the learners' communicator (learner-to-learner).
        site_bytes: totals per tag of the learner's worker links (weights, rollouts, control).
        verifier: remote-rollout verification counts (empty without ``verify_remote``).
    """

    learner_id: int
    history: list[dict[str, float]]
    policy: nn.Module
    learner_bytes: dict[str, dict[str, int]]
    site_bytes: dict[str, dict[str, int]]
    sim_clock_s: float = 0.0
    exposed_comm_s: float = 0.0
    verifier: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What :func:`train` returns: one :class:`LearnerResult` per learner run here."""

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

    def learner_bytes(self, *, control: bool = True) -> int:
        """Learner-to-learner bytes, sent + received, summed over learners and every tag.

        ``control`` adds the control bytes (the WAN model's clock exchange, ``wan/clock``).
        """
        keys = ("sent", "recv", "control_sent", "control_recv") if control else ("sent", "recv")
        return sum(v[k] for lr in self.learners for v in lr.learner_bytes.values() for k in keys)

    def bytes_per_channel(self) -> dict[str, dict[str, int]]:
        """Sent/received bytes per channel (tags folded to their first component), all ledgers."""
        out: dict[str, dict[str, int]] = {}
        for lr in self.learners:
            for side, tags in (("learners", lr.learner_bytes), ("site", lr.site_bytes)):
                for tag, v in tags.items():
                    ch = tag.split("/")[0] if side == "site" else f"learners/{tag.split('/')[0]}"
                    d = out.setdefault(ch, {"sent": 0, "recv": 0, "control": 0})
                    d["sent"] += v["sent"]
                    d["recv"] += v["recv"]
                    d["control"] += v["control_sent"] + v["control_recv"]
        return dict(sorted(out.items()))


def _environment(reward: Any, prompts: Sequence[Any] | None) -> Environment:
    if isinstance(reward, Environment):
        if prompts is not None:
            raise ValueError("prompts must be None when reward is an Environment (it has its own)")
        return reward
    funcs = list(reward) if isinstance(reward, Sequence) else [reward]
    if not funcs or not all(callable(f) for f in funcs):
        raise TypeError(
            "reward must be an Environment, a reward function f(prompts, completions, "
            f"completion_ids, **columns) -> list[float | None], or a list of them; got {reward!r}"
        )
    if not prompts:
        raise ValueError("prompts must hold at least one prompt (token ids, or a dict with "
                         "'prompt' and extra columns for the reward functions)")  # fmt: skip
    tasks = []
    for i, p in enumerate(prompts):
        if isinstance(p, Mapping):
            if "prompt" not in p:
                raise ValueError(f"prompts[{i}] must have a 'prompt' key, got keys {sorted(p)}")
            cols = {k: v for k, v in p.items() if k not in ("prompt", "answer")}
            tasks.append(Task(p["prompt"], answer=p.get("answer"), info=cols, task_id=i))
        else:
            tasks.append(Task(p, task_id=i))
    return SingleTurnEnv(tasks, Rubric.from_trl(funcs))


def _link_pair(preset: str, timeout_s: float) -> tuple[Any, Any]:
    """A two-rank in-process link behind the WAN model ``preset``: (learner end, worker end)."""
    cfg = WanConfig.from_preset(preset, 2)
    a, b = InprocCommunicator.group(2, timeout_s=timeout_s)
    return WanCommunicator(a, cfg), WanCommunicator(b, cfg)


def _check_same_start(comm: Communicator, policy: nn.Module) -> None:
    """Every learner must start from the same weights (one 16-byte all-gather)."""
    fp = param_fingerprint(policy)
    rows = comm.all_gather_bytes(fp, tag="learners/init")
    assert isinstance(rows, list)  # internal invariant: a blocking call's result
    if any(r != fp for r in rows):
        raise ValueError(
            "every learner must start from the same policy weights, but the fingerprints differ "
            "(build the policy with the same seed or load one checkpoint on every learner)"
        )


def _run_site(
    policy: nn.Module,
    env: Environment,
    cfg: GRPOConfig,
    comm: Communicator | None,
    *,
    workers: int,
    remote_workers: int,
    remote_codec: str | None,
    remote_preset: str,
    remote_on_sync: bool,
    share: tuple[int, int] | None,
    verify_remote: bool,
    on_step: Callable[[int, dict[str, float]], None] | None,
    timeout_s: float,
) -> LearnerResult:
    """One learner site for ``cfg.steps`` steps (see :func:`train` for the arguments)."""
    lid = comm.rank if comm is not None else 0
    multi = comm is not None and comm.world_size > 1
    if multi:
        assert comm is not None  # narrowed by ``multi``
        _check_same_start(comm, policy)
    method = METHODS[cfg.method]
    optimizer = build_learner_optimizer(policy, cfg, comm if multi else None)
    learner = Learner(policy, optimizer, cfg, learner_id=lid, comm=comm if multi else None,
                      global_normalizer=multi and method.kind != "outer")  # fmt: skip
    n_external = share[1] if share else 0
    n_local = cfg.prompts_per_step - n_external
    if n_local < 1:
        raise ValueError(
            f"share n_external must be in [0, {cfg.prompts_per_step - 1}], got {n_external}"
        )
    stop = env.stop_ids
    if stop is None:  # the policy's end-of-sequence token, if it has one
        eos = getattr(policy, "eos_id", None)
        stop = () if eos is None else (int(eos),)
    sampling = SamplingArgs(cfg.max_completion_length, cfg.temperature, stop)
    initial = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    kinds = [("local", None, _LINK_PRESET)] * workers + [
        ("remote", remote_codec, remote_preset)
    ] * remote_workers
    links, threads, errors = [], [], []
    for wid, (name, codec, preset) in enumerate(kinds):
        mine, theirs = _link_pair(preset, timeout_s)
        links.append(WorkerLink(mine, initial, codec=codec, name=name,
                                keep=max(8, cfg.max_staleness + 2)))  # fmt: skip
        worker = RolloutWorker(env, copy.deepcopy(policy), sampling, group_size=cfg.group_size,
                               worker_id=wid, origin=lid, seed=cfg.seed)  # fmt: skip
        far = WorkerLink(theirs, initial, codec=codec, name=name)

        def serve(link: WorkerLink = far, w: RolloutWorker = worker) -> None:
            try:
                link.serve(w)
            except BaseException as exc:  # reported by the learner thread
                errors.append(exc)
                link.comm.close()

        threads.append(threading.Thread(target=serve, daemon=True, name=f"worker-{lid}-{wid}"))
    for t in threads:
        t.start()
    quota = [n_local // len(links) + (i < n_local % len(links)) for i in range(len(links))]
    remote_views = [ln.publisher.view for ln in links if ln.name == "remote" and ln.publisher]
    verifier = None
    if verify_remote and remote_views:
        # the workers never see the key, so they cannot predict the checked positions
        verifier = RolloutVerifier(copy.deepcopy(policy), remote_views,
                                   key=secrets.token_bytes(32))  # fmt: skip
    store = PolicyStore(keep=cfg.rollout_lag + 1)
    store.publish(policy, 0)
    sharing = None
    if share and multi:
        assert comm is not None  # narrowed by ``multi``
        sharing = RolloutSharing(comm, n_publish=share[0], n_external=n_external, seed=cfg.seed)
    rejected = fingerprint_rejected = 0

    def collect(link: WorkerLink, groups: list[RolloutGroup]) -> list[RolloutGroup]:
        nonlocal rejected, fingerprint_rejected
        assert link.publisher is not None  # internal invariant: the learner's end
        view = link.publisher.view
        out = []
        for g in groups:
            try:
                ok = all(r.fingerprint == view.fingerprint(r.policy_version) for r in g.rollouts)
            except KeyError:
                ok = False
            if not ok:
                fingerprint_rejected += 1
                continue
            if verifier is not None and link.name == "remote":
                if not all(v.ok for v in verifier.verify(g.rollouts)):
                    rejected += 1
                    continue
            out.append(g)
        return out

    results: list[dict[str, float]] = []
    try:
        for step in range(cfg.steps):
            if isinstance(comm, WanCommunicator):
                comm.mark_step(step)
            elif comm is not None:
                comm.ledger.mark_step(step)
            snap = store.get(max(0, learner.version - cfg.rollout_lag))
            due_remote = not remote_on_sync or learner.synced or step == 0
            for link, q in zip(links, quota, strict=True):  # every worker samples in parallel
                link.comm.ledger.mark_step(step)
                state = snap.state if link.name == "local" or due_remote else None
                link.send(q, state, snap.version)
            groups: list[RolloutGroup] = []
            for link, q in zip(links, quota, strict=True):
                groups += collect(link, link.receive()) if q else []
            if cfg.filter_zero_std_groups:  # dynamic sampling: resample what was dropped
                keep = [g for g in groups if bool(informative_groups(g.rewards()[None])[0])]
                for _ in range(cfg.max_resample_rounds):
                    if len(keep) >= n_local:
                        break
                    more = collect(links[0], links[0].request(n_local - len(keep)))
                    keep += [g for g in more if bool(informative_groups(g.rewards()[None])[0])]
                learner.zero_std_dropped += len(groups) - len(keep)
                groups = keep[:n_local]
            external = sharing.exchange(groups) if sharing is not None else []
            metrics = learner.step(groups + external)
            store.publish(policy, learner.version)
            metrics["rollouts/rejected_fingerprint"] = float(fingerprint_rejected)
            metrics["rollouts/rejected_unverified"] = float(rejected)
            results.append(metrics)
            if on_step is not None:
                on_step(step, metrics)
    finally:
        for link in links:
            if not errors:
                try:
                    link.close()
                except CommError:
                    pass
            link.comm.close()
        for t in threads:
            t.join(timeout=30)
    if errors:
        raise RuntimeError(f"a rollout worker of learner {lid} failed: {errors[0]}") from errors[0]
    site: dict[str, dict[str, int]] = {}
    for link in links:
        for tag, v in link.comm.ledger.by_tag().items():
            d = site.setdefault(tag, dict.fromkeys(v, 0))
            for k, n in v.items():
                d[k] += n
    ver = {}
    if verifier is not None:
        ver = {"rollouts": float(verifier.cost.rollouts), "rejected": float(rejected),
               "fraction_of_full": verifier.cost.fraction_of_full()}  # fmt: skip
    clock = comm.clock if isinstance(comm, WanCommunicator) else 0.0
    exposed = comm.exposed_comm_s if isinstance(comm, WanCommunicator) else 0.0
    return LearnerResult(lid, results, policy, comm.ledger.by_tag() if comm is not None else {},
                         site, clock, exposed, ver)  # fmt: skip


def train(
    policy: nn.Module,
    reward: Environment | RewardFn | Sequence[RewardFn],
    prompts: Sequence[Any] | None,
    config: GRPOConfig,
    *,
    comm: Communicator | None = None,
    learners: int = 1,
    wan_preset: str = "home_broadband",
    workers: int = 1,
    remote_workers: int = 0,
    remote_codec: str | None = "quant(int8)",
    remote_preset: str = "home_broadband",
    remote_on_sync: bool = False,
    share: tuple[int, int] | None = None,
    verify_remote: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    timeout_s: float = 600.0,
) -> TrainResult:
    """Train ``policy`` with GRPO for ``config.steps`` steps; return metrics, policies, bytes.

    Args:
        policy: a :class:`thinwire.rl.Policy` module (``TinyCausalLM``, ``HFCausalLMPolicy``);
            trained in place when this process runs one learner, deep-copied per learner when
            it runs several.
        reward: TRL-style reward function(s) ``f(prompts, completions, completion_ids,
            **columns) -> list[float | None]``, or an :class:`~thinwire.rl.envs.Environment`
            (then ``prompts`` is None).
        prompts: the prompts: token ids, or dicts with ``"prompt"`` (ids, or text when the
            environment encodes) plus extra columns handed to the reward functions.
        config: :class:`thinwire.rl.GRPOConfig` (objective, batch, ``steps``, ``method``).
        comm: the learners' communicator when each learner is its own process (``torchrun``:
            ``TorchDistCommunicator``, best wrapped in ``WanCommunicator``); this process is
            learner ``comm.rank``. None: ``learners`` learners run here.
        learners: learners run as threads of this process over an in-process communicator
            behind the WAN model ``wan_preset`` (default: 1); only with ``comm=None``.
        wan_preset: :data:`thinwire.collectives.PRESETS` name of the simulated learner links.
        workers: co-located rollout workers per learner (fp32 weights over a LAN link).
        remote_workers: rollout workers behind ``remote_preset`` links, fed ``remote_codec``
            weight frames (default: int8 with error feedback).
        remote_on_sync: send remote workers new weights only after steps that completed an
            optimizer sync (the merged model of the DiLoCo family), not after every step.
        share: ``(n_publish, n_external)`` for SAPO rollout sharing between learners.
        verify_remote: spot-check remote workers' log-probs with a
            :class:`thinwire.rl.RolloutVerifier` (rejected groups are dropped and counted).
        on_step: ``on_step(step, metrics)`` after each step of each learner.
        timeout_s: seconds a learner waits for its peers (or a worker) in one collective.

    Raises:
        ValueError / TypeError: a bad argument (named, with its accepted range).
        RuntimeError: a learner or worker failed (its error is chained).
    """
    check_type("config", config, GRPOConfig)
    check_int("learners", learners, 1)
    check_int("workers", workers, 0)
    check_int("remote_workers", remote_workers, 0)
    if workers + remote_workers < 1:
        raise ValueError("workers + remote_workers must be in [1, inf), got 0: nobody samples")
    check_choice("wan_preset", wan_preset, tuple(PRESETS))
    check_choice("remote_preset", remote_preset, tuple(PRESETS))
    if comm is not None and learners != 1:
        raise ValueError(
            f"learners must be 1 with a communicator (it has the ranks), got {learners}"
        )
    n_learners = comm.world_size if comm is not None else learners
    if share is not None and n_learners < 2:
        raise ValueError(f"share needs at least 2 learners to share with, got {n_learners}")
    if verify_remote and remote_workers == 0:
        raise ValueError("verify_remote=True needs remote_workers >= 1 (it checks their rollouts)")
    env = _environment(reward, prompts)
    site = dict(workers=workers, remote_workers=remote_workers, remote_codec=remote_codec,
                remote_preset=remote_preset, remote_on_sync=remote_on_sync, share=share,
                verify_remote=verify_remote, on_step=on_step, timeout_s=timeout_s)  # fmt: skip
    t0 = time.perf_counter()
    if comm is not None or learners == 1:
        res = _run_site(policy, env, config, comm, **site)  # type: ignore[arg-type]
        return TrainResult([res], time.perf_counter() - t0)
    comms = InprocCommunicator.group(learners, timeout_s=timeout_s)
    wan_cfg = WanConfig.from_preset(wan_preset, learners)
    results: list[LearnerResult | None] = [None] * learners
    errors: list[BaseException | None] = [None] * learners

    def body(rank: int) -> None:
        try:
            results[rank] = _run_site(copy.deepcopy(policy), env, config,
                                      WanCommunicator(comms[rank], wan_cfg), **site)  # type: ignore[arg-type]  # fmt: skip
        except BaseException as exc:  # re-raised below with the rank named
            errors[rank] = exc
            comms[rank].close()  # peers waiting on this rank fail fast with PeerLost

    threads = [
        threading.Thread(target=body, args=(r,), name=f"learner-{r}") for r in range(learners)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the root cause, not the PeerLost/CommTimeout it caused on the other ranks
    first = next((e for e in errors if e is not None and not isinstance(e, CommError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        rank = errors.index(first)
        raise RuntimeError(f"learner {rank} failed: {type(first).__name__}: {first}") from first
    return TrainResult([r for r in results if r is not None], time.perf_counter() - t0)
