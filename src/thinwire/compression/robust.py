"""Robust aggregation rules: a peer that sends garbage or lies moves the average only a little.

Rules over the peers' decoded contributions (each the same shape, folded in rank order). ``P`` is
the number of contributions, ``f`` the number of hostile ones among them:

* ``"mean"`` — the plain mean. No protection: one peer moves it anywhere (f = 0 tolerated).
* ``"clip"`` — each peer's contribution is scaled down to at most ``max_norm`` in L2 norm, by
  default the middle of the peers' norms (the middle one for odd P, the mean of the two middle
  ones for even P; templar clips each peer to the median norm), then averaged. While
  f < P / 2 the cap is at most an honest norm, so each hostile peer moves the mean by at most
  ``cap / P`` in norm, in any direction it likes: clip bounds the damage, it does not remove it.
  With f >= P / 2 the hostile peers set the cap. Cost: one norm per peer.
* ``"trimmed_mean"`` — per coordinate, drop the ``trim`` largest and smallest values and average
  the rest (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018, Alg. "trimmed mean").
  Tolerates f <= trim hostile peers, and needs 1 <= trim < P / 2, so at least 3 peers; a size it
  cannot trim at is refused rather than silently averaged. Cost: a sort over peers per
  coordinate, O(P log P · N), and all P contributions held at once.
* ``"median"`` — per-coordinate median (same paper; the mean of the two middle values for even
  P, which avoids the bias of always taking the lower one). Tolerates f < P / 2; with 2 peers it
  is the plain mean. Cost as trimmed mean.

With 2 peers no rule can protect: nothing in two contributions tells the honest one from the
hostile one (clip halves the larger toward the smaller; median and mean coincide; trimmed mean is
refused). Robust rules need 3 or more peers, and a majority of them honest.

Every rule is deterministic given the contributions in rank order, so all ranks agree bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from thinwire._validate import check_choice, check_float, check_int

__all__ = ["ROBUST_RULES", "check_trim", "clip_to_norm", "robust_mean", "clip_scales"]

ROBUST_RULES = ("mean", "clip", "trimmed_mean", "median")


def _middle(values: Sequence[float]) -> float:
    """The middle of ``values`` in float64: the middle one (odd count), the mean of the two (even)."""
    s = sorted(float(v) for v in values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def clip_scales(norms: Sequence[float], max_norm: float | None = None) -> list[float]:
    """Factor per peer that brings its norm to at most ``max_norm``.

    The default cap is the middle of ``norms``: the middle one for an odd count, the mean of the
    two middle ones for an even count. (The lower median would make one all-zero peer out of two
    cap the other at 0 and freeze training.)
    """
    if not norms:
        return []
    if max_norm is None:
        max_norm = _middle(norms)
    return [1.0 if n <= max_norm or n == 0 else max_norm / n for n in norms]


def clip_to_norm(
    contribs: Sequence[torch.Tensor], max_norm: float | None = None
) -> list[torch.Tensor]:
    """Each contribution scaled to L2 norm at most ``max_norm`` (default: see :func:`clip_scales`)."""
    norms = [float(c.double().norm()) for c in contribs]
    return [
        c * s if s != 1.0 else c
        for c, s in zip(contribs, clip_scales(norms, max_norm), strict=True)
    ]


def check_trim(rule: str, trim: int | None, trim_ratio: float, P: int) -> int:
    """The number of peers ``"trimmed_mean"`` drops at each end with ``P`` peers (0 otherwise).

    ``trim`` (peers dropped at each end) wins over ``trim_ratio`` (``floor(trim_ratio * P)``).

    Raises:
        TypeError: ``trim`` is not an int.
        ValueError: ``trim`` given for another rule, negative, or a trimmed mean that cannot
            trim at this size (effective trim 0, or ``2 * trim >= P``).
    """
    if trim is not None:
        check_int("trim", trim, 0)
        if rule != "trimmed_mean":
            raise ValueError(
                f"trim applies only to rule='trimmed_mean', got trim={trim} with rule={rule!r}"
            )
    if rule != "trimmed_mean":
        return 0
    t = int(trim_ratio * P) if trim is None else trim
    if t == 0 or 2 * t >= P:
        src = f" (floor(trim_ratio={trim_ratio:g} * {P}))" if trim is None else ""
        raise ValueError(
            f"rule='trimmed_mean' cannot trim at this size: trim={t} with {P} "
            f"peer{'s' if P != 1 else ''}{src}; it "
            "needs 1 <= trim < P/2 (at least 3 peers), and with trim 0 it is the plain mean"
        )
    return t


def robust_mean(
    contribs: Sequence[torch.Tensor],
    rule: str = "mean",
    *,
    trim_ratio: float = 0.25,
    trim: int | None = None,
    max_norm: float | None = None,
) -> torch.Tensor:
    """Aggregate ``contribs`` (rank order, equal shapes) with ``rule``; float32 result.

    See the module docstring for what each rule tolerates: with 2 peers none of them can tell
    the honest peer from the hostile one.

    Args:
        contribs: the peers' decoded contributions.
        rule: one of :data:`ROBUST_RULES`.
        trim_ratio: for ``"trimmed_mean"`` without ``trim``, the fraction of peers dropped at each
            end, range [0, 0.5); the count is ``floor(trim_ratio * P)``.
        trim: for ``"trimmed_mean"``, the number of peers dropped at each end (default None:
            from ``trim_ratio``). Needs ``1 <= trim < P / 2``.
        max_norm: for ``"clip"``, the norm cap (default: the middle of the peers' norms, the
            mean of the two middle ones for even P).

    Raises:
        ValueError: no contributions, unequal shapes, a bad setting, or a trimmed mean that
            cannot trim at this number of peers.
    """
    check_choice("rule", rule, ROBUST_RULES)
    check_float("trim_ratio", trim_ratio, 0.0, 0.5, hi_open=True)
    if not contribs:
        raise ValueError("contribs must hold at least one tensor, got none")
    t = check_trim(rule, trim, trim_ratio, len(contribs))
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
    kept = ordered[t : P - t]
    acc = torch.zeros(shape, dtype=torch.float32, device=kept.device)
    for x in kept:
        acc += x
    return acc / kept.shape[0]
