"""``benchmarks/gpu_check.py --cpu-smoke`` runs as the README says: every kernel against its torch
reference and every optimizer's step, with no timing claims, exiting 0.

The script is what a session with a GPU runs as it is, so it must keep working on a CPU-only CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_gpu_check_cpu_smoke_passes_every_check() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=ROOT,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    summary = re.search(r"OK: (\d+) passed, (\d+) failed", out)
    assert summary is not None, out[-4000:]
    passed, failed = int(summary.group(1)), int(summary.group(2))
    assert failed == 0
    assert passed == len(re.findall(r"^PASS ", out, re.M)) > 0
    # Every registered kernel and every optimizer family was exercised, with no timing claim.
    for name in ("dct_topk", "decode_accumulate", "ef_quantize_pack"):
        assert re.search(rf"^PASS {name} ", out, re.M), name
    for opt in ("DiLoCo", "SparseLoCo", "DeMo", "StreamingDiLoCo"):
        assert re.search(rf"^PASS {opt} .*comm=None", out, re.M), opt
        assert re.search(rf"^PASS {opt} .*gloo TorchDistCommunicator", out, re.M), opt
    assert "GB/s" not in out
