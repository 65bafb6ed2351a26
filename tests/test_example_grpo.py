"""Runs examples/grpo_wan.py reduced: 2 learners under torchrun (gloo on loopback) and as threads,
the single-learner command and the DDP baseline, and checks the report against byte formulas."""

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
FP32_FRAME = 4 * P + 4  # fp32 weights and the frame's CRC32
TWO_BIT = 2 * -(-P // 8) + 5 * 4 + 4  # 2-bit codes, the centroid table (5 floats), CRC32
RECORD = 4 + 159  # a DigitSum rollout record and its length in the bundle


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _channels(out: str) -> dict[str, tuple[int, int]]:
    return {
        m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^  (\S+)\s+(\d+) / (\d+)$", out, re.M)
    }


def test_two_learners_torchrun_and_inproc_agree_with_formulas():
    torchrun = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                     "--nproc-per-node=2", str(EXAMPLE), *SMALL]).stdout  # fmt: skip
    inproc = _run([sys.executable, str(EXAMPLE), "--inproc", "2", *SMALL]).stdout
    for out in (torchrun, inproc):
        assert (
            "grpo_wan: 2 learners, method diloco-2bit, home_broadband, 4 prompts x 8 per learner, "
            "20 steps" in out
        )
        ch = _channels(out)
        assert ch["diloco/sync"] == (2 * TWO_BIT, 2 * TWO_BIT)  # H = 10: 2 syncs in 20 steps
        assert ch["weights/local"] == (19 * FP32_FRAME, 0)  # a frame per new version (1..19)
        # per step: an 8-byte all-gather length, the bundle's 8-byte header, 4 x 8 records
        assert ch["rollouts/local"][1] == 20 * (16 + 4 * 8 * RECORD)
        assert ch["site/control"] == (21 * 3 * 8, 0)  # 20 requests and the closing one
        ratio = re.search(
            r"learner-to-learner: (\d+) B .* DDP-GRPO sends (\d+) B \((\d+)x more\)", out
        )
        assert ratio and round(int(ratio[2]) / int(ratio[1])) == int(ratio[3]) > 10
        assert re.search(r"simulated WAN clock: \d+\.\d s", out)
    # same seeds, same reduction order: gloo processes and threads give the same curve
    curve = re.compile(r"^\s+\d+-\d+\s+(\d\.\d{3})$", re.M)
    assert curve.findall(torchrun) == curve.findall(inproc) and len(curve.findall(inproc)) == 2


def test_single_learner_command():
    out = _run([sys.executable, str(EXAMPLE), "--method", "ddp", "--steps", "10", "--prompts", "4",
                "--group", "4", "--window", "5"]).stdout  # fmt: skip
    assert "grpo_wan: 1 learner, method ddp" in out
    assert "ddp/grads" not in _channels(out) and "learner-to-learner" not in out
    assert _channels(out)["weights/local"] == (9 * FP32_FRAME, 0)
    assert len(re.findall(r"^\s+\d+-\d+\s+\d\.\d{3}$", out, re.M)) == 2


def test_ddp_baseline_bytes_equal_the_example_formula_with_progress_lines():
    steps = 10
    res = _run([sys.executable, str(EXAMPLE), "--inproc", "2", "--method", "ddp", "--steps",
                str(steps), "--prompts", "4", "--group", "8", "--window", "5"])  # fmt: skip
    ring = 2 * (2 - 1) * -(-P // 2) * 4  # fp32 ring all-reduce of the gradients, every step
    assert _channels(res.stdout)["ddp/grads"] == (steps * ring, steps * ring)
    got = re.search(r"learner-to-learner: (\d+) B .*DDP-GRPO by formula: (\d+) B", res.stdout)
    assert got and got[1] == got[2]  # the formula behind every run's "x more" is the ledger's
    # one progress line per 10% of the steps, on stderr, counting from 1
    progress = re.findall(r"^grpo_wan: step (\d+)/10, reward \d\.\d{3}", res.stderr, re.M)
    assert progress == [str(s) for s in range(1, steps + 1)], res.stderr
