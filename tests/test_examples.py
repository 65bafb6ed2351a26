"""Every example runs under torchrun in a reduced form, and its printed figures are checked."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from thinwire.bench import TinyGPT

ROOT = Path(__file__).resolve().parents[1]
N_PARAMS = sum(p.numel() for p in TinyGPT().parameters())


def _torchrun(script: str, nproc: int, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        str(ROOT / "examples" / script),
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "method, per_sync", [("diloco-fp32", None), ("ddp", None), ("sparseloco", "small")]
)
def test_train_tiny_prints_ledger_bytes(method, per_sync):
    P, steps, H = 2, 8, 4
    out = _torchrun(
        "train_tiny.py", P, "--method", method, "--steps", str(steps), "--inner-steps", str(H)
    )
    assert f"method {method} on {P} ranks (gloo)" in out
    m = re.search(r"done: eval ([0-9.]+) \(floor ([0-9.]+)\), sent/rank ([0-9,]+) B", out)
    assert m, out
    sent = int(m.group(3).replace(",", ""))
    ring = 2 * (P - 1) * math.ceil(N_PARAMS / P) * 4
    if method == "ddp":
        assert sent == steps * ring
    elif method == "diloco-fp32":
        assert sent == (steps // H) * ring
    else:
        assert 0 < sent < (steps // H) * ring / 50
    assert float(m.group(1)) < math.log(64)  # it learned something: below the uniform loss


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    """The example run with plain python: no torchrun environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(ROOT / "examples" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.mark.timeout(300)
def test_train_tiny_without_torchrun_runs_ranks_as_threads():
    P, steps, H = 2, 4, 2
    res = _python("train_tiny.py", "--inproc", str(P), "--method", "ddp", "--preset", "none",
                  "--steps", str(steps), "--inner-steps", str(H))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert f"method ddp on {P} ranks (inproc), preset none" in out
    m = re.search(r"done: eval ([0-9.]+) \(floor ([0-9.]+)\), sent/rank ([0-9,]+) B", out)
    assert m, out
    # the same ledger as under torchrun: one fp32 ring all-reduce of the gradients per step
    assert int(m.group(3).replace(",", "")) == steps * 2 * (P - 1) * math.ceil(N_PARAMS / P) * 4
    # no WAN model: the wall clock is printed, never a "sim nan s"
    assert "nan" not in out and len(re.findall(r"wall [0-9.]+ s", out)) == steps // H
    assert "wall time" in out


@pytest.mark.timeout(300)
def test_train_tiny_without_torchrun_or_inproc_says_how_it_runs():
    res = _python("train_tiny.py", "--method", "diloco-fp32", "--steps", "2", "--inner-steps", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "method diloco-fp32 on 1 rank (inproc), preset home_broadband" in res.stdout
    assert "torchrun" in res.stderr and "Traceback" not in res.stderr


def test_train_tiny_rejects_steps_not_a_multiple_of_inner_steps():
    res = _python("train_tiny.py", "--steps", "5", "--inner-steps", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.endswith("error: argument --steps: must be a multiple of --inner-steps (2), got 5")
