"""Codec benchmark: thinwire's bucket codecs against reference-style DeMo and templar compressors.

Run::

    .venv/bin/python benchmarks/codecs.py                 # prints the markdown tables
    .venv/bin/python benchmarks/codecs.py --write         # also replaces the block in RESULTS.md
    .venv/bin/python benchmarks/codecs.py --profile       # + top-10 ops of one encode / decode

Three parts, all in this process on the CPU, ``--threads`` torch threads (default 1):

1. Baseline comparison. On a 4096 x 4096 and a (50257, 768) float32 tensor
   (``thinwire.bench.codec_demo.demo_tensor``: smooth field plus unit noise, seeded), thinwire's
   ``SparseBucket`` for DeMo (k=32, float and sign values) and SparseLoCo (k=64 per 64x64 tile,
   2-bit) against the compressors of ``benchmarks/_baselines.py``, written in the style of the
   reference code (DeMo, arXiv:2411.19870v1 Alg. 1; templar SparseLoCo, arXiv:2508.15706v1 §3).
   Encode = one tensor to its payload; decode = 4 peers' payloads unpacked and aggregated with
   the index mean (plus the inverse DCT for DeMo). Baseline and thinwire runs alternate each
   repeat (the order flips every repeat) and the median of ``--repeats`` is reported. The kept
   index sets are compared chunk by chunk; a differing chunk is classed as an exact magnitude
   tie, a float32 rounding near-tie (DeMo: the two paths compute the DCT in a different
   summation order) or a real difference.
2. One DeMo optimizer step on 6 x (2048, 2048) parameters (25.2M), ``DeMo(comm=None).step()``
   against the reference-style step of ``_baselines.DeMoStep``, interleaved the same way.
3. Wire bytes, bits per index and encode/decode time of every codec of ``DEMO_CODECS`` on the
   4096 x 4096 tensor (single-tensor ``codec.encode`` / ``codec.decode``; ``--table-repeats``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _provenance import git_commit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _baselines as ref  # noqa: E402

import thinwire  # noqa: E402
from thinwire.bench.codec_demo import DEMO_CODECS, demo_tensor  # noqa: E402
from thinwire.compression import (  # noqa: E402
    INDEX_CODERS,
    SparseCodec,
    build_codec,
    dct_basis,
    log2_binom,
    make_bucket,
)
from thinwire.optim import DeMo, demo_compressor, sparseloco_compressor  # noqa: E402

BEGIN = "<!-- codecs.py:begin -->"
END = "<!-- codecs.py:end -->"
SHAPES = ((4096, 4096), (50257, 768))
PEERS = 4
STEP_SHAPES = [(2048, 2048)] * 6
TARGET_ENCODE, TARGET_DECODE, TARGET_STEP, AIM_STEP = 1.0, 0.8, 1.0, 0.5
U32 = 2.0**-24  # float32 unit roundoff


# --- timing ----------------------------------------------------------------------------------


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved(
    base: Callable[[], object], ours: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of ``base`` and ``ours``, run alternately (order flipped every repeat)."""
    base(), ours()  # warm-up: bases, caches, allocator
    tb: list[float] = []
    to: list[float] = []
    for r in range(repeats):
        pair = ((base, tb), (ours, to)) if r % 2 == 0 else ((ours, to), (base, tb))
        for fn, acc in pair:
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(tb), statistics.median(to)


def _verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}x ({'met' if ratio <= target else 'missed'}, target <= {target:.1f}x)"


# --- part 1: against the reference-style compressors -----------------------------------------


@dataclass
class Method:
    label: str
    codec: SparseCodec
    baseline: str  # "demo" or "templar"


def _methods() -> list[Method]:
    return [
        Method("DeMo k=32 float", demo_compressor(topk=32, chunk=64, values="float"), "demo"),
        Method("DeMo k=32 sign", demo_compressor(topk=32, chunk=64, values="sign"), "demo"),
        Method(
            "SparseLoCo k=64 2-bit",
            build_codec(sparseloco_compressor(topk=64, chunk=64, bits=2)),
            "templar",
        ),
    ]


def _index_diff(
    ours_idx: torch.Tensor,
    base_idx: torch.Tensor,
    coeffs32: torch.Tensor,
    exact: dict[int, tuple[torch.Tensor, torch.Tensor, int]] | None,
) -> tuple[int, int, int]:
    """Chunks whose kept index sets differ: ``(exact ties, float32 near-ties, other)``.

    ``coeffs32`` are the baseline's own float32 coefficients ``(N, chunk_len)``. ``exact``
    (DeMo only) maps a differing chunk to its float64 DCT coefficients ``c``, the rounding scale
    ``|F1|^T |X| |F2|`` and ``n1 + n2``: each float32 coefficient is within
    ``(n1 + n2) u scale`` of ``c`` (Higham, Accuracy and Stability, eq. 3.5), so two paths can
    rank entries whose ``|c|`` lie within twice that of each other either way.
    """
    a = torch.sort(ours_idx, dim=1).values
    b = torch.sort(base_idx, dim=1).values
    rows = torch.nonzero((a != b).any(dim=1)).reshape(-1).tolist()
    ties = near = other = 0
    for r in rows:
        sa, sb = set(a[r].tolist()), set(b[r].tolist())
        only_a, only_b = sorted(sa - sb), sorted(sb - sa)
        ma = coeffs32[r, only_a].abs().sort().values
        mb = coeffs32[r, only_b].abs().sort().values
        if torch.equal(ma, mb):
            ties += 1
            continue
        if exact is not None:
            c, scale, nn = exact[r]
            swapped = only_a + only_b
            mags = c[swapped].abs()
            tol = 2 * nn * U32 * float(scale[swapped].max())
            if float(mags.max() - mags.min()) <= 2 * tol:
                near += 1
                continue
        other += 1
    return ties, near, other


def _dct64(
    x: torch.Tensor, n1: int, n2: int, rows: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor, int]]:
    """Float64 DCT coefficients and rounding scales of the tiles ``rows`` (see _index_diff)."""
    import einops

    t = einops.rearrange(x.double(), "(y h) (x w) -> (y x) h w", h=n1, w=n2)[rows]
    b1 = dct_basis(n1, torch.float64)
    b2 = dct_basis(n2, torch.float64)
    c = (b1.mT @ t @ b2).reshape(-1, n1 * n2)
    s = (b1.abs().mT @ t.abs() @ b2.abs()).reshape(-1, n1 * n2)
    return {int(r): (c[i], s[i], n1 + n2) for i, r in enumerate(rows.tolist())}


def compare(shape: tuple[int, int], repeats: int) -> list[dict[str, object]]:
    xs = [demo_tensor(*shape, seed=s) for s in range(PEERS)]
    x0 = xs[0]
    rows: list[dict[str, object]] = []
    for m in _methods():
        bucket = make_bucket(m.codec, [shape])
        k = bucket.ks[0]
        g = bucket.geometries[0]
        if m.baseline == "demo":
            tr = ref.DeMoDCT([shape], 64)
            comp = ref.DeMoTopK(k)
            payloads = [comp.compress(tr.encode(x)) for x in xs]

            def enc_base(tr=tr, comp=comp) -> object:
                return comp.compress(tr.encode(x0))

            def dec_base(tr=tr, comp=comp, payloads=payloads) -> object:
                return tr.decode(comp.batch_decompress(payloads))

            base_idx = payloads[0].idx.reshape(g.num_chunks, k)
            base_coeffs = tr.encode(x0).reshape(g.num_chunks, g.chunk_len)
            base_label = "DeMo reference style (int64 idx + fp32)"
        else:
            tp = ref.TemplarTopK([shape], k, 64)
            payloads = [tp.compress(x) for x in xs]

            def enc_base(tp=tp) -> object:
                return tp.compress(x0)

            def dec_base(tp=tp, payloads=payloads) -> object:
                return tp.batch_decompress(payloads)

            base_idx = tp.unpack(payloads[0])[0].reshape(g.num_chunks, k)
            base_coeffs = tp.tiles(x0).reshape(g.num_chunks, g.chunk_len)
            base_label = "templar style (12-bit idx + uint8 2-bit codes)"

        frames = torch.stack([bucket.encode([x])[0] for x in xs])
        _, status = bucket.decode(frames)
        if status.tolist() != [0] * PEERS:
            raise RuntimeError(f"{m.label} {shape}: decode status {status.tolist()}")

        def enc_ours(bucket=bucket) -> object:
            return bucket.encode([x0])

        def dec_ours(bucket=bucket, frames=frames) -> object:
            parts, _ = bucket.decode(frames)
            return bucket.aggregate(parts, list(range(PEERS)))

        # selections and aggregates, outside the timed region
        ours_idx = bucket.encode([x0])[1][0].idx
        differ = (torch.sort(ours_idx, 1).values != torch.sort(base_idx, 1).values).any(1)
        exact = None
        if m.baseline == "demo":
            exact = _dct64(x0, g.n1, g.n2, torch.nonzero(differ).reshape(-1))
        ties, near, other = _index_diff(ours_idx, base_idx, base_coeffs, exact)
        agg_diff = "n/a (sign vs float)"
        if not m.label.endswith("sign"):
            a = dec_ours()[0].double()
            b = dec_base().double()
            agg_diff = f"{float((a - b).norm() / b.norm()):.1e}"

        tb_e, to_e = _interleaved(enc_base, enc_ours, repeats)
        tb_d, to_d = _interleaved(dec_base, dec_ours, repeats)
        rows.append(
            dict(
                shape=shape,
                method=m.label,
                baseline=base_label,
                k=k,
                tile=(g.n1, g.n2),
                chunks=g.num_chunks,
                enc=(to_e, tb_e),
                dec=(to_d, tb_d),
                bytes=(bucket.nbytes, payloads[0].nbytes),
                differ=(int(differ.sum()), ties, near, other),
                agg=agg_diff,
            )
        )
        print(f"  done: {shape} {m.label}", file=sys.stderr, flush=True)
    return rows


def compare_table(rows: list[dict[str, object]]) -> list[str]:
    lines = [
        "| tensor | method (k, tile) | encode ms ours / base | encode ratio | "
        "decode+agg ms, 4 peers, ours / base | decode ratio | wire bytes ours / base | "
        "differing chunks (ties, fp32 near-ties, other) | aggregate rel. diff |",
        "|---|---|---:|---|---:|---|---:|---|---:|",
    ]
    for r in rows:
        (to_e, tb_e), (to_d, tb_d) = r["enc"], r["dec"]
        (nb_o, nb_b) = r["bytes"]
        n, ties, near, other = r["differ"]
        rr, cc = r["shape"]
        lines.append(
            f"| {rr}x{cc} | {r['method']} (k={r['k']}, {r['tile'][0]}x{r['tile'][1]}) vs "
            f"{r['baseline']} | {1e3 * to_e:.0f} / {1e3 * tb_e:.0f} | "
            f"{_verdict(to_e / tb_e, TARGET_ENCODE)} | {1e3 * to_d:.0f} / {1e3 * tb_d:.0f} | "
            f"{_verdict(to_d / tb_d, TARGET_DECODE)} | {nb_o:,} / {nb_b:,} "
            f"({nb_b / nb_o:.2f}x fewer) | {n} of {r['chunks']:,} ({ties}, {near}, {other}) | "
            f"{r['agg']} |"
        )
    return lines


# --- part 2: one DeMo optimizer step ---------------------------------------------------------


def step_compare(repeats: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for s in STEP_SHAPES]
    grads = [torch.randn(s, generator=gen) for s in STEP_SHAPES]
    ps_o = [torch.nn.Parameter(t.clone()) for t in init]
    ps_b = [torch.nn.Parameter(t.clone()) for t in init]
    for p, gr in zip(ps_o + ps_b, grads + grads, strict=True):
        p.grad = gr
    lr = 1e-3
    ours = DeMo(ps_o, lr, topk=32, chunk=64, values="float", comm=None)
    base = ref.DeMoStep(ps_b, lr, beta=0.999, k=32, chunk=64)
    ours.step()
    base.step()
    moved = sum(int((a != b).sum()) for a, b in zip(ps_o, ps_b, strict=True))
    n = sum(p.numel() for p in ps_o)
    tb, to = _interleaved(base.step, ours.step, repeats)
    return [
        "| DeMo step, 6 x (2048, 2048) = "
        f"{n / 1e6:.1f}M params, k=32 float | ours ms | baseline ms | ratio |",
        "|---|---:|---:|---|",
        f"| `DeMo(comm=None).step()` vs reference-style step | {1e3 * to:.0f} | {1e3 * tb:.0f} | "
        f"{_verdict(to / tb, TARGET_STEP)}, aim {AIM_STEP:.1f}x |",
        "",
        f"After the first step from identical state, {moved:,} of {n:,} parameter coordinates "
        "differ between the two (a coordinate differs when its update sign differs: near-ties in "
        "the top-k or an aggregate within rounding of 0).",
    ]


# --- part 3: the codec table -----------------------------------------------------------------


def wire_table(rows: int, cols: int, repeats: int) -> list[str]:
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
        print(f"  done: table {label}", file=sys.stderr, flush=True)
    return lines


# --- profile ---------------------------------------------------------------------------------


def _thinwire_functions(fn: Callable[[], object], top: int) -> str:
    """thinwire functions by cumulative time over one call of ``fn`` (cProfile)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    rows = [
        (ct, f"{Path(f).name}:{name}")
        for (f, _, name), (_, _, _, ct, _) in stats.items()
        if f"thinwire{os.sep}" in f and name not in ("encode", "<lambda>", "_dec")
    ]
    rows.sort(reverse=True)
    return ", ".join(f"`{label}` {1e3 * ct:.0f}" for ct, label in rows[:top])


def profile(shape: tuple[int, int], top: int = 10, calls: int = 3) -> list[str]:
    """Where thinwire's time goes on one encode and one 4-peer decode + aggregate.

    Per method and phase: the top torch ops by self CPU time (``torch.profiler``, mean of
    ``calls`` calls) and the thinwire functions by cumulative time (cProfile, one call).
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    xs = [demo_tensor(*shape, seed=s) for s in range(PEERS)]
    out: list[str] = []
    for m in _methods():
        bucket = make_bucket(m.codec, [shape])
        frames = torch.stack([bucket.encode([x])[0] for x in xs])

        def _enc(b=bucket) -> object:
            return b.encode([xs[0]])

        def _dec(b=bucket, f=frames) -> object:
            return b.aggregate(b.decode(f)[0], list(range(PEERS)))

        for what, fn in (("encode", _enc), ("decode+aggregate", _dec)):
            fn()
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    fn()
            avgs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in avgs) or 1
            ops = ", ".join(
                f"`{e.key}` {e.self_cpu_time_total / 1e3 / calls:.0f} "
                f"({100 * e.self_cpu_time_total / total:.0f}%)"
                for e in avgs[:top]
            )
            out.append(
                f"- {m.label}, {what} ({total / 1e3 / calls:.0f} ms per call profiled). "
                f"Ops, self ms: {ops}. thinwire functions, cumulative ms: "
                f"{_thinwire_functions(fn, 8)}"
            )
            print(out[-1], file=sys.stderr, flush=True)
    return out


# --- main ------------------------------------------------------------------------------------


def _provenance(args: argparse.Namespace) -> str:
    cmd = shlex.join([".venv/bin/python", "benchmarks/codecs.py", *sys.argv[1:]])
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared); torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"thinwire {thinwire.__version__}, commit {git_commit()}"
        f"{' + uncommitted changes' if dirty else ''}; median of {args.repeats} interleaved "
        f"repeats (baseline/thinwire alternating); command: `{cmd}`"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--table-repeats", type=int, default=1, help="repeats of the codec table")
    ap.add_argument("--no-table", action="store_true", help="skip the per-codec table")
    ap.add_argument("--no-step", action="store_true", help="skip the optimizer step")
    ap.add_argument(
        "--shapes", default="4096x4096,50257x768", help="comma-separated RxC (default both)"
    )
    ap.add_argument("--profile", action="store_true", help="top-10 ops of one encode / decode")
    ap.add_argument("--write", action="store_true", help="replace the block in RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]

    rows: list[dict[str, object]] = []
    for shape in shapes:
        rows += compare(shape, args.repeats)
    lines = [
        BEGIN,
        _provenance(args),
        "",
        "**Against reference-style compressors** (`benchmarks/_baselines.py`; DeMo: "
        "arXiv:2411.19870v1 Alg. 1, templar SparseLoCo: arXiv:2508.15706v1 §3). Encode: one "
        "tensor -> payload (ours: `SparseBucket.encode`, framed and checksummed). Decode: "
        f"{PEERS} peers' payloads -> dense index-mean aggregate (ours: `decode` + `aggregate`, "
        "incl. the inverse DCT). Differing chunks: per-chunk set equality of the kept indices; "
        "ties are exact equal magnitudes (order unspecified in `torch.topk`), fp32 near-ties "
        "are DCT coefficients within float32 rounding of each other (the two paths sum in a "
        "different order). Aggregate rel. diff: ||ours - base|| / ||base|| of the 4-peer "
        "aggregate (nonzero where a tie put the kept value at the other tied position, or where "
        "a sum ran in another order). For (50257, 768) the rows split as 29 (largest divisor "
        "<= 64); SparseLoCo's "
        "density rule then keeps round(29*64*64/4096) = 29 per tile, and the templar baseline "
        "is run at the same k (templar itself keeps 64 per tile whatever its size).",
        "",
        *compare_table(rows),
    ]
    if not args.no_step:
        lines += ["", *step_compare(args.repeats)]
    if args.profile:
        lines += [
            "",
            f"**Where thinwire's time goes** ({shapes[0][0]}x{shapes[0][1]}; `torch.profiler` "
            "self CPU time of the top 10 ops, and cProfile cumulative time of thinwire's own "
            "functions; profiler overhead included):",
            "",
            *profile(shapes[0]),
        ]
    if not args.no_table:
        lines += [
            "",
            f"**Every codec, single tensor** ({SHAPES[0][0]}x{SHAPES[0][1]} fp32, `demo_tensor` "
            f"seed 0, `codec.encode` / `codec.decode`, median of {args.table_repeats}):",
            "",
            *wire_table(*SHAPES[0], args.table_repeats),
        ]
    lines.append(END)
    block = "\n".join(lines)
    print(block)
    if args.write:
        path = Path(__file__).with_name("RESULTS.md")
        text = path.read_text()
        head, sep, rest = text.partition(BEGIN)
        if not sep:
            raise SystemExit(f"{path}: no {BEGIN} marker")
        _, _, tail = rest.partition(END)
        path.write_text(head + block + tail)


if __name__ == "__main__":
    main()
