"""Kernel-shaping check of the WAN model's bandwidth term (thinwire netcheck); opt-in, root only."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from thinwire.collectives.netcheck import (
    goodput_bytes_per_s,
    quick_netcheck,
    run_netcheck,
    tbf_burst_bytes,
)


def test_goodput_and_burst_formulas():
    # goodput R * mss / (mss + 66) (tbf meters whole frames); burst max(R / 250 Hz, 16 KiB);
    # both hand-computed
    assert goodput_bytes_per_s(50) == pytest.approx(6.25e6 * 1448 / 1514, rel=1e-12)
    assert tbf_burst_bytes(10) == 16384  # 1.25e6 / 250 = 5000 B < 16 KiB
    assert tbf_burst_bytes(50) == 25000  # 6.25e6 / 250


def test_netcheck_rejects_bad_sizes():
    with pytest.raises(
        ValueError, match=r"sizes must be in multiples of 4 with >= 2 of them >= 1 MiB"
    ):
        run_netcheck(2, (10,), (1 << 20,))


def test_netcheck_rejects_bad_tolerance():
    with pytest.raises(ValueError, match=r"tolerance must be in \(0, 1\].*got 0"):
        run_netcheck(2, (10,), (1 << 20, 2 << 20), tolerance=0)


def test_netcheck_skips_cleanly_without_root(monkeypatch):
    # not root -> a skip message, nothing built
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    res = run_netcheck()
    assert set(res) == {"skipped"} and "root" in res["skipped"]


def _privileged() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_privileged() is not None, reason=f"netcheck {_privileged()}")
def test_quick_netcheck_matches_model_slope(tmp_path):
    res = quick_netcheck(tmp_path / "netcheck.json")
    assert "skipped" not in res
    assert [r["op"] for r in res["results"]] == ["all_reduce"]
    for r in res["results"]:
        # QUICK_TOLERANCE: fitted s/byte within 15 % of the model at tbf goodput (gloo's excess
        # through the 1 s queue reached 13.7 %; a wrong bandwidth term is off by far more)
        assert abs(r["fit_b_s_per_byte"] / r["model_b_s_per_byte"] - 1) <= 0.15, r
    assert res["pass"]
    assert (tmp_path / "netcheck.json").exists()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not {"twbr", "tw0", "tw1"} & set(listed)  # namespaces deleted in finally
