"""Environments and rubrics, verifiers-style.

- ``Task`` (prompt, answer, info, task_id) and ``Trajectory`` (token-level record of one rollout,
  with a loss mask that is 0 on env/tool tokens, and its reward).
- ``Rubric``: weighted reward functions that ask for what they need by argument name (verifiers'
  convention), plus TRL-style group functions via ``Rubric.from_trl``.
- ``Environment`` (abstract), ``SingleTurnEnv`` (one model turn) and ``MultiTurnEnv``
  (``env_response`` + ``is_completed``); ``GymAdapter`` wraps any gymnasium-style environment by
  duck typing (``gymnasium`` is not a dependency).

The environment owns the reward (verifiers; TRL RFC #5912): multi-turn state never leaks into the
trainer, which only sees token ids, behaviour log-probs, the loss mask and the scalar reward.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from thinwire._validate import check_int
from thinwire.rl.policies import SamplingArgs, SamplingClient

__all__ = [
    "Task",
    "Trajectory",
    "Rubric",
    "Environment",
    "SingleTurnEnv",
    "MultiTurnEnv",
    "GymAdapter",
]

Encode = Callable[[Any], Sequence[int]]
Decode = Callable[[Sequence[int]], Any]

# Argument names a reward function may ask for (verifiers); the plural forms make it a group
# function that scores all members at once and returns one value per member.
_SINGULAR = {
    "prompt": "prompt",
    "completion": "completion",
    "answer": "answer",
    "info": "info",
    "state": "state",
    "task": "task",
    "prompt_ids": "prompt_ids",
    "completion_ids": "completion_ids",
}
_PLURAL = {
    "prompts": "prompt",
    "completions": "completion",
    "answers": "answer",
    "infos": "info",
    "states": "state",
    "tasks": "task",
}


@dataclasses.dataclass
class Task:
    """One prompt of an environment's dataset.

    Args:
        prompt: text, chat messages, or token ids (``LongTensor [Tp]`` or ``list[int]``).
        answer: reference answer handed to reward functions (default: None).
        info: free-form metadata for reward functions (default: {}).
        task_id: identifier, carried into rollout records as ``prompt_id`` (default: 0).
    """

    prompt: Any
    answer: Any = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    task_id: int | str = 0


@dataclasses.dataclass
class Trajectory:
    """Token-level record of one rollout (one member of a group).

    ``completion_ids`` holds every token after the prompt (model turns and, in multi-turn
    environments, env/tool tokens), with no padding; ``loss_mask`` is 1 on model tokens only and
    ``behavior_logprobs`` is 0 where the mask is 0. ``reward`` is NaN until scored and stays NaN
    for an unscorable trajectory (see :class:`Rubric`).
    """

    task: Task
    prompt_ids: Tensor
    completion_ids: Tensor
    behavior_logprobs: Tensor
    loss_mask: Tensor
    truncated: bool = False
    completion: Any = None
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    reward: float = math.nan
    reward_components: dict[str, float] = dataclasses.field(default_factory=dict)


def _func_name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", type(func).__name__)


def _as_score(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, bool | int | float):
        v = float(value)
        return None if math.isnan(v) else v
    raise TypeError(f"reward function {name} must return float or None, got {value!r}")


class Rubric:
    """Weighted reward functions; ``score_group`` is the single entry point.

    A function asks for what it needs by argument name: ``prompt``, ``completion``, ``answer``,
    ``info``, ``state``, ``task``, ``prompt_ids``, ``completion_ids`` (or ``**kwargs`` for all)
    and returns ``float | None`` (``None``: not applicable). A *group* function uses a plural
    name (``prompts``, ``completions``, ``answers``, ``infos``, ``states``, ``tasks``) and
    returns one score per member. ``R = Σ_k w_k R_k`` over the functions that returned a value;
    when every function with a non-zero weight returns ``None`` the trajectory is *unscorable*
    (reward NaN, advantage 0). Weight 0 makes a function a logged metric only.

    Args:
        funcs: reward functions (synchronous).
        weights: one per function (default: all 1.0, TRL and verifiers).
        names: component names (default: each function's ``__name__``, deduplicated).

    Raises:
        ValueError: lengths disagree, no function has a non-zero weight, or a function asks
            for an argument the rubric cannot supply.
        TypeError: a function is a coroutine function.
    """

    def __init__(
        self,
        funcs: Sequence[Callable[..., Any]],
        weights: Sequence[float] | None = None,
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        funcs = list(funcs)
        if not funcs:
            raise ValueError("funcs must hold at least one reward function")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise ValueError(
                f"weights must have {len(funcs)} entries (one per function), got {len(weights)}"
            )
        if not any(w != 0 for w in weights):
            raise ValueError("at least one reward function needs a non-zero weight")
        if names is None:
            names = []
            for f in funcs:
                base = _func_name(f)
                name, i = base, 1
                while name in names:
                    i += 1
                    name = f"{base}_{i}"
                names.append(name)
        elif len(names) != len(funcs) or len(set(names)) != len(names):
            raise ValueError(f"names must be {len(funcs)} distinct strings, got {list(names)}")
        self.funcs = funcs
        self.weights = weights
        self.names = list(names)
        self._kinds = [self._inspect(f, n) for f, n in zip(funcs, self.names, strict=True)]

    @staticmethod
    def _inspect(func: Callable[..., Any], name: str) -> tuple[bool, tuple[str, ...], bool]:
        """(is_group, requested argument names, takes **kwargs) of a reward function."""
        if inspect.iscoroutinefunction(func):
            raise TypeError(f"reward function {name} is async; Rubric takes synchronous functions")
        params = inspect.signature(func).parameters.values()
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        wanted = tuple(
            p.name
            for p in params
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        )
        is_group = any(a in _PLURAL for a in wanted)
        known = set(_PLURAL) | {"completion_ids", "prompt_ids"} if is_group else set(_SINGULAR)
        for p in params:
            if p.name in wanted and p.name not in known and p.default is inspect.Parameter.empty:
                raise ValueError(
                    f"reward function {name} asks for {p.name!r}; available: "
                    f"{sorted(known)} (plural names make a group function)"
                )
        return is_group, wanted, var_kw

    @staticmethod
    def _fields(traj: Trajectory) -> dict[str, Any]:
        active = traj.completion_ids.tolist()
        return {
            "prompt": traj.task.prompt,
            "completion": traj.completion if traj.completion is not None else active,
            "answer": traj.task.answer,
            "info": traj.task.info,
            "state": traj.state,
            "task": traj.task,
            "prompt_ids": traj.prompt_ids.tolist(),
            "completion_ids": active,
        }

    def score_group(self, trajectories: Sequence[Trajectory]) -> list[float]:
        """Score every member; sets ``reward`` and ``reward_components`` on each trajectory.

        Returns:
            The rewards, NaN for unscorable trajectories.
        """
        rows = [self._fields(t) for t in trajectories]
        n = len(rows)
        per_func: list[list[float | None]] = []
        for func, name, (is_group, wanted, var_kw) in zip(
            self.funcs, self.names, self._kinds, strict=True
        ):
            if is_group:
                cols = {p: [r[s] for r in rows] for p, s in _PLURAL.items()}
                cols["prompt_ids"] = [r["prompt_ids"] for r in rows]
                cols["completion_ids"] = [r["completion_ids"] for r in rows]
                args = cols if var_kw else {k: v for k, v in cols.items() if k in wanted}
                out = func(**args)
                if out is None or len(out) != n:
                    raise ValueError(
                        f"group reward function {name} must return {n} scores, got {out!r}"
                    )
                per_func.append([_as_score(v, name) for v in out])
            else:
                vals = []
                for r in rows:
                    args = r if var_kw else {k: v for k, v in r.items() if k in wanted}
                    vals.append(_as_score(func(**args), name))
                per_func.append(vals)
        rewards: list[float] = []
        for i, traj in enumerate(trajectories):
            total, scored = 0.0, False
            comps: dict[str, float] = {}
            for name, w, vals in zip(self.names, self.weights, per_func, strict=True):
                v = vals[i]
                comps[name] = math.nan if v is None else v
                if v is not None and w != 0:
                    total += w * v
                    scored = True
            traj.reward = total if scored else math.nan
            traj.reward_components = comps
            rewards.append(traj.reward)
        return rewards

    @classmethod
    def from_trl(
        cls, funcs: Sequence[Callable[..., Any]], weights: Sequence[float] | None = None
    ) -> Rubric:
        """Accept TRL-style functions ``f(prompts, completions, completion_ids, **columns)``.

        Each is called once per group with lists; the columns are ``answer`` and every key of
        the tasks' ``info`` dicts (TRL passes the dataset's extra columns the same way). It
        returns ``list[float | None]``.
        """
        wrapped = []
        for f in funcs:

            def group_fn(
                tasks: list[Task],
                completions: list[Any],
                completion_ids: list[list[int]],
                _f: Callable[..., Any] = f,
            ) -> Any:
                columns: dict[str, list[Any]] = {"answer": [t.answer for t in tasks]}
                for key in sorted({k for t in tasks for k in t.info}):
                    columns[key] = [t.info.get(key) for t in tasks]
                prompts = [t.prompt for t in tasks]
                return _f(prompts, completions, completion_ids, **columns)

            group_fn.__name__ = _func_name(f)
            wrapped.append(group_fn)
        return cls(wrapped, weights)


def _to_ids(prompt: Any, encode: Encode | None) -> Tensor:
    if isinstance(prompt, Tensor):
        return prompt.long().reshape(-1)
    if isinstance(prompt, list | tuple) and all(isinstance(x, int) for x in prompt):
        return torch.tensor(list(prompt), dtype=torch.long)
    if encode is None:
        raise ValueError(
            f"prompt {prompt!r} is not token ids; give the environment an encode= function"
        )
    return torch.tensor(list(encode(prompt)), dtype=torch.long)


class Environment(abc.ABC):
    """A source of tasks plus the rollout logic and the rubric that scores it.

    Subclasses implement ``dataset`` and ``rollout`` and set ``rubric``. ``rollout_group``
    samples the G members of one group and scores them together; ``run_group`` is its
    synchronous form for worker threads.

    Args:
        rubric: scores trajectories.
        encode: text (or messages) → token ids, for environments whose prompts are text.
        decode: token ids → text handed to reward functions as ``completion``.
    """

    #: Tokens that end a completion; None: the policy's end-of-sequence token.
    stop_ids: tuple[int, ...] | None = None

    def __init__(
        self, rubric: Rubric, *, encode: Encode | None = None, decode: Decode | None = None
    ) -> None:
        self.rubric = rubric
        self.encode = encode
        self.decode = decode

    @abc.abstractmethod
    def dataset(self, split: str = "train") -> Sequence[Task]:
        """The tasks of ``split``."""

    @abc.abstractmethod
    async def rollout(
        self, client: SamplingClient, task: Task, sampling: SamplingArgs
    ) -> Trajectory:
        """Run one rollout of ``task`` (unscored)."""

    async def rollout_group(
        self, client: SamplingClient, task: Task, n: int, sampling: SamplingArgs
    ) -> list[Trajectory]:
        """``n`` rollouts of one task, scored as a group. Sequential: an environment may hold
        one mutable simulator (``GymAdapter``)."""
        check_int("n", n, 1)
        group = [await self.rollout(client, task, sampling) for _ in range(n)]
        self.rubric.score_group(group)
        return group

    def run_group(
        self, client: SamplingClient, task: Task, n: int, sampling: SamplingArgs
    ) -> list[Trajectory]:
        """Synchronous ``rollout_group`` (runs its own event loop; inside a running loop use
        ``await env.rollout_group(...)``)."""
        return asyncio.run(self.rollout_group(client, task, n, sampling))

    def sample_groups(
        self,
        client: SamplingClient,
        n_groups: int,
        group_size: int,
        sampling: SamplingArgs,
        generator: torch.Generator,
    ) -> list[list[Trajectory]]:
        """``n_groups`` scored groups of ``group_size`` rollouts, tasks drawn uniformly.

        What a rollout worker calls once per step. The default draws each task from
        ``dataset("train")`` with ``generator`` and runs :meth:`run_group`; an environment with
        a cheaper batched path (``DigitSumEnv``: one sampling call for every group) overrides it.
        """
        check_int("n_groups", n_groups, 1)
        tasks = self.dataset("train")
        out = []
        for _ in range(n_groups):
            task = tasks[int(torch.randint(0, len(tasks), (), generator=generator))]
            out.append(self.run_group(client, task, group_size, sampling))
        return out

    def _completion_view(self, ids: Tensor) -> Any:
        return self.decode(ids.tolist()) if self.decode is not None else ids.tolist()


class _TaskListEnv(Environment):
    """An environment whose dataset is a fixed list of tasks, or ``{split: tasks}``."""

    def __init__(
        self,
        dataset: Sequence[Task] | Mapping[str, Sequence[Task]],
        rubric: Rubric,
        *,
        encode: Encode | None = None,
        decode: Decode | None = None,
    ) -> None:
        super().__init__(rubric, encode=encode, decode=decode)
        self._splits = dict(dataset) if isinstance(dataset, Mapping) else {"train": list(dataset)}

    def dataset(self, split: str = "train") -> Sequence[Task]:
        """The tasks of ``split`` (``ValueError`` naming the known splits otherwise)."""
        if split not in self._splits:
            raise ValueError(f"split must be in {sorted(self._splits)}, got {split!r}")
        return self._splits[split]


class SingleTurnEnv(_TaskListEnv):
    """One model turn per task; the default environment.

    Args:
        dataset: the tasks, or ``{split: tasks}``.
        rubric: scores the completions.
        encode / decode: text codec (see ``Environment``).
    """

    def _trajectories(
        self,
        task: Task,
        prompt_ids: Tensor,
        ids: Tensor,
        logp: Tensor,
        truncated: Tensor,
        stop_ids: Sequence[int],
    ) -> list[Trajectory]:
        out = []
        stops = torch.tensor(list(stop_ids), dtype=torch.long)
        for row, lp, trunc in zip(ids, logp, truncated, strict=True):
            hit = torch.isin(row, stops).nonzero()
            length = int(hit[0]) + 1 if len(hit) else row.numel()  # keep the stop token
            comp = row[:length].clone()
            out.append(
                Trajectory(
                    task=task,
                    prompt_ids=prompt_ids,
                    completion_ids=comp,
                    behavior_logprobs=lp[:length].clone(),
                    loss_mask=torch.ones(length, dtype=torch.bool),
                    truncated=bool(trunc),
                    completion=self._completion_view(comp),
                )
            )
        return out

    async def rollout(
        self, client: SamplingClient, task: Task, sampling: SamplingArgs
    ) -> Trajectory:
        """Sample one completion of ``task``."""
        return (await self._sample(client, task, 1, sampling))[0]

    async def rollout_group(
        self, client: SamplingClient, task: Task, n: int, sampling: SamplingArgs
    ) -> list[Trajectory]:
        """All ``n`` members in one batched ``client.sample`` call, then ``score_group``."""
        check_int("n", n, 1)
        group = await self._sample(client, task, n, sampling)
        self.rubric.score_group(group)
        return group

    async def _sample(
        self, client: SamplingClient, task: Task, n: int, sampling: SamplingArgs
    ) -> list[Trajectory]:
        prompt_ids = _to_ids(task.prompt, self.encode)
        ids, logp, truncated = client.sample(
            prompt_ids, n, sampling.max_new_tokens, sampling.temperature, sampling.stop_ids
        )
        return self._trajectories(task, prompt_ids, ids, logp, truncated, sampling.stop_ids)


class MultiTurnEnv(_TaskListEnv):
    """Alternating model turns and environment responses (as verifiers' MultiTurnEnv).

    The rollout keeps a token context (prompt, then every turn). A model turn is sampled from the
    whole context; its tokens get loss mask 1. ``env_response`` returns new messages (dicts with
    ``role`` and ``content``, optionally ``ids``); their tokens get mask 0 and log-prob 0. The
    rollout ends when ``is_completed`` says so, after ``max_turns`` model turns, or when the next
    turn would not fit in ``max_context`` tokens (then ``truncated``). ``completion`` handed to the
    rubric is the list of messages after the prompt.

    Args:
        dataset: the tasks, or ``{split: tasks}``.
        rubric: scores trajectories (reward functions may read ``state``).
        encode / decode: text codec for prompts and env messages given as text.
        max_turns: most model turns (default: 4).
        max_context: most tokens of prompt + completion (default: no limit).
    """

    def __init__(
        self,
        dataset: Sequence[Task] | Mapping[str, Sequence[Task]],
        rubric: Rubric,
        *,
        encode: Encode | None = None,
        decode: Decode | None = None,
        max_turns: int = 4,
        max_context: int | None = None,
    ) -> None:
        super().__init__(dataset, rubric, encode=encode, decode=decode)
        self.max_turns = check_int("max_turns", max_turns, 1)
        self.max_context = None if max_context is None else check_int("max_context", max_context, 2)

    async def setup_state(self, task: Task, state: dict[str, Any]) -> dict[str, Any]:
        """Hook before the first turn; may set ``state["prompt"]`` (default: ``task.prompt``)."""
        return state

    @abc.abstractmethod
    async def env_response(
        self, messages: list[dict[str, Any]], state: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """New environment messages after a model turn, and the updated state."""

    async def is_completed(self, messages: list[dict[str, Any]], state: dict[str, Any]) -> bool:
        """Stop condition checked after each model turn and each env response (default:
        ``max_turns`` model turns done, or ``state["error"]`` set)."""
        return state["turn"] >= self.max_turns or "error" in state

    def _msg_ids(self, msg: dict[str, Any]) -> Tensor:
        if "ids" in msg:
            return torch.as_tensor(msg["ids"], dtype=torch.long).reshape(-1)
        return _to_ids(msg["content"], self.encode)

    async def rollout(
        self, client: SamplingClient, task: Task, sampling: SamplingArgs
    ) -> Trajectory:
        """Run turns until completion; env tokens are masked out of the loss."""
        state: dict[str, Any] = await self.setup_state(task, {"turn": 0})
        prompt = state.get("prompt", task.prompt)
        prompt_ids = _to_ids(prompt, self.encode)
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
        context = prompt_ids
        ids_parts: list[Tensor] = []
        lp_parts: list[Tensor] = []
        mask_parts: list[Tensor] = []
        truncated = False
        while True:
            if (
                self.max_context is not None
                and context.numel() + sampling.max_new_tokens > self.max_context
            ):
                truncated = True
                break
            ids, logp, trunc = client.sample(
                context, 1, sampling.max_new_tokens, sampling.temperature, sampling.stop_ids
            )
            keep = ids[0]
            if sampling.stop_ids:
                hit = torch.isin(keep, torch.tensor(list(sampling.stop_ids))).nonzero()
                keep = keep[: int(hit[0]) + 1] if len(hit) else keep
            n_tok = keep.numel()
            ids_parts.append(keep)
            lp_parts.append(logp[0, :n_tok])
            mask_parts.append(torch.ones(n_tok, dtype=torch.bool))
            context = torch.cat([context, keep])
            messages.append(
                {"role": "assistant", "content": self._completion_view(keep), "ids": keep}
            )
            state["turn"] += 1
            truncated = bool(trunc[0])
            if await self.is_completed(messages, state):
                break
            new_msgs, state = await self.env_response(messages, state)
            for msg in new_msgs:
                env_ids = self._msg_ids(msg)
                ids_parts.append(env_ids)
                lp_parts.append(torch.zeros(env_ids.numel(), dtype=logp.dtype))
                mask_parts.append(torch.zeros(env_ids.numel(), dtype=torch.bool))
                context = torch.cat([context, env_ids])
                messages.append(msg)
            if await self.is_completed(messages, state):
                break
        empty = torch.zeros(0, dtype=torch.long)
        return Trajectory(
            task=task,
            prompt_ids=prompt_ids,
            completion_ids=torch.cat(ids_parts) if ids_parts else empty,
            behavior_logprobs=torch.cat(lp_parts) if lp_parts else torch.zeros(0),
            loss_mask=torch.cat(mask_parts) if mask_parts else empty.bool(),
            truncated=truncated,
            completion=messages[1:],
            state=state,
        )


def _episode_reward(state: dict[str, Any]) -> float:
    """Episodic return of a gym episode (sum of step rewards)."""
    return float(state["episode_reward"])


class GymAdapter(MultiTurnEnv):
    """Any gymnasium-style environment as a ``MultiTurnEnv`` (verifiers ``GymEnv``, PR #548).

    Duck-typed: ``env.reset(seed=s) -> (obs, info)`` and ``env.step(action) -> (obs, reward,
    terminated, truncated, info)``; ``gymnasium`` itself is never imported. Each task is one
    episode seed. The prompt is ``obs_to_text(obs)`` of the reset observation; each model turn
    is decoded and turned into an action by ``parse_action`` (a ``ValueError`` from it ends the
    episode with ``state["error"]``); the next observation is the env message (mask 0). The
    trajectory reward is the episodic sum of step rewards (the rubric's ``episode_reward``).

    Args:
        env: the gym-style environment (one episode at a time).
        obs_to_text: observation → prompt/message text.
        parse_action: decoded model turn → action.
        encode / decode: text codec of the policy.
        seeds: episode seeds, one task each (default: 0..99).
        max_steps: most env steps per episode (= ``max_turns``; default: 16).
        max_context: most tokens of one episode (default: no limit).
    """

    def __init__(
        self,
        env: Any,
        obs_to_text: Callable[[Any], Any],
        parse_action: Callable[[Any], Any],
        *,
        encode: Encode,
        decode: Decode,
        seeds: Sequence[int] = tuple(range(100)),
        max_steps: int = 16,
        max_context: int | None = None,
    ) -> None:
        for attr in ("reset", "step"):
            if not callable(getattr(env, attr, None)):
                raise TypeError(f"env must have a callable {attr}() (gymnasium API), got {env!r}")
        tasks = [Task(prompt=None, info={"seed": int(s)}, task_id=int(s)) for s in seeds]
        super().__init__(
            tasks,
            Rubric([_episode_reward]),
            encode=encode,
            decode=decode,
            max_turns=max_steps,
            max_context=max_context,
        )
        self.env = env
        self.obs_to_text = obs_to_text
        self.parse_action = parse_action

    async def setup_state(self, task: Task, state: dict[str, Any]) -> dict[str, Any]:
        """Reset the episode with the task's seed; the first observation is the prompt."""
        obs, _info = self.env.reset(seed=task.info["seed"])
        state.update(episode_reward=0.0, steps=0, terminated=False, env_truncated=False)
        state["prompt"] = self.obs_to_text(obs)
        return state

    async def env_response(
        self, messages: list[dict[str, Any]], state: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Step the env with the parsed action; the next observation is the new message."""
        try:
            action = self.parse_action(messages[-1]["content"])
        except ValueError as err:
            state["error"] = str(err)
            return [], state
        obs, reward, terminated, truncated, _info = self.env.step(action)
        state["episode_reward"] += float(reward)
        state["steps"] += 1
        state["terminated"] = bool(terminated)
        state["env_truncated"] = bool(truncated)
        if terminated or truncated:
            return [], state
        return [{"role": "user", "content": self.obs_to_text(obs)}], state

    async def is_completed(self, messages: list[dict[str, Any]], state: dict[str, Any]) -> bool:
        """Done when the episode terminated or was truncated, or at ``max_steps``."""
        if state.get("terminated") or state.get("env_truncated") or "error" in state:
            return True
        # A model turn was just taken and the env has not stepped yet: let it step first.
        if messages[-1]["role"] == "assistant":
            return False
        return state["steps"] >= self.max_turns
