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
    first = subprocess.Popen([sys.executable, script, *args], stdout=log0, stderr=subprocess.STDOUT, cwd=ROOT)
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
            capture_output=True, text=True, timeout=240, cwd=ROOT,
        )
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
    out0 = (tmp_path / "peer0.log").read_text()
    done = [re.search(r"done, eval ([0-9.]+) after 10 steps; sent ([0-9,]+) B in 2 syncs", o) for o in (out0, second.stdout)]
    assert all(done), out0[-2000:] + second.stdout[-2000:]
    # Both peers evaluate the same global parameters after the last sync.
    assert done[0].group(1) == done[1].group(1)
    # The 108,288-element fp32 vector is below one hivemind part (2**17 elements), so one peer
    # reduces all of it: the other sends it its whole vector (4N bytes) and the reducer sends the
    # whole result back ((P-1) * 4N) — spec §2.4 butterfly — 4N per peer per sync, 2 syncs.
    sent = [int(d.group(2).replace(",", "")) for d in done]
    assert sent == [2 * 4 * N_PARAMS] * 2
    assert "group 2" in out0 and "group 2" in second.stdout
