"""The one finiteness check every optimizer runs on what it is about to send (STYLE.md §3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__: list[str] = []


def first_nonfinite(
    param_groups: Sequence[dict[str, Any]],
    parts: Sequence[tuple[int, Sequence[torch.Tensor], Sequence[torch.Tensor]]],
) -> tuple[int, int] | None:
    """``(group index, param index)`` of the first non-finite outgoing tensor, or None.

    ``parts`` are ``(group index, params, outgoing tensors)``. One fused reduction decides the
    common case; the per-tensor search runs only when something is non-finite.
    """
    outgoing = [t for _, _, ts in parts for t in ts]
    if not outgoing or bool(torch.stack([torch.isfinite(t).all() for t in outgoing]).all()):
        return None
    for gi, ps, ts in parts:
        for p, t in zip(ps, ts, strict=True):
            if not bool(torch.isfinite(t).all()):
                return gi, next(j for j, q in enumerate(param_groups[gi]["params"]) if q is p)
    return None
