"""A process that exits with an overlapped sync in flight exits cleanly.

Before the fix, a gloo rank that returned right after a step that launched an overlapped
reduction (StreamingDiLoCo with ``overlap_steps``, DeMo with ``overlap``) aborted at interpreter
exit about half of the time: "terminate called without an active exception", SIGABRT, exit
code 134. ``close()`` now waits for the reduction, and an ``atexit`` hook does the same for
any reduction still in flight (here the optimizers are already garbage collected: the worker
function returned). Each run here starts two real gloo processes (a file rendezvous in
``tmp_path``, loopback), both optimizers with a reduction in flight, and exits at once; every
rank must exit with code 0 and without "terminate called", ten runs in a row (then two with an
explicit ``close()``, which must also keep the pending results). The ranks are forked from one
launcher that imported torch once, and leave through the ordinary interpreter exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

P = 2


def _worker(rank: int, rdzv: str, mode: str) -> None:
    """One rank: a step of each optimizer that leaves its reduction in flight, then exit."""
    from functools import partial

    import torch
    from torch import nn

    from thinwire.collectives import TorchDistCommunicator
    from thinwire.optim import DeMo, StreamingDiLoCo

    comm = TorchDistCommunicator(
        init_method=f"file://{rdzv}", rank=rank, world_size=P, timeout_s=60.0
    )
    g = torch.Generator().manual_seed(rank)
    models = [nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)) for _ in range(2)]
    stream = StreamingDiLoCo(
        models[0].parameters(),
        partial(torch.optim.SGD, lr=0.01),
        sync_every=4,
        fragments=2,
        overlap_steps=1,  # K = 2: the first step launches fragment 0's reduction
        comm=comm,
    )
    demo = DeMo(models[1].parameters(), lr=1e-3, topk=4, chunk=8, overlap=True, comm=comm)
    for model, opt in zip(models, (stream, demo), strict=True):
        opt.zero_grad()
        model(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
        opt.step()
    assert stream._inflight is not None and demo._pending  # both really left work in flight
    if mode == "close":
        stream.close()
        demo.close()
        stream.close()  # idempotent
        # Nothing was dropped: the results wait in state for their apply step.
        assert all("inflight" in stream.state[p] for p in stream._fragments[0])
        assert all("pending" in demo.state[p] for p in models[1].parameters())
    # Return at once: the interpreter exits with the reductions (mode "exit") in flight.


def _launch(tmp: str, plan: list[str]) -> None:
    """Run the plan's groups one after another; print one exit code per rank and run.

    torch and thinwire are imported once here; each rank is a ``fork()`` of this process that
    runs :func:`_worker` and then leaves through ``sys.exit`` — the ordinary interpreter exit
    (atexit hooks, finalization, the C++ static destructors) where the abort happened.
    """
    import json

    import torch  # noqa: F401 - imported before fork so that ranks start at once

    import thinwire.optim  # noqa: F401

    codes = []
    for run, mode in enumerate(plan):
        pids = []
        for rank in range(P):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the rank: stderr to its own file, run, exit normally
                fd = os.open(f"{tmp}/run{run}_rank{rank}.err", os.O_WRONLY | os.O_CREAT, 0o644)
                os.dup2(fd, 2)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                try:
                    _worker(rank, f"{tmp}/rdzv{run}", mode)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    sys.stderr.flush()
                    os._exit(1)
                sys.exit(0)
            pids.append(pid)
        codes.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids])
    print(json.dumps(codes))


def _run_plan(tmp_path: Path, plan: list[str]) -> None:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    res = subprocess.run(
        [sys.executable, __file__, "--launch", str(tmp_path), *plan],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    codes = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(codes) == len(plan)
    for run, (mode, rank_codes) in enumerate(zip(plan, codes, strict=True)):
        for rank, code in enumerate(rank_codes):
            err = (tmp_path / f"run{run}_rank{rank}.err").read_text()
            assert "terminate called" not in err, f"run {run} ({mode}) rank {rank}:\n{err}"
            assert code == 0, f"run {run} ({mode}) rank {rank} exited {code}:\n{err}"


@pytest.mark.timeout(600)
def test_exit_with_syncs_in_flight_is_clean_ten_runs_in_a_row(tmp_path: Path) -> None:
    _run_plan(tmp_path, ["exit"] * 10 + ["close"] * 2)


if __name__ == "__main__" and sys.argv[1:2] == ["--launch"]:
    _launch(sys.argv[2], sys.argv[3:])
