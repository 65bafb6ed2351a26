"""Hardening report: for each defect an adversarial review found, what happens now.

Run::

    .venv/bin/python benchmarks/hardening.py                  # all 13 items (a few minutes)
    .venv/bin/python benchmarks/hardening.py --only bomb,gloo_lies
    .venv/bin/python benchmarks/hardening.py --write          # also replace the block in RESULTS.md

Each item runs the scenario of the tests that cover the fix, with their own helpers and
constants, imported from ``tests/compression``, ``tests/collectives``, ``tests/optim`` and
``tests/reliability``: a crafted payload decoded in a child process under an address-space cap,
hostile hivemind peers on 127.0.0.1, a lying gloo rank among three real processes, hostile and
non-finite peers in the reliability suite's regression task (``_faults.Regression``), forked gloo
ranks that exit with a sync in flight, and the optimizer table. The "before" column quotes what
the review measured on the code before the fixes (one-off runs, not repeated here); the "now"
column is this run. Times and memory depend on the machine's load; losses and bit counts come
from seeded, deterministic runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import logging
import math
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _provenance import git_commit

import thinwire

HERE = Path(__file__).resolve().parent
for _sub in ("reliability", "optim", "collectives", "compression"):
    sys.path.insert(0, str(HERE.parent / "tests" / _sub))

BEGIN = "<!-- hardening.py:begin -->"
END = "<!-- hardening.py:end -->"
SECTION = "## Hardening against an adversarial review"
AFTER = "## Reliability under faults"  # the new section goes right after this one


# A scenario returns the "now" cell of its row and detail lines (full messages) for below it.
Result = tuple[str, list[str]]


@dataclass(frozen=True)
class Item:
    """One defect of the review: what it was, what the review measured, the tests of the fix,
    and the scenario that measures it now."""

    defect: str
    before: str  # the review's one-off measurement on the code before the fix (not re-run)
    tests: tuple[str, ...]  # pytest node ids; "::name" continues the previous file
    run: Callable[[], Result]


ITEMS: dict[str, Item] = {}  # in the review's order


def item(
    name: str, defect: str, before: str, *tests: str
) -> Callable[[Callable[[], Result]], Callable[[], Result]]:
    """Register the decorated scenario as item ``name`` of the report."""

    def register(run: Callable[[], Result]) -> Callable[[], Result]:
        ITEMS[name] = Item(defect, before, tests, run)
        return run

    return register


# ---------------------------------------------------------------------------------- helpers
def _status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM, VmSize, VmPeak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    """Set this process's VmHWM back to its current RSS (``clear_refs`` 5, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _ratio(loss: float, clean: float) -> str:
    if not math.isfinite(loss):
        return "diverged"
    r = loss / clean
    return f"{r:.3f}x" if r < 1000 else f"{r:.1e}x"


def _run_id(name: str) -> str:
    return f"tw-hardening-{name}-{os.getpid()}-{int(time.time())}"


def _quiet_hivemind() -> None:
    logging.getLogger("hivemind").setLevel(logging.ERROR)


# ---------------------------------------------------------------------- 1. decompression bomb
# The decodes run in a child whose address space is capped 1 GiB above what it has mapped, as
# in the test: a regression then fails to allocate instead of exhausting this machine.
_BOMB_CHILD = """
import json, resource, sys, time
from thinwire.compression import DenseCodec, SparseCodec

cfg = json.loads(sys.argv[1])
codecs = {"sparse": SparseCodec(**cfg["sparse_kw"]), "dense": DenseCodec(**cfg["dense_kw"])}
payloads = {name: open(path, "rb").read() for name, path in cfg["files"].items()}

def kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

vm = kb("VmSize") * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))
hwm0 = kb("VmHWM")
out = {}
for call in ("sparse.decode", "sparse.decode_sparse", "dense.decode"):
    name, method = call.split(".")
    t0 = time.perf_counter()
    try:
        getattr(codecs[name], method)(payloads[name])
        kind, msg = "returned", ""
    except BaseException as exc:
        kind, msg = type(exc).__name__, str(exc)
    out[call] = {"kind": kind, "msg": msg, "s": time.perf_counter() - t0,
                 "peak_kb": kb("VmHWM") - hwm0}
print(json.dumps(out))
"""


@item(
    "bomb",
    "Decompression bomb: a small valid sparse payload declaring shape (32768, 32768), decoded "
    "without `numel`",
    "0.43 MB payload: 4 GiB allocated, 17.6 GB peak RSS, 32 s",
    "tests/compression/test_decode_limits.py::"
    "test_huge_declared_shape_raises_payload_error_under_memory_limit",
    "::test_max_numel_is_checked_before_the_body_is_decoded",
)
def bomb() -> Result:
    import test_decode_limits as t

    from thinwire.compression import DenseCodec, SparseCodec

    sparse, dense = SparseCodec(**t.SPARSE_KW), DenseCodec(**t.DENSE_KW)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"sparse": Path(tmp) / "sparse.bin", "dense": Path(tmp) / "dense.bin"}
        files["sparse"].write_bytes(t.sparse_bomb(sparse, t.BOMB_SHAPE))
        files["dense"].write_bytes(t.dense_bomb(dense, t.DENSE_BOMB_SHAPE))
        sizes = {k: v.stat().st_size for k, v in files.items()}
        arg = json.dumps(
            {
                "sparse_kw": t.SPARSE_KW,
                "dense_kw": t.DENSE_KW,
                "files": {k: str(v) for k, v in files.items()},
            }
        )
        proc = subprocess.run(
            [sys.executable, "-c", _BOMB_CHILD, arg], capture_output=True, text=True, timeout=300
        )
    if proc.returncode != 0:
        return f"child failed (exit {proc.returncode})", [proc.stderr[-2000:]]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    cells = []
    for call, payload in (
        ("sparse.decode", "sparse"),
        ("sparse.decode_sparse", "sparse"),
        ("dense.decode", "dense"),
    ):
        o = got[call]
        cells.append(
            f"`{call}` of {sizes[payload] / 1e6:.2f} MB: `{o['kind']}` after "
            f"{1e3 * o['s']:.1f} ms, peak RSS +{_mb(o['peak_kb'])}"
        )
    declared = f"sparse {t.BOMB_SHAPE}, dense {t.DENSE_BOMB_SHAPE} float32 declared"
    details = [f"`{call}`: {got[call]['kind']}: {got[call]['msg']}" for call in got]
    return f"{declared}: " + "; ".join(cells), details


# -------------------------------------------------------------- 2. hivemind: bounded transfers
@item(
    "hm_transfers",
    "hivemind: unbounded transfers (a huge announced length; a trickling peer)",
    "`len = 2**40` announced: the honest peer grew ~200 MB/s; one chunk per 4 s held the op past "
    "60 s",
    "tests/collectives/test_hivemind_hardening.py::"
    "test_oversized_announcements_are_refused_before_fetching",
    "::test_trickling_peer_is_dropped_at_the_op_deadline",
)
def hm_transfers() -> Result:
    import test_hivemind as hm
    import test_hivemind_hardening as hh

    _quiet_hivemind()
    # the test's `pair` fixture: fetches of one op share one deadline (allreduce_timeout 3 s)
    peers = hm._swarm(2, _run_id("size"), expected_world_size=2, round_wait_timeout=2.0,
                      allreduce_timeout=3.0)  # fmt: skip
    try:
        honest, hostile = peers
        # 2**40 announced, then 32 MiB as fast as it can (the test's hostile peer)
        evil = hh._Hostile(2**40, [bytes(hh.CHUNK)] * 64)
        hh._serve_with(hostile, evil)
        rss0 = _status_kb("VmRSS")
        _reset_peak_rss()
        th = hh._join_with(hostile, "big", 0, hh._meta(2**40))
        t0 = time.monotonic()
        h = honest.all_gather_bytes(b"honest", tag="big", round=0, async_op=True)
        out = h.wait(timeout=60)
        big_s = time.monotonic() - t0
        th.join(timeout=30)
        big_peak = _status_kb("VmHWM") - rss0
        big_dropped = h.missing == (hostile.peer_id,) and out.count(None) == 1
        # 40 chunks, one every 4 s (each inside next_chunk_timeout): 160 s for the payload
        data = bytes(40 * hh.CHUNK)
        chunks = [data[i : i + hh.CHUNK] for i in range(0, len(data), hh.CHUNK)]
        slow = hh._Hostile(len(data), chunks, gap=4.0)
        hh._serve_with(hostile, slow)
        th = hh._join_with(hostile, "slow", 0, hh._meta(len(data), data))
        t0 = time.monotonic()
        h = honest.all_gather_bytes(b"honest", tag="slow", round=0, async_op=True)
        out = h.wait(timeout=45)
        slow_s = time.monotonic() - t0
        th.join(timeout=30)
        slow_dropped = h.missing == (hostile.peer_id,) and b"honest" in out
        fetch_s = honest._fetch_s
    finally:
        hm._close(peers)
    cell = (
        f"`len = 2**40`: {evil.requests} fetch requests, peer "
        f"{'dropped' if big_dropped else 'NOT dropped'} after {big_s:.1f} s, peak RSS "
        f"+{_mb(big_peak)}; one chunk per 4 s: {'dropped' if slow_dropped else 'NOT dropped'} "
        f"after {slow_s:.1f} s (op fetch deadline {fetch_s:g} s)"
    )
    return cell, []


# ------------------------------------------------------------------------- 3. gloo length lies
# The lies of test_length_lies.GLOO_SCENARIOS reported here (the others: other caps and signs).
_GLOO_SHOWN = ("cap:ring:2147483648:default", "cap:direct:1099511627776:default")


def _gloo_lies_worker(rank: int, tmp: str) -> None:
    """One rank of the test's gloo scenarios (``_gloo_worker``), with its memory per scenario."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    logging.getLogger("thinwire").setLevel(logging.CRITICAL)  # the refusals are reported
    import test_length_lies as t
    import torch.distributed as dist

    from thinwire.collectives import TorchDistCommunicator

    world = TorchDistCommunicator(
        init_method=f"file://{tmp}/rdzv", rank=rank, world_size=t.P, timeout_s=t.TIMEOUT_S
    )
    out: dict[str, Any] = {}
    try:
        for name in t.GLOO_SCENARIOS:
            group = dist.new_group(list(range(t.P)))
            cls = t._stale_rows_class() if name == "stale-ring-row" else TorchDistCommunicator
            comm = cls(group, timeout_s=t.TIMEOUT_S)
            vm0 = _status_kb("VmSize")
            res = t._scenario(name, comm)
            # VmPeak now minus VmSize before: a bound on the address space mapped during the
            # scenario, which counts an allocation of the announced size even if untouched
            out[name] = {"res": res, "mapped_kb": _status_kb("VmPeak") - vm0}
    finally:
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
        world.close()


@item(
    "gloo_lies",
    "gloo `all_gather_bytes`: a rank lies about its payload length",
    "2 GiB announced, 100 bytes sent: honest ranks allocated 2 GiB and returned stale padding",
    "tests/collectives/test_length_lies.py::"
    "test_gloo_length_above_cap_is_refused_before_allocating",
    "::test_gloo_short_direct_send_returns_only_sent_bytes_and_zeros",
    "::test_gloo_ring_row_without_end_mark_is_refused",
)
def gloo_lies() -> Result:
    import test_length_lies as t
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_lies_worker, args=(tmp,), nprocs=t.P, join=True)
        res = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(t.P)]
    honest = [r for r in range(t.P) if r != t.LIAR]
    cells, details = [], []
    for name in _GLOO_SHOWN:
        outs = [res[r][name]["res"] for r in honest]
        errs = sorted({o.get("err", "returned") for o in outs})
        worst = max(o.get("elapsed", math.nan) for o in outs)
        mapped = max(res[r][name]["mapped_kb"] for r in honest)
        announced = int(name.split(":")[2])
        cells.append(
            f"{announced / 2**30:g} GiB announced ({name.split(':')[1]}): "
            f"{'/'.join(errs)} on {len(outs)}/{len(honest)} honest ranks within "
            f"{1e3 * worst:.0f} ms, at most {_mb(mapped)} of address space mapped meanwhile "
            f"(the announced allocation alone: {announced / 2**20:,.0f} MB)"
        )
        details.append(f"`{name}`: {outs[0].get('msg', outs[0])}")
    short = [res[r]["short-direct"]["res"] for r in honest]
    want = t.SENT + bytes(4096 - len(t.SENT))
    clean = sum(o.get("ok", [None] * t.P)[t.LIAR] == want for o in short)
    stale = sum(o["ok"][t.LIAR].count(t.STALE) for o in short if "ok" in o)
    cells.append(
        f"4096 announced, {len(t.SENT)} sent: entry = the sent bytes + zeros on "
        f"{clean}/{len(honest)} ranks, {stale} stale bytes"
    )
    for name in ("unmarked-ring", "stale-ring-row"):
        outs = [res[r][name]["res"] for r in honest]
        marked = sum("without its end mark" in o.get("msg", "") for o in outs)
        cells.append(f"ring row without its end mark (`{name}`): refused on {marked}/{len(outs)}")
        details.append(f"`{name}`: {outs[0].get('msg', outs[0])}")
    others = [n for n in t.GLOO_SCENARIOS if n.startswith("cap") and n not in _GLOO_SHOWN]
    refused = sum(res[r][n]["res"].get("err") == "CommError" for n in others for r in honest)
    cells.append(f"other caps and lengths ({len(others)} scenarios): {refused}/"
                 f"{len(others) * len(honest)} CommError")  # fmt: skip
    return "; ".join(cells), details


# ------------------------------------------------------------------------ 4. hivemind exposure
def _ipv4(hex_le: str) -> str:
    """``/proc/net/tcp``'s little-endian hex IPv4 address, dotted."""
    if len(hex_le) != 8:
        return hex_le  # an IPv6 socket
    return socket.inet_ntoa(bytes.fromhex(hex_le)[::-1])


@item(
    "hm_exposure",
    "hivemind exposure: listening address, unsigned DHT records, guessable payload ids",
    "daemon on 0.0.0.0; unsigned records (tombstones and fake members accepted); payload id "
    "`{round}:{tag}`",
    "tests/collectives/test_hivemind_hardening.py::test_default_listens_on_loopback_only",
    "::test_forged_membership_records_are_refused",
    "::test_payloads_cannot_be_fetched_by_a_guessed_id",
)
def hm_exposure() -> Result:
    import test_hivemind as hm
    import test_hivemind_hardening as hh

    from thinwire.collectives import HivemindCommunicator

    _quiet_hivemind()
    comm = HivemindCommunicator.create(_run_id("listen"), expected_world_size=1)  # defaults
    try:
        addrs = comm.visible_maddrs()
        port = int(addrs[0].split("/tcp/")[1].split("/")[0])
        listening = sorted(_ipv4(ip) for ip in hh._listening_ips(port))
    finally:
        comm.close()
    # the test's `exposed` fixture: three peers that wait for every live member
    peers = hm._swarm(3, _run_id("exposed"), round_wait_timeout=20.0)
    try:
        a, b, x = peers
        ha = a.all_gather_bytes(b"secret-a", tag="u", round=0, async_op=True)
        hb = b.all_gather_bytes(b"secret-b", tag="u", round=0, async_op=True)
        time.sleep(1.0)  # a and b have offered their payloads and wait for x
        old_id = hh._fetch_as(x, a.peer_id, "0:u")  # the old id: f"{round}:{tag}"
        guessed = hh._fetch_as(x, a.peer_id, secrets.token_hex(16))
        hx = x.all_gather_bytes(b"secret-x", tag="u", round=0, async_op=True)
        outs = [h.wait(timeout=60) for h in (ha, hb, hx)]
        gathered = all(
            sorted(map(bytes, o)) == [b"secret-a", b"secret-b", b"secret-x"] for o in outs
        )
        left = [hh._served_bytes(c) for c in peers]
        # the forged-record scenario is the test itself (a bare DHT tombstoning every member and
        # writing 40 fake ones, signed and unsigned); it prints how long the round took
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                hh.test_forged_membership_records_are_refused(peers)
            forged = f"passed, {printed.getvalue().strip()}"
        except BaseException as exc:  # reported: a failure here is a finding
            forged = f"FAILED: {_err(exc)}"
    finally:
        hm._close(peers)

    def shown(v: bytes | None) -> str:
        return "nothing" if v is None else f"{len(v)} bytes"

    cell = (
        f"default daemon listens on {', '.join(listening)} only; fetch by the old id `0:u`: "
        f"{shown(old_id)}, by a random token: {shown(guessed)} (the round then gathered all 3 "
        f"payloads: {'yes' if gathered else 'NO'}; served bytes after it: {left}); forged "
        f"tombstones + 40 fake members: {forged}"
    )
    return cell, [f"visible multiaddrs of a default peer: {addrs}"]


# --------------------------------------------------------- 5, 6. training runs with a bad peer
def _regression(
    P: int,
    rule: str,
    *,
    kind: str = "diloco",
    faults: dict[int, tuple[Any, ...]] | None = None,
    comms: list[Any] | None = None,
    **kw: Any,
) -> list[Any]:
    """Train the reliability suite's regression (``test_hostile``'s setup for ``kind``) on ``P``
    in-process ranks; per rank a dict (eval loss, params, drops seen) or the exception raised."""
    import test_hostile as h
    from _faults import FaultyComm, run_threads

    from thinwire.collectives import InprocCommunicator

    comms = comms if comms is not None else InprocCommunicator.group(P, timeout_s=30)
    base = h.TASK.model()
    codec = h._codec(kind)

    def worker(r: int) -> dict[str, Any]:
        model = copy.deepcopy(base)
        comm = FaultyComm(comms[r], (faults or {}).get(r, ()), codec=codec)
        try:
            opt = h._optimizer(kind, model, comm, rule, **kw)
            for s in range(h.SETUPS[kind]["steps"]):
                h.TASK.step(model, opt, r, s)
        except BaseException:
            comm.close()  # the peers fail at once instead of waiting for the timeout
            raise
        drops = sum(rec.op == "drop" for rec in comm.ledger.records)
        return {
            "loss": h._eval(kind, model, opt),
            "params": [p.detach().clone() for p in model.parameters()],
            "drops": drops,
        }

    return run_threads([functools.partial(worker, r) for r in range(P)])


def _outcome(o: Any, clean: float) -> str:
    if isinstance(o, BaseException):
        return f"`{type(o).__name__}`"
    return _ratio(o["loss"], clean)


@item(
    "robust_size",
    "Robust rules at small group sizes: `trimmed_mean` trimming nobody, `clip` with an all-zero "
    "peer",
    "`trimmed_mean`, 2-3 peers: trim 0, a x1e6 peer won (3.6e71x the clean loss); `clip` with a "
    "zero peer froze training (133x)",
    "tests/optim/test_reduce_faults.py::"
    "test_trimmed_mean_that_cannot_trim_is_refused_by_make_reducer",
    "::test_trimmed_mean_with_trim_one_drops_a_huge_peer_among_three",
    "::test_dense_clip_with_a_stalled_peer_does_not_freeze_training",
    "::test_sparse_clip_with_a_stalled_peer_does_not_freeze_training",
    "tests/compression/test_robust.py::test_trimmed_mean_refuses_a_size_it_cannot_trim",
    "::test_clip_with_a_stalled_peer_does_not_freeze_the_other",
)
def robust_size() -> Result:
    import test_hostile as h
    from _faults import Fault

    huge, zero = (Fault("scale", arg=1e6),), (Fault("scale", arg=0.0),)
    clean3 = _regression(3, "mean")[0]["loss"]
    clean2 = _regression(2, "mean")[0]["loss"]
    refused = {P: _regression(P, "trimmed_mean", faults={P - 1: huge})[0] for P in (2, 3)}
    trim1 = _regression(3, "trimmed_mean", faults={2: huge}, trim=1)[0]
    clip = {
        kind: _regression(2, "clip", kind=kind, faults={1: zero})[0]
        for kind in ("diloco", "sparseloco")
    }
    clean2_sparse = _regression(2, "mean", kind="sparseloco")[0]["loss"]
    # context: the unprotected mean with the same zero peer, and a run that never moves
    mean_zero = _regression(2, "mean", kind="sparseloco", faults={1: zero})[0]
    frozen = h.TASK.eval_loss(h.TASK.model())
    cell = (
        f"`trimmed_mean` at the default trim, 2 and 3 peers: {_outcome(refused[2], clean2)} / "
        f"{_outcome(refused[3], clean3)} (refused at construction); `trim=1` of 3 peers, one "
        f"x1e6: {_outcome(trim1, clean3)} the clean loss; `clip`, 2 peers, one all-zero: "
        f"DiLoCo {_outcome(clip['diloco'], clean2)}, SparseLoCo "
        f"{_outcome(clip['sparseloco'], clean2_sparse)} the clean 2-peer loss (SparseLoCo "
        f"with the plain mean and the same zero peer: {_outcome(mean_zero, clean2_sparse)}; "
        f"no training at all: {_ratio(frozen, clean2_sparse)})"
    )
    details = [
        f"`trimmed_mean`, {P} peers: {_err(o) if isinstance(o, BaseException) else 'ran'}"
        for P, o in refused.items()
    ]
    details.append(
        f"clean losses (plain mean, no bad peer): DiLoCo 3 peers {clean3:.5f}, 2 peers "
        f"{clean2:.5f}; SparseLoCo 2 peers {clean2_sparse:.5f}"
    )
    return cell, details


@item(
    "nonfinite_peer",
    'One peer sending NaN or ±3e38 under `robust="mean"`',
    "one NaN peer froze every rank (134x); ±3e38 ended training with `FloatingPointError`",
    "tests/optim/test_reduce_faults.py::"
    "test_a_peer_sending_nonfinite_or_overflowing_values_is_dropped",
    "::test_reducer_drops_the_bad_row_and_counts_it",
)
def nonfinite_peer() -> Result:
    import test_reduce_faults as rf

    clean2 = _regression(2, "mean", compressor=None)
    cells, details = [], []
    for poison in ("nan", "huge"):
        comms = rf._BadSender.group(3, timeout_s=30.0)
        comms[2].poison = poison
        bad3 = _regression(3, "mean", comms=comms, compressor=None)
        first = next((o for o in bad3 if isinstance(o, BaseException)), None)
        if first is not None:
            cells.append(f"{poison}: `{type(first).__name__}`")
            details.append(f"{poison}: {_err(first)}")
            continue
        same = all(
            torch.equal(a, b)
            for r in (0, 1)
            for a, b in zip(bad3[r]["params"], clean2[r]["params"], strict=True)
        )
        label = "NaN" if poison == "nan" else f"±{rf.HUGE:.0e}"
        cells.append(
            f"{label}: {_ratio(bad3[0]['loss'], clean2[0]['loss'])} the clean run without it "
            f"(honest θ bitwise equal: {'yes' if same else 'NO'}; drops counted per rank: "
            f"{[o['drops'] for o in bad3[:2]]})"
        )
    return "; ".join(cells), details


# --------------------------------------------------------------- 7. exit with a sync in flight
EXIT_PLAN = ["exit"] * 10 + ["close"] * 2  # the test's plan


@item(
    "exit_in_flight",
    "Process exit with an overlapped sync in flight",
    "aborted (SIGABRT, exit 134): StreamingDiLoCo 9/10 runs, DeMo overlap 5/10",
    "tests/optim/test_exit_in_flight.py::test_exit_with_syncs_in_flight_is_clean_ten_runs_in_a_row",
)
def exit_in_flight() -> Result:
    import test_exit_in_flight as t

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
        proc = subprocess.run(
            [sys.executable, t.__file__, "--launch", tmp, *EXIT_PLAN],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if proc.returncode != 0:
            return f"launcher failed (exit {proc.returncode})", [proc.stderr[-2000:]]
        codes = json.loads(proc.stdout.strip().splitlines()[-1])
        aborts = sum(
            "terminate called" in (Path(tmp) / f"run{run}_rank{rank}.err").read_text()
            for run in range(len(EXIT_PLAN))
            for rank in range(t.P)
        )
    cells = []
    for mode in ("exit", "close"):
        runs = [c for m, c in zip(EXIT_PLAN, codes, strict=True) if m == mode]
        clean = sum(all(code == 0 for code in c) for c in runs)
        seen = sorted({code for c in runs for code in c})
        cells.append(f"{mode}: {clean}/{len(runs)} runs with every rank exiting 0 (codes {seen})")
    return (
        f"{t.P} gloo ranks, StreamingDiLoCo + DeMo overlap in flight; "
        + "; ".join(cells)
        + f"; `terminate called` in {aborts} of {t.P * len(EXIT_PLAN)} rank logs",
        [],
    )


# ------------------------------------------------------------------ 8. hivemind: serve table
GATHERS, GATHER_MB = 30, 4  # the review's run


@item(
    "hm_served",
    "hivemind: payloads kept in the serve table after the gather",
    "30 gathers of 4 MB: 120 MB still served per peer (kept ~20 min)",
    "tests/collectives/test_hivemind_hardening.py::test_many_gathers_leave_nothing_served",
)
def hm_served() -> Result:
    import test_hivemind as hm
    import test_hivemind_hardening as hh

    _quiet_hivemind()
    # the test's swarm (it runs 8 gathers; the review's run had 30)
    peers = hm._swarm(2, _run_id("serve"), expected_world_size=2, round_wait_timeout=2.0)
    try:
        payloads = [bytes([k]) * (GATHER_MB << 20) for k in range(2)]
        worst, ok = 0, 0
        t0 = time.monotonic()
        for r in range(GATHERS):
            outs = hm._together([lambda c=c, p=p, r=r: c.all_gather_bytes(p, tag="s", round=r)
                                 for c, p in zip(peers, payloads, strict=True)])  # fmt: skip
            ok += all(sorted(o) == sorted(payloads) for o in outs)
            worst = max(worst, *(hh._served_bytes(c) for c in peers))
        took = time.monotonic() - t0
        left = [hh._served_bytes(c) for c in peers]
    finally:
        hm._close(peers)
    cell = (
        f"{GATHERS} gathers of {GATHER_MB} MB ({ok}/{GATHERS} complete, {took:.1f} s): bytes "
        f"still served per peer after the last one {left}; most after any gather {worst}"
    )
    return cell, []


# ------------------------------------------------------------------ 9. hivemind: a dead peer
ROUND_WAIT_S = 30.0  # the test's round_wait_timeout


@item(
    "hm_dead_peer",
    "hivemind: a dead peer with `expected_world_size`",
    "every round waited the full `round_wait_timeout`",
    "tests/collectives/test_hivemind_hardening.py::"
    "test_dead_peer_is_forgotten_with_expected_world_size",
)
def hm_dead_peer() -> Result:
    import test_hivemind as hm

    _quiet_hivemind()
    peers = hm._swarm(3, _run_id("dead"), expected_world_size=3, round_wait_timeout=ROUND_WAIT_S)
    try:
        a, b, c = peers
        warm = hm._together([lambda p=p: p.control_max([1.0], tag="warm") for p in peers])
        if warm != [[1.0]] * 3:
            return f"warm-up round failed: {warm}", []
        hm._kill([c._dht.pid] + hm._descendants(c._dht.pid) + [av.pid for av in c._slots.values()])
        killed = time.monotonic()
        ab = tuple(sorted((a.peer_id, b.peer_id)))

        def gather(r: int) -> tuple[float, bool]:
            t0 = time.monotonic()
            hs = [p.all_gather_bytes(bytes([k]), tag="d", round=r, async_op=True)
                  for k, p in enumerate((a, b))]  # fmt: skip
            outs = [h.wait(timeout=ROUND_WAIT_S + 15) for h in hs]
            return time.monotonic() - t0, outs[0] == outs[1] and all(h.group == ab for h in hs)

        first = gather(0)  # started right after the kill: c is still listed as alive
        while c.peer_id in [p.peer_id for p in a.peers()]:
            if time.monotonic() - killed > 60:
                return "the dead peer was still listed 60 s after the kill", []
            time.sleep(0.25)
        expired = time.monotonic() - killed
        later = [gather(r) for r in (1, 2)]
    finally:
        hm._close(peers)
    good = sum(ok for _, ok in (first, *later))
    cell = (
        f"3 peers, one killed, `round_wait_timeout` {ROUND_WAIT_S:g} s: a round started at the "
        f"kill formed after {first[0]:.1f} s; the peer left the member list {expired:.1f} s after "
        f"the kill; the next 2 rounds formed after {later[0][0]:.1f} s and {later[1][0]:.1f} s "
        f"({good}/3 rounds with exactly the 2 live peers)"
    )
    return cell, []


# --------------------------------------------------------------------- 10. checkpoint settings
@item(
    "checkpoint",
    "Checkpoints silently overriding the constructor's settings",
    "the checkpoint's settings replaced the constructor's, silently (compressor, `topk`, "
    "fragments, even the class)",
    "tests/optim/test_checkpoint_settings.py::"
    "test_mismatched_setting_is_refused_naming_both_values",
    "::test_other_param_shapes_are_refused_at_load",
)
def checkpoint() -> Result:
    import test_checkpoint_settings as t
    from _optim_db import assert_same_state, batches, tiny_model, train

    def attempt(saved_with: Any, loaded_into: Any) -> tuple[str, bool]:
        sd = t._saved(saved_with)
        model = tiny_model(seed=5)
        opt = loaded_into(list(model.parameters()))
        train(opt, model, batches(1, seed=1), 0, 1)
        before = t._snapshot(opt, model)
        try:
            opt.load_state_dict(sd)
            outcome = "accepted"
        except Exception as exc:  # the outcome is what is reported
            outcome = _err(exc)
        try:
            assert_same_state(t._snapshot(opt, model), before)
            unchanged = True
        except AssertionError:
            unchanged = False
        return outcome, unchanged

    refused, unchanged, named, accepted = 0, 0, 0, []
    for case in t.MISMATCHES:
        saved_with, loaded_into, match = case.values
        outcome, same = attempt(saved_with, loaded_into)
        if outcome.startswith("ValueError"):
            refused += 1
            named += re.search(match, outcome) is not None
        else:
            accepted.append(f"{case.id}: {outcome}")
        unchanged += same
    example = attempt(*t.MISMATCHES[2].values[:2])[0]
    # test_other_param_shapes_are_refused_at_load: the same model with fc1.weight transposed
    makes = [t._diloco(), t._stream(), t._sparse(), t._demo(), t._demo(overlap=True)]
    shapes = 0
    for make in makes:
        sd = t._saved(make)
        other = tiny_model()
        with torch.no_grad():
            other.fc1.weight = torch.nn.Parameter(torch.zeros(5, 8))
        try:
            make(list(other.parameters())).load_state_dict(sd)
        except ValueError as exc:
            shapes += "shape of param 0 of group 0 must be (5, 8), got (8, 5)" in str(exc)
    cell = (
        f"{refused}/{len(t.MISMATCHES)} mismatched settings refused with `ValueError` "
        f"({named} naming the setting and both values), optimizer unchanged in "
        f"{unchanged}/{len(t.MISMATCHES)}; params of another shape: {shapes}/{len(makes)} "
        "refused at load; settings: " + ", ".join(f"`{case.id}`" for case in t.MISMATCHES)
    )
    details = [f"e.g. `{t.MISMATCHES[2].id}`: {example}"] + [f"accepted: {a}" for a in accepted]
    return cell, details


# ------------------------------------------------------------------------- 11. param validation
def _bad_group(what: str, ps: list[torch.Tensor]) -> dict[str, Any]:
    """A param group the optimizers must refuse: the inputs of ``test_optim_table``."""
    if what == "complex":
        return {"params": [torch.zeros(3, dtype=torch.complex64, requires_grad=True)]}
    if what == "meta":
        return {"params": [torch.nn.Parameter(torch.empty(4, 3, device="meta"))]}
    if what == "set":
        return {"params": set(ps[2:])}
    return {"params": ps[2:], "outer_lrr": 0.5}  # a misspelt per-group key


def _try_group(info: Any, what: str, where: str) -> BaseException | None:
    """Give ``info``'s optimizer the bad group ``what`` in its constructor or through
    ``add_param_group``; the exception raised, or None if it was accepted."""
    from _optim_db import tiny_model

    ps = list(tiny_model().parameters())
    try:
        if where == "constructor":
            info.make([{"params": ps[:2]}, _bad_group(what, ps)], **info.group_kwargs)
        else:
            info.make(ps[:2], **info.group_kwargs).add_param_group(_bad_group(what, ps))
    except Exception as exc:  # the outcome is what is reported
        return exc
    return None


@item(
    "params",
    "complex, meta and set params; unknown param-group keys",
    "accepted (DeMo kept a complex param's real part; a meta param failed at the first step)",
    "tests/optim/test_optim_table.py::test_complex_param_is_refused_naming_its_index",
    "::test_meta_param_is_refused_at_construction",
    "::test_a_set_of_params_is_refused",
    "::test_unknown_group_key_is_refused_listing_the_accepted_keys",
)
def params() -> Result:
    from _optim_db import OPTIM_DB

    outcomes: dict[str, set[str]] = {}
    refused, total, examples = 0, 0, {}
    for info in OPTIM_DB:
        for what in ("complex", "meta", "set", "unknown key"):
            for where in ("constructor", "add_param_group"):
                exc = _try_group(info, what, where)
                total += 1
                if isinstance(exc, TypeError | ValueError):
                    refused += 1
                    examples.setdefault(what, f"{info.name}, {where}: {_err(exc)}")
                name = "accepted" if exc is None else type(exc).__name__
                outcomes.setdefault(what, set()).add(name)
    kinds = ", ".join(f"{what} → {'/'.join(sorted(o))}" for what, o in outcomes.items())
    cell = (
        f"{refused}/{total} refused ({len(OPTIM_DB)} optimizers x 4 inputs x constructor and "
        f"`add_param_group`): {kinds}"
    )
    return cell, [f"{what}: {msg}" for what, msg in examples.items()]


# ------------------------------------------------------------------------- 12. GradScaler skips
@item(
    "gradscaler",
    "`GradScaler`-skipped steps desynchronising the ranks' sync counts",
    "the skipping rank counted one step fewer; the group hung until the timeout",
    "tests/optim/test_amp_gradscaler.py::test_skipped_step_keeps_the_sync_schedule",
    "::test_demo_skipped_step_joins_the_exchange_and_sends_nothing",
)
def gradscaler() -> Result:
    import test_amp_gradscaler as t
    from _optim_db import assert_same_state, run_ranks

    names = ("DiLoCo", "StreamingDiLoCo", "SparseLoCo", "DeMo", "DeMo-overlap")
    counts, skipped, errors = {}, 0, []
    same_state, same_replicas = [], []
    for name in names:
        try:
            got = run_ranks(2, lambda comm, rank, name=name: t._scaled_run(name, comm, rank))
        except BaseException as exc:  # a hang or a rank error is the finding
            errors.append(f"{name}: {_err(exc)}")
            continue
        counts[name] = [o["count"] for o in got]
        skipped += got[1]["scale"] == t.SCALE / 2 and got[0]["scale"] == t.SCALE
        if name.startswith("DeMo"):
            same_replicas.append(
                all(
                    torch.equal(a, b)
                    for a, b in zip(got[0]["params"][-1], got[1]["params"][-1], strict=True)
                )
            )
            continue
        want = run_ranks(2, lambda comm, rank, name=name: t._oracle_run(name, comm, rank))
        try:
            for r in range(2):
                assert_same_state(got[r]["final"], want[r]["final"])
            same_state.append(True)
        except AssertionError:
            same_state.append(False)
    full = sum(c == [t.T, t.T] for c in counts.values())
    cell = (
        f"2 in-process ranks, {t.T} iterations, rank 1's loss x inf at iteration {t.BAD}: both "
        f"ranks counted {t.T} steps in {full}/{len(names)} optimizers ({', '.join(names)}), "
        f"rank 1's scaler skipped in {skipped}/{len(names)}; DiLoCo family: final state "
        f"bitwise = a run without scaler where rank 1 takes an empty step in "
        f"{sum(same_state)}/{len(same_state)}; DeMo: replicas bitwise equal in "
        f"{sum(same_replicas)}/{len(same_replicas)}"
    )
    details = [f"steps counted per rank: {counts}"] + errors
    return cell, details


# ---------------------------------------------------------------------- 13. butterfly exactness
@item(
    "butterfly",
    "hivemind butterfly all-reduce results differing across peers",
    "results differed across peers in the last bits",
    "tests/collectives/test_hivemind_hardening.py::test_butterfly_results_are_bit_identical",
)
def butterfly() -> Result:
    import test_hivemind as hm

    _quiet_hivemind()
    cases = [
        (None, "mean", torch.float32),
        (None, "sum", torch.float32),
        (None, "mean", torch.float64),
        ("fp16", "mean", torch.float32),
        ("int8", "mean", torch.float32),
    ]
    numel = 300_001  # the test's size: three reducers for fp32, uneven shares
    peers = hm._swarm(3, _run_id("exact"), expected_world_size=3, round_wait_timeout=5.0)
    cells = []
    try:
        for codec, op, dtype in cases:
            xs = [x.to(dtype) for x in hm._inputs(3, numel, seed=11, uniform=codec == "int8")]
            ts = [x.clone() for x in xs]
            tag = f"x{codec}{op}{dtype}"
            res = hm._together(
                [
                    functools.partial(c.all_reduce, t, op, codec=codec, tag=tag)
                    for c, t in zip(peers, ts, strict=True)
                ]
            )
            failed = [r for r in res if isinstance(r, BaseException)]
            label = f"{codec or str(dtype).removeprefix('torch.')} {op}"
            if failed:
                cells.append(f"{label}: `{type(failed[0]).__name__}`")
                continue
            diff = max(float((ts[0].double() - t.double()).abs().max()) for t in ts[1:])
            differ = sum(int((ts[0] != t).sum()) for t in ts[1:])
            ref = hm._mean64(xs) * (3 if op == "sum" else 1)
            err = float((ts[0].double() - ref).abs().max())
            cells.append(f"{label}: {diff:.1g} ({differ} elements differ; off float64 {err:.1g})")
    finally:
        hm._close(peers)
    return (
        f"3 peers, {numel:,} elements; max abs difference from peer 0's result: "
        + "; ".join(cells),
        [],
    )


# ------------------------------------------------------------------------------------ report
def _provenance(args: argparse.Namespace) -> str:
    commit = git_commit()
    # the code measured is src/ and the tests' scenarios; say so if either differs from HEAD
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src", "tests"]).returncode
    if dirty:
        commit += " + uncommitted changes under src/ or tests/"
    try:
        import hivemind

        hv = f", hivemind {hivemind.__version__}"
    except ImportError:
        hv = ""
    cmd = "python benchmarks/hardening.py" + (f" --only {args.only}" if args.only else "")
    return (
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}{hv}, thinwire "
        f"{thinwire.__version__}, commit {commit}; command: `{cmd}`"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _tests_cell(ids: tuple[str, ...]) -> str:
    return "<br>".join(f"`{_cell(i)}`" for i in ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma list of {tuple(ITEMS)} (default: all)")
    ap.add_argument(
        "--write", action="store_true", help="replace the block in benchmarks/RESULTS.md"
    )
    args = ap.parse_args()
    # The report is the markdown block; the library's own error/warning lines would bury it.
    logging.getLogger("thinwire").setLevel(logging.CRITICAL)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()] or list(ITEMS)
    unknown = sorted(set(wanted) - set(ITEMS))
    if unknown:
        ap.error(f"--only must name items in {tuple(ITEMS)}, got {unknown}")
    rows = [
        "| # | defect | before (the review's measurement) | now (this run) | asserted by |",
        "|---:|---|---|---|---|",
    ]
    notes: list[str] = []
    t_all = time.perf_counter()
    for i, (name, it) in enumerate(ITEMS.items(), 1):
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            now, details = it.run()
        except Exception as exc:  # one broken scenario must not hide the others' figures
            now, details = f"scenario raised {_err(exc)}", []
        dt = time.perf_counter() - t0
        rows.append(
            f"| {i} | {_cell(it.defect)} | {_cell(it.before)} | {_cell(now)} ({dt:.0f} s) "
            f"| {_tests_cell(it.tests)} |"
        )
        notes += [f"- {i}. {_cell(d)}" for d in details]
        print(f"[hardening.py] {name} done ({dt:.0f} s)", file=sys.stderr, flush=True)
    out = [BEGIN, _provenance(args), "", *rows, ""]
    if notes:
        out += ["Messages and details:", "", *notes, ""]
    out += [f"_total wall time: {time.perf_counter() - t_all:.0f} s_", END]
    block = "\n".join(out)
    print(block)
    if args.write:
        path = HERE / "RESULTS.md"
        path.write_text(_with_block(path.read_text(), block))


def _with_block(text: str, block: str) -> str:
    """``text`` with ``block`` between the markers, or in a new section after ``AFTER``."""
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + block + tail
    intro = (
        f"{SECTION}\n\n"
        "An adversarial review found the 13 defects below; each is fixed and covered by the\n"
        "tests named. `python benchmarks/hardening.py` runs each test's scenario once and\n"
        'measures what happens now; the "before" column quotes the review\'s own runs on the\n'
        "code before the fixes.\n\n"
    )
    section = intro + block + "\n"
    start = text.find(AFTER)
    nxt = text.find("\n## ", start + len(AFTER)) if start >= 0 else -1
    if nxt < 0:
        return text.rstrip("\n") + "\n\n" + section
    return text[: nxt + 1] + section + "\n" + text[nxt + 1 :]


if __name__ == "__main__":
    main()
