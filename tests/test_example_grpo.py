"""Runs examples/grpo_wan.py reduced: 2 learners under torchrun (gloo on loopback) and as threads,
plus the single-learner command, and checks the report against the byte formulas."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo_wan.py"
P = 69_390  # TinyCausalLM parameters
ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
SMALL = ["--steps", "20", "--prompts", "4", "--group", "8", "--window", "10"]


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _channels(out: str) -> dict[str, tuple[int, int]]:
    return {
        m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^  (\S+)\s+(\d+) / (\d+)$", out, re.M)
    }


def test_two_learners_torchrun_and_inproc_agree_with_formulas():
    torchrun = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                     "--nproc-per-node=2", str(EXAMPLE), "--sync", "diloco", *SMALL])  # fmt: skip
    inproc = _run([sys.executable, str(EXAMPLE), "--inproc", "2", "--sync", "diloco", *SMALL])
    for out in (torchrun, inproc):
        assert (
            "grpo_wan: 2 learners, sync diloco, home_broadband, 4 prompts x 8 per learner, 20 steps"
            in out
        )
        ring = 2 * (2 - 1) * -(-P // 2) * 4  # fp32 ring all-reduce of the pseudo-gradient
        group = 10 + 8 * 159 + 4  # one DigitSum group of 8 on the wire (rollout.py layout)
        assert _channels(out) == {
            "learners/sync": (2 * ring, 2 * ring),  # H = 10: 2 syncs in 20 steps
            "rollouts/local": (0, 20 * 4 * group),
            "weights/local": (20 * 4 * P, 0),  # one fp32 pull per step
        }
        assert f"DDP-GRPO would send {20 * ring} B (10.0x more)" in out
        assert re.search(r"simulated WAN clock: \d+\.\d s", out)
    # same seeds, same ring reduction order: gloo processes and threads give the same curve
    curve = re.compile(r"^\s+\d+-\d+\s+(\d\.\d{3})$", re.M)
    assert curve.findall(torchrun) == curve.findall(inproc) and len(curve.findall(inproc)) == 2


def test_single_learner_command():
    out = _run([sys.executable, str(EXAMPLE), "--sync", "none", "--steps", "10", "--prompts", "4",
                "--group", "4", "--window", "5"])  # fmt: skip
    assert "grpo_wan: 1 learner, sync none" in out
    assert "learners/sync" not in _channels(out) and "DDP-GRPO" not in out
    assert _channels(out)["weights/local"] == (10 * 4 * P, 0)
    assert len(re.findall(r"^\s+\d+-\d+\s+\d\.\d{3}$", out, re.M)) == 2


def test_ddp_sync_is_reported_as_the_baseline_with_progress_lines():
    steps = 10
    res = subprocess.run(
        [sys.executable, str(EXAMPLE), "--inproc", "2", "--sync", "ddp", "--steps", str(steps),
         "--prompts", "4", "--group", "8", "--window", "5"],
        capture_output=True, text=True, timeout=240, env=ENV,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ring = 2 * (2 - 1) * -(-P // 2) * 4  # fp32 ring all-reduce of the gradients, every step
    assert _channels(res.stdout)["learners/sync"] == (steps * ring, steps * ring)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("learner-to-learner:"))
    assert "x more" not in line and "DDP-GRPO: fp32 gradients" in line
    # one progress line per 10% of the steps, on stderr, counting from 1
    progress = re.findall(r"^grpo_wan: step (\d+)/10, reward \d\.\d{3}", res.stderr, re.M)
    assert progress == [str(s) for s in range(1, steps + 1)], res.stderr
