"""Environments around the GRPO core: verifiers-style environments, rubrics, and DigitSum.

* :class:`Task`, :class:`Trajectory`; :class:`Rubric` (weighted reward functions that ask for
  what they need by name; TRL-style functions through :meth:`Rubric.from_trl`);
* :class:`Environment`, :class:`SingleTurnEnv`, :class:`MultiTurnEnv`, :class:`GymAdapter`;
* :class:`DigitSumEnv`: the built-in CPU task with an exact reward (three digits summing to a
  target; a uniform policy scores 0.017493).

This package reaches the core only through :mod:`thinwire.rl`'s public names.
"""

from __future__ import annotations

from thinwire.rl.envs.base import (
    Environment,
    GymAdapter,
    MultiTurnEnv,
    Rubric,
    SingleTurnEnv,
    Task,
    Trajectory,
)
from thinwire.rl.envs.digit_sum import (
    BOS,
    EOS,
    EQ,
    PAD,
    PROMPT_LEN,
    VOCAB_SIZE,
    DigitSumEnv,
    Prompt,
    count_solutions,
)

__all__ = [
    "BOS",
    "EOS",
    "EQ",
    "PAD",
    "PROMPT_LEN",
    "VOCAB_SIZE",
    "DigitSumEnv",
    "Environment",
    "GymAdapter",
    "MultiTurnEnv",
    "Prompt",
    "Rubric",
    "SingleTurnEnv",
    "Task",
    "Trajectory",
    "count_solutions",
]
