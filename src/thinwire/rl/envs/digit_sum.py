"""DigitSum: a CPU-trainable GRPO task with an exact reward.

The prompt ``<bos> d_tens d_ones =`` gives a target T; the policy answers with exactly K = 3
tokens and earns 1.0 when all three are digits summing to T. Many answers are correct (15 to 75
per target for T in [4, 23]), so there is no supervised target and no warm start is needed.
A uniform policy over the 14 tokens scores exactly (10/14)^3 × 0.048 = 0.017493.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from thinwire._validate import check_int
from thinwire.rl import Policy
from thinwire.rl.envs.base import Rubric, SingleTurnEnv, Task, Trajectory
from thinwire.rl.policies import SamplingArgs, SamplingClient, greedy_decode

__all__ = [
    "PAD",
    "EQ",
    "BOS",
    "EOS",
    "VOCAB_SIZE",
    "PROMPT_LEN",
    "Prompt",
    "DigitSumEnv",
    "count_solutions",
]

# Token ids: digits 0-9 are ids 0-9.
PAD = 10
EQ = 11
BOS = 12
EOS = 13
VOCAB_SIZE = 14
PROMPT_LEN = 4  # <bos> d_tens d_ones =


def count_solutions(target: int, k: int = 3) -> int:
    """Number of digit k-tuples summing to ``target`` (15 to 75 for T in [4, 23], k = 3)."""
    return sum(1 for digits in itertools.product(range(10), repeat=k) if sum(digits) == target)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One DigitSum prompt: ``ids`` = ``[BOS, T // 10, T % 10, EQ]`` (LongTensor [4]), ``target`` T."""

    ids: Tensor
    target: int

    @property
    def prompt_id(self) -> int:
        """Stable id of the prompt (its target)."""
        return self.target


class DigitSumEnv(SingleTurnEnv):
    """The built-in reference environment (the task in this module's docstring).

    Use it directly (``sample_prompts`` + ``thinwire.rl.policies.sample`` + ``reward``) or as a
    ``SingleTurnEnv`` (``dataset``, ``rollout_group``, ``rubric``; tasks carry the prompt ids and
    the target as ``answer``).

    Args:
        t_min / t_max: targets are uniform on {t_min, …, t_max} (default: 4 and 23; the full
            range 0–27 is the documented zero-variance-group failure variant).
        k: completion length K (default: 3).
        seed: seed of the generator ``sample_prompts`` uses when none is passed (default: 0).

    Raises:
        ValueError: an empty or unreachable target range (targets must be two-digit sums of k
            digits: 0 ≤ t_min ≤ t_max ≤ min(9k, 99)).
    """

    stop_ids: tuple[int, ...] | None = ()  # exactly K tokens, no stop token

    def __init__(self, t_min: int = 4, t_max: int = 23, k: int = 3, seed: int = 0) -> None:
        check_int("k", k, 1)
        hi = min(9 * k, 99)  # k digits sum to at most 9k; the prompt writes T with two digits
        check_int("t_min", t_min, 0, hi)
        check_int("t_max", t_max, t_min, hi)
        check_int("seed", seed, 0)
        self.t_min = t_min
        self.t_max = t_max
        self.k = k
        self.generator = torch.Generator().manual_seed(seed)
        tasks = [
            Task(prompt=self.prompt_ids(t), answer=t, task_id=t) for t in range(t_min, t_max + 1)
        ]
        super().__init__(
            {"train": tasks, "test": tasks}, Rubric([self._rubric_reward], names=["digit_sum"])
        )

    @property
    def targets(self) -> list[int]:
        """Every target, in order."""
        return list(range(self.t_min, self.t_max + 1))

    @property
    def sampling_args(self) -> SamplingArgs:
        """Exactly K tokens at temperature 1.0, no stop token."""
        return SamplingArgs(max_new_tokens=self.k, temperature=1.0, stop_ids=())

    @staticmethod
    def prompt_ids(target: int) -> Tensor:
        """``[BOS, T // 10, T % 10, EQ]`` as a LongTensor [4]."""
        return torch.tensor([BOS, target // 10, target % 10, EQ], dtype=torch.long)

    def sample_prompts(self, n: int, generator: torch.Generator | None = None) -> list[Prompt]:
        """``n`` prompts with targets uniform on {t_min, …, t_max}.

        Args:
            n: number of prompts (≥ 1).
            generator: randomness source (default: the environment's own, seeded by ``seed``).
        """
        check_int("n", n, 1)
        gen = self.generator if generator is None else generator
        targets = torch.randint(self.t_min, self.t_max + 1, (n,), generator=gen)
        ids = torch.stack(
            [
                torch.full_like(targets, BOS),
                targets // 10,
                targets % 10,
                torch.full_like(targets, EQ),
            ],
            dim=1,
        )  # [n, 4]
        return [Prompt(row, t) for row, t in zip(ids.unbind(0), targets.tolist(), strict=True)]

    def reward(self, prompt: Prompt | int, completion_ids: Tensor | Sequence[int]) -> float:
        """1.0 if the completion is exactly K digits summing to the target, else 0.0.

        Args:
            prompt: a ``Prompt`` or the target itself.
            completion_ids: the K completion tokens.
        """
        target = prompt.target if isinstance(prompt, Prompt) else int(prompt)
        toks = (
            completion_ids.tolist() if isinstance(completion_ids, Tensor) else list(completion_ids)
        )
        ok = len(toks) == self.k and all(0 <= t <= 9 for t in toks) and sum(toks) == target
        return 1.0 if ok else 0.0

    def rewards(self, targets: Tensor, completion_ids: Tensor) -> Tensor:
        """Vectorised ``reward``: ``targets [B]``, ``completion_ids [B, K]`` → float ``[B]``."""
        if completion_ids.dim() != 2 or completion_ids.shape[1] != self.k:
            raise ValueError(
                f"completion_ids must have shape [B, {self.k}], got {tuple(completion_ids.shape)}"
            )
        digits = (completion_ids >= 0) & (completion_ids <= 9)
        ok = digits.all(dim=1) & (completion_ids.sum(dim=1) == targets)
        return ok.to(torch.get_default_dtype())

    def sample_groups(
        self,
        client: SamplingClient,
        n_groups: int,
        group_size: int,
        sampling: SamplingArgs,
        generator: torch.Generator,
    ) -> list[list[Trajectory]]:
        """Batched :meth:`Environment.sample_groups`: one ``client.sample`` call for all groups.

        Prompts come from :meth:`sample_prompts` with ``generator``; rewards from the
        vectorised :meth:`rewards` (the rubric's ``digit_sum`` component).
        """
        check_int("n_groups", n_groups, 1)
        prompts = self.sample_prompts(n_groups, generator)
        ids, logp, truncated = client.sample(
            torch.stack([p.ids for p in prompts]), group_size, sampling.max_new_tokens,
            sampling.temperature, sampling.stop_ids,
        )  # fmt: skip
        targets = torch.tensor([p.target for p in prompts]).repeat_interleave(group_size)
        rewards = self.rewards(targets, ids).tolist()
        tasks = {t.answer: t for t in self.dataset("train")}
        mask = torch.ones(ids.shape[1], dtype=torch.bool)
        out: list[list[Trajectory]] = []
        for gi, p in enumerate(prompts):
            group = []
            for row in range(gi * group_size, (gi + 1) * group_size):
                r = float(rewards[row])
                group.append(Trajectory(
                    task=tasks[p.target], prompt_ids=p.ids, completion_ids=ids[row],
                    behavior_logprobs=logp[row], loss_mask=mask, truncated=bool(truncated[row]),
                    reward=r, reward_components={"digit_sum": r},
                ))  # fmt: skip
            out.append(group)
        return out

    def _rubric_reward(self, completion_ids: list[int], answer: Any) -> float:
        return self.reward(int(answer), completion_ids)

    def uniform_baseline(self) -> float:
        """Exact expected reward of a uniform policy over the 14 tokens.

        ``(10/14)^k`` (all k tokens are digits) times the mean over targets of
        ``count_solutions(T) / 10^k``; 0.017493 for the defaults.
        """
        mean_frac = Fraction(
            sum(count_solutions(t, self.k) for t in self.targets), len(self.targets) * 10**self.k
        )
        return float(Fraction(10, VOCAB_SIZE) ** self.k * mean_frac)

    @torch.no_grad()
    def greedy_accuracy(self, policy: Policy) -> int:
        """How many targets the policy's greedy answer solves (the end-to-end tests ask ≥ 17/20)."""
        targets = torch.tensor(self.targets)
        prompts = torch.stack([self.prompt_ids(int(t)) for t in targets])
        answers = greedy_decode(policy, prompts, self.k)
        return int(self.rewards(targets, answers).sum().item())
