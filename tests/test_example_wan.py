"""Runs examples/wan_allreduce.py under torchrun (4 gloo ranks on loopback) and checks its report."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "wan_allreduce.py"


def test_wan_allreduce_example_bytes_and_clock():
    P, n, steps, compute = 4, 100003, 2, 0.5
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc-per-node={P}", str(EXAMPLE), "--preset", "home_broadband", "--numel", str(n),
           "--steps", str(steps), "--compute-s", str(compute), "--jitter-ms", "0"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = re.findall(
        r"rank (\d): sent (\d+) B, recv (\d+) B .* control (\d+) B, simulated ([\d.]+) s",
        res.stdout,
    )
    assert sorted(int(x[0]) for x in lines) == list(range(P))
    # ledger: ring all-reduce 2(P-1) ceil(n/P) * 4, equal-size all_gather_bytes (P-1)(8 + 4n)
    per_step = 2 * (P - 1) * math.ceil(n / P) * 4 + (P - 1) * (8 + 4 * n)
    # WAN model, home_broadband (alpha 20 ms, B = 10 Mbit/s), jitter off; the 0.5 s of compute
    # hides under the all-reduce, which is longer, so each step costs T_allreduce + T_allgather
    alpha, B = 0.020, 10e6 / 8
    t_ar = 2 * (P - 1) * (alpha + math.ceil(n / P) * 4 / B)
    t_ag = 2 * (P - 1) * alpha + (P - 1) * (8 + 4 * n) / B
    assert t_ar > compute
    for _, sent, recv, control, clock in lines:
        assert int(sent) == int(recv) == steps * per_step
        # one float64 MAX per op (clock exchange), and gloo's 8-byte end mark on each of the
        # P - 1 ring rows of all_gather_bytes that a rank receives
        assert int(control) == steps * (2 * 2 * (P - 1) * 8 + (P - 1) * 8)
        assert abs(float(clock) - steps * (t_ar + t_ag)) <= 0.005  # printed with 2 decimals
