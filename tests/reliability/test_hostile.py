"""A hostile, broken or careless peer among four (in-process engine).

Ranks are threads of a real :class:`~thinwire.collectives.InprocCommunicator` group; one rank's
communicator is wrapped by the fault harness (``_faults.FaultyComm``), which alters only what that
rank sends. Every run trains the same seeded regression (``_faults.Regression``: known loss floor
0.01) and is deterministic, so each figure is a fixed number that ``benchmarks/faults.py`` prints.

1. Hostile peer: rank 3 sends its update scaled x100, or sign-flipped and scaled x100, every round.
   With robust aggregation (DiLoCo ``median``/``trimmed_mean``/``clip``, SparseLoCo and DeMo
   ``clip``) the final eval loss stays within 5 % of the clean run (no attacker, plain mean); with
   the plain mean the same attack does clear damage (oracle: the clean run's loss).
2. Non-finite gradients on rank 2 never reach another rank, checked on the wire: a tap records
   every frame and tensor every rank sends, and each must decode to finite values. ``raise``:
   rank 2 raises before sending (its tap has no entry for that sync); ``skip``: it sends weight 0
   (a full-size frame with flag 0 and an all-zero body, or a zero vector with weight 0) and the
   round is the mean of the other three.
3. A corrupted frame (bit flips, a zero-filled tail, NaN with a valid CRC) from rank 2 is dropped
   by every rank with a logged reason naming peer 2, never half-applied: the run is bitwise
   identical to one where rank 2 sent a flag-0 frame that round, and (dense) equals the float64
   mean of the others' frames.
   A sender that skips its own finite check (the harness NaN-poisons its update after the check)
   is seen on the wire, and gathered paths drop it too.
4. A straggler: late within the timeout changes nothing (bitwise); beyond it the peers raise
   ``CommTimeout`` within ``timeout_s + 10 s`` instead of hanging.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from typing import Any

import pytest
import torch
from _faults import (
    Fault,
    FaultyComm,
    Regression,
    Tap,
    finite_payload,
    frame_status,
    is_empty_frame,
    run_threads,
)

from thinwire.collectives import CommError, InprocCommunicator
from thinwire.compression import STATUS_EMPTY, STATUS_OK, DenseBucket, DenseCodec, build_codec
from thinwire.optim import DeMo, DiLoCo, LocalSGD, SparseLoCo, StreamingDiLoCo
from thinwire.optim.demo import demo_compressor
from thinwire.optim.sparseloco import sparseloco_compressor

P = 4
HOSTILE, BAD = 3, 2  # the attacker (section 1), the rank that breaks (sections 2 and 3)
TASK = Regression(batch=64)  # batch 64: the clean run reaches 1.01x the floor (see below)
# Steps and learning rates chosen so the clean run ends within ~2 % (DiLoCo, SparseLoCo) or ~60 %
# (DeMo: 120 sign steps, lr decayed to 0) of the 0.01 floor; robust rules are then compared
# near convergence, where they differ from the mean only by their extra variance.
SETUPS: dict[str, dict[str, Any]] = {
    "diloco": dict(steps=300, H=5, lr=0.05),
    "sparseloco": dict(steps=100, H=5, lr=0.2, topk=32, chunk=8, bits=2),
    "demo": dict(steps=120, lr=0.01, topk=8, chunk=8),
}
ATTACKS = {
    "x100": (Fault("scale", arg=100.0),),
    "flip": (Fault("sign_flip"),),
    "flip_x100": (Fault("sign_flip"), Fault("scale", arg=100.0)),
}
TOLERANCE = 1.05  # a robust rule must end within 5 % of the clean run's loss
DAMAGE = {"diloco": 1.5, "sparseloco": 1.5, "demo": 1.2}  # unprotected run at least this much worse


def _codec(kind: str, compressor: str | None = None) -> Any:
    """The codec of ``kind``'s gathered payloads (frames: the harness finds their bucket codec)."""
    s = SETUPS.get(kind, {})
    if kind == "sparseloco":
        return build_codec(sparseloco_compressor(topk=s["topk"], chunk=s["chunk"], bits=s["bits"]))
    if kind == "demo":
        return demo_compressor(topk=s["topk"], chunk=s["chunk"])
    return build_codec(compressor) if compressor else DenseCodec("fp32")


def _optimizer(kind: str, model: torch.nn.Module, comm: Any, rule: str, **kw: Any) -> Any:
    s = SETUPS[kind]
    sgd = functools.partial(torch.optim.SGD, lr=s["lr"])
    if kind == "diloco":
        return DiLoCo(model.parameters(), sgd, sync_every=s["H"], comm=comm, robust=rule, **kw)
    if kind == "sparseloco":
        return SparseLoCo(
            model.parameters(),
            sgd,
            sync_every=s["H"],
            comm=comm,
            robust=rule,
            topk=s["topk"],
            chunk=s["chunk"],
            bits=s["bits"],
            **kw,
        )
    return DeMo(
        model.parameters(),
        lr=s["lr"],
        topk=s["topk"],
        chunk=s["chunk"],
        comm=comm,
        robust=rule,
        **kw,
    )


def _eval(kind: str, model: torch.nn.Module, opt: Any) -> float:
    if kind == "demo":  # DeMo has no global copy: every replica holds the same parameters
        return TASK.eval_loss(model)
    with opt.global_params():
        return TASK.eval_loss(model)


@functools.cache
def hostile_loss(kind: str, rule: str, attack: str | None) -> float:
    """Final eval loss (of honest rank 0) when rank 3 runs ``attack`` every round; inf if the
    run blew up (a rank raised on non-finite values, its peers then lost it)."""
    comms = InprocCommunicator.group(P, timeout_s=30)
    base = TASK.model()
    codec = _codec(kind)

    def worker(r: int) -> float:
        model = copy.deepcopy(base)
        faults = ATTACKS[attack] if attack is not None and r == HOSTILE else ()
        comm = FaultyComm(comms[r], faults, codec=codec)
        opt = _optimizer(kind, model, comm, rule)
        steps = SETUPS[kind]["steps"]
        # DeMo's sign steps of size lr keep the loss jittering at a level set by lr; decaying lr
        # linearly to 0 lets every run settle, so the final losses compare the rules, not where
        # the jitter happened to stop.
        decay = (
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
            if kind == "demo"
            else None
        )
        try:
            for s in range(steps):
                TASK.step(model, opt, r, s)
                if decay is not None:
                    decay.step()
        except FloatingPointError:
            comm.close()  # the peers raise PeerLost at once instead of waiting for the timeout
            return math.inf
        except CommError:
            return math.inf
        return _eval(kind, model, opt)

    loss = run_threads([functools.partial(worker, r) for r in range(P)])[0]
    return loss if isinstance(loss, float) and math.isfinite(loss) else math.inf


HOSTILE_CASES = [
    ("diloco", "x100", ("median", "trimmed_mean", "clip")),
    ("diloco", "flip_x100", ("median", "trimmed_mean", "clip")),
    ("sparseloco", "x100", ("clip",)),
    ("demo", "x100", ("clip",)),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind,attack,rules", HOSTILE_CASES)
def test_robust_aggregation_holds_off_a_hostile_peer(kind, attack, rules):
    clean = hostile_loss(kind, "mean", None)
    assert clean < 2.0 * TASK.noise**2 or kind == "demo"  # the clean run learned the task
    unprotected = hostile_loss(kind, "mean", attack)
    assert unprotected > DAMAGE[kind] * clean, (unprotected, clean)  # the attack does damage
    for rule in rules:
        assert hostile_loss(kind, rule, attack) <= TOLERANCE * clean, (rule, clean)


# ----------------------------------------------------------------- 2. non-finite on the wire
WIRE_KINDS = {
    "diloco": dict(),  # dense ring all-reduce
    "diloco_int8": dict(compressor="quant(int8, block=256)", error_feedback=True),
    "diloco_median": dict(robust="median"),  # fp32 payloads gathered
    "streaming": dict(streaming=True),
    "diloco_adamw": dict(adamw=True),  # inner state (moments) can hold the NaN too
    "sparseloco": dict(),
    "demo": dict(),
}
WIRE_H, WIRE_STEPS, BAD_STEP = 4, 16, 5  # NaN grads at step 5: DiLoCo syncs at 4, 8 (bad), ...


def _wire_optimizer(kind: str, model: torch.nn.Module, comm: Any, policy: str) -> Any:
    kw = dict(WIRE_KINDS[kind])
    sgd = functools.partial(torch.optim.SGD, lr=0.05)
    if kw.pop("adamw", False):
        sgd = functools.partial(torch.optim.AdamW, lr=0.01)
    if kind == "sparseloco":
        return SparseLoCo(
            model.parameters(),
            sgd,
            sync_every=WIRE_H,
            comm=comm,
            topk=32,
            chunk=8,
            on_nonfinite=policy,
        )
    if kind == "demo":
        return DeMo(model.parameters(), lr=0.01, topk=8, chunk=8, comm=comm, on_nonfinite=policy)
    if kw.pop("streaming", False):
        return StreamingDiLoCo(
            model.parameters(),
            sgd,
            sync_every=WIRE_H,
            fragments=2,
            overlap_steps=1,
            comm=comm,
            on_nonfinite=policy,
        )
    return DiLoCo(model.parameters(), sgd, sync_every=WIRE_H, comm=comm, on_nonfinite=policy, **kw)


def _wire_codec(kind: str) -> Any:
    if kind in ("sparseloco", "demo"):
        return (
            build_codec(sparseloco_compressor(topk=32, chunk=8))
            if kind == "sparseloco"
            else demo_compressor(topk=8, chunk=8)
        )
    return _codec("diloco", compressor=WIRE_KINDS[kind].get("compressor"))


def nonfinite_run(kind: str, policy: str) -> dict[str, Any]:
    """Rank 2's gradients are NaN at step 5; returns each rank's outcome and the wire record."""
    tap = Tap()
    comms = InprocCommunicator.group(P, timeout_s=30)
    base = TASK.model()

    def worker(r: int) -> tuple[str, Any]:
        model = copy.deepcopy(base)
        comm = FaultyComm(comms[r], tap=tap)
        opt = _wire_optimizer(kind, model, comm, policy)
        weights = []
        try:
            for s in range(WIRE_STEPS):
                TASK.step(model, opt, r, s, poison=(r == BAD and s == BAD_STEP))
                last = getattr(opt, "last_sync", None)
                if last and last["inner_step"] == opt.inner_step:
                    weights.append(last["weight"])
        except FloatingPointError as exc:
            comm.close()  # a rank that stops leaves the group: peers get PeerLost, not a hang
            return "raised", str(exc)
        except CommError as exc:
            return "lost", type(exc).__name__
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        return "ok", (weights, finite)

    outcomes = run_threads([functools.partial(worker, r) for r in range(P)])
    return {"outcomes": outcomes, "tap": tap, "codec": _wire_codec(kind)}


def _nonfinite_sent(run: dict[str, Any]) -> list[tuple[str, int]]:
    bad = []
    for rec in run["tap"].records:
        if rec.op == "all_gather_into_tensor" and rec.data.dtype == torch.uint8:
            assert rec.bucket is not None, (rec.who, rec.index, "a frame of no known bucket")
            ok = finite_payload(run["codec"], rec.data, rec.bucket)
        elif isinstance(rec.data, torch.Tensor):
            ok = bool(torch.isfinite(rec.data).all())
        else:
            ok = finite_payload(run["codec"], rec.data)
        if not ok:
            bad.append((rec.who, rec.index))
    return bad


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(WIRE_KINDS))
def test_nonfinite_raise_stops_the_rank_before_it_sends(kind):
    run = nonfinite_run(kind, "raise")
    assert _nonfinite_sent(run) == []
    status, msg = run["outcomes"][BAD]
    assert status == "raised" and "non-finite" in msg and "nothing was sent" in msg, msg
    assert "group 0, param" in msg
    for r in range(P):
        if r != BAD:  # the peers lost rank 2 in the collective it never joined
            assert run["outcomes"][r] == ("lost", "PeerLost"), run["outcomes"][r]
    # Rank 2 issued one collective fewer than each peer: the one it refused to send.
    sent = {f"rank{r}": len(run["tap"].of(f"rank{r}")) for r in range(P)}
    assert all(sent[f"rank{r}"] == sent["rank0"] for r in range(P) if r != BAD)
    assert sent[f"rank{BAD}"] == sent["rank0"] - 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(WIRE_KINDS))
def test_nonfinite_skip_sends_weight_zero_and_the_others_continue(kind):
    run = nonfinite_run(kind, "skip")
    assert _nonfinite_sent(run) == []
    assert all(o[0] == "ok" for o in run["outcomes"]), run["outcomes"]
    assert all(o[1][1] for r, o in enumerate(run["outcomes"]) if r != BAD)  # peers stay finite
    # Rank 2 sent a flag-0 frame (gather) or zeros with weight 0 at least once; nobody else did.
    for r in range(P):
        empty = [rec.index for rec in run["tap"].of(f"rank{r}") if _is_empty(rec)]
        assert bool(empty) == (r == BAD), (r, empty)
    if kind != "demo":  # the DiLoCo family reports each round's contributor count
        weights = [o[1][0] for o in run["outcomes"]]
        assert all(w == weights[0] for w in weights)  # every rank saw the same rounds
        assert 3.0 in weights[0] and set(weights[0]) <= {3.0, 4.0}, weights[0]
        assert weights[0][0] == 4.0  # the round before the NaN had everyone


def _is_empty(rec: Any) -> bool:
    """A full-size frame with flag 0 and an all-zero body, or a dense vector whose trailing
    contributor weight is 0."""
    data = rec.data
    if rec.op == "all_gather_into_tensor" and data.dtype == torch.uint8:
        return is_empty_frame(rec.bucket, data)
    if isinstance(data, torch.Tensor):
        return data.numel() > 0 and float(data[-1]) == 0.0 and not bool(data[:-1].any())
    return len(data) == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "kind",
    [
        "diloco",
        "diloco_adamw",
        "streaming",
    ],
)
def test_skipping_worker_contributes_again_from_the_next_round(kind):
    """After a skipped round the worker restarts from θ_g and counts again."""
    run = nonfinite_run(kind, "skip")
    status, (weights, finite) = run["outcomes"][BAD]
    assert status == "ok" and finite, run["outcomes"][BAD]
    assert weights[-1] == 4.0 and weights.count(3.0) <= 2, weights


# ------------------------------------------------------------- 3. a corrupted payload is dropped
CORRUPT_KINDS = ("localsgd_int8", "localsgd_median", "sparseloco", "demo")
CORRUPT_FAULTS = ("corrupt", "truncate", "nan")
CORRUPT_OP, CORRUPT_STEPS = 1, 12  # rank 2's second collective (DiLoCo family: syncs at 4, 8, 12)


def _corrupt_optimizer(kind: str, model: torch.nn.Module, comm: Any) -> Any:
    sgd = functools.partial(torch.optim.SGD, lr=0.05)
    if kind == "localsgd_int8":
        return LocalSGD(
            model.parameters(),
            sgd,
            sync_every=WIRE_H,
            comm=comm,
            compressor="quant(int8, block=256)",
        )
    if kind == "localsgd_median":
        return LocalSGD(model.parameters(), sgd, sync_every=WIRE_H, comm=comm, robust="median")
    return _wire_optimizer(kind, model, comm, "raise")


def _corrupt_codec(kind: str) -> Any:
    if kind == "localsgd_int8":
        return build_codec("quant(int8, block=256)")
    return DenseCodec("fp32") if kind == "localsgd_median" else _wire_codec(kind)


def corrupt_run(kind: str, fault: str) -> dict[str, Any]:
    """Rank 2's collective #1 suffers ``fault``; returns final params, anchors per sync, the tap."""
    tap = Tap()
    comms = InprocCommunicator.group(P, timeout_s=30)
    base = TASK.model()

    def worker(r: int) -> dict[str, Any]:
        model = copy.deepcopy(base)
        faults = [Fault(fault, at=frozenset({CORRUPT_OP}))] if r == BAD else []
        comm = FaultyComm(comms[r], faults, tap=tap, seed=r)
        opt = _corrupt_optimizer(kind, model, comm)
        anchors, raised = [], None
        try:
            for s in range(CORRUPT_STEPS):
                TASK.step(model, opt, r, s)
                last = getattr(opt, "last_sync", None)
                if last and last["inner_step"] == opt.inner_step:
                    flat = [opt.state[p]["anchor"].reshape(-1) for p in model.parameters()]
                    anchors.append(torch.cat(flat))
        except FloatingPointError as exc:  # a poisoned θ_g makes the next Δ non-finite
            raised = str(exc)
        params = [p.detach().clone() for p in model.parameters()]
        return {"params": params, "anchors": anchors, "raised": raised}

    out = run_threads([functools.partial(worker, r) for r in range(P)])
    for o in out:
        if isinstance(o, BaseException):
            raise o
    return {"ranks": out, "tap": tap}


def _drop_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dropping the payload" in r.getMessage()]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", CORRUPT_FAULTS)
@pytest.mark.parametrize("kind", CORRUPT_KINDS)
def test_corrupted_payload_is_dropped_naming_the_peer(kind, fault, caplog):
    caplog.set_level(logging.WARNING, logger="thinwire.optim._reduce")
    bad = corrupt_run(kind, fault)
    assert all(o["raised"] is None for o in bad["ranks"])
    reasons = _drop_reasons(caplog)
    # Every rank (rank 2 too: its own slot holds what it sent) drops peer 2 once, nobody else.
    assert len(reasons) == P and all(
        m.startswith(f"dropping the payload of peer {BAD} (") for m in reasons
    ), reasons
    sent = bad["tap"].of(f"rank{BAD}")[CORRUPT_OP]
    assert sent.op == "all_gather_into_tensor" and sent.data.shape == sent.clean.shape
    assert not torch.equal(sent.data, sent.clean)
    # The harness damaged the frame as the fault says: a bad CRC, or (nan) a valid CRC over a
    # body that does not decode.
    want = {"corrupt": "CRC32 mismatch", "truncate": "CRC32 mismatch", "nan": "does not decode"}
    assert all(want[fault] in m for m in reasons), reasons
    assert frame_status(sent.bucket, sent.data)[0] not in (STATUS_OK, STATUS_EMPTY)
    # Oracle 1: bitwise the run in which rank 2 sent a flag-0 frame (no contribution) that round.
    caplog.clear()
    dropped = corrupt_run(kind, "drop")
    assert _drop_reasons(caplog) == []
    for a, b in zip(bad["ranks"], dropped["ranks"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
    for o in bad["ranks"][1:]:  # and every replica agrees
        assert all(
            torch.equal(x, y) for x, y in zip(o["params"], bad["ranks"][0]["params"], strict=True)
        )
    if kind.startswith("localsgd"):
        _check_mean_of_the_others(kind, bad)


def _check_mean_of_the_others(kind: str, run: dict[str, Any]) -> None:
    """Oracle 2 (LocalSGD: θ_g ← θ_g − Δ̄): the sync equals the float64 rule over ranks 0, 1, 3."""
    codec = _corrupt_codec(kind)
    sent = {r: run["tap"].of(f"rank{r}")[CORRUPT_OP] for r in range(P)}
    deltas = {}
    for r, rec in sent.items():  # each clean frame, decoded as every receiver decodes it
        bucket = DenseBucket(codec, rec.bucket.shapes)
        vals, status = bucket.decode(rec.clean[None])
        assert int(status[0]) == STATUS_OK
        deltas[r] = vals[0].double()
    others = torch.stack([deltas[r] for r in range(P) if r != BAD])
    if kind == "localsgd_median":
        want = others.sort(dim=0).values[1]  # the middle of three, by hand
    else:
        want = others.sum(0) / 3
    every = torch.stack(list(deltas.values())).mean(0) if kind != "localsgd_median" else None
    for o in run["ranks"]:
        before, after = o["anchors"][CORRUPT_OP - 1].double(), o["anchors"][CORRUPT_OP].double()
        torch.testing.assert_close(before - after, want, rtol=0, atol=1e-6)
        if every is not None:  # not a blend with the corrupted peer's own update
            assert float((before - after - every).abs().max()) > 1e-4


# --------------------------------------------------------------------------- 4. a straggler
def straggler_run(stall_s: float, timeout_s: float) -> list[tuple[str, Any]]:
    """Rank 2 sleeps ``stall_s`` before its second sync; per rank ("ok", params) or
    ("error", exception class name, seconds the failing step took)."""
    comms = InprocCommunicator.group(P, timeout_s=timeout_s)
    base = TASK.model()

    def worker(r: int) -> tuple[str, Any]:
        model = copy.deepcopy(base)
        faults = [Fault("stall", at=frozenset({CORRUPT_OP}), arg=stall_s)] if r == BAD else []
        comm = FaultyComm(comms[r], faults)
        opt = LocalSGD(
            model.parameters(),
            functools.partial(torch.optim.SGD, lr=0.05),
            sync_every=WIRE_H,
            comm=comm,
        )
        t0 = time.monotonic()
        try:
            for s in range(CORRUPT_STEPS):
                t0 = time.monotonic()
                TASK.step(model, opt, r, s)
        except CommError as exc:
            return "error", (type(exc).__name__, time.monotonic() - t0)
        return "ok", [p.detach().clone() for p in model.parameters()]

    return run_threads([functools.partial(worker, r) for r in range(P)])


@pytest.mark.timeout(120)
def test_straggler_within_the_timeout_changes_nothing_beyond_it_fails_fast():
    on_time, slow = straggler_run(0.0, 10.0), straggler_run(0.5, 10.0)
    for a, b in zip(on_time, slow, strict=True):  # a late peer delays the round, nothing else
        assert a[0] == b[0] == "ok"
        assert all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))
    timeout_s = 1.0
    late = straggler_run(3.0, timeout_s)
    for r, (status, info) in enumerate(late):
        if r != BAD:  # its peers give up within the timeout (+10 s): no hang
            assert status == "error" and info[0] == "CommTimeout", late
            assert info[1] < timeout_s + 10.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["diloco", "localsgd_int8", "localsgd_median"])
def test_a_sender_that_bypasses_its_check_cannot_poison_the_round(kind):
    """The harness NaN-poisons rank 2's outgoing update after its optimizer's own check."""
    run = corrupt_run(kind, "nan")
    # The wire check sees exactly that payload (so it would see any other).
    wire = {"tap": run["tap"], "codec": _corrupt_codec(kind)}
    assert _nonfinite_sent(wire) == [(f"rank{BAD}", CORRUPT_OP)]
    for o in run["ranks"]:  # no replica's θ_g took the NaN, and training went on
        assert o["raised"] is None, o["raised"]
        assert bool(torch.isfinite(o["anchors"][CORRUPT_OP]).all())
