"""The hivemind example: two peers as separate processes, the second joining through the first's
printed address; both finish, agree on the global model and count the butterfly bytes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinwire.bench import TinyGPT

ROOT = Path(__file__).resolve().parents[1]
N_PARAMS = sum(p.numel() for p in TinyGPT().parameters())


@pytest.mark.timeout(300)
def test_two_hivemind_peers_train_together(tmp_path):
    script = str(ROOT / "examples" / "hivemind_diloco.py")
    args = ["--steps", "10", "--inner-steps", "5", "--run-id", f"tw-test-{os.getpid()}"]
    log0 = (tmp_path / "peer0.log").open("w+")
    first = subprocess.Popen(
        [sys.executable, script, *args], stdout=log0, stderr=subprocess.STDOUT, cwd=ROOT
    )
    try:
        addr = None
        for _ in range(120):
            time.sleep(0.5)
            m = re.search(r"--initial-peers (\S+)", (tmp_path / "peer0.log").read_text())
            if m:
                addr = m.group(1)
                break
            assert first.poll() is None, (tmp_path / "peer0.log").read_text()
        assert addr, "the first peer never printed its address"
        second = subprocess.run(
            [sys.executable, script, *args, "--initial-peers", addr],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=ROOT,
        )
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
    out0 = (tmp_path / "peer0.log").read_text()
    done = [
        re.search(r"done, eval ([0-9.]+) after 10 steps; sent ([0-9,]+) B in 2 syncs", o)
        for o in (out0, second.stdout)
    ]
    assert all(done), out0[-2000:] + second.stdout[-2000:]
    # Both peers evaluate the same global parameters after the last sync.
    assert done[0].group(1) == done[1].group(1)
    # The 108,288-element fp32 vector and its contributor weight (hivemind rounds are elastic, so
    # the mean is over contributors) are below one hivemind part (2**17 elements), so one peer
    # reduces all of it: the other sends it its whole vector (4(N + 1) bytes) and the reducer
    # sends the whole result back ((P-1) * 4(N + 1); the butterfly formula of
    # thinwire.collectives.accounting): 4(N + 1) per peer per sync, 2 syncs.
    sent = [int(d.group(2).replace(",", "")) for d in done]
    assert sent == [2 * 4 * (N_PARAMS + 1)] * 2
    assert "group 2" in out0 and "group 2" in second.stdout


def test_steps_not_a_multiple_of_inner_steps_is_one_error_line():
    script = str(ROOT / "examples" / "hivemind_diloco.py")
    res = subprocess.run(
        [sys.executable, script, "--world-size", "1", "--steps", "3", "--inner-steps", "5"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.endswith("error: argument --steps: must be a multiple of --inner-steps (5), got 3")


@pytest.mark.timeout(300)
def test_a_single_peer_trains_alone():
    script = str(ROOT / "examples" / "hivemind_diloco.py")
    args = [
        "--world-size",
        "1",
        "--steps",
        "4",
        "--inner-steps",
        "2",
        "--run-id",
        f"tw-one-{os.getpid()}",
    ]
    res = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    done = re.search(r"done, eval ([0-9.]+) after 4 steps; sent 0 B in 2 syncs", res.stdout)
    assert done, res.stdout  # alone, nothing crosses the wire
    last_round = re.findall(r"round 2 step 4 train \S+ eval ([0-9.]+) group 1", res.stdout)
    assert last_round == [done.group(1)]  # the final line evaluates the same global model
