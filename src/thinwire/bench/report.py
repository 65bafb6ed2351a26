"""Benchmark reports: the summary per method, ``results.json``, ``curves.csv``, the PNG, the table,
and the side-by-side comparison of two ``results.json`` files.

Definitions: bytes are payload bytes sent per rank (max
over ranks) from the ledger; reduction vs DDP = DDP bytes / method bytes; compression ratio per
sync = dense fp32 bytes of the synced tensors / wire bytes this rank put in its payloads; loss at
equal bytes (equal simulated time) interpolates each eval-loss curve, in log-bytes (linearly in
time), at the smallest final total among the methods. Simulated time, compute and communication
are those of one rank, the slowest (largest simulated time; ties go to the most compute), so
``sim_time_s = compute_s + exposed_comm_s`` holds in every run; ``exposed_comm_s`` counts the
time that rank waited on the wire, including waiting for slower peers, and can exceed the
modelled ``comm_s``. ``results.json`` is strict JSON: non-finite numbers (no training loss at
step 0, no entropy floor for a ``--data`` file, an eval loss only rank 0 computes) are ``null``.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import thinwire
from thinwire.bench.methods import METHODS
from thinwire.collectives import PRESETS

__all__ = [
    "SCHEMA",
    "summarize",
    "write_outputs",
    "table_rows",
    "TABLE_HEADERS",
    "NOTE",
    "BENCH_EXTRA",
    "json_safe",
    "load_results",
    "COMPARE_HEADERS",
    "compare_rows",
    "describe_run",
    "make_figure",
]

SCHEMA = "thinwire.bench/v1"
NOTE = "CPU, tiny model: trends, not absolute speedups"
BENCH_EXTRA = 'pip install "thinwire[bench]"'  # rich (table, progress) and matplotlib (PNG)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (recursively), for strict JSON.

    numpy scalars become Python numbers and paths strings; tuples become lists.
    """
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _interp(curve: list[dict[str, Any]], key: str, at: float, log: bool) -> float:
    """Eval loss of a curve at ``at`` bytes (log-linear) or seconds (linear).

    Before the curve's first positive point the model is still the initial one: the step-0 loss.
    """
    pts = [(float(c[key]), float(c["eval_loss"])) for c in curve if math.isfinite(c["eval_loss"])]
    if not pts or not math.isfinite(at):
        return math.nan
    pos = [(x, y) for x, y in pts if x > 0]
    if not pos or at < pos[0][0]:
        return pts[0][1]
    xs = np.array([x for x, _ in pos])
    ys = np.array([y for _, y in pos])
    if log:
        return float(np.interp(math.log(at), np.log(xs), ys))
    return float(np.interp(at, xs, ys))


def summarize(per_rank: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Fold the per-rank results into one summary per method (mean and std over seeds)."""
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for rank_results in per_rank:
        for r in rank_results:
            by_key[(r["method"], r["seed"])].append(r)
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (method, seed), rs in by_key.items():
        rs = sorted(rs, key=lambda r: r["rank"])
        r0 = rs[0]
        # One rank's consistent (total, compute, exposed) triple: maxima taken field by field
        # come from different ranks (the fastest computer waits longest) and do not add up.
        slow = max(rs, key=lambda r: (r["sim_time_s"], r["compute_s"]))
        run = {
            "method": method,
            "seed": seed,
            "bytes_sent_per_rank": max(r["sent"] for r in rs),
            "bytes_recv_per_rank": max(r["recv"] for r in rs),
            "bytes_sent_by_rank": [r["sent"] for r in rs],
            "control_bytes_per_rank": max(r["control_sent"] for r in rs),
            "ops": r0["ops"],
            "compression_ratio_per_sync": (r0["dense_synced_bytes"] / r0["wire_payload_bytes"])
            if r0["wire_payload_bytes"]
            else math.nan,
            "sim_time_s": slow["sim_time_s"],
            "compute_s": slow["compute_s"],
            "comm_s": slow["comm_s"],
            "exposed_comm_s": slow["exposed_comm_s"],
            "time_rank": slow["rank"],
            "real_time_s": max(r["real_time_s"] for r in rs),
            "final_eval_loss": r0["curve"][-1]["eval_loss"],
            "loss_floor": r0["loss_floor"],
            "tokens": r0["curve"][-1]["tokens"],
            "init_hash": r0["init_hash"],
            "algorithms": r0["algorithms"],
            "curve": [
                dict(
                    c,
                    bytes_sent_cum=max(r["curve"][i]["bytes_sent_cum"] for r in rs),
                    sim_time_s=max(r["curve"][i]["sim_time_s"] for r in rs),
                )
                for i, c in enumerate(r0["curve"])
            ],
        }
        runs[method].append(run)
    # equal-bytes / equal-time points per seed
    seeds = sorted({s for (_, s) in by_key})
    for seed in seeds:
        these = [r for rs in runs.values() for r in rs if r["seed"] == seed]
        min_bytes = min(
            (
                r["curve"][-1]["bytes_sent_cum"]
                for r in these
                if r["curve"][-1]["bytes_sent_cum"] > 0
            ),
            default=math.nan,
        )
        min_time = min(r["curve"][-1]["sim_time_s"] for r in these)
        for r in these:
            r["loss_at_equal_bytes"] = _interp(r["curve"], "bytes_sent_cum", min_bytes, log=True)
            r["loss_at_equal_time"] = _interp(r["curve"], "sim_time_s", min_time, log=False)
            r["equal_bytes_point"] = min_bytes
            r["equal_time_point_s"] = min_time
    ddp = runs.get("ddp")
    summary: dict[str, Any] = {}

    def agg(rs: list[dict[str, Any]], key: str) -> dict[str, float]:
        vals = [float(r[key]) for r in rs]
        return {
            "mean": statistics.fmean(vals),
            "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
        }

    for method, rs in runs.items():
        s = {
            k: agg(rs, k)
            for k in (
                "bytes_sent_per_rank",
                "bytes_recv_per_rank",
                "sim_time_s",
                "compute_s",
                "comm_s",
                "exposed_comm_s",
                "real_time_s",
                "final_eval_loss",
                "loss_at_equal_bytes",
                "loss_at_equal_time",
                "compression_ratio_per_sync",
            )
        }
        s["loss_floor"] = rs[0]["loss_floor"]
        s["tokens"] = rs[0]["tokens"]
        s["description"] = METHODS[method].description
        if ddp:
            s["reduction_vs_ddp"] = statistics.fmean(r["bytes_sent_per_rank"] for r in ddp) / max(
                1.0, s["bytes_sent_per_rank"]["mean"]
            )
        s["runs"] = rs
        summary[method] = s
    hashes = {r["init_hash"] for rs in runs.values() for r in rs if r["seed"] == seeds[0]}
    if len(hashes) != 1:
        raise RuntimeError("methods started from different initial parameters")
    return summary


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1000
    return f"{n:.1f}"


def _pm(d: dict[str, float], fmt: str) -> str:
    if not math.isfinite(d["mean"]):
        return "n/a"
    return format(d["mean"], fmt) + (f" ± {format(d['std'], fmt)}" if d["std"] else "")


def _sim_cell(total: float, compute: float, exposed: float) -> str:
    """``total s (compute + exposed)`` at 0.1 s.

    The exposed part is printed as the difference of the two rounded figures so that the cell
    adds up (it moves by at most 0.1 s). Without a WAN model (preset ``none``) the total is the
    wall clock, which also holds evaluation, so it is labelled as such.
    """
    t, c = round(total, 1), round(compute, 1)
    if not math.isclose(total, compute + exposed, rel_tol=1e-6, abs_tol=1e-9):
        return f"{t:,.1f} s (wall clock; compute {c:,.1f})"
    return f"{t:,.1f} s ({c:,.1f} + {max(t - c, 0.0):,.1f})"


TABLE_HEADERS = [
    "method",
    "sent/rank",
    "vs DDP",
    "ratio/sync",
    "sim time, slowest rank (compute + exposed comm)",
    "eval @steps",
    "@bytes",
    "@time",
    "gap to floor",
]


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per method, in the order the methods were given."""
    rows = []
    for method, s in summary.items():
        floor = s["loss_floor"]
        gap = s["final_eval_loss"]["mean"] - floor if math.isfinite(floor) else math.nan
        rows.append(
            [
                method,
                _fmt_bytes(s["bytes_sent_per_rank"]["mean"]),
                f"{s['reduction_vs_ddp']:,.0f}x" if "reduction_vs_ddp" in s else "n/a",
                f"{s['compression_ratio_per_sync']['mean']:,.1f}x"
                if math.isfinite(s["compression_ratio_per_sync"]["mean"])
                else "n/a",
                _sim_cell(
                    s["sim_time_s"]["mean"], s["compute_s"]["mean"], s["exposed_comm_s"]["mean"]
                ),
                _pm(s["final_eval_loss"], ".4f"),
                _pm(s["loss_at_equal_bytes"], ".4f"),
                _pm(s["loss_at_equal_time"], ".4f"),
                f"{gap:+.4f}" if math.isfinite(gap) else "n/a",
            ]
        )
    return rows


COMPARE_HEADERS = [
    "method",
    "sent/rank A",
    "B",
    "B/A",
    "vs DDP A",
    "B",
    "B/A",
    "eval A",
    "B",
    "B/A",
    "sim time A",
    "B",
    "B/A",
]


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``results.json`` the benchmark wrote (also one of an older run with bare ``NaN``).

    Raises:
        ValueError: the file is missing, unreadable, not JSON, or not a benchmark result.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    try:
        res = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{str(p)!r} is not JSON ({exc})") from None
    if not isinstance(res, dict) or res.get("schema") != SCHEMA:
        got = res.get("schema") if isinstance(res, dict) else type(res).__name__
        raise ValueError(
            f"{str(p)!r} is not a thinwire bench results.json: schema must be {SCHEMA!r}, "
            f"got {got!r}"
        )
    if not isinstance(res.get("methods"), dict) or not res["methods"]:
        raise ValueError(f"{str(p)!r} holds no methods")
    return res


def _num(x: Any) -> float:
    """A number from ``results.json`` (``null`` and missing are NaN)."""
    if isinstance(x, dict):
        x = x.get("mean")
    return float(x) if isinstance(x, int | float) else math.nan


def _ratio(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or a == 0:
        return "n/a"
    return f"{b / a:,.3g}x"


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    """One row per method of either run (A's order, then B's own): each figure for A, for B,
    and the ratio B/A. Columns: :data:`COMPARE_HEADERS`."""
    names = list(a["methods"]) + [m for m in b["methods"] if m not in a["methods"]]
    cells = (
        ("bytes_sent_per_rank", _fmt_bytes),
        ("reduction_vs_ddp", lambda v: f"{v:,.0f}x"),
        ("final_eval_loss", lambda v: f"{v:.4f}"),
        ("sim_time_s", lambda v: f"{v:,.1f} s"),
    )
    rows = []
    for m in names:
        ma, mb = a["methods"].get(m, {}), b["methods"].get(m, {})
        row = [m]
        for key, fmt in cells:
            va, vb = _num(ma.get(key)), _num(mb.get(key))
            row += [
                fmt(va) if math.isfinite(va) else "n/a",
                fmt(vb) if math.isfinite(vb) else "n/a",
                _ratio(va, vb),
            ]
        rows.append(row)
    return rows


def describe_run(res: dict[str, Any]) -> str:
    """A short description of a run from its ``config``: preset, ranks, engine, steps, seeds."""
    c = res.get("config", {})
    seeds = ",".join(str(x) for x in c.get("seeds", []))
    return (
        f"preset {c.get('preset', '?')}, {c.get('world_size', '?')} ranks ({c.get('engine', '?')}), "
        f"{c.get('steps', '?')} steps, H={c.get('inner_steps', '?')}, seeds {seeds or '?'}"
    )


def write_outputs(
    summary: dict[str, Any], cfg: dict[str, Any], out: Path, *, plot: bool = True
) -> dict[str, Path]:
    """Write ``results.json``, ``curves.csv`` and (with ``plot``) ``bench_<preset>.png`` into ``out``.

    The PNG is :func:`make_figure`: loss vs bytes, loss vs simulated time, bytes per method.
    """
    out.mkdir(parents=True, exist_ok=True)
    preset = cfg.get("preset", "none")
    results = {
        "schema": SCHEMA,
        "note": NOTE,
        "config": cfg,
        "preset": {"name": preset, "basis": PRESETS[preset].basis if preset in PRESETS else None},
        "versions": {
            "thinwire": thinwire.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "engine": cfg.get("engine"),
        },
        "methods": {
            m: {k: v for k, v in s.items() if k != "runs"}
            | {
                "runs": [
                    {k: v for k, v in r.items() if k != "curve"} | {"curve": r["curve"]}
                    for r in s["runs"]
                ]
            }
            for m, s in summary.items()
        },
    }
    paths = {"json": out / "results.json", "csv": out / "curves.csv"}
    paths["json"].write_text(json.dumps(json_safe(results), indent=1, allow_nan=False))
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "method",
                "seed",
                "step",
                "tokens",
                "bytes_sent_cum",
                "sim_time_s",
                "train_loss",
                "eval_loss",
            ]
        )
        for m, s in summary.items():
            for r in s["runs"]:
                for c in r["curve"]:
                    w.writerow(
                        [
                            m,
                            r["seed"],
                            c["step"],
                            c["tokens"],
                            c["bytes_sent_cum"],
                            f"{c['sim_time_s']:.6f}",
                            f"{c['train_loss']:.6f}",
                            f"{c['eval_loss']:.6f}",
                        ]
                    )
    if plot:
        fig = make_figure(summary, preset)
        paths["png"] = out / f"bench_{preset}.png"
        fig.savefig(paths["png"], dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
    return paths


def make_figure(summary: dict[str, Any], preset: str = "none") -> Any:
    """The benchmark's figure: three panels side by side, one colour per method.

    1. eval loss against bytes sent per rank (log scale): which method learns most per byte;
    2. eval loss against simulated time under ``preset``: which finishes first on that link;
    3. bytes sent per rank by each method, a horizontal bar chart on a log scale, each bar
       labelled with its total and its reduction against DDP when DDP ran.

    The entropy floor of the built-in language is a dotted line on the loss panels.

    Args:
        summary: :func:`summarize`'s output (its first seed's curves are drawn).
        preset: WAN preset name, shown on the time axis (default ``"none"``).

    Returns:
        A ``matplotlib.figure.Figure`` (the Agg backend); the caller saves and closes it.

    Raises:
        ImportError: matplotlib is not installed (extra ``thinwire[bench]``).
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"the PNG needs matplotlib: {BENCH_EXTRA}, or pass plot=False") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(
        1, 3, figsize=(18, 4.8), gridspec_kw={"width_ratios": [1.0, 1.0, 0.9]}
    )
    colors: dict[str, Any] = {}
    for m, s in summary.items():
        r = s["runs"][0]
        xs = [max(p["bytes_sent_cum"], 1) for p in r["curve"]]
        ys = [p["eval_loss"] for p in r["curve"]]
        (line,) = a.plot(xs, ys, marker="o", ms=3, label=m)
        colors[m] = line.get_color()
        b.plot(
            [p["sim_time_s"] for p in r["curve"]], ys, marker="o", ms=3, label=m, color=colors[m]
        )
    floor = next(iter(summary.values()))["loss_floor"]
    for ax in (a, b):
        if math.isfinite(floor):
            ax.axhline(floor, color="k", ls=":", lw=1, label="entropy floor")
        ax.set_ylabel("eval loss (nats/token)")
        ax.grid(alpha=0.3)
    a.set_xscale("log")
    a.set_xlabel("bytes sent per rank")
    a.set_title("loss vs bytes")
    b.set_xlabel(f"simulated time (s), preset {preset}")
    b.set_title("loss vs time")
    a.legend(fontsize=8)

    names = list(summary)
    sent = [max(float(summary[m]["bytes_sent_per_rank"]["mean"]), 1.0) for m in names]
    pos = list(range(len(names)))
    c.barh(pos, sent, color=[colors[m] for m in names])
    c.set_yticks(pos, names)
    c.invert_yaxis()  # first method on top, as in the legend and the table
    c.set_xscale("log")
    c.set_xlim(min(sent) / 2, max(sent) * 40)  # room for the labels right of the bars
    for y, m, v in zip(pos, names, sent, strict=True):
        ddp = summary[m].get("reduction_vs_ddp")
        label = _fmt_bytes(v) + (f"  ({ddp:,.0f}x less than DDP)" if ddp and m != "ddp" else "")
        c.text(v * 1.15, y, label, va="center", fontsize=8)
    c.set_xlabel("bytes sent per rank (log scale)")
    c.set_title("bytes per method")
    c.grid(alpha=0.3, axis="x")
    fig.suptitle(f"thinwire bench — {NOTE}")
    fig.tight_layout()
    return fig
