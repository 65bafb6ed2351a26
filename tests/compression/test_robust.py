"""Robust aggregation rules (``thinwire.compression.robust``) against closed forms.

Each rule must either protect at the given number of peers or refuse: a trimmed mean that trims
nothing is a plain mean, and a norm cap of zero freezes training.
"""

from __future__ import annotations

import pytest
import torch

from thinwire.compression import clip_scales, robust_mean

N = 7


def _peers(P: int, *, attacker: float | None = None) -> list[torch.Tensor]:
    """``P`` honest float32 contributions; with ``attacker`` the last one is scaled by it."""
    g = torch.Generator().manual_seed(1234 + P)
    xs = [torch.randn(N, generator=g) for _ in range(P)]
    if attacker is not None:
        xs[-1] = xs[-1] * attacker
    return xs


def _trimmed_oracle(xs: list[torch.Tensor], t: int) -> torch.Tensor:
    """Float64 trimmed mean by hand: sort each coordinate, drop ``t`` at each end, average."""
    P = len(xs)
    out = torch.empty(N, dtype=torch.float64)
    for j in range(N):
        col = sorted(float(x[j]) for x in xs)
        kept = col[t : P - t]
        out[j] = sum(kept) / len(kept)
    return out


# ------------------------------------------------------------------------ trimmed mean
@pytest.mark.parametrize(
    "P,trim,want",
    [
        (2, None, "trim=0 with 2 peers"),  # floor(0.25 * 2) = 0: would be the plain mean
        (3, None, "trim=0 with 3 peers"),  # floor(0.25 * 3) = 0
        (2, 1, "trim=1 with 2 peers"),  # 2 * 1 >= 2: nothing left to average
        (4, 2, "trim=2 with 4 peers"),
        (5, 0, "trim=0 with 5 peers"),
    ],
)
def test_trimmed_mean_refuses_a_size_it_cannot_trim(P, trim, want):
    with pytest.raises(ValueError, match="trimmed_mean") as info:
        robust_mean(_peers(P, attacker=1e6), "trimmed_mean", trim=trim)
    assert want in str(info.value)


@pytest.mark.parametrize("P,trim", [(3, 1), (4, 1), (5, 2), (5, 1)])
def test_trimmed_mean_with_explicit_trim_drops_a_huge_peer(P, trim):
    xs = _peers(P, attacker=1e6)
    got = robust_mean(xs, "trimmed_mean", trim=trim)
    # float32 accumulation of at most 3 kept values of magnitude ~3: a few ulps of the result
    torch.testing.assert_close(got.double(), _trimmed_oracle(xs, trim), rtol=1e-6, atol=1e-6)
    assert float(got.abs().max()) < 10.0  # the x1e6 peer is gone


def test_trimmed_mean_default_trim_is_floor_of_ratio():
    xs = _peers(8, attacker=1e6)  # floor(0.25 * 8) = 2
    got = robust_mean(xs, "trimmed_mean")
    torch.testing.assert_close(got.double(), _trimmed_oracle(xs, 2), rtol=1e-6, atol=1e-6)


def test_trim_is_refused_for_other_rules_and_wrong_types():
    with pytest.raises(ValueError, match=r"trim applies only to rule='trimmed_mean'.*'median'"):
        robust_mean(_peers(3), "median", trim=1)
    with pytest.raises(TypeError, match="trim must be int"):
        robust_mean(_peers(3), "trimmed_mean", trim=1.0)
    with pytest.raises(ValueError, match=r"trim must be in \[0, inf\), got -1"):
        robust_mean(_peers(3), "trimmed_mean", trim=-1)


# --------------------------------------------------------------------------------- clip
@pytest.mark.parametrize(
    "norms,cap",
    [
        ([0.0, 4.0], 2.0),  # even P: the mean of the two middle norms (here: both)
        ([4.0, 0.0], 2.0),
        ([1.0, 2.0, 100.0], 2.0),  # odd P: the middle norm
        ([100.0, 1.0, 3.0, 2.0], 2.5),  # sorted 1, 2, 3, 100: (2 + 3) / 2
        ([5.0], 5.0),
    ],
)
def test_clip_cap_is_the_mean_of_the_middle_norms(norms, cap):
    want = [1.0 if n <= cap or n == 0 else cap / n for n in norms]
    assert clip_scales(norms) == pytest.approx(want, rel=1e-15, abs=0)  # float64 arithmetic


def test_clip_with_a_stalled_peer_does_not_freeze_the_other():
    """Two peers, one all-zero: the old lower-median cap was 0 and scaled the honest one to 0."""
    g = _peers(1)[0]
    got = robust_mean([g, torch.zeros(N)], "clip")
    # cap = (0 + |g|) / 2, so g is halved; mean over 2 peers: g / 4 (powers of two: exact)
    assert torch.equal(got, g / 4)
    got = robust_mean([torch.zeros(N), g], "clip")
    assert torch.equal(got, g / 4)


def test_clip_bounds_a_huge_peer_to_the_middle_norm():
    xs = _peers(3, attacker=1e6)
    got = robust_mean(xs, "clip")
    norms = sorted(float(x.double().norm()) for x in xs)
    cap = norms[1]
    want = (
        sum(
            (x.double() * min(1.0, cap / float(x.double().norm())) for x in xs),
            torch.zeros(N, dtype=torch.float64),
        )
        / 3
    )
    # float32 scaling and accumulation of three terms of magnitude ~cap
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
