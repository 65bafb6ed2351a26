"""Peers that come and go on a real hivemind swarm: late joiners and dead peers.

Every peer is its own process (its own DHT process and p2p daemon, as on separate machines)
training :class:`~thinwire.optim.DiLoCo` on the seeded regression of ``_faults`` through a
:class:`~thinwire.collectives.HivemindCommunicator` on 127.0.0.1. A peer "crashes" by killing its
own daemons and calling ``os._exit`` from a sync post-hook (the way a machine dies: no goodbye).

1. Three peers start from different random weights; the third crashes after round 3; a new peer
   joins (from other random weights) once round 5 is done. Oracles: after round 10 every live
   peer holds bitwise the same θ_g and outer state (``consistency_digest``), the joiner's eval
   loss equals the others' (within 5 %, the acceptance bound; equal digests make it exact), and
   the joiner took the state from a live peer (its first recorded sync is past round 5).
2. Two peers, one crashes: the survivor notices within the membership expiry (3 heartbeats)
   plus 10 s and, by its ``alone`` setting, keeps training alone or stops with
   :class:`~thinwire.collectives.AllPeersLeft`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _faults import Regression

H, LR, TARGET = 5, 0.1, 10
TASK = Regression(batch=64)
HEARTBEAT_S = 1.0
KW = dict(
    host_maddrs=("/ip4/127.0.0.1/tcp/0",),
    matchmaking_time=1.0,
    request_timeout=0.5,
    heartbeat_s=HEARTBEAT_S,
    next_chunk_timeout=5.0,
    round_wait_timeout=30.0,  # long enough for a joiner's first H steps after adopting a state
)


def _descendants(root: int) -> list[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [c for c, pp in parent.items() if pp == pid]
        out += kids
        todo += kids
    return out


def _crash(code: int) -> None:
    """Die like a machine that lost power: every daemon of this peer first, then the process."""
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(code)


def _log(tmp: Path, idx: int, **rec: Any) -> None:
    with open(tmp / f"peer{idx}.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def _records(tmp: Path, idx: int) -> list[dict[str, Any]]:
    p = tmp / f"peer{idx}.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _peer(
    idx: int, tmp_s: str, run_id: str, expected: int, crash_at: int, alone: str, hold_at: int
) -> None:
    """Train until ``TARGET`` syncs (or crash after sync ``crash_at``); then serve until done.

    ``hold_at``: wait at that sync until a joiner announced itself (file ``joined``), so that a
    slow start on a loaded machine cannot let the others finish before it joins.
    """
    torch.set_num_threads(1)
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)  # hivemind's processes must fork
    from thinwire.collectives import AllPeersLeft, HivemindCommunicator
    from thinwire.optim import DiLoCo

    tmp = Path(tmp_s)
    addr = tmp / "addr.json"
    first = [] if idx == 0 else json.loads(addr.read_text())
    comm = HivemindCommunicator.create(
        run_id, initial_peers=first, expected_world_size=expected, alone=alone, **KW
    )
    if idx == 0:
        addr.write_text(json.dumps(comm.visible_maddrs()))
    model = TASK.model()
    with torch.no_grad():  # a different random start on every peer: the swarm must agree
        g = torch.Generator().manual_seed(1000 + idx)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    opt = DiLoCo(
        model.parameters(), functools.partial(torch.optim.SGD, lr=LR), sync_every=H, comm=comm
    )
    _log(tmp, idx, event="start", sync=opt.sync_step, t=time.time())
    (tmp / f"up{idx}").write_text("")

    def hook(o: Any, info: Any) -> None:
        _log(tmp, idx, event="sync", sync=info.sync_step, committed=info.committed,
             weight=info.weight, t=time.time())  # fmt: skip
        if info.sync_step == crash_at:
            _crash(17)

    opt.register_sync_post_hook(hook)
    step = 0
    try:
        while opt.sync_step < TARGET:
            if opt.sync_step == hold_at:
                _wait(lambda: (tmp / "joined").exists(), 240, "the joiner")
                hold_at = -1
            TASK.step(model, opt, idx, step)
            step += 1
    except AllPeersLeft as exc:
        _log(tmp, idx, event="alone", error=str(exc), t=time.time())
        comm.close()
        return
    with opt.global_params():
        loss = TASK.eval_loss(model)
    _log(tmp, idx, event="done", sync=opt.sync_step, digest=opt.consistency_digest(), loss=loss)
    deadline = time.monotonic() + 120
    while not (tmp / "stop").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # stay alive: peers still finishing their last round may need us
    comm.close()


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def spawn(tmp_path: Path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs: list[Any] = []

    def start(
        idx: int, run_id: str, expected: int, crash_at: int = -1, alone: str = "continue",
        hold_at: int = -1,
    ):  # fmt: skip
        args = (idx, str(tmp_path), run_id, expected, crash_at, alone, hold_at)
        p = ctx.Process(target=_peer, args=args)
        p.start()
        procs.append(p)
        return p

    yield start
    (tmp_path / "stop").write_text("")
    for p in procs:
        p.join(30)
        if p.is_alive():
            for pid in _descendants(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            p.kill()
            p.join(5)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_crash_and_late_join_end_bit_identical(tmp_path: Path, spawn) -> None:
    run_id = f"elastic-{os.getpid()}-{time.monotonic_ns()}"
    spawn(0, run_id, 3, hold_at=6)
    _wait(lambda: (tmp_path / "addr.json").exists(), 60, "peer 0's address")
    spawn(1, run_id, 3, hold_at=6)
    crashed = spawn(2, run_id, 3, crash_at=3)
    crashed.join(240)
    assert crashed.exitcode == 17, crashed.exitcode
    _wait(lambda: any(r.get("sync", 0) >= 5 for r in _records(tmp_path, 0)), 240, "round 5")
    spawn(3, run_id, 3)
    _wait(lambda: (tmp_path / "up3").exists(), 240, "the joiner's optimizer")
    (tmp_path / "joined").write_text("")  # release the others, held at round 6
    done = {}
    for idx in (0, 1, 3):
        _wait(lambda i=idx: any(r["event"] == "done" for r in _records(tmp_path, i)), 300,
              f"peer {idx} to finish")  # fmt: skip
        done[idx] = next(r for r in _records(tmp_path, idx) if r["event"] == "done")
    assert all(d["sync"] == TARGET for d in done.values()), done
    assert len({d["digest"] for d in done.values()}) == 1, done  # bitwise the same θ_g
    others = (done[0]["loss"] + done[1]["loss"]) / 2
    assert abs(done[3]["loss"] - others) <= 0.05 * others, done
    syncs = [r["sync"] for r in _records(tmp_path, 3) if r["event"] == "sync"]
    assert syncs and syncs[0] > 5, syncs  # the joiner started from a live peer's state


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("alone", ["continue", "raise"])
def test_survivor_of_two_reports_within_the_wait(tmp_path: Path, spawn, alone: str) -> None:
    run_id = f"duo-{alone}-{os.getpid()}-{time.monotonic_ns()}"
    spawn(0, run_id, 2, alone=alone)
    _wait(lambda: (tmp_path / "addr.json").exists(), 60, "peer 0's address")
    crashed = spawn(1, run_id, 2, crash_at=2)
    crashed.join(240)
    assert crashed.exitcode == 17
    t_dead = next(r["t"] for r in _records(tmp_path, 1) if r.get("sync") == 2)
    limit = 3 * HEARTBEAT_S + 10.0  # membership expiry plus the acceptance's 10 s
    if alone == "raise":
        _wait(lambda: any(r["event"] == "alone" for r in _records(tmp_path, 0)), 120, "the error")
        rec = next(r for r in _records(tmp_path, 0) if r["event"] == "alone")
        assert "every other peer" in rec["error"] and "alone='raise'" in rec["error"]
    else:
        _wait(lambda: any(r["event"] == "done" for r in _records(tmp_path, 0)), 240, "the end")
        solo = [r for r in _records(tmp_path, 0) if r["event"] == "sync" and r["sync"] > 2]
        assert solo and all(r["committed"] and r["weight"] == 1.0 for r in solo[1:]), solo
        rec = solo[0] if solo[0]["weight"] == 1.0 else solo[1]
    assert rec["t"] - t_dead <= limit + H * 1.0, (rec["t"] - t_dead, limit)
