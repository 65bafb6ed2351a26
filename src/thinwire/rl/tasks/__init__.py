"""Built-in environments for thinwire.rl: ``DigitSumEnv``."""

from __future__ import annotations

from thinwire.rl.tasks.digit_sum import (
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
    "Prompt",
    "count_solutions",
]
