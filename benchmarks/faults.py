"""Fault-injection report: runs the reliability scenarios and prints their figures.

Run::

    .venv/bin/python benchmarks/faults.py                 # every scenario, short hivemind churn
    .venv/bin/python benchmarks/faults.py --long          # hivemind: 200 rounds, churn every 20
    .venv/bin/python benchmarks/faults.py --only hostile,fuzz
    .venv/bin/python benchmarks/faults.py --write         # also replace the block in RESULTS.md

The scenarios are the ones ``tests/reliability`` asserts on (the same functions, imported from
there, with the fault harness ``tests/reliability/_faults.py``): a gloo rank killed mid-sync and
the restart, churn on a hivemind swarm, the payload and frame fuzz campaigns, a hostile peer
against every aggregation rule, NaN gradients checked on the wire, corrupted frames and a
straggler. Every number comes from one run of seeded, deterministic training, except wall times
and detection delays, which depend on the machine's load.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _provenance import git_commit

import thinwire

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "reliability"))

BEGIN = "<!-- faults.py:begin -->"
END = "<!-- faults.py:end -->"
SCENARIOS = ("kill", "churn", "fuzz", "hostile", "nonfinite", "corrupt", "straggler")


def _ratio(loss: float, clean: float) -> str:
    if not math.isfinite(loss):
        return "diverged"
    r = loss / clean
    return f"{r:.3f}x" if r < 1000 else f"{r:.0e}x (blew up)"


def kill() -> list[str]:
    import test_faults_gloo as g

    with tempfile.TemporaryDirectory() as tmp:
        res = g.kill_and_restart(Path(tmp))
    lines = [
        f"4 gloo ranks, DiLoCo (AdamW inner, int8 payloads + error feedback), H={g.H}, "
        f"checkpoint after every sync; rank {g.KILLED} calls `os._exit({g.KILL_CODE})` while its "
        f"sync #{g.KILL_SYNC + 1} all-gather is in flight; `timeout_s={g.TIMEOUT_S:g}`.",
        "",
        "| survivor | error | failing step took | next call raised after |",
        "|---|---|---:|---:|",
    ]
    for r, out in sorted(res["a"].items()):
        name, elapsed, _ = out["error"] or ("none (finished!)", math.nan, "")
        later = out.get("later", (False, math.nan))[1]
        lines.append(f"| rank {r} | `{name}` | {elapsed:.2f} s | {1e3 * later:.2f} ms |")
    exact = sum(
        all(
            torch.equal(x, y)
            for x, y in zip(o["reference"]["params"], o["resumed"]["params"], strict=True)
        )
        for o in res["b"].values()
    )
    steps = {o["step"] for o in res["b"].values()}
    lines += [
        "",
        f"Restart: 4 fresh processes resume from step {sorted(steps)} and finish; final params "
        f"`torch.equal` to an uninterrupted run on {exact}/4 ranks. Exit codes: killed run "
        f"{res['codes_a']}, restart {res['codes_b']}; wall {res['t_a']:.1f} s + {res['t_b']:.1f} s.",
    ]
    return lines


def churn(long: bool) -> list[str]:
    import test_faults_hivemind as h

    rounds, period, away = (200, 20, 5) if long else (20, 5, 2)
    res = h.churn_run(rounds, period, away, f"tw-bench-churn-{int(time.time())}")
    base = h.baseline_loss(rounds)
    errs = h.round_errors(res)
    syncs = [s for s in res["tap"].records if s.tag == h.SYNC_TAG]
    worst = 0.0
    by_round: dict[int, dict[str, object]] = {}
    for s in syncs:
        by_round.setdefault(s.round, {})[s.who] = s
    for recs in by_round.values():
        for s in recs.values():
            sent = torch.stack([recs[g].data.double() for g in s.group])  # type: ignore[attr-defined]
            want = sent.sum(0) if s.reduce_op == "sum" else sent.mean(0)  # type: ignore[attr-defined]
            worst = max(worst, float((s.result.double() - want).abs().max()))
    sizes = sorted({len(s.group) for s in syncs})
    bitwise = sum(j["bitwise"] for j in res["rejoins"])
    return [
        f"4 hivemind peers (127.0.0.1, matchmaking 1 s), DiLoCo H={h.H}; {rounds} rounds, one peer "
        f"away for {away} of every {period} rounds, rejoining as a new peer.",
        "",
        "| rounds | wall | syncs checked | off the float64 group mean or sum (max) | group sizes | "
        "rejoins with bitwise state | distinct final θ_g | final loss vs no churn |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
        f"| {rounds} | {res['seconds']:.0f} s | {len(syncs) - len(errs)}/{len(syncs)} | "
        f"{worst:.2g} | {sizes} | {bitwise}/{len(res['rejoins'])} | {res['replicas']} of 4 | "
        f"{res['loss']:.5f} vs {base:.5f} ({res['loss'] / base:.3f}x) |",
    ]


def fuzz() -> list[str]:
    import test_fuzz_all as f

    t0 = time.perf_counter()
    tally = f.fuzz()
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    frames = f.fuzz_frames()
    dt_frames = time.perf_counter() - t0
    st = frames.status_counts()
    damaged = sum(frames.by_kind[k] for k in f.DAMAGED)
    resealed = sum(frames.by_kind[k] for k in f.RESEALED)
    return [
        f"{len(f.DENSE)} dense and {len(f.SPARSE)} sparse codec settings, tensors of <= 64 "
        "elements, through the receive paths of `thinwire.compression`: per-tensor payloads and "
        "bundles (decode / bundle split, geometry check, aggregation), and the bucket frames "
        "optimizers send (`make_bucket(...).decode` of a batch of frames, then the fold).",
        "",
        "| per-tensor payloads and bundles: damaged messages | refused with `PayloadError` | "
        "decoded (forged but valid, finite) | any other outcome | wall |",
        "|---:|---:|---:|---:|---:|",
        f"| {tally.decodes:,} | {tally.rejected:,} | {tally.accepted:,} | 0 | {dt:.1f} s |",
        "",
        "| bucket frames: damaged | CRC left as it was: caught by the CRC | re-sealed: body "
        "refused | re-sealed: accepted (valid, finite) | re-sealed flag 0: no contribution | "
        "raised, or status 0 with non-finite values | wall |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {frames.frames:,} | {st.get('crc', 0):,} of {damaged:,} | {st.get('body', 0):,} | "
        f"{frames.accepted:,} | {frames.empty:,} (of {resealed:,} re-sealed) | 0 | "
        f"{dt_frames:.1f} s |",
    ]


def hostile() -> list[str]:
    import test_hostile as t

    lines = [
        "Final eval loss over the clean run's (no attacker, plain mean); rank 3 of 4 attacks every "
        "round; loss floor 0.01.",
        "",
        "| optimizer | clean loss | attack | mean | median | trimmed_mean | clip |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for kind in ("diloco", "sparseloco", "demo"):
        clean = t.hostile_loss(kind, "mean", None)
        rules = ("mean", "median", "trimmed_mean", "clip") if kind == "diloco" else ("mean", "clip")
        for attack in ("x100", "flip", "flip_x100"):
            cells = [
                _ratio(t.hostile_loss(kind, rule, attack), clean) if rule in rules else "n/a"
                for rule in ("mean", "median", "trimmed_mean", "clip")
            ]
            lines.append(f"| {kind} | {clean:.5f} | {attack} | " + " | ".join(cells) + " |")
    return lines


def nonfinite() -> list[str]:
    import test_hostile as t

    lines = [
        "Rank 2's gradients are NaN at step 5; every frame and tensor each rank sent was decoded.",
        "",
        "| optimizer path | policy | non-finite sent | rank 2 | peers | round weights seen |",
        "|---|---|---:|---|---|---|",
    ]
    for kind in t.WIRE_KINDS:
        for policy in ("raise", "skip"):
            run = t.nonfinite_run(kind, policy)
            outs = run["outcomes"]
            bad = outs[t.BAD][0]
            if bad == "ok" and kind != "demo":
                back = outs[t.BAD][1][0][-1] == 4.0 and outs[t.BAD][1][1]
                bad += ", back next round" if back else ", never contributes again"
            peers = sorted(
                {
                    o[0] if o[0] != "lost" else f"lost ({o[1]})"
                    for r, o in enumerate(outs)
                    if r != t.BAD
                }
            )
            weights = outs[0][1][0] if outs[0][0] == "ok" and kind != "demo" else "-"
            lines.append(
                f"| {kind} | {policy} | {len(t._nonfinite_sent(run))} | {bad} | "
                f"{', '.join(peers)} | {weights} |"
            )
    return lines


def corrupt() -> list[str]:
    import test_hostile as t

    class Count(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.msgs: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.msgs.append(record.getMessage())

    handler = Count()
    log = logging.getLogger("thinwire.optim._reduce")
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
    lines = [
        "Rank 2's second frame is damaged (corrupt: bit flips; truncate: a zero-filled tail; nan: "
        "NaN bytes re-sealed with a valid CRC); drops = warnings `dropping the payload of peer 2` "
        "(one per rank); the run is compared with one where rank 2 sent a flag-0 frame (no "
        "contribution) that round.",
        "",
        "| optimizer path | fault | drops naming peer 2 | bitwise equal to the no-contribution run |",
        "|---|---|---:|---|",
    ]
    try:
        for kind in t.CORRUPT_KINDS:
            ref = t.corrupt_run(kind, "drop")
            for fault in t.CORRUPT_FAULTS:
                handler.msgs.clear()
                run = t.corrupt_run(kind, fault)
                named = sum(
                    m.startswith(f"dropping the payload of peer {t.BAD} (") for m in handler.msgs
                )
                same = all(
                    torch.equal(x, y)
                    for a, b in zip(run["ranks"], ref["ranks"], strict=True)
                    for x, y in zip(a["params"], b["params"], strict=True)
                )
                lines.append(f"| {kind} | {fault} | {named} | {'yes' if same else 'NO'} |")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    return lines


def straggler() -> list[str]:
    import test_hostile as t

    on_time, slow = t.straggler_run(0.0, 10.0), t.straggler_run(0.5, 10.0)
    same = all(
        a[0] == b[0] == "ok" and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))
        for a, b in zip(on_time, slow, strict=True)
    )
    late = t.straggler_run(3.0, 1.0)
    peers = [info for r, (status, info) in enumerate(late) if r != t.BAD and status == "error"]
    worst = max((s for _, s in peers), default=math.nan)
    return [
        "| straggler (rank 2, one sync) | timeout | outcome |",
        "|---|---:|---|",
        f"| 0.5 s late | 10 s | all ranks finish, params bitwise equal to an on-time run: "
        f"{'yes' if same else 'NO'} |",
        f"| 3 s late | 1 s | {len(peers)}/3 peers raise `{peers[0][0] if peers else '-'}`, "
        f"failing step took <= {worst:.2f} s |",
    ]


def _provenance(args: argparse.Namespace) -> str:
    commit = git_commit()
    cmd = "python benchmarks/faults.py" + (" --long" if args.long else "")
    return (
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, thinwire {thinwire.__version__}, commit {commit}; "
        f"command: `{cmd}`"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of {SCENARIOS}")
    ap.add_argument("--long", action="store_true", help="hivemind churn: 200 rounds, every 20")
    ap.add_argument(
        "--write", action="store_true", help="replace the block in benchmarks/RESULTS.md"
    )
    args = ap.parse_args()
    # The report is the markdown block; the library's own error/warning lines would bury it.
    logging.getLogger("thinwire").setLevel(logging.CRITICAL)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SCENARIOS))
    if unknown:
        ap.error(f"--only must name scenarios in {SCENARIOS}, got {unknown}")
    titles = {
        "kill": "Kill 1 of 4 gloo ranks mid-sync, then restart",
        "churn": "hivemind: a peer leaves and rejoins",
        "fuzz": "Fuzzed, truncated and bit-flipped payloads",
        "hostile": "A hostile peer (x100, sign flip, both) against each aggregation rule",
        "nonfinite": "Non-finite gradients on one rank, checked on the wire",
        "corrupt": "A corrupted payload from one peer",
        "straggler": "A straggler",
    }
    runs: dict[str, Callable[[], list[str]]] = {
        "kill": kill,
        "churn": lambda: churn(args.long),
        "fuzz": fuzz,
        "hostile": hostile,
        "nonfinite": nonfinite,
        "corrupt": corrupt,
        "straggler": straggler,
    }
    out = [BEGIN, _provenance(args), ""]
    for name in SCENARIOS:
        if name in wanted:
            t0 = time.perf_counter()
            body = runs[name]()
            out += [
                f"### {titles[name]}",
                "",
                *body,
                "",
                f"_scenario wall time: {time.perf_counter() - t0:.0f} s_",
                "",
            ]
            print(f"[faults.py] {name} done", file=sys.stderr, flush=True)
    out.append(END)
    block = "\n".join(out)
    print(block)
    if args.write:
        path = HERE / "RESULTS.md"
        text = path.read_text()
        if BEGIN in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            path.write_text(head + block + tail)
        else:
            path.write_text(
                text.rstrip("\n") + "\n\n## Reliability under faults\n\n" + block + "\n"
            )


if __name__ == "__main__":
    main()
