"""The torchft example as the README runs it: the ``torchft_lighthouse`` binary from the torchft
wheel and three replica processes on loopback; one is killed with SIGKILL mid-run and started
again with the same command; it heals, and all three finish on the same global model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinwire.bench import TinyGPT

pytest.importorskip("torchft")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "torchft_diloco.py")
LIGHTHOUSE = Path(sys.executable).with_name("torchft_lighthouse")
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        assert proc.poll() is None, path.read_text(errors="replace")[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{path.name} never printed {pattern!r}")


@pytest.mark.timeout(300)
def test_killed_replica_restarts_heals_and_finishes_with_the_others(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], log: str) -> subprocess.Popen:
        f = (tmp_path / log).open("w")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)
        procs.append(p)
        return p

    try:
        # The README's Lighthouse command, on a free port instead of 29510.
        lh = start(
            [str(LIGHTHOUSE), "--min_replicas", "3", "--join_timeout_ms", "10000",
             "--heartbeat_timeout_ms", "1000", "--bind", "[::]:0"],
            "lighthouse.log",
        )  # fmt: skip
        port = _wait_for(tmp_path / "lighthouse.log", r"listening on: \S+:(\d+)", lh, 30).group(1)
        args = ["--lighthouse", f"http://localhost:{port}", "--steps", "200", "--inner-steps", "10"]
        replicas = [
            start([sys.executable, SCRIPT, *args, "--replica-id", str(i)], f"r{i}.log")
            for i in range(3)
        ]
        # Kill replica 2 a few rounds in, as a crash would, and start it again.
        _wait_for(tmp_path / "r2.log", r"replica 2: round 3 ", replicas[2], 120)
        replicas[2].send_signal(signal.SIGKILL)
        assert replicas[2].wait(timeout=30) == -signal.SIGKILL
        replicas[2] = start(
            [sys.executable, SCRIPT, *args, "--replica-id", "2"], "r2-restarted.log"
        )
        for p in replicas:
            assert p.wait(timeout=200) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    logs = {
        name: (tmp_path / f"{name}.log").read_text(errors="replace")
        for name in ("r0", "r1", "r2-restarted")
    }
    done = {
        name: re.search(
            r"replica \d: done, eval ([0-9.]+) after 200 steps; (\d+) rounds committed; "
            r"global model ([0-9a-f]{8})",
            text,
        )
        for name, text in logs.items()
    }
    assert all(done.values()), {k: v[-2000:] for k, v in logs.items()}
    # With --min_replicas 3 the others waited for the restarted replica: no round without it.
    groups = re.findall(r"replica 0: round \d+ step \d+ group (\d+)", logs["r0"])
    assert len(groups) == 20 and set(groups) == {"3"}, logs["r0"][-3000:]
    # The same global model, eval loss and number of committed rounds on every replica.
    assert len({m.groups() for m in done.values()}) == 1, {k: m.groups() for k, m in done.items()}
    # The restarted replica healed at its first sync: a live replica's state, weight 0.
    healed = re.findall(
        r"replica 2: round \d+ step \d+ group 3 eval [0-9.]+ \(committed; healed: took a live "
        r"replica's state, ([0-9,]+) B\)",
        logs["r2-restarted"],
    )
    assert len(healed) == 1, logs["r2-restarted"][-3000:]
    # θ_g, the outer momentum (both fp32, one value per parameter) and two int64 step counters.
    n_params = sum(p.numel() for p in TinyGPT().parameters())
    assert int(healed[0].replace(",", "")) == 2 * 4 * n_params + 16
