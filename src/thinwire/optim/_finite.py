"""Finiteness: the one check every optimizer runs on what it is about to send, and AMP's skips."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from thinwire.optim._state import local

__all__: list[str] = []


def first_nonfinite(
    param_groups: Sequence[dict[str, Any]],
    parts: Sequence[tuple[int, Sequence[torch.Tensor], Sequence[torch.Tensor]]],
) -> tuple[int, int] | None:
    """``(group index, param index)`` of the first non-finite outgoing tensor, or None.

    ``parts`` are ``(group index, params, outgoing tensors)``. One fused reduction decides the
    common case; the per-tensor search runs only when something is non-finite. A sharded
    (DTensor) tensor is checked on this rank's shard, which is what this rank sends: no
    collective over its mesh.
    """
    outgoing = [local(t) for _, _, ts in parts for t in ts]
    if not outgoing or bool(torch.stack([torch.isfinite(t).all() for t in outgoing]).all()):
        return None
    for gi, ps, ts in parts:
        for p, t in zip(ps, ts, strict=True):
            if not bool(torch.isfinite(local(t)).all()):
                return gi, next(j for j, q in enumerate(param_groups[gi]["params"]) if q is p)
    return None


def amp_step_skipped(opt: Optimizer) -> bool:
    """Whether ``torch.amp.GradScaler`` found inf/NaN gradients for this ``step()``.

    thinwire optimizers set ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` calls
    ``opt.step()`` on every iteration, with ``opt.found_inf`` (non-zero: skip the update) and
    ``opt.grad_scale`` (the scale the gradients still carry, or None once ``scaler.unscale_``
    ran) set for the call (``torch/amp/grad_scaler.py``, ``GradScaler.step``). A plain scaler
    would skip ``opt.step()`` instead, and a rank that skipped would fall a step behind the
    others' collective schedule. When the step is not skipped, the gradients are unscaled
    here with the operation ``GradScaler.unscale_`` uses, so the update equals the unscaled
    one bit for bit. Without a scaler this returns False and touches nothing.
    """
    found_inf = getattr(opt, "found_inf", None)
    if found_inf is None:
        return False
    if bool(found_inf.item()):
        return True
    scale = getattr(opt, "grad_scale", None)
    if scale is not None:
        inv = scale.double().reciprocal().float()
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for (device, _), grads in groups.items():
            dummy = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, dummy, inv.to(device))
    return False
