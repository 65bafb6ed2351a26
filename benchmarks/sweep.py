"""Sweep of each method's key settings on the built-in task; picks the defaults in methods.py.

Run::

    .venv/bin/python benchmarks/sweep.py            # inproc engine, 4 ranks, 200 steps, seeds 0,1
    .venv/bin/python benchmarks/sweep.py --write    # also writes the table into benchmarks/RESULTS.md

For every method a small grid of its most sensitive setting is run with the benchmark's default
shape (4 ranks, 200 steps, H = 20, no WAN: only loss matters here) and the mean final eval loss
over the seeds is reported; the best value per method is marked. The defaults in
``src/thinwire/bench/methods.py`` are set from this table, never from a single lucky seed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _provenance import git_commit

from thinwire.bench import BenchConfig, run_bench

GRID: dict[str, tuple[str, list[float]]] = {
    "ddp": ("inner_lr", [1e-3, 3e-3, 1e-2]),
    "diloco-fp32": ("outer_lr", [0.4, 0.7, 1.0]),
    "diloco-int8": ("outer_lr", [0.4, 0.7, 1.0]),
    "diloco-int4": ("outer_lr", [0.4, 0.7, 1.0]),
    "streaming-diloco": ("outer_lr", [0.4, 0.7, 1.0]),
    "demo": ("lr", [1e-3, 3e-3, 1e-2]),
    "demo-sign": ("lr", [1e-3, 3e-3, 1e-2]),
    "sparseloco": ("topk", [64, 128, 256]),
}
BEGIN, END = "<!-- sweep.py:begin -->", "<!-- sweep.py:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(GRID))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = [
        "| method | setting | value | eval loss (mean over seeds) | best |",
        "|---|---|---:|---:|:---:|",
    ]
    t0 = time.perf_counter()
    for method in args.methods.split(","):
        key, values = GRID[method]
        scores = []
        for v in values:
            cfg = BenchConfig(
                methods=[method],
                engine="inproc",
                world_size=args.world_size,
                preset="none",
                steps=args.steps,
                inner_steps=args.inner_steps,
                seeds=seeds,
                overrides={method: {key: v}},
            )
            per_rank = run_bench(cfg)
            losses = [r["curve"][-1]["eval_loss"] for r in per_rank[0]]
            scores.append(statistics.fmean(losses))
            print(f"{method:18s} {key}={v:<8g} eval {scores[-1]:.4f}", flush=True)
        best = min(range(len(values)), key=lambda i: scores[i])
        for i, v in enumerate(values):
            lines.append(
                f"| {method} | {key} | {v:g} | {scores[i]:.4f} | {'*' if i == best else ''} |"
            )
    commit = git_commit()
    prov = (
        f"inproc engine, {args.world_size} ranks, {args.steps} steps, H={args.inner_steps}, seeds {args.seeds}, "
        f"no WAN; torch {torch.__version__}, commit {commit}; {time.perf_counter() - t0:.0f} s; "
        f"command: `python benchmarks/sweep.py --write`"
    )
    block = "\n".join([BEGIN, prov, "", *lines, END])
    print(block)
    if args.write:
        path = Path(__file__).with_name("RESULTS.md")
        text = path.read_text()
        if BEGIN not in text:
            text += "\n## Sweep of method settings\n\n" + BEGIN + "\n" + END + "\n"
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        path.write_text(head + block + tail)


if __name__ == "__main__":
    main()
