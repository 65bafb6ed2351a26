"""Robust aggregation rules: a peer that sends garbage or lies moves the average only a little.

Rules over the peers' decoded contributions (each the same shape, folded in rank order):

* ``"mean"`` — the plain mean (no protection; the default everywhere);
* ``"clip"`` — each peer's contribution is scaled down to at most ``max_norm`` in L2 norm, by
  default the median of the peers' norms (templar clips each peer to the median norm,
  ``specs/demo_sparseloco.md`` §3.4), then averaged. Cost: one norm per peer;
* ``"trimmed_mean"`` — per coordinate, drop the ``trim`` largest and smallest values and average
  the rest (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018, Alg. "trimmed mean").
  Cost: a sort over peers per coordinate, O(P log P · N), and all P contributions held at once;
* ``"median"`` — per-coordinate median (same paper; the mean of the two middle values for even
  P, which avoids the bias of always taking the lower one). Cost as trimmed mean.

Every rule is deterministic given the contributions in rank order, so all ranks agree bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from thinwire._validate import check_choice, check_float

__all__ = ["ROBUST_RULES", "clip_to_norm", "robust_mean", "clip_scales"]

ROBUST_RULES = ("mean", "clip", "trimmed_mean", "median")


def clip_scales(norms: Sequence[float], max_norm: float | None = None) -> list[float]:
    """Factor per peer that brings its norm to at most ``max_norm`` (default: the median norm)."""
    if not norms:
        return []
    if max_norm is None:
        max_norm = float(torch.tensor(list(norms), dtype=torch.float64).median())
    return [1.0 if n <= max_norm or n == 0 else max_norm / n for n in norms]


def clip_to_norm(
    contribs: Sequence[torch.Tensor], max_norm: float | None = None
) -> list[torch.Tensor]:
    """Each contribution scaled to L2 norm at most ``max_norm`` (default: the median norm)."""
    norms = [float(c.double().norm()) for c in contribs]
    return [
        c * s if s != 1.0 else c
        for c, s in zip(contribs, clip_scales(norms, max_norm), strict=True)
    ]


def robust_mean(
    contribs: Sequence[torch.Tensor],
    rule: str = "mean",
    *,
    trim_ratio: float = 0.25,
    max_norm: float | None = None,
) -> torch.Tensor:
    """Aggregate ``contribs`` (rank order, equal shapes) with ``rule``; float32 result.

    Args:
        contribs: the peers' decoded contributions.
        rule: one of :data:`ROBUST_RULES`.
        trim_ratio: for ``"trimmed_mean"``, the fraction of peers dropped at each end, range
            [0, 0.5); the count is ``floor(trim_ratio * P)``.
        max_norm: for ``"clip"``, the norm cap (default: the median of the peers' norms).

    Raises:
        ValueError: no contributions, unequal shapes or a bad setting.
    """
    check_choice("rule", rule, ROBUST_RULES)
    check_float("trim_ratio", trim_ratio, 0.0, 0.5, hi_open=True)
    if not contribs:
        raise ValueError("contribs must hold at least one tensor, got none")
    shape = contribs[0].shape
    if any(c.shape != shape for c in contribs):
        raise ValueError(f"contribs must share one shape, got {[tuple(c.shape) for c in contribs]}")
    xs = [c.to(torch.float32) for c in contribs]
    if rule == "clip":
        xs = clip_to_norm(xs, max_norm)
    if rule in ("mean", "clip"):
        acc = torch.zeros(shape, dtype=torch.float32, device=xs[0].device)
        for x in xs:  # rank order: every worker folds identically
            acc += x
        return acc / len(xs)
    stack = torch.stack(xs)  # (P, *shape)
    P = stack.shape[0]
    ordered = stack.sort(dim=0, stable=True).values
    if rule == "median":
        if P % 2:
            return ordered[P // 2].clone()
        return (ordered[P // 2 - 1] + ordered[P // 2]) / 2  # even P: mean of the two middles
    t = int(trim_ratio * P)
    kept = ordered[t : P - t]
    acc = torch.zeros(shape, dtype=torch.float32, device=kept.device)
    for x in kept:
        acc += x
    return acc / kept.shape[0]
