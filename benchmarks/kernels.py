"""Kernel micro-benchmark: GB/s of each fused op's Triton kernel and its speed-up over the torch
reference, measured in the same process on the same CUDA device.

Run::

    .venv/bin/python benchmarks/kernels.py                     # prints a markdown table
    .venv/bin/python benchmarks/kernels.py --write             # also updates benchmarks/RESULTS.md
    .venv/bin/python benchmarks/kernels.py --max-numel 16M     # a shorter sweep
    .venv/bin/python benchmarks/kernels.py --cpu-reference     # no GPU: time the references only

GB/s counts the bytes an op must read and write at least (inputs, outputs, side data; never
scratch), the same figure for both backends, as in the Triton tutorials. Times are
``triton.testing.do_bench`` medians. Each case is first checked for equal integer outputs (codes,
indices) and, for decode, bit-identical floats; the table says ``ok`` or ``MISMATCH``. Sizes run
from 64 K to 256 M elements, powers of 4; a size whose buffers do not fit the free device memory
is skipped and listed. Without CUDA the script prints that the GPU figures need a CUDA device and
exits 0 (``--cpu-reference`` times the torch references on the CPU instead, 64 K to 1 M, and does
not write). ``--write`` replaces the block between ``<!-- kernels.py:begin -->`` and
``<!-- kernels.py:end -->`` in ``benchmarks/RESULTS.md``, appending a "## Kernels" section if
there is none; other sections are left alone.

The launch constants in ``thinwire.compression._triton`` (``NUM_WARPS``, ``TILE``,
``FUSED_MAX_BLOCK``, ``NORMALIZE_TILE``) were fixed without a GPU and must be re-chosen from this
benchmark on one; the provenance line records them.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _provenance import git_commit

import thinwire
from thinwire.compression import (
    EF_FORMAT_BITS,
    dct_basis,
    dct_topk,
    decode_accumulate,
    ef_quantize_pack,
)

BEGIN = "<!-- kernels.py:begin -->"
END = "<!-- kernels.py:end -->"
SECTION = "## Kernels (Triton kernels against their torch references)"
INTRO = (
    "GB/s = minimum bytes read + written per call / median time (`triton.testing.do_bench`); the "
    "ratio is the torch reference's time over the kernel's, same process, same device. "
    '"check" compares integer outputs exactly (and decode\'s floats bit for bit) before timing.'
)
SIZES = [4**k * 2**16 for k in range(7)]  # 64 K .. 256 M elements
#: DeMo's default chunk 64 x 64 with k = 32 (bloc97/DeMo `compression_topk`); SparseLoCo's
#: 64 of 4096 per chunk (templar) from 4 peers for decode.
TILE_SIDE, DEMO_K, DECODE_K, DECODE_PEERS = 64, 32, 64, 4
EF_CASES = [("int8", None), ("int4", None), ("fp4_e3m0", None), ("sign", None), ("2bit", None)]


@dataclass
class Case:
    """One benchmark row: builders of the two calls and the byte count."""

    op: str
    label: str
    numel: int
    nbytes: int  # minimum bytes read + written
    run: Callable[[str], object]  # backend -> outputs
    check: Callable[[object, object], bool]


def _human(n: int) -> str:
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _parse_numel(text: str) -> int:
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1].upper(), 1)
    return int(text[:-1] if mult > 1 else text) * mult


def _ef_case(n: int, fmt: str, block: int | None, device: str) -> Case:
    g = torch.Generator(device=device).manual_seed(0)
    residual = torch.randn(n, generator=g, device=device)
    inp = torch.randn(n, generator=g, device=device)
    bits = EF_FORMAT_BITS[fmt]
    side = {"int8": n // 256, "int4": n // 128, "fp4_e3m0": n // 128, "sign": 1, "2bit": 5}[fmt]
    nbytes = 12 * n + (n * bits + 7) // 8 + 4 * side  # read e, x; write e', codes, side

    def run(backend: str) -> object:
        return ef_quantize_pack(residual, inp, decay=0.9, fmt=fmt, block=block, backend=backend)

    return Case("ef_quantize_pack", fmt, n, nbytes, run, lambda a, b: torch.equal(a[0], b[0]))


def _dct_case(n: int, device: str) -> Case:
    n_tiles = n // TILE_SIDE**2
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n_tiles, TILE_SIDE, TILE_SIDE, generator=g, device=device)
    basis = dct_basis(TILE_SIDE, device=device)
    nbytes = 4 * n + n_tiles * DEMO_K * (8 + 4)  # read tiles; write int64 idx + fp32 val

    def run(backend: str) -> object:
        return dct_topk(x, basis, basis, DEMO_K, backend=backend)

    return Case(
        "dct_topk", f"64x64, k={DEMO_K}", n, nbytes, run, lambda a, b: torch.equal(a[0], b[0])
    )


def _decode_case(n: int, device: str) -> Case:
    chunk_len = TILE_SIDE**2
    n_chunks = n // chunk_len
    g = torch.Generator(device=device).manual_seed(0)
    idx = [
        torch.rand(n_chunks, chunk_len, generator=g, device=device)
        .argsort(dim=1)[:, :DECODE_K]
        .sort(dim=1)
        .values
        for _ in range(DECODE_PEERS)
    ]
    val = [torch.randn(n_chunks, DECODE_K, generator=g, device=device) for _ in idx]
    nbytes = 4 * n + DECODE_PEERS * n_chunks * DECODE_K * (8 + 4)  # read payloads; write dense

    def run(backend: str) -> object:
        return decode_accumulate(idx, val, n_chunks, chunk_len, backend=backend)

    label = f"{DECODE_PEERS} peers, k={DECODE_K}/4096"
    return Case("decode_accumulate", label, n, nbytes, run, lambda a, b: torch.equal(a, b))


def _cases(n: int, device: str) -> list[Callable[[], Case]]:
    out: list[Callable[[], Case]] = [
        lambda f=f, b=b: _ef_case(n, f, b, device) for f, b in EF_CASES
    ]
    out.append(lambda: _dct_case(n, device))
    out.append(lambda: _decode_case(n, device))
    return out


def _fits(n: int) -> bool:
    """Whether ~16 float32 copies of ``n`` elements (inputs, outputs, reference temporaries) fit."""
    free, _ = torch.cuda.mem_get_info()
    return 16 * 4 * n < free


def run_gpu(sizes: list[int]) -> tuple[list[str], list[str]]:
    from triton.testing import do_bench

    lines = [
        "| op | case | elements | kernel GB/s | torch GB/s | kernel ms | torch ms | ratio | check"
        " |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    skipped: list[str] = []
    for n in sizes:
        if not _fits(n):
            skipped.append(_human(n))
            continue
        for make in _cases(n, "cuda"):
            case = make()
            ok = case.check(case.run("torch"), case.run("triton"))
            t_k = do_bench(lambda c=case: c.run("triton"), return_mode="median")
            t_r = do_bench(lambda c=case: c.run("torch"), return_mode="median")
            lines.append(
                f"| {case.op} | {case.label} | {_human(n)} | {case.nbytes / t_k / 1e6:,.1f} | "
                f"{case.nbytes / t_r / 1e6:,.1f} | {t_k:.4f} | {t_r:.4f} | {t_r / t_k:.2f}x | "
                f"{'ok' if ok else 'MISMATCH'} |"
            )
            del case
            torch.cuda.empty_cache()
    return lines, skipped


def run_cpu_reference(sizes: list[int], repeats: int = 3) -> list[str]:
    lines = ["| op | case | elements | torch ms (CPU) | torch GB/s |", "|---|---|---:|---:|---:|"]
    for n in sizes:
        for make in _cases(n, "cpu"):
            case = make()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                case.run("torch")
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            lines.append(
                f"| {case.op} | {case.label} | {_human(n)} | {1e3 * t:.2f} | "
                f"{case.nbytes / t / 1e9:.2f} |"
            )
    return lines


def _provenance(command: str) -> str:
    import triton

    from thinwire.compression._triton import _common
    from thinwire.compression._triton import decode_accumulate as dec
    from thinwire.compression._triton import ef_quantize_pack as efq

    dev = torch.cuda.get_device_properties(0)
    return (
        f"{torch.cuda.get_device_name(0)} ({dev.total_memory / 2**30:.0f} GiB); "
        f"torch {torch.__version__}, triton {triton.__version__}, thinwire {thinwire.__version__}, "
        f"commit {git_commit()}, {datetime.date.today().isoformat()}; backends: triton (kernel) vs "
        f"torch (reference); launch constants NUM_WARPS={_common.NUM_WARPS}, TILE={efq.TILE}, "
        f"FUSED_MAX_BLOCK={efq.FUSED_MAX_BLOCK}, NORMALIZE_TILE={dec.NORMALIZE_TILE}; "
        f"command: `{command}`"
    )


def write_results(block: list[str], path: Path) -> None:
    """Replace the marked block in ``path`` (append a Kernels section if it has none)."""
    text = path.read_text() if path.exists() else "# thinwire benchmark results\n"
    body = "\n".join([BEGIN, *block, END])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + body + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{INTRO}\n\n{body}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--max-numel", default="256M", help="largest size (default 256M)")
    ap.add_argument("--cpu-reference", action="store_true", help="no GPU: time torch on CPU")
    args = ap.parse_args(argv)
    sizes = [n for n in SIZES if n <= _parse_numel(args.max_numel)]
    if not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py: the GPU figures need a CUDA device (none found on "
            f"{platform.machine()}); nothing measured, RESULTS.md untouched."
        )
        if args.cpu_reference:
            print("\n".join(run_cpu_reference([n for n in sizes if n <= 2**20])))
        return 0
    lines, skipped = run_gpu(sizes)
    command = "python benchmarks/kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    block = [_provenance(command.strip()), "", *lines]
    if skipped:
        block += ["", f"Skipped (free device memory too small): {', '.join(skipped)}."]
    print("\n".join(block))
    if args.write:
        write_results(block, Path(__file__).with_name("RESULTS.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
