"""Codec benchmark: wire bytes, ratio, bits per index and CPU encode/decode time.

Run::

    .venv/bin/python benchmarks/codecs.py            # 4096 x 4096 fp32, prints a markdown table
    .venv/bin/python benchmarks/codecs.py --write    # also replaces the block in benchmarks/RESULTS.md

The tensor is ``thinwire.bench.codec_demo.demo_tensor`` (seeded; smooth field plus noise), so
errors are reproducible. Times are the median of ``--repeats`` runs in this process on the CPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import thinwire
from thinwire.bench.codec_demo import DEMO_CODECS, demo_tensor
from thinwire.compression import INDEX_CODERS, SparseCodec, build_codec, log2_binom

BEGIN = "<!-- codecs.py:begin -->"
END = "<!-- codecs.py:end -->"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(rows: int, cols: int, repeats: int) -> list[str]:
    x = demo_tensor(rows, cols, seed=0)
    dense_bytes = x.numel() * 4
    lines = [
        "| codec | pipeline | bytes | vs fp32 | bits/elem | bits/index (bound, ratio) | rel. L2 err | encode ms | decode ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, spec in DEMO_CODECS:
        codec = build_codec(spec)
        payload = codec.encode(x)
        if len(payload) != codec.wire_bytes(tuple(x.shape)):
            raise RuntimeError(f"{label}: wire_bytes disagrees with len(payload)")
        y = codec.decode(payload)
        err = float((y.double() - x.double()).norm() / x.double().norm())
        t_enc = _median_time(lambda c=codec: c.encode(x), repeats)
        t_dec = _median_time(lambda c=codec, p=payload: c.decode(p), repeats)
        idx = "-"
        if isinstance(codec, SparseCodec):
            g = codec.geometry(tuple(x.shape))
            k = codec.k_for(g.chunk_len)
            bpi = INDEX_CODERS[codec.index_coding].bits_per_index(k, g.chunk_len)
            bound = log2_binom(g.chunk_len, k) / k
            idx = f"{bpi:.2f} ({bound:.2f}, {bpi / bound:.3f}x)"
        lines.append(
            f"| {label} | `{spec}` | {len(payload):,} | {dense_bytes / len(payload):,.1f}x | "
            f"{8 * len(payload) / x.numel():.3f} | {idx} | {err:.4f} | {1e3 * t_enc:.1f} | "
            f"{1e3 * t_dec:.1f} |"
        )
    return lines


def _provenance(rows: int, cols: int, repeats: int) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (
        f"{rows}x{cols} fp32 (`demo_tensor`, seed 0), median of {repeats}; "
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, thinwire {thinwire.__version__}, commit {commit}; "
        f"command: `python benchmarks/codecs.py --write`"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--write", action="store_true", help="replace the block in benchmarks/RESULTS.md"
    )
    args = ap.parse_args()
    lines = run(args.rows, args.cols, args.repeats)
    block = "\n".join([BEGIN, _provenance(args.rows, args.cols, args.repeats), "", *lines, END])
    print(block)
    if args.write:
        path = Path(__file__).with_name("RESULTS.md")
        text = path.read_text()
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        path.write_text(head + block + tail)


if __name__ == "__main__":
    main()
