"""The method table: every training method thinwire compares, and the one factory that builds it.

A :class:`Method` is a name, the optimizer class it builds and its settings; :data:`METHODS`
lists them all, the plain data-parallel baseline (:class:`~thinwire.optim.DataParallel`)
included, and :func:`build_optimizer` builds any of them on a model's parameters. The
benchmark (``thinwire bench``), the RL learners (:mod:`thinwire.rl`) and the examples take
their optimizers from here, so a method means the same optimizer everywhere; a caller changes
settings through ``overrides`` (the RL layer, for instance, uses Adam as the inner optimizer and
outer learning rate 1 with momentum 0), never through a factory of its own.

The settings of the language-model methods were chosen by ``benchmarks/sweep.py`` on the
benchmark's built-in task (its table is in ``benchmarks/RESULTS.md``); ``diloco-2bit`` was chosen
by the GRPO sweep of ``benchmarks/grpo.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from thinwire._validate import check_int, check_type
from thinwire.collectives import Communicator
from thinwire.optim.data_parallel import DataParallel
from thinwire.optim.demo import DeMo
from thinwire.optim.diloco import DiLoCo
from thinwire.optim.sparseloco import SparseLoCo
from thinwire.optim.streaming import StreamingDiLoCo

__all__ = [
    "DEFAULT_METHODS",
    "INNER_LR",
    "METHODS",
    "Method",
    "MethodKind",
    "build_optimizer",
    "inner_adamw",
]

# Inner AdamW of every method (and of DataParallel): betas and weight decay of the DiLoCo and
# SparseLoCo reference training scripts (OpenDiLoCo, tplr-ai/SparseLoCo); lr from the sweep on
# the benchmark's built-in task.
INNER_LR = 3e-3
INNER_BETAS = (0.9, 0.95)
INNER_WD = 0.1

MethodKind = Literal["ddp", "outer", "demo"]


def inner_adamw(lr: float = INNER_LR) -> Callable[..., Optimizer]:
    """Factory ``param_groups -> AdamW`` of the inner optimizer every method uses by default."""
    return partial(torch.optim.AdamW, lr=lr, betas=INNER_BETAS, weight_decay=INNER_WD)


@dataclass(frozen=True)
class Method:
    """One method of the table.

    Attributes:
        name: the name used on command lines and in reports.
        kind: what crosses the wire: ``"ddp"`` (gradients every step), ``"outer"`` (the
            DiLoCo family: a pseudo-gradient every ``sync_every`` steps; evaluate with the
            optimizer's ``global_params()``) or ``"demo"`` (DeMo's components every step).
        optimizer: the optimizer class.
        description: one line for help texts and reports.
        settings: keyword arguments of ``optimizer`` (``lr`` of DeMo included).
    """

    name: str
    kind: MethodKind
    optimizer: type[Optimizer]
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)


_INT4 = {"compressor": "quant(int4, block=128)", "error_feedback": True}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ddp", "ddp", DataParallel, "AdamW, fp32 gradients ring all-reduced every step"),
        Method(
            "diloco-fp32",
            "outer",
            DiLoCo,
            "DiLoCo, fp32 pseudo-gradients (ring all-reduce)",
            {"compressor": None},
        ),
        Method(
            "diloco-int8",
            "outer",
            DiLoCo,
            "DiLoCo, int8 blockwise (256) pseudo-gradients, error feedback",
            {"compressor": "quant(int8, block=256)", "error_feedback": True},
        ),
        Method(
            "diloco-int4",
            "outer",
            DiLoCo,
            "DiLoCo, int4 blockwise (128) pseudo-gradients, error feedback",
            _INT4,
        ),
        Method(
            "diloco-2bit",
            "outer",
            DiLoCo,
            "DiLoCo, 2-bit centroid pseudo-gradients, error feedback",
            {"compressor": "quant(2bit)", "error_feedback": True},
        ),
        Method(
            "streaming-diloco",
            "outer",
            StreamingDiLoCo,
            "Streaming DiLoCo, 4 fragments, overlap 4, alpha 0.5, int4",
            {
                **_INT4,
                "fragments": 4,
                # tau = H/P - 1: each event is latency-bound on home broadband (~0.2 s) while a
                # tiny-model step takes ~60 ms; measured exposed comm 7.4 s (tau 1) vs 1.2 s
                # (tau 4) of ~13-19 s simulated, eval 1.0841 vs 1.0828 (4 inproc ranks, 200 steps).
                "overlap_steps": 4,
                "mix_alpha": 0.5,
            },
        ),
        Method(
            "demo",
            "demo",
            DeMo,
            "DeMo, k=32/4096 DCT, fp32 values",
            # lr from the sweep (final eval loss): 1e-3 1.551, 3e-3 1.104, 1e-2 1.210
            {"values": "float", "topk": 32, "lr": 3e-3},
        ),
        Method(
            "demo-sign",
            "demo",
            DeMo,
            "DeMo/DisTrO, k=8/4096 DCT, 1-bit values",
            {"values": "sign", "topk": 8, "lr": 3e-3},  # sweep: 1e-3 1.994, 3e-3 1.208, 1e-2 1.414
        ),
        Method(
            "sparseloco",
            "outer",
            SparseLoCo,
            "SparseLoCo, k=64/4096, 2-bit values, error feedback 0.95",
            {"topk": 64},
        ),
    )
}
#: The methods ``thinwire bench`` runs by default: the whole table.
DEFAULT_METHODS = tuple(METHODS)


def build_optimizer(
    method: Method | str,
    params: torch.nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    comm: Communicator | None = None,
    *,
    sync_every: int,
    inner: Callable[..., Optimizer] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Optimizer:
    """The optimizer of ``method`` over ``params`` (a module's parameters, or param groups).

    Args:
        method: a :class:`Method` or a name in :data:`METHODS`.
        params: a module (its ``parameters()``), parameters, or param-group dicts.
        comm: the workers' communicator (None: one worker).
        sync_every: *H*, inner steps between syncs of the DiLoCo family (ignored by ``ddp`` and
            DeMo, which sync every step), range [1, inf).
        inner: factory ``param_groups -> Optimizer`` of the inner optimizer (default:
            :func:`inner_adamw`); DeMo has none and ignores it.
        overrides: settings that replace the method's (a key the optimizer does not take
            raises ``TypeError``); ``inner_lr`` sets the default inner AdamW's learning rate.

    Raises:
        ValueError: an unknown method name (the message lists the table) or an invalid setting
            (the optimizer's own message).
    """
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be in {{{', '.join(METHODS)}}}, got {method!r}")
        method = METHODS[method]
    check_type("method", method, Method)
    check_int("sync_every", sync_every, 1)
    settings = dict(method.settings) | dict(overrides or {})
    inner_lr = settings.pop("inner_lr", None)
    if inner is None:
        inner = inner_adamw(INNER_LR if inner_lr is None else float(inner_lr))
    elif inner_lr is not None:
        raise ValueError(
            "overrides['inner_lr'] applies to the default inner AdamW: pass inner=None"
        )
    ps: list[Any] = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
    cls: Any = method.optimizer
    if cls is DataParallel:
        return DataParallel(ps, inner, comm=comm, **settings)
    if cls is DeMo:
        lr = settings.pop("lr")
        return DeMo(ps, lr, comm=comm, **settings)
    if cls is StreamingDiLoCo:
        # Overlap at most K - 1 = H/P - 1 steps, the schedule's limit, for short runs.
        k = sync_every // int(settings.get("fragments", 1))
        settings["overlap_steps"] = min(int(settings.get("overlap_steps", 0)), max(k - 1, 0))
    return cls(ps, inner, sync_every=sync_every, comm=comm, **settings)
