"""The methods the benchmark compares, with their tuned settings for the built-in task.

Each method is a name, a kind and a factory of its optimizer. ``ddp`` is the baseline: inner
AdamW with the gradients flattened into one fp32 buffer and ring all-reduced every step. The
settings below were chosen by ``benchmarks/sweep.py`` on the built-in task (its table is in
``benchmarks/RESULTS.md``); the same settings are used for every preset, seed and engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from thinwire.collectives import Communicator
from thinwire.optim import DeMo, DiLoCo, SparseLoCo, StreamingDiLoCo

__all__ = ["Method", "METHODS", "DEFAULT_METHODS", "build_optimizer", "inner_adamw"]

# Inner AdamW of every method (and DDP's optimizer): betas and weight decay of the DiLoCo /
# SparseLoCo reference training scripts (OpenDiLoCo, tplr-ai/SparseLoCo); lr from the sweep on
# the built-in task.
INNER_LR = 3e-3
INNER_BETAS = (0.9, 0.95)
INNER_WD = 0.1


def inner_adamw(lr: float = INNER_LR) -> Callable[..., torch.optim.Optimizer]:
    """Factory of the inner AdamW every method uses."""
    return partial(torch.optim.AdamW, lr=lr, betas=INNER_BETAS, weight_decay=INNER_WD)


@dataclass(frozen=True)
class Method:
    """One benchmark entry: ``kind`` is ``"ddp"``, ``"outer"`` (DiLoCo family) or ``"demo"``."""

    name: str
    kind: str
    description: str
    settings: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ddp", "ddp", "AdamW, fp32 gradients ring all-reduced every step"),
        Method(
            "diloco-fp32",
            "outer",
            "DiLoCo, fp32 pseudo-gradients (ring all-reduce)",
            {"compressor": None},
        ),
        Method(
            "diloco-int8",
            "outer",
            "DiLoCo, int8 blockwise (256) pseudo-gradients, error feedback",
            {"compressor": "quant(int8, block=256)", "error_feedback": True},
        ),
        Method(
            "diloco-int4",
            "outer",
            "DiLoCo, int4 blockwise (128) pseudo-gradients, error feedback",
            {"compressor": "quant(int4, block=128)", "error_feedback": True},
        ),
        Method(
            "streaming-diloco",
            "outer",
            "Streaming DiLoCo, 4 fragments, overlap 4, alpha 0.5, int4",
            {
                "streaming": True,
                "compressor": "quant(int4, block=128)",
                "error_feedback": True,
                "fragments": 4,
                # tau = H/P - 1: each event is latency-bound on home broadband (~0.2 s) while a
                # tiny-model step takes ~60 ms; measured exposed comm 7.4 s (tau 1) vs 1.2 s (tau 4)
                # of ~13-19 s simulated, eval 1.0841 vs 1.0828 (4 inproc ranks, 200 steps).
                "overlap_steps": 4,
                "mix_alpha": 0.5,
            },
        ),
        Method(
            "demo",
            "demo",
            "DeMo, k=32/4096 DCT, fp32 values",
            # lr from the sweep (final eval loss): 1e-3 1.551, 3e-3 1.104, 1e-2 1.210
            {"values": "float", "topk": 32, "lr": 3e-3},
        ),
        Method(
            "demo-sign",
            "demo",
            "DeMo/DisTrO, k=8/4096 DCT, 1-bit values",
            {"values": "sign", "topk": 8, "lr": 3e-3},  # sweep: 1e-3 1.994, 3e-3 1.208, 1e-2 1.414
        ),
        Method(
            "sparseloco",
            "outer",
            "SparseLoCo, k=64/4096, 2-bit values, error feedback 0.95",
            {"sparseloco": True, "topk": 64},
        ),
    )
}
DEFAULT_METHODS = tuple(METHODS)


def build_optimizer(
    method: Method,
    model: torch.nn.Module,
    comm: Communicator | None,
    *,
    inner_steps: int,
    overrides: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer of ``method`` on ``model``'s parameters, syncing every ``inner_steps``.

    ``overrides`` replaces entries of the method's settings (the sweep uses it); the key
    ``inner_lr`` sets the inner AdamW learning rate (DDP's learning rate for ``ddp``).
    """
    s = dict(method.settings) | dict(overrides or {})
    inner = inner_adamw(s.pop("inner_lr", INNER_LR))
    params = list(model.parameters())
    if method.kind == "ddp":
        return inner(params)
    if method.kind == "demo":
        return DeMo(params, s.pop("lr"), comm=comm, **s)
    if s.pop("sparseloco", False):
        return SparseLoCo(params, inner, sync_every=inner_steps, comm=comm, **s)
    if s.pop("streaming", False):
        # Overlap at most K - 1 = H/P - 1 steps (the schedule's limit) for short test runs.
        s["overlap_steps"] = min(s["overlap_steps"], inner_steps // s["fragments"] - 1)
        return StreamingDiLoCo(params, inner, sync_every=inner_steps, comm=comm, **s)
    return DiLoCo(params, inner, sync_every=inner_steps, comm=comm, **s)
