"""Fixtures and settings shared by the RL pipeline and learner tests."""

from __future__ import annotations

import pytest
import torch

from thinwire.rl.config import GRPOConfig

P = 69_390  # TinyCausalLM parameters at its defaults


@pytest.fixture(autouse=True)
def _one_thread():
    # a 69k-parameter model gains nothing from intra-op threads on a shared 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cfg(**kw):
    base = dict(
        group_size=4,
        prompts_per_step=4,
        max_completion_length=3,
        epsilon_high=0.28,
        max_staleness=0,
        beta=0.0,  # the oracles below are written without the KL term
    )
    return GRPOConfig(**{**base, **kw})
