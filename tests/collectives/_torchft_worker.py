"""One replica group of the torchft tests, run as its own process: ``python _torchft_worker.py MODE JSON``.

``ops`` runs every communicator op through a few rounds (a member leaves after the first, a
round is voted down, the next one commits, the member comes back with a new Manager and heals)
and saves what each op returned and recorded;
``train`` trains DiLoCo (or, with ``"optimizer": "streaming"``, Streaming DiLoCo with two
fragments) on a teacher-student regression and writes one JSON line per round to
its log (quorum size and id, whether the round completed here, whether it was committed, the
contributor count the sync hook saw), then the final eval loss and ``consistency_digest``. A
``train`` worker told ``die_at_round`` exits with ``os._exit`` inside that round, after its
reduction and before the commit vote: the harshest moment for the others, whose reductions
have completed. ``hold`` stops a worker at a sync step until a file exists, and ``announce``
writes one once a worker's communicator and optimizer exist: the test holds the survivors
until the restarted replica is up, so that it joins a run still in progress however slowly
processes start.

Workers start together: each creates its communicator (its Manager heartbeats from then on),
writes ``ready<replica>`` into ``barrier`` and waits until all ``replicas`` are there, so the
first quorum holds every replica.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from thinwire.collectives import TorchftCommunicator
from thinwire.optim import DiLoCo, StreamingDiLoCo


def _barrier(folder: str, replica: int, replicas: int, timeout: float = 120.0) -> None:
    d = Path(folder)
    (d / f"ready{replica}").write_text("")
    deadline = time.monotonic() + timeout
    while sum((d / f"ready{r}").exists() for r in range(replicas)) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"replica {replica}: the others never got ready")
        time.sleep(0.02)


def _wait_for(path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def _comm(cfg: dict[str, Any], cls: type = TorchftCommunicator) -> TorchftCommunicator:
    return cls(
        cfg["lighthouse"],
        replica_id=str(cfg["replica"]),
        min_replica_size=cfg.get("min_replica_size", 1),
        hostname="localhost",
        timeout_s=cfg.get("timeout_s", 20.0),
        quorum_timeout_s=cfg.get("quorum_timeout_s", 60.0),
    )


# --------------------------------------------------------------------------------------- ops
def run_ops(cfg: dict[str, Any]) -> None:
    me = cfg["replica"]
    comm = _comm(cfg)
    loaded: list[dict[str, torch.Tensor]] = []
    state = {"x": torch.arange(4, dtype=torch.float32)}  # equal on every replica: nothing loads
    comm.attach_state(lambda: dict(state), loaded.append)
    comm.agree_initial_state("check")
    out: dict[str, Any] = {"before": (comm.rank, comm.world_size, comm.peers())}
    _barrier(cfg["barrier"], me, 3)

    # Round 0: all three replicas; every op once.
    start = comm.begin_round(0)
    P, r = comm.world_size, comm.rank
    out["round0"] = {"start": start, "P": P, "rank": r, "epoch": comm.epoch}
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(3, 1001, generator=g, dtype=torch.float64)  # row j: replica-rank j's input
    t = base[r].to(torch.float32).clone()
    out["round0"]["sum"] = comm.all_reduce(t, "sum", tag="ops/sum").clone()
    t = base[r].to(torch.float32).clone()
    h = comm.all_reduce(t, "mean", async_op=True, tag="ops/mean")
    out["round0"]["mean"] = h.wait().clone()
    lens = [5, 0, 300]
    payload = bytes((r * 31 + k) % 256 for k in range(lens[r]))
    out["round0"]["gather"] = {
        alg: comm.all_gather_bytes(payload, algorithm=alg, tag=f"ops/gather/{alg}")
        for alg in ("ring", "direct")
    }
    frame = torch.full((77,), r, dtype=torch.uint8)
    out["round0"]["rows"] = comm.all_gather_into_tensor(frame, tag="ops/rows")
    b = base[r].clone() if r == 1 else torch.zeros(1001, dtype=torch.float64)
    out["round0"]["bcast"] = comm.broadcast(b, src=1, tag="ops/bcast")
    out["round0"]["bcast_bytes"] = comm.broadcast_bytes(
        b"hello from 2" if r == 2 else None, src=2, tag="ops/bbytes"
    )
    out["round0"]["max"] = comm.control_max([float(r), -float(r)], tag="ops/max")
    comm.barrier()
    out["round0"]["committed"] = comm.end_round(True)
    out["round0"]["records"] = list(comm.ledger.records)
    out["round0"]["peers"] = comm.peers()
    comm.ledger.reset()

    if r == 2:  # the last replica leaves between syncs, and comes back after round 3
        comm.close()
        out["loaded"] = loaded
        _wait_for(str(Path(cfg["barrier"]) / "round3-done"))
        comm = _comm(cfg)  # a new Manager: a new member at step 0, behind the others
        again: list[dict[str, torch.Tensor]] = []
        comm.attach_state(lambda: {"x": torch.full((4,), 9.0)}, again.append)
        comm.agree_initial_state("check")
        start = comm.begin_round(0)
        t = torch.full((3,), 5.0)
        comm.all_reduce(t, "sum", tag="ops/sum")
        out["rejoin"] = {
            "start": start,
            "P": comm.world_size,
            "sum": t,
            "committed": comm.end_round(True),
            "loaded": again,
            "records": list(comm.ledger.records),
        }
        comm.close()
        torch.save(out, Path(cfg["out"]))
        return

    # Round 1: the two that stayed.
    comm.begin_round(1)
    P, r = comm.world_size, comm.rank
    t = base[r].to(torch.float32).clone()
    out["round1"] = {"P": P, "rank": r, "epoch": comm.epoch}
    out["round1"]["sum"] = comm.all_reduce(t, "sum", tag="ops/sum").clone()
    out["round1"]["gather"] = comm.all_gather_bytes(payload, tag="ops/gather")
    out["round1"]["committed"] = comm.end_round(True)
    # Round 2: rank 1 reports that the round failed on it; nobody commits.
    comm.begin_round(2)
    comm.all_reduce(torch.ones(3), "sum", tag="ops/sum")
    out["round2"] = {"committed": comm.end_round(comm.rank != 1)}
    # Round 3: the failure of round 2 did not stick.
    comm.begin_round(3)
    t = torch.ones(3)
    comm.all_reduce(t, "sum", tag="ops/sum")
    out["round3"] = {"sum": t, "committed": comm.end_round(True), "P": comm.world_size}
    out["records"] = list(comm.ledger.records)
    out["loaded"] = loaded
    if r == 0:
        (Path(cfg["barrier"]) / "round3-done").write_text("")
    # Rounds 4, 5, ... until the returning replica is in the quorum (the Lighthouse admits it at
    # whichever quorum it asked to join first).
    deadline = time.monotonic() + 90
    for k in range(4, 10_000):
        assert time.monotonic() < deadline, "the returning replica never joined"
        comm.begin_round(k)
        t = torch.ones(3)
        comm.all_reduce(t, "sum", tag="ops/sum")
        out["rejoin"] = {"P": comm.world_size, "sum": t, "committed": comm.end_round(True)}
        if comm.world_size == 3:
            break
    comm.close()
    torch.save(out, Path(cfg["out"]))


# ------------------------------------------------------------------------------------- train
D_IN, D_OUT, NOISE, BATCH = 32, 8, 0.1, 32


def _gen(*key: int) -> torch.Generator:
    digest = hashlib.sha256(struct.pack(f"<{len(key)}q", *key)).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**62)


def _teacher() -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(-1)
    return torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5, 0.1 * torch.randn(D_OUT, generator=g)


def _batch(replica: int, step: int, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    W, b = _teacher()
    g = _gen(replica, step)
    x = torch.randn(n, D_IN, generator=g)
    return x, x @ W.T + b + NOISE * torch.randn(n, D_OUT, generator=g)


def _model() -> nn.Linear:
    m = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        m.weight.copy_(0.1 * torch.randn(m.weight.shape, generator=_gen(-3)))
        m.bias.zero_()
    return m


class _Logged(TorchftCommunicator):
    """The communicator with a log line per round and, optionally, a death inside one."""

    log: Any
    die_at_round: int = -1

    def begin_round(self, round: int):
        self._round = round
        self._start = super().begin_round(round)
        return self._start

    def end_round(self, ok: bool) -> bool:
        if self._round == self.die_at_round:
            time.sleep(0.3)  # the others have finished the reduction and wait in the vote
            os._exit(3)
        committed = super().end_round(ok)
        self._last = dict(
            round=self._round,
            P=self.world_size,
            quorum=self.epoch,
            ok=bool(ok),
            committed=committed,
            healed=self._start.healed,
            contribute=self._start.contribute,
        )
        return committed


def run_train(cfg: dict[str, Any]) -> None:
    me = cfg["replica"]
    torch.manual_seed(0)
    if cfg.get("go"):
        _wait_for(cfg["go"])
    comm = _comm(cfg, _Logged)
    comm.die_at_round = cfg.get("die_at_round", -1)
    log = open(cfg["log"], "a")  # noqa: SIM115 - closed below
    model = _model()
    inner = functools.partial(torch.optim.SGD, lr=cfg.get("inner_lr", 0.05))
    if cfg.get("optimizer") == "streaming":  # two fragments, each overlapped one step
        opt: Any = StreamingDiLoCo(
            model.parameters(), inner, sync_every=cfg["sync_every"], fragments=2,
            overlap_steps=1, comm=comm,
        )  # fmt: skip
    else:
        opt = DiLoCo(model.parameters(), inner, sync_every=cfg["sync_every"], comm=comm)

    def hook(_opt: Any, info: Any) -> None:
        line = dict(comm._last, sync_step=info.sync_step, weight=info.weight, pid=os.getpid())
        line["digest"] = opt.consistency_digest()
        log.write(json.dumps(line) + "\n")
        log.flush()

    opt.register_sync_post_hook(hook)
    if cfg.get("barrier"):
        _barrier(cfg["barrier"], me, cfg["replicas"])
    if cfg.get("announce"):
        Path(cfg["announce"]).write_text("")
    hold = cfg.get("hold")  # {"at": sync step, "file": path}: wait there until the file exists
    while opt.inner_step < cfg["steps"]:
        if hold and opt.sync_step == hold["at"]:
            _wait_for(hold["file"])
            hold = None
        x, y = _batch(me, opt.inner_step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    x, y = _batch(-2, -2, 4096)  # the eval set: no replica trains on it
    with torch.no_grad(), opt.global_params():
        loss = float(F.mse_loss(model(x).double(), y.double()))
    heals = [r for r in comm.ledger.records if r.op == "fetch_state"]
    log.write(
        json.dumps(
            dict(
                done=True,
                eval=loss,
                digest=opt.consistency_digest(),
                sync_step=opt.sync_step,
                inner_step=opt.inner_step,
                fetched=[r.recv for r in heals],
                pid=os.getpid(),
            )
        )
        + "\n"
    )
    log.close()
    comm.close()


if __name__ == "__main__":
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    {"ops": run_ops, "train": run_train}[mode](cfg)
