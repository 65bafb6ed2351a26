"""The ``thinwire`` command line: ``thinwire bench`` (the bandwidth benchmark) and ``thinwire demo`` (codecs)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the bench extra is optional; fall back to aligned plain text
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=160).print(table)


def _demo(args: argparse.Namespace) -> int:
    from thinwire.bench.codec_demo import HEADERS, demo_tensor, format_rows, run_demo

    x = demo_tensor(args.rows, args.cols, args.seed)
    rows = run_demo(x)
    title = (
        f"thinwire codecs on a built-in {args.rows}x{args.cols} fp32 tensor "
        f"({x.numel() * 4:,} bytes dense; seed {args.seed})"
    )
    _print_table(title, HEADERS, format_rows(rows))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from thinwire.bench.harness import BenchConfig, run_bench
    from thinwire.bench.methods import METHODS
    from thinwire.bench.report import NOTE, TABLE_HEADERS, summarize, table_rows, write_outputs

    methods = (
        list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    )
    cfg = BenchConfig(
        methods=methods,
        engine=args.engine,
        world_size=args.world_size,
        preset=args.preset,
        topology=args.topology,
        wan_mode=args.wan_mode,
        steps=args.steps,
        inner_steps=args.inner_steps,
        seeds=[int(s) for s in args.seeds.split(",")],
        batch=args.batch,
        data=args.data,
    )
    cfg.validate()
    show = not args.quiet and sys.stdout.isatty()
    total = len(cfg.methods) * len(cfg.seeds) * cfg.steps
    t0 = time.perf_counter()
    if show:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        )
        tasks: dict[tuple[str, int], int] = {}
        with progress:
            overall = progress.add_task("all methods", total=total)

            def on_event(ev: tuple) -> None:
                kind, method, seed, _rank, step = ev
                key = (method, seed)
                if key not in tasks:
                    tasks[key] = progress.add_task(f"{method} (seed {seed})", total=cfg.steps)
                progress.update(tasks[key], completed=step)
                done = sum(progress.tasks[i].completed for i in tasks.values())
                progress.update(overall, completed=done)

            per_rank = run_bench(cfg, on_event)
    else:
        if not args.quiet:
            print(
                f"thinwire bench: {len(cfg.methods)} methods x {len(cfg.seeds)} seed(s), {cfg.steps} steps, "
                f"{cfg.world_size} ranks ({cfg.engine}), preset {cfg.preset}",
                flush=True,
            )
        per_rank = run_bench(cfg)
    summary = summarize(per_rank)
    out = Path(args.out)
    paths = write_outputs(
        summary, cfg.__dict__ | {"seeds": cfg.seeds}, out, plot=not (args.no_plot or args.json_only)
    )
    if not args.json_only:
        floor = next(iter(summary.values()))["loss_floor"]
        title = (
            f"thinwire bench: {cfg.world_size} ranks ({cfg.engine}), preset {cfg.preset}, {cfg.steps} steps, "
            f"H={cfg.inner_steps}, seeds {args.seeds}; loss floor {floor:.4f} nats; {NOTE}"
        )
        _print_table(title, TABLE_HEADERS, table_rows(summary))
        print(
            f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.0f} s"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``thinwire`` console script."""
    parser = argparse.ArgumentParser(prog="thinwire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="bytes and error of every codec on a built-in tensor")
    demo.add_argument("--rows", type=int, default=1024)
    demo.add_argument("--cols", type=int, default=1024)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    b = sub.add_parser("bench", help="bytes, loss and simulated time of every method vs DDP")
    b.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    b.add_argument("--engine", default="gloo", choices=["gloo", "inproc"])
    b.add_argument("--world-size", type=int, default=4)
    b.add_argument("--preset", default="home_broadband", help="WAN preset name, or 'none'")
    b.add_argument("--topology", default=None, help="JSON topology file with per-rank links")
    b.add_argument("--wan-mode", default="virtual", choices=["virtual", "sleep"])
    b.add_argument("--steps", type=int, default=200)
    b.add_argument("--inner-steps", type=int, default=20)
    b.add_argument("--seeds", default="0", help="comma-separated seeds (mean ± std over them)")
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--data", default=None, help="a local text file to train on (byte-level)")
    b.add_argument("--out", default="bench_out")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--no-plot", action="store_true")
    b.add_argument("--json-only", action="store_true")
    b.set_defaults(func=_bench)
    nc = sub.add_parser(
        "netcheck",
        help="root only: check the WAN model against kernel traffic shaping",
        add_help=False,
    )
    nc.set_defaults(func=None)
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "netcheck":  # its own parser: spec §3.5 flags
        from thinwire.collectives import netcheck_main

        return netcheck_main(argv[1:])
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
