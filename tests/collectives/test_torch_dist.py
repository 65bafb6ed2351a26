"""TorchDistCommunicator on real gloo processes: results, ordering, bytes, async ops, peer exit.

Ranks are real processes (``torch.multiprocessing.spawn``) that rendezvous through a file in a
pytest temp dir, gloo pinned to loopback. Spawning costs seconds per process on two cores, so one
spawn of 4 processes serves every world size through sub-groups (P = 1, 2, 3, 4; the P = 3 group
sits on global ranks 1..3), saves results to ``rank{r}.pt``, and the parent compares them with
float64 oracles and the formulas of :mod:`thinwire.collectives.accounting`. The peer-exit test needs
its own spawn.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from thinwire.collectives import accounting as acct

NUMELS = (1, 7, 1000, 100003)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CASES = [(n, d, op) for n in NUMELS for d in DTYPES for op in ("sum", "mean")]
# rtol 1e-5 and atol 1e-6*P for fp32/fp64; bf16 keeps 8 mantissa bits -> 2e-2.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2}
LENS = (0, 3, 17, 0)  # payload length of rank r for the variable-size gathers
PAYLOAD_BYTES = 1001  # uint8 payload of the equal-size tensor gathers


def _inputs(P: int, numel: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g, dtype=torch.float64).to(dtype) for _ in range(P)]


def _tensor_inputs(P: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per rank: a 1-D uint8 payload of random bytes and a 2-D float32 tensor."""
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randint(0, 256, (PAYLOAD_BYTES,), generator=g, dtype=torch.uint8),
            torch.randn(3, 5, generator=g),
        )
        for _ in range(P)
    ]


def _payload(rank: int) -> bytes:
    return bytes((rank * 31 + k) % 256 for k in range(LENS[rank]))


# One spawn of 4 processes serves every world size: a group per size, the P=3 group on global
# ranks 1..3 so group ranks differ from global ranks (broadcast src and point-to-point mapping).
NPROCS = 4
GROUPS = {1: [0], 2: [0, 1], 3: [1, 2, 3], 4: [0, 1, 2, 3]}


def _exercise(comm: Any, P: int, seen_ops: list[str]) -> dict[str, Any]:
    """Every check for one communicator; returns what the parent compares with oracles."""
    rank = comm.rank
    first_spy = len(seen_ops)
    out: dict[str, Any] = {"engine": comm.engine, "rank": rank, "P": comm.world_size}
    reduced = []
    for i, (n, d, op) in enumerate(CASES):
        t = _inputs(P, n, d, seed=i)[rank].clone()
        assert comm.all_reduce(t, op) is t
        reduced.append(t)
    out["reduced"] = reduced
    u8, f32 = _tensor_inputs(P)[rank]
    out["rows_u8"] = comm.all_gather_into_tensor(u8, tag="payload")
    # async: three more ops go on the wire before this handle is waited
    handle = comm.all_gather_into_tensor(f32, async_op=True)
    out["gather"] = {
        alg: comm.all_gather_bytes(_payload(rank), algorithm=alg)
        for alg in ("ring", "direct", "auto")
    }
    rows = handle.wait()
    out["rows_f32"] = (rows, handle.done(), handle.wait() is rows)
    out["inputs_kept"] = torch.equal(u8, _tensor_inputs(P)[rank][0]) and torch.equal(
        f32, _tensor_inputs(P)[rank][1]
    )
    out["gather_equal"] = comm.all_gather_bytes(torch.full((3,), rank, dtype=torch.int32))
    b0 = torch.full((5,), float(rank))
    comm.broadcast(b0, src=0)
    b1 = torch.full((2, 3), rank, dtype=torch.int64)
    comm.broadcast(b1, src=P - 1)
    out["bcast"] = (b0, b1)
    out["bcast_bytes"] = comm.broadcast_bytes(b"from-last" if rank == P - 1 else None, P - 1)
    out["max"] = comm.control_max([float(rank), -float(rank)])
    # Async: three all-reduces waited in reverse order; the handle caches its value.
    ts = [torch.full((64,), float(10 * rank + i)) for i in range(3)]
    hs = [comm.all_reduce(t, "sum", async_op=True) for t in ts]
    vals = [h.wait() for h in reversed(hs)]
    out["async"] = ([v.clone() for v in vals], [h.done() for h in hs], hs[0].wait() is ts[0])
    comm.barrier()
    out["records"] = [dataclasses.asdict(r) for r in comm.ledger.records]
    out["seen_ops"] = seen_ops[first_spy:]
    return out


def _main_worker(rank: int, nprocs: int, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    from thinwire.collectives.base import OrderMismatch
    from thinwire.collectives.torch_dist import TorchDistCommunicator

    # Spy: every reduce op handed to gloo is recorded; AVG must never appear (older gloo
    # builds reject it; thinwire issues SUM and divides).
    real_all_reduce = dist.all_reduce
    seen_ops: list[str] = []

    def spy(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, *args: Any, **kw: Any) -> Any:
        seen_ops.append(str(op))
        return real_all_reduce(tensor, op, *args, **kw)

    dist.all_reduce = spy
    # The world communicator creates (and owns) the default group from the file rendezvous.
    world = TorchDistCommunicator(
        init_method=f"file://{tmp}/rdzv", rank=rank, world_size=nprocs, timeout_s=60
    )
    out: dict[Any, Any] = {"owns": world._owns_group}
    try:
        # new_group is collective over the whole world, in the same order on every rank.
        groups = {P: dist.new_group(ranks) for P, ranks in GROUPS.items() if P < nprocs}
        debug_group = dist.new_group(list(range(nprocs)))
        for P, ranks in GROUPS.items():
            if rank in ranks:
                comm = world if P == nprocs else TorchDistCommunicator(groups[P], timeout_s=60)
                out[P] = _exercise(comm, P, seen_ops)
        # Order check (every rank must issue collectives in one order): rank 0 all-reduces while
        # the others broadcast.
        checked = TorchDistCommunicator(debug_group, timeout_s=30, debug_checks=True)
        checked.all_reduce(torch.ones(3), tag="warm")
        out["debug_ctl"] = dataclasses.asdict(checked.ledger.records[-1])
        got = checked.all_gather_into_tensor(torch.full((6,), rank, dtype=torch.uint8))
        out["debug_agt"] = (got, dataclasses.asdict(checked.ledger.records[-1]))
        try:
            if rank == 0:
                checked.all_reduce(torch.ones(3), tag="grad")
            else:
                checked.broadcast(torch.ones(3), tag="grad")
            out["mismatch"] = None
        except OrderMismatch as exc:
            out["mismatch"] = str(exc)
        try:
            checked.barrier()
            out["after_mismatch"] = None
        except OrderMismatch as exc:
            out["after_mismatch"] = str(exc)
    finally:
        dist.all_reduce = real_all_reduce
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
        world.close()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_main_worker, args=(NPROCS, str(tmp)), nprocs=NPROCS, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(NPROCS)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_gloo_ops_against_oracles(P, gloo_results):
    res = [gloo_results[g][P] for g in GROUPS[P]]
    assert [o["rank"] for o in res] == list(range(P))
    assert all(o["engine"] == "gloo" and o["P"] == P for o in res)

    # all_reduce vs float64 oracle; bitwise identical on every rank.
    for i, (n, d, op) in enumerate(CASES):
        oracle = torch.zeros(n, dtype=torch.float64)
        for x in _inputs(P, n, d, seed=i):
            oracle += x.double()
        if op == "mean":
            oracle /= P
        for r in range(P):
            assert res[r]["reduced"][i].dtype == d
            assert torch.equal(res[r]["reduced"][i], res[0]["reduced"][i])
        torch.testing.assert_close(
            res[0]["reduced"][i].double(), oracle, rtol=RTOL[d], atol=1e-6 * P
        )

    # Equal-size tensor gathers: row j is exactly rank j's input, inputs untouched.
    xs = _tensor_inputs(P)
    for o in res:
        rows_f32, done, same = o["rows_f32"]
        assert o["rows_u8"].shape == (P, PAYLOAD_BYTES) and o["rows_u8"].dtype == torch.uint8
        assert rows_f32.shape == (P, 3, 5) and rows_f32.dtype == torch.float32
        for j in range(P):
            assert torch.equal(o["rows_u8"][j], xs[j][0]) and torch.equal(rows_f32[j], xs[j][1])
        assert done and same and o["inputs_kept"]

    # Gathers and broadcasts: exact bytes in rank order.
    expected = [_payload(j) for j in range(P)]
    for o in res:
        assert o["gather"] == {"ring": expected, "direct": expected, "auto": expected}
        assert o["gather_equal"] == [
            torch.full((3,), j, dtype=torch.int32).numpy().tobytes() for j in range(P)
        ]
        assert torch.equal(o["bcast"][0], torch.zeros(5))
        assert torch.equal(o["bcast"][1], torch.full((2, 3), P - 1, dtype=torch.int64))
        assert o["bcast_bytes"] == b"from-last"
        assert o["max"] == [float(P - 1), 0.0]
        vals, done, same = o["async"]
        base = 10 * sum(range(P))
        assert [v[0].item() for v in vals] == [base + 2 * P, base + P, float(base)]
        assert done == [True, True, True] and same
        # The spy saw every dense reduce as SUM (control_max as MAX), never AVG.
        sum_max = {str(dist.ReduceOp.SUM), str(dist.ReduceOp.MAX)}
        assert set(o["seen_ops"]) <= sum_max and str(dist.ReduceOp.AVG) not in sum_max
        # Exactly the dense reduces, control_max and the three async ones; none at P == 1.
        assert len(o["seen_ops"]) == (len(CASES) + 4 if P > 1 else 0)

    # Ledger: per op and rank, exactly the accounting formulas.
    sizes = [LENS[j] for j in range(P)]
    for r, o in enumerate(res):
        rows = [(x["op"], x["algorithm"], x["sent"], x["recv"]) for x in o["records"]]
        want = [
            ("all_reduce", "ring", *acct.ring_allreduce_bytes(n, 8 if d == torch.float64 else 4, P))
            for n, d, _ in CASES
        ]
        agt = "all_gather_into_tensor", "ring"
        want += [(*agt, *acct.allgather_tensor_bytes(PAYLOAD_BYTES, P))]
        want += [(*agt, *acct.allgather_tensor_bytes(3 * 5 * 4, P))]
        direct = ("all_gather_bytes", "direct", *acct.allgather_direct_bytes(sizes, r))
        want += [("all_gather_bytes", "ring", *acct.allgather_ring_bytes(sizes)), direct]
        want += [
            direct
            if len(set(sizes)) > 1
            else ("all_gather_bytes", "ring", *acct.allgather_ring_bytes(sizes))
        ]
        want += [("all_gather_bytes", "ring", *acct.allgather_ring_bytes([12] * P))]
        want += [("broadcast", "binomial", *acct.broadcast_binomial_bytes(20, r, 0, P))]
        want += [("broadcast", "binomial", *acct.broadcast_binomial_bytes(48, r, P - 1, P))]
        want += [("broadcast_bytes", "binomial", *acct.broadcast_payload_bytes(9, r, P - 1, P))]
        want += [("control_max", "ring", 0, 0)]
        want += [("all_reduce", "ring", *acct.ring_allreduce_bytes(64, 4, P))] * 3
        assert rows == want
        ctl = [x["control_sent"] for x in o["records"]]
        assert ctl[len(CASES) + 9] == acct.ring_allreduce_bytes(2, 8, P)[0]
        # Control bytes only where thinwire sends them: the control_max vector, and the 8-byte
        # end mark of each ring row of all_gather_bytes (one row to each of the P - 1 peers).
        mark = (P - 1) * 8
        ring_gathers = [len(CASES) + 2, len(CASES) + 5]
        if len(set(sizes)) == 1:
            ring_gathers.append(len(CASES) + 4)
        want_ctl = [0] * len(ctl)
        want_ctl[len(CASES) + 9] = ctl[len(CASES) + 9]
        for i in ring_gathers:
            want_ctl[i] = mark
        assert ctl == want_ctl
        assert all(x["P"] == P and x["rank"] == r and x["engine"] == "gloo" for x in o["records"])
        agt_recs = o["records"][len(CASES) : len(CASES) + 2]
        assert [x["sent"] for x in agt_recs] == [(P - 1) * PAYLOAD_BYTES, (P - 1) * 60]
        assert [x["sizes"] for x in agt_recs] == [(PAYLOAD_BYTES,) * P, (60,) * P]
        assert agt_recs[0]["tag"] == "payload" and agt_recs[1]["payload_bytes"] == 60
        if P > 1:  # local (P == 1) ops take no measured time
            assert all(x["t_real_s"] > 0 for x in o["records"])
    for i in range(len(res[0]["records"])):
        assert sum(o["records"][i]["sent"] for o in res) == sum(
            o["records"][i]["recv"] for o in res
        )


@pytest.mark.timeout(240)
def test_debug_checks_detect_order_mismatch(gloo_results):
    # Collectives issued in different orders: the divergence is named on every rank, and the
    # failed communicator re-raises the same error; signatures are (P-1)*16 control bytes, never
    # payload.
    for o in gloo_results:
        assert o["owns"] is True
        assert o["debug_ctl"]["control_sent"] == (NPROCS - 1) * 16
        assert o["debug_ctl"]["control_recv"] == (NPROCS - 1) * 16
        assert o["debug_ctl"]["sent"] == acct.ring_allreduce_bytes(3, 4, NPROCS)[0]
        got, rec = o["debug_agt"]
        assert torch.equal(got, torch.arange(NPROCS, dtype=torch.uint8)[:, None].expand(-1, 6))
        assert rec["control_sent"] == rec["control_recv"] == (NPROCS - 1) * 16
        assert rec["sent"] == rec["recv"] == (NPROCS - 1) * 6
        assert "all_reduce" in o["mismatch"] and "broadcast" in o["mismatch"]
        assert o["after_mismatch"] == o["mismatch"]


FAIL_TIMEOUT_S = 5.0


def _failure_worker(rank: int, P: int, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import datetime

    from thinwire.collectives.base import CommError
    from thinwire.collectives.torch_dist import TorchDistCommunicator

    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rdzv",
        rank=rank,
        world_size=P,
        timeout=datetime.timedelta(seconds=FAIL_TIMEOUT_S),
    )
    out: dict[str, Any] = {}
    try:
        comm = TorchDistCommunicator(timeout_s=FAIL_TIMEOUT_S)  # wraps the existing group
        out["owns"] = comm._owns_group
        comm.all_reduce(torch.ones(8), "sum")
        comm.barrier()
        if rank == P - 1:
            os._exit(0)  # dies mid-run without any goodbye
        t0 = time.monotonic()
        handle = comm.all_reduce(torch.ones(1000), "sum", async_op=True)
        try:
            handle.wait()
            out["first"] = None
        except CommError as exc:
            out["first"] = (type(exc).__name__, time.monotonic() - t0, str(exc))
        t1 = time.monotonic()
        try:
            comm.broadcast(torch.ones(4), src=0)
            out["later"] = None
        except CommError as exc:
            out["later"] = (type(exc).__name__, time.monotonic() - t1, exc is handle.exception())
    finally:
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_peer_exit_raises_comm_error(tmp_path):
    P = 3
    mp.spawn(_failure_worker, args=(P, str(tmp_path)), nprocs=P, join=True)
    for r in range(P - 1):
        o = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert o["owns"] is False
        name, elapsed, msg = o["first"]
        assert name in {"PeerLost", "CommTimeout", "CommError"}, msg
        assert elapsed < FAIL_TIMEOUT_S + 10
        # Later calls re-raise the stored error object without starting a new op (no timeout).
        later_name, later_elapsed, same = o["later"]
        assert later_name == name and same and later_elapsed < FAIL_TIMEOUT_S


def _exit_worker(rank: int, tmp: str) -> None:
    """A typical torchrun script: the caller owns the group and destroys it at the end, while a
    communicator and an optimizer holding it are still alive (and possibly in a cycle)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    from functools import partial

    from thinwire.collectives import TorchDistCommunicator
    from thinwire.optim import DataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        comm = TorchDistCommunicator(timeout_s=60.0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        opt = DataParallel(model.parameters(), partial(torch.optim.SGD, lr=0.1), comm=comm)
        for _ in range(6):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 4)).backward()
            opt.step()
    finally:
        dist.destroy_process_group()


def _plain_exit_worker(rank: int, tmp: str) -> None:
    """The same job without thinwire: gradients all-reduced with ``dist.all_reduce``."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(6):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 4)).backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            opt.step()
    finally:
        dist.destroy_process_group()


def _aborted_jobs(worker: Any, runs: int, tmp: Path) -> int:
    """Launch ``runs`` two-rank jobs of ``worker``; count those where a rank died of SIGABRT
    (any other failure is raised)."""
    aborted = 0
    for i in range(runs):
        (tmp / str(i)).mkdir(parents=True)
        try:
            mp.spawn(worker, args=(str(tmp / str(i)),), nprocs=2, join=True)
        except mp.ProcessExitedException as exc:
            if exc.signal_name != "SIGABRT":
                raise
            aborted += 1
    return aborted


@pytest.mark.slow  # 24 job launches, about 90 s
@pytest.mark.timeout(400)
def test_processes_exit_cleanly_after_the_caller_destroys_the_group(tmp_path):
    # torch 2.13's gloo group aborts the process ("terminate called without an active
    # exception") when the destroyed group is only freed during interpreter finalization: 37 of
    # 100 plain-torch jobs of this shape aborted here, 0 of 40 when the script called
    # gc.collect() right after destroy_process_group(). thinwire's communicator releases its reference and collects garbage at close()
    # and at interpreter exit: 0 of 60 here, 1 of 12 once on a loaded CI machine. The plain
    # jobs are the control that shows this machine reproduces the defect.
    plain = _aborted_jobs(_plain_exit_worker, 12, tmp_path / "plain")
    mine = _aborted_jobs(_exit_worker, 12, tmp_path / "thinwire")
    print(f"SIGABRT at exit: plain torch {plain} of 12 jobs, thinwire {mine} of 12")
    assert mine <= 1 and mine < plain, (mine, plain)
