"""One-command check of thinwire on a CUDA machine: kernels against references, optimizers on GPU.

Run::

    python benchmarks/gpu_check.py              # CUDA machine, a few minutes
    python benchmarks/gpu_check.py --quick      # fewer sizes
    python benchmarks/gpu_check.py --cpu-smoke  # CPU only: does the script itself still work?

What it does, printing one ``PASS``/``FAIL``/``INFO`` line per check:

1. Device name, torch / triton / CUDA versions; the nominal memory bandwidth
   (``2 x memory clock x bus width``) and the practical peak, measured with a large
   ``Tensor.copy_`` (bytes read + written per second).
2. Every Triton kernel registered in ``thinwire.compression._dispatch.registered()``
   (``ef_quantize_pack``, ``dct_topk``, ``decode_accumulate``) against its torch reference at a
   few sizes, with the agreement rules of ``tests/compression/test_kernels.py``: integer outputs
   exact; float outputs exact where both paths do the same float32 operations, else within a
   float32 summation bound (Higham, Accuracy and Stability of Numerical Algorithms, eqs. 3.5 and
   4.4). ``dct_topk`` indices may differ only on chunks whose candidates lie within that bound of
   each other (near-ties; counted and printed). Both are timed with ``triton.testing.do_bench``
   and reported in GB/s (bytes read + written, from the sizes) and as a fraction of the copy peak.
   A registered kernel this script has no check for is a failure (add one).
3. Each optimizer (DiLoCo with int4 values and error feedback, SparseLoCo, DeMo float and sign,
   StreamingDiLoCo) stepping CUDA parameters with ``comm=None`` and under a 1-rank NCCL group
   through ``thinwire.collectives.TorchDistCommunicator``: parameters must stay on the device and
   finite, ``backend="auto"`` must agree with ``backend="torch"`` (DeMo's sign may flip where an
   aggregate is within rounding of 0, as in ``tests/optim/test_backends.py``), and the step time
   of the two backends is printed with their ratio.

The exit code is 1 when any check fails. ``--cpu-smoke`` runs the same code on the CPU at tiny
sizes (kernels in Triton's interpreter when triton is installed, gloo instead of NCCL) and makes
no timing claims: it exists so a session without a GPU can check that this script has not rotted.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

if "--cpu-smoke" in sys.argv[1:]:
    # Triton decides at decoration time whether to interpret: set before any kernel is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import thinwire  # noqa: E402
from thinwire.collectives import TorchDistCommunicator  # noqa: E402
from thinwire.compression import (  # noqa: E402
    EF_FORMAT_BITS,
    dct_basis,
    dct_topk,
    decode_accumulate,
    ef_quantize_pack,
    quantize_2bit_centroid,
)
from thinwire.compression._dispatch import registered, triton_available  # noqa: E402
from thinwire.optim import DeMo, DiLoCo, SparseLoCo, StreamingDiLoCo  # noqa: E402

U32 = 2.0**-24  # float32 unit roundoff


@dataclass
class Ctx:
    device: torch.device
    kernel_backend: str | None  # "triton", or None when kernels cannot run here
    timing: bool  # real GPU timings (False on --cpu-smoke)
    quick: bool
    smoke: bool
    # backend compared with "torch" in the optimizer checks: "auto" on CUDA; on --cpu-smoke
    # "triton" (interpreted) when triton imports, since "auto" is the torch path on the CPU
    step_backend: str = "auto"
    peak_gbs: float | None = None
    failed: int = 0
    passed: int = 0

    def report(self, ok: bool, name: str, detail: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def info(msg: str) -> None:
    print(f"INFO {msg}", flush=True)


def guarded(ctx: Ctx, name: str, fn: Callable[[], None]) -> None:
    """Run one check; an exception is a FAIL line (with its last frame), not an abort."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes one summary line
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        ctx.report(
            False, name, f"{type(exc).__name__}: {exc} (at {tb.filename}:{tb.lineno})".strip()
        )


# --- timing ----------------------------------------------------------------------------------


def bench_ms(ctx: Ctx, fn: Callable[[], object]) -> float | None:
    """Median ms of ``fn`` by ``triton.testing.do_bench`` (GPU only; None on --cpu-smoke)."""
    if not ctx.timing:
        return None
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def gbs(nbytes: int, ms: float | None) -> str:
    return "-" if ms is None else f"{nbytes / (ms * 1e-3) / 1e9:,.0f} GB/s"


def timing_line(ctx: Ctx, nbytes: int, t_kernel: float | None, t_ref: float | None) -> str:
    if t_kernel is None or t_ref is None:
        return "no timing (--cpu-smoke)"
    frac = ""
    if ctx.peak_gbs:
        frac = f" = {100 * nbytes / (t_kernel * 1e-3) / 1e9 / ctx.peak_gbs:.0f}% of copy peak"
    return (
        f"kernel {t_kernel * 1e3:,.0f} us ({gbs(nbytes, t_kernel)}{frac}), torch "
        f"{t_ref * 1e3:,.0f} us ({gbs(nbytes, t_ref)}), speed-up {t_ref / t_kernel:.1f}x"
    )


def _copy_peak(ctx: Ctx, n: int) -> float:
    """GB/s of ``dst.copy_(src)`` over ``n`` float32 (bytes read + written)."""
    src = torch.randn(n, device=ctx.device)
    dst = torch.empty_like(src)
    ms = bench_ms(ctx, lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def header(ctx: Ctx) -> None:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    info(f"thinwire {thinwire.__version__}, torch {torch.__version__}, triton {tv}")
    if ctx.device.type != "cuda":
        info(f"device: CPU ({os.cpu_count()} cores); --cpu-smoke makes no timing claims")
        return
    props = torch.cuda.get_device_properties(ctx.device)
    info(
        f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} "
        f"SMs, CUDA {torch.version.cuda}, capability {props.major}.{props.minor}"
    )
    clock = getattr(props, "memory_clock_rate", 0)  # kHz
    width = getattr(props, "memory_bus_width", 0)  # bits
    nominal = 2 * clock * 1e3 * width / 8 / 1e9 if clock and width else None
    n = (1 << 27) if ctx.quick else (1 << 28)  # 512 MiB / 1 GiB of float32
    ctx.peak_gbs = _copy_peak(ctx, n)
    torch.cuda.empty_cache()
    info(
        f"memory bandwidth: nominal "
        f"{'n/a' if nominal is None else f'{nominal:,.0f} GB/s'} (2 x clock x bus width), "
        f"practical peak {ctx.peak_gbs:,.0f} GB/s (copy_ of {n * 4 / 2**30:.1f} GiB, read + write)"
    )


# --- kernel checks ---------------------------------------------------------------------------


def _randn(ctx: Ctx, shape, seed: int) -> torch.Tensor:
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=ctx.device)
    return x * torch.exp(torch.randn(shape, generator=g, device=ctx.device))


def _sum_slack(terms: torch.Tensor) -> torch.Tensor:
    """Two float32 summation orders of ``terms`` differ by at most this (Higham eq. 4.4, x2)."""
    m = terms.numel()
    return 2 * max(m - 1, 1) * U32 * terms.double().abs().sum()


def _ef_agree(a, b, fmt: str, p: torch.Tensor) -> tuple[bool, str]:
    """Agreement rule of test_kernels._check_ef for ``block=None`` (default blocks)."""
    (pa, sa, ra), (pb, sb, rb) = a, b
    if not torch.equal(pa, pb):
        return False, f"packed codes differ in {int((pa != pb).sum())} of {pa.numel()} bytes"
    if sa.shape != sb.shape or ra.shape != rb.shape:
        return (
            False,
            f"shapes differ: side {sa.shape} vs {sb.shape}, residual {ra.shape}/{rb.shape}",
        )
    if fmt in ("int8", "int4", "fp4_e3m0"):
        ok = torch.equal(sa, sb) and torch.equal(ra, rb)
        return ok, "codes, scales and residual bit-identical" if ok else "scales/residual differ"
    flat = p.reshape(-1).double()
    dr = (ra.reshape(-1).double() - rb.reshape(-1).double()).abs()
    if fmt == "sign":  # one scale (mean |p|) for the whole tensor
        tol = _sum_slack(flat) / max(flat.numel(), 1)
        ok_s = bool((sa.double() - sb.double()).abs().max() <= tol + 1e-45) if sa.numel() else True
        ok_r = bool(torch.all(dr <= tol + 2 * U32 * flat.abs()))
        worst = float((dr - 2 * U32 * flat.abs()).max()) if dr.numel() else 0.0
        word = "within" if ok_s and ok_r else "NOT within"
        return (
            ok_s and ok_r,
            f"codes exact; scale and residual {word} {float(tol):.1e} (worst {worst:.1e})",
        )
    # 2bit: mu and codes identical; each centroid is a float sum over its bin
    if sa[0] != sb[0]:
        return False, f"mu differs: {float(sa[0])} vs {float(sb[0])}"
    codes = quantize_2bit_centroid(p).codes.long().reshape(-1)
    c = flat - float(sa[0])
    nb = sa.numel() - 1
    tol = torch.zeros(nb, dtype=torch.float64, device=p.device)
    for j in range(nb):
        sel = c[codes == j]
        if sel.numel():
            tol[j] = _sum_slack(sel) / sel.numel() + 2 * U32 * sel.abs().max()
    ok_t = bool(torch.all((sa[1:].double() - sb[1:].double()).abs() <= tol))
    ok_r = bool(torch.all(dr <= tol[codes] + 2 * U32 * flat.abs() + 1e-45))
    word = "within" if ok_t and ok_r else "NOT within"
    return ok_t and ok_r, (
        f"codes and mu exact; centroids and residual {word} {float(tol.max()):.1e} "
        f"(residual worst {float(dr.max()):.1e})"
    )


def check_ef_quantize_pack(ctx: Ctx) -> None:
    if ctx.smoke:
        sizes = [1031]
    else:
        sizes = [1031, 1 << 20] if ctx.quick else [1031, 1 << 20, 1 << 24]
    for fmt in EF_FORMAT_BITS:
        for n in sizes:
            name = f"ef_quantize_pack fmt={fmt} n={n:,}"

            def run(fmt=fmt, n=n, name=name) -> None:
                residual, inp = _randn(ctx, n, n), _randn(ctx, n, n + 1)
                kw = {"decay": 0.9, "scale": 0.37, "fmt": fmt}
                a = ef_quantize_pack(residual, inp, backend="torch", **kw)
                b = ef_quantize_pack(residual, inp, backend=ctx.kernel_backend, **kw)
                ok, detail = _ef_agree(a, b, fmt, residual * 0.9 + inp * 0.37)
                nbytes = 3 * 4 * n + a[0].numel() + 4 * a[1].numel()  # r, inp in; res, codes out
                tk = bench_ms(ctx, lambda: ef_quantize_pack(residual, inp, backend="triton", **kw))
                tr = bench_ms(ctx, lambda: ef_quantize_pack(residual, inp, backend="torch", **kw))
                ctx.report(ok, name, f"{detail}; {timing_line(ctx, nbytes, tk, tr)}")

            guarded(ctx, name, run)


def check_dct_topk(ctx: Ctx) -> None:
    if ctx.smoke:
        cases = [(3, 16, 16, 8), (2, 29, 64, 16)]
    elif ctx.quick:
        cases = [(61, 64, 64, 32), (1024, 64, 64, 32)]
    else:
        # 4096 tiles = one 4096 x 4096 matrix; 20796 tiles of 29 x 64 = (50257, 768)
        cases = [(61, 64, 64, 32), (4096, 64, 64, 32), (4096, 64, 64, 8), (20796, 29, 64, 32)]
    for n_tiles, n1, n2, k in cases:
        name = f"dct_topk tiles={n_tiles:,}x{n1}x{n2} k={k}"

        def run(n_tiles=n_tiles, n1=n1, n2=n2, k=k, name=name) -> None:
            x = _randn(ctx, (n_tiles, n1, n2), n1 * 100 + n2)
            b1 = dct_basis(n1, device=ctx.device)
            b2 = dct_basis(n2, device=ctx.device)
            ia, va = dct_topk(x, b1, b2, k, backend="torch")
            ib, vb = dct_topk(x, b1, b2, k, backend=ctx.kernel_backend)
            ok = ib.dtype == torch.int64 and vb.dtype == torch.float32 and ib.shape == ia.shape
            # exact coefficients and the float32 rounding scale |F1|^T |X| |F2| (float64)
            f1, f2 = (
                dct_basis(n1, torch.float64, ctx.device),
                dct_basis(n2, torch.float64, ctx.device),
            )
            xd = x.double()
            exact = (f1.mT @ xd @ f2).reshape(n_tiles, n1 * n2)
            scale = (f1.abs().mT @ xd.abs() @ f2.abs()).reshape(n_tiles, n1 * n2)
            tol = 2 * (n1 + n2) * U32 * scale  # two float32 paths, Higham eq. 3.5
            rows = torch.nonzero((ia != ib).any(dim=1)).reshape(-1).tolist()
            bad_rows = 0
            for r in rows:
                sa, sb = set(ia[r].tolist()), set(ib[r].tolist())
                swapped = sorted(sa ^ sb)
                mags = exact[r, swapped].abs()
                if float(mags.max() - mags.min()) > 2 * float(tol[r, swapped].max()):
                    bad_rows += 1
            same = ~(ia != ib).any(dim=1)  # compare values on rows selecting the same indices
            dv = (va[same].double() - vb[same].double()).abs()
            bound = tol.gather(1, ia)[same] + 1e-45
            ok = ok and bad_rows == 0 and bool(torch.all(dv <= bound))
            nbytes = n_tiles * n1 * n2 * 4 + n_tiles * k * 12 + (n1 * n1 + n2 * n2) * 4
            tk = bench_ms(ctx, lambda: dct_topk(x, b1, b2, k, checked=False, backend="triton"))
            tr = bench_ms(ctx, lambda: dct_topk(x, b1, b2, k, checked=False, backend="torch"))
            detail = (
                f"indices equal on {n_tiles - len(rows):,} of {n_tiles:,} tiles "
                f"({len(rows) - bad_rows} float32 near-ties, {bad_rows} real differences); values "
                f"within 2(n1+n2)u|F|^T|X||F|: {bool(torch.all(dv <= bound))}"
            )
            ctx.report(ok, name, f"{detail}; {timing_line(ctx, nbytes, tk, tr)}")

        guarded(ctx, name, run)


def check_decode_accumulate(ctx: Ctx) -> None:
    if ctx.smoke:
        cases = [(2, 8, 256, 16)]
    elif ctx.quick:
        cases = [(1, 1024, 4096, 32), (4, 4096, 4096, 32)]
    else:
        cases = [
            (1, 4096, 4096, 32),
            (4, 4096, 4096, 32),
            (16, 4096, 4096, 32),
            (4, 20796, 1856, 29),
        ]
    for peers, n_chunks, chunk_len, k in cases:
        for mode in ("index_mean", "global_mean"):
            name = f"decode_accumulate P={peers} chunks={n_chunks:,}x{chunk_len} k={k} {mode}"

            def run(peers=peers, n_chunks=n_chunks, chunk_len=chunk_len, k=k, mode=mode, name=name):
                g = torch.Generator(device=ctx.device).manual_seed(peers * 1000 + k)
                idx_list, val_list = [], []
                for _ in range(peers):
                    scores = torch.rand(n_chunks, chunk_len, generator=g, device=ctx.device)
                    idx_list.append(torch.sort(scores.topk(k, dim=1).indices, dim=1).values)
                    val_list.append(torch.randn(n_chunks, k, generator=g, device=ctx.device))
                kw = {"mode": mode, "checked": False}
                a = decode_accumulate(
                    idx_list, val_list, n_chunks, chunk_len, backend="torch", **kw
                )
                b = decode_accumulate(
                    idx_list, val_list, n_chunks, chunk_len, backend=ctx.kernel_backend, **kw
                )
                ok = torch.equal(a, b)
                detail = (
                    "bit-identical"
                    if ok
                    else f"{int((a != b).sum())} of {a.numel()} differ, max {float((a - b).abs().max()):.1e}"
                )
                nbytes = peers * n_chunks * k * 12 + n_chunks * chunk_len * 4

                def kern() -> object:
                    return decode_accumulate(
                        idx_list, val_list, n_chunks, chunk_len, backend="triton", **kw
                    )

                def refer() -> object:
                    return decode_accumulate(
                        idx_list, val_list, n_chunks, chunk_len, backend="torch", **kw
                    )

                ctx.report(
                    ok,
                    name,
                    f"{detail}; {timing_line(ctx, nbytes, bench_ms(ctx, kern), bench_ms(ctx, refer))}",
                )

            guarded(ctx, name, run)


KERNEL_CHECKS: dict[str, Callable[[Ctx], None]] = {
    "ef_quantize_pack": check_ef_quantize_pack,
    "dct_topk": check_dct_topk,
    "decode_accumulate": check_decode_accumulate,
}


def check_kernels(ctx: Ctx) -> None:
    names = sorted(registered())
    info(f"registered kernels: {', '.join(names)}")
    if ctx.kernel_backend is None:
        info("triton does not import here: kernel-vs-reference checks skipped")
        return
    for name in names:
        check = KERNEL_CHECKS.get(name)
        if check is None:
            ctx.report(False, f"kernel {name}", "registered but gpu_check.py has no check for it")
            continue
        check(ctx)


# --- optimizer checks ------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "DiLoCo int4/128 + EF": lambda ps, comm, backend: DiLoCo(
        ps,
        functools.partial(torch.optim.SGD, lr=0.01),
        sync_every=1,
        compressor="quant(int4, block=128)",
        error_feedback=True,
        comm=comm,
        backend=backend,
    ),
    "SparseLoCo k=64 2-bit": lambda ps, comm, backend: SparseLoCo(
        ps,
        functools.partial(torch.optim.SGD, lr=0.01),
        sync_every=1,
        topk=64,
        chunk=64,
        comm=comm,
        backend=backend,
    ),
    "DeMo k=32 float": lambda ps, comm, backend: DeMo(
        ps, 1e-3, topk=32, chunk=64, values="float", comm=comm, backend=backend
    ),
    "DeMo k=32 sign": lambda ps, comm, backend: DeMo(
        ps, 1e-3, topk=32, chunk=64, values="sign", comm=comm, backend=backend
    ),
    "StreamingDiLoCo P=2 tau=1": lambda ps, comm, backend: StreamingDiLoCo(
        ps,
        functools.partial(torch.optim.SGD, lr=0.01),
        sync_every=4,
        fragments=2,
        overlap_steps=1,
        comm=comm,
        backend=backend,
    ),
}


def _shapes(ctx: Ctx) -> list[tuple[int, ...]]:
    if ctx.smoke:
        return [(128, 128), (64, 32), (96,)]
    if ctx.quick:
        return [(2048, 2048), (2048, 512), (2048,)]
    return [(4096, 4096), (4096, 1024), (1024, 4096), (4096,)]  # 25.2M parameters


def _make(ctx: Ctx, kind: str, comm, backend: str):
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    ps = []
    for s in _shapes(ctx):
        p = torch.nn.Parameter(0.02 * torch.randn(s, generator=gen, device=ctx.device))
        p.grad = torch.randn(s, generator=gen, device=ctx.device)
        ps.append(p)
    return ps, OPTIMIZERS[kind](ps, comm, backend)


def _agree(kind: str, a: list[torch.Tensor], b: list[torch.Tensor], steps: int) -> tuple[bool, str]:
    pa = torch.cat([p.detach().reshape(-1) for p in a]).double()
    pb = torch.cat([p.detach().reshape(-1) for p in b]).double()
    diff = (pa - pb).abs()
    if kind.startswith("DeMo"):
        # as tests/optim/test_backends.py: an aggregate within rounding of 0 may flip its sign,
        # moving that coordinate by 2 lr; everything else agrees to float32 rounding
        frac = float((diff > 1e-6).double().mean())
        ok = frac <= 0.02 and float(diff.max()) <= 2 * 1e-3 * steps + 1e-6
    else:
        frac = float((diff > 1e-6 + 1e-4 * pb.abs()).double().mean())
        ok = frac <= 0.02
    return ok, f"{100 * frac:.3f}% of coordinates differ, max {float(diff.max()):.1e}"


def _run_steps(ctx: Ctx, opt, steps: int) -> None:
    for _ in range(steps):
        opt.step()
    ctx.sync()


def _step_ms(ctx: Ctx, opt, steps: int) -> float | None:
    if not ctx.timing:
        return None
    _run_steps(ctx, opt, 2)
    t0 = time.perf_counter()
    _run_steps(ctx, opt, steps)
    return 1e3 * (time.perf_counter() - t0) / steps


def check_optimizers(ctx: Ctx, comm, label: str, reference: dict[str, list[torch.Tensor]]) -> None:
    steps = 3
    timed = 3 if ctx.quick else 8
    for kind in OPTIMIZERS:
        name = f"{kind} step, {label}"

        def run(kind=kind, name=name) -> None:
            ps_auto, opt_auto = _make(ctx, kind, comm, ctx.step_backend)
            ps_torch, opt_torch = _make(ctx, kind, comm, "torch")
            _run_steps(ctx, opt_auto, steps)
            _run_steps(ctx, opt_torch, steps)
            on_dev = all(p.device.type == ctx.device.type for p in ps_auto + ps_torch)
            finite = all(bool(torch.isfinite(p).all()) for p in ps_auto + ps_torch)
            ok_bk, agree = _agree(kind, ps_auto, ps_torch, steps)
            detail = (
                f"on {ctx.device.type}: {on_dev}, finite: {finite}; "
                f"{ctx.step_backend} vs torch: {agree}"
            )
            ok = on_dev and finite and ok_bk
            if kind in reference:  # the communicator path against comm=None, same backend
                ok_ref, same = _agree(kind, ps_auto, reference[kind], steps)
                ok = ok and ok_ref
                detail += f"; vs comm=None: {same}"
            else:
                reference[kind] = [p.detach().clone() for p in ps_auto]
            ta, tt = _step_ms(ctx, opt_auto, timed), _step_ms(ctx, opt_torch, timed)
            if ta is not None and tt is not None:
                n = sum(p.numel() for p in ps_auto) / 1e6
                detail += (
                    f"; step ({n:.1f}M params) auto {ta:.1f} ms, torch {tt:.1f} ms, "
                    f"auto/torch {ta / tt:.2f}x"
                )
            ctx.report(ok, name, detail)

        guarded(ctx, name, run)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_with_group(ctx: Ctx, reference: dict[str, list[torch.Tensor]]) -> None:
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    name = f"1-rank {backend} process group"
    try:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
        comm = TorchDistCommunicator()
    except Exception as exc:  # noqa: BLE001
        ctx.report(False, name, f"could not start: {type(exc).__name__}: {exc}")
        return
    info(f"{name} up: TorchDistCommunicator engine={comm.engine}, world_size={comm.world_size}")
    try:
        check_optimizers(ctx, comm, f"{backend} TorchDistCommunicator", reference)
    finally:
        comm.close()
        if dist.is_initialized():
            dist.destroy_process_group()


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer and smaller sizes")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="CPU only, tiny sizes, no timing claims"
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.cpu_smoke:
        device = torch.device("cpu")
        kernel_backend = "triton" if triton_available() else None
    else:
        if not torch.cuda.is_available():
            print("FAIL setup: no CUDA device (use --cpu-smoke on a CPU-only machine)")
            return 1
        if not triton_available():
            print("FAIL setup: triton does not import (pip install 'thinwire[triton]')")
            return 1
        device = torch.device("cuda", torch.cuda.current_device())
        kernel_backend = "triton"
    ctx = Ctx(
        device, kernel_backend, timing=not args.cpu_smoke, quick=args.quick, smoke=args.cpu_smoke
    )
    if args.cpu_smoke and kernel_backend is not None:
        ctx.step_backend = "triton"
    guarded(ctx, "device header", lambda: header(ctx))
    check_kernels(ctx)
    reference: dict[str, list[torch.Tensor]] = {}
    check_optimizers(ctx, None, "comm=None", reference)
    check_with_group(ctx, reference)
    print(
        f"{'FAILED' if ctx.failed else 'OK'}: {ctx.passed} passed, {ctx.failed} failed "
        f"in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return 1 if ctx.failed else 0


if __name__ == "__main__":
    sys.exit(main())
