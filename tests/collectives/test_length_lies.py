"""``all_gather_bytes`` against a rank that lies about its payload length.

The lying rank calls the engine's primitives directly, in the order ``all_gather_bytes`` issues
them (length exchange, then the payload phase), with a length it does not honour. Honest ranks
run the public op. Oracles: the announced lengths and the cap (an error must name both and the
rank), the bytes the liar actually sent (an entry may hold those and zeros, nothing else), and
the communicator's failure state (a rejected op leaves it ``failed``, re-raising the same error).

Engines: the in-process engine (threads) and ``TorchDistCommunicator`` on real gloo processes
(``torch.multiprocessing.spawn``, FileStore rendezvous in ``tmp_path``, loopback). One spawn runs
every gloo scenario, each on a fresh process group so a failed communicator does not leak into
the next one.

Stale bytes are made visible on purpose: gloo hands back whatever its buffers held where a peer
sent nothing, which is often zeros in a fresh process. Honest gloo ranks therefore allocate
receive buffers through a ``torch.empty`` that fills them with ``STALE`` (as reused memory would
be), and the ring scenario reproduces, in a transport subclass, what gloo was observed to do when
a rank sends a short all-gather row: the rest of the row is copied from gloo's internal buffer,
i.e. bytes of an earlier collective (a real short all-gather send cannot be run as a test: gloo
aborts the *sending* process when it then receives the full-size rows of its peers).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from thinwire.collectives._engine import DEFAULT_MAX_BYTES
from thinwire.collectives.base import CommError
from thinwire.collectives.inproc import InprocCommunicator

P = 3
LIAR = 2
HUGE = 2**40  # announced: 1 TiB, far above the default cap
PAYLOAD = 16  # honest payload length
STALE = 0xEE  # what reused memory holds in these tests
SENT = b"\x07" * 10  # what the short-sending liar actually sends


def _honest(rank: int) -> bytes:
    return bytes([rank + 1]) * PAYLOAD


def _lie_lengths(comm: Any, announce: int) -> None:
    """The liar's length exchange: ``announce`` instead of its real length."""
    comm._op_seq += 1  # as _begin does without debug checks: the op counts on every rank
    lens = torch.tensor([announce], dtype=torch.int64)
    comm._prim_allgather(lens).wait(comm.timeout_s)


def _lie_direct(comm: Any, announce: int, sent: bytes) -> None:
    """Announce ``announce`` bytes, then send only ``sent`` to every peer (``direct``)."""
    _lie_lengths(comm, announce)
    buf = torch.frombuffer(bytearray(sent), dtype=torch.uint8)
    peers = [j for j in range(comm.world_size) if j != comm.rank]
    pending = comm._prim_exchange(
        {j: buf for j in peers}, {j: PAYLOAD for j in peers}, comm._op_seq
    )
    pending.wait(comm.timeout_s)


def _lie_ring_unmarked(comm: Any) -> None:
    """Announce the honest length and all-gather a row of the right size but no end mark."""
    _lie_lengths(comm, PAYLOAD)
    row = torch.zeros(PAYLOAD + comm._RING_END_MARK, dtype=torch.uint8)
    row[:PAYLOAD] = 9
    comm._prim_allgather(row).wait(comm.timeout_s)


def _outcome(comm: Any, fn: Callable[[], Any]) -> dict[str, Any]:
    """Run one honest op; on CommError also check the communicator stays failed."""
    t0 = time.monotonic()
    try:
        return {"ok": fn()}
    except CommError as exc:
        out: dict[str, Any] = {"err": type(exc).__name__, "msg": str(exc)}
        out["elapsed"] = time.monotonic() - t0
        t1 = time.monotonic()
        try:
            comm.all_gather_bytes(b"later")
            out["later"] = None
        except CommError as later:
            out["later"] = (later is exc, time.monotonic() - t1)
        return out


def _cap_msg(announce: int, cap: int) -> str:
    return (
        f"rank {LIAR} announced a payload of {announce} bytes, outside \\[0, {cap}\\] "
        "\\(max_bytes\\)"
    )


# ----------------------------------------------------------------------------- in-process


def _run_threads(fn: Callable[[InprocCommunicator], Any]) -> list[Any]:
    comms = InprocCommunicator.group(P, timeout_s=10)
    out: list[Any] = [None] * P

    def body(r: int) -> None:
        try:
            out[r] = fn(comms[r])
        except BaseException as exc:  # returned to the test, which asserts on it
            out[r] = exc

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "an inproc rank hung"
    return out


@pytest.mark.parametrize("algorithm", ["ring", "direct", "auto"])
@pytest.mark.parametrize(
    ("announce", "cap"), [(HUGE, None), (2**31, None), (65, 64), (-1, None)], ids=str
)
def test_inproc_length_above_cap_is_refused_before_allocating(algorithm, announce, cap):
    kw = {} if cap is None else {"max_bytes": cap}

    def fn(c: InprocCommunicator) -> Any:
        if c.rank == LIAR:
            return _lie_lengths(c, announce)
        return _outcome(c, lambda: c.all_gather_bytes(_honest(c.rank), algorithm=algorithm, **kw))

    res = _run_threads(fn)
    want_cap = DEFAULT_MAX_BYTES if cap is None else cap
    for r in range(P):
        if r == LIAR:
            continue
        o = res[r]
        assert o.get("err") == "CommError", o
        assert o["elapsed"] < 5  # refused at once, not by the 10 s timeout
        assert re.search(_cap_msg(announce, want_cap), o["msg"]), o["msg"]
        assert f"on rank {r}" in o["msg"]
        assert o["later"][0]  # the communicator stays failed with the same error


def test_inproc_short_or_long_sends_are_errors():
    def fn(c: InprocCommunicator) -> Any:
        if c.rank == LIAR:
            try:
                _lie_direct(c, 100, SENT)
            except CommError:
                pass
            return None
        return _outcome(c, lambda: c.all_gather_bytes(_honest(c.rank), algorithm="direct"))

    res = _run_threads(fn)
    for r in range(P):
        if r != LIAR:
            assert res[r].get("err") == "CommError", res[r]
            assert f"rank {LIAR} announced 100 bytes and sent {len(SENT)}" in res[r]["msg"]


def test_inproc_own_payload_above_cap_fails_on_every_rank():
    # Every rank sees every length, its own included, so all ranks refuse together.
    res = _run_threads(lambda c: _outcome(c, lambda: c.all_gather_bytes(bytes(65), max_bytes=64)))
    for r in range(P):
        assert res[r]["err"] == "CommError" and "rank 0 announced a payload of 65" in res[r]["msg"]
    (single,) = InprocCommunicator.group(1)
    assert single.all_gather_bytes(bytes(64), max_bytes=64) == [bytes(64)]
    with pytest.raises(CommError, match=r"announced a payload of 65 bytes"):
        single.all_gather_bytes(bytes(65), max_bytes=64)


def test_inproc_max_bytes_at_the_cap_and_none():
    res = _run_threads(
        lambda c: (
            c.all_gather_bytes(_honest(c.rank), max_bytes=PAYLOAD, algorithm="ring"),
            c.all_gather_bytes(_honest(c.rank) * (c.rank + 1), max_bytes=None),
        )
    )
    for r in range(P):
        assert res[r][0] == [_honest(j) for j in range(P)]
        assert res[r][1] == [_honest(j) * (j + 1) for j in range(P)]


@pytest.mark.parametrize(("bad", "err"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_max_bytes_is_validated_before_any_collective(bad, err):
    (c,) = InprocCommunicator.group(1)
    with pytest.raises(err, match="max_bytes"):
        c.all_gather_bytes(b"x", max_bytes=bad)
    assert c.failed is None and c.all_gather_bytes(b"x") == [b"x"]


# ------------------------------------------------------------------------------------ gloo

TIMEOUT_S = 20.0
SHORT = 5  # bytes of the liar's ring row that arrive in the short-row scenario


def _stale_rows_class() -> type:
    from thinwire.collectives.torch_dist import TorchDistCommunicator

    class StaleRows(TorchDistCommunicator):
        """gloo as observed when rank ``LIAR`` sends only ``SHORT`` bytes of its ring row: the
        rest of that row is copied out of gloo's internal buffer, here ``STALE`` bytes."""

        def _prim_allgather(self, buf: torch.Tensor) -> Any:
            pending = super()._prim_allgather(buf)
            if buf.dtype != torch.uint8:  # the length exchange is int64; only rows are hit
                return pending
            real_wait = pending.wait

            def wait(timeout: float) -> Any:
                rows = real_wait(timeout)
                rows[LIAR][SHORT:] = STALE
                return rows

            pending.wait = wait
            return pending

    return StaleRows


def _scenario(name: str, comm: Any) -> dict[str, Any] | None:
    rank = comm.rank
    mine = _honest(rank)
    if name.startswith("cap"):  # "cap:<algorithm>:<announce>:<max_bytes or default>"
        _, alg, announce, cap = name.split(":")
        kw = {} if cap == "default" else {"max_bytes": int(cap)}
        if rank == LIAR:
            return _lie_lengths(comm, int(announce))
        return _outcome(comm, lambda: comm.all_gather_bytes(mine, algorithm=alg, **kw))
    if name == "short-direct":
        if rank == LIAR:
            return _lie_direct(comm, 4096, SENT)
        real_empty = torch.empty

        def stale_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
            return real_empty(*args, **kwargs).fill_(STALE)

        torch.empty = stale_empty  # receive buffers start as reused memory would
        try:
            return _outcome(comm, lambda: comm.all_gather_bytes(mine, algorithm="direct"))
        finally:
            torch.empty = real_empty
    if name == "unmarked-ring":
        if rank == LIAR:
            return _lie_ring_unmarked(comm)
        return _outcome(comm, lambda: comm.all_gather_bytes(mine, algorithm="ring"))
    if name == "stale-ring-row":  # every rank honest; rows from LIAR arrive short
        return _outcome(comm, lambda: comm.all_gather_bytes(mine, algorithm="ring"))
    raise AssertionError(name)


GLOO_SCENARIOS = [
    f"cap:ring:{HUGE}:default",
    f"cap:direct:{HUGE}:default",
    f"cap:ring:{2**31}:default",
    "cap:direct:65:64",
    "cap:ring:-1:default",
    "short-direct",
    "unmarked-ring",
    "stale-ring-row",
]


def _gloo_worker(rank: int, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    from thinwire.collectives.torch_dist import TorchDistCommunicator

    world = TorchDistCommunicator(
        init_method=f"file://{tmp}/rdzv", rank=rank, world_size=P, timeout_s=TIMEOUT_S
    )
    out: dict[str, Any] = {}
    try:
        for name in GLOO_SCENARIOS:
            group = dist.new_group(list(range(P)))  # a fresh group: failures stay per scenario
            cls = _stale_rows_class() if name == "stale-ring-row" else TorchDistCommunicator
            comm = cls(group, timeout_s=TIMEOUT_S)
            out[name] = _scenario(name, comm)
    finally:
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
        world.close()


@pytest.fixture(scope="module")
def gloo_lies(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("lies")
    mp.spawn(_gloo_worker, args=(str(tmp),), nprocs=P, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(P)]


def _honest_results(res: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [res[r][name] for r in range(P) if r != LIAR]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "name", [n for n in GLOO_SCENARIOS if n.startswith("cap")], ids=lambda n: n
)
def test_gloo_length_above_cap_is_refused_before_allocating(name, gloo_lies):
    _, _, announce, cap = name.split(":")
    want_cap = DEFAULT_MAX_BYTES if cap == "default" else int(cap)
    for o in _honest_results(gloo_lies, name):
        assert o.get("err") == "CommError", o
        assert re.search(_cap_msg(int(announce), want_cap), o["msg"]), o["msg"]
        assert o["elapsed"] < TIMEOUT_S / 2  # refused at once, not by a timeout
        same, later_s = o["later"]
        assert same and later_s < 1.0  # failed: the same error, no new op on the wire


@pytest.mark.timeout(240)
def test_gloo_short_direct_send_returns_only_sent_bytes_and_zeros(gloo_lies):
    # gloo accepts the 10-byte message into the 4096-byte buffer: the entry has the announced
    # length, the bytes the liar sent, then zeros, never the buffer's earlier contents.
    want = SENT + bytes(4096 - len(SENT))
    for r in range(P):
        if r == LIAR:
            continue
        got = gloo_lies[r]["short-direct"]["ok"]
        assert got[LIAR] == want, set(got[LIAR][len(SENT) :])
        assert [got[j] for j in range(P) if j != LIAR] == [
            _honest(j) for j in range(P) if j != LIAR
        ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["unmarked-ring", "stale-ring-row"])
def test_gloo_ring_row_without_end_mark_is_refused(name, gloo_lies):
    for o in _honest_results(gloo_lies, name):
        assert o.get("err") == "CommError", o  # never a returned entry with stale bytes
        assert f"rank {LIAR}'s ring row" in o["msg"] and "without its end mark" in o["msg"]
        assert o["later"][0]
