"""The thinwire command line.

thinwire bench runs the bandwidth benchmark (bytes, loss and simulated time of every method next
to DDP); thinwire bench --compare A B puts two of its results.json files side by side; thinwire
demo prints the bytes and error of every codec; thinwire netcheck (root only) checks the WAN model
against kernel traffic shaping.

Every flag is checked before any work starts: a bad value ends in one line naming the flag, what
it accepts and what was given, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import thinwire

__all__ = ["main"]

logger = logging.getLogger("thinwire.bench.cli")

_DESCRIPTION = (
    "thinwire: train one PyTorch model over slow, far links. "
    "Run 'thinwire bench' for the bandwidth benchmark, 'thinwire demo' for the codec table."
)
_PROGRESS_FRACTION = 10  # progress lines when stdout is not a terminal: one per 10% of steps


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help; the epilog (methods, presets) keeps its line breaks,
    so descriptions are wrapped with :func:`_wrap`."""


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=79)


# --- argument types: each raises ArgumentTypeError, which argparse turns into one line --------


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, inf), got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def _methods_arg(text: str) -> list[str]:
    from thinwire.bench.methods import METHODS

    if text.strip() == "all":
        return list(METHODS)
    names = [m.strip() for m in text.split(",")]
    unknown = [n for n in names if n not in METHODS]
    if unknown or len(set(names)) != len(names):
        why = f"unknown {', '.join(map(repr, unknown))}" if unknown else "a name repeats"
        raise argparse.ArgumentTypeError(
            f"must be 'all' or comma-separated names from {{{', '.join(METHODS)}}}, "
            f"got {text!r} ({why})"
        )
    return names


def _seeds_arg(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"must be distinct comma-separated integers in [0, inf), e.g. 0,1,2, got {text!r}"
        )
    return seeds


def _data_arg(text: str) -> str:
    from thinwire.bench.tiny import ByteCorpus

    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"must be an existing text file, got {text!r}")
    try:
        ByteCorpus(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{exc} (file {text!r})") from None
    return text


def _topology_arg(text: str) -> str:
    from thinwire.collectives import WanConfig

    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"must be an existing JSON topology file, got {text!r}")
    try:
        WanConfig.from_json(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"must be a JSON topology file, got {text!r}, which is not JSON "
            f"({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"invalid topology in {text!r}: {exc}") from None
    return text


# --- optional extras -------------------------------------------------------------------------


_warned: set[str] = set()  # optional modules already reported missing


def _have(module: str, what: str) -> bool:
    """Whether ``module`` imports; if not, warn (once per process) what is skipped."""
    try:
        importlib.import_module(module)
    except ImportError:
        if module not in _warned:
            from thinwire.bench.report import BENCH_EXTRA

            _warned.add(module)
            logger.warning("%s is not installed: %s; install it with %s", module, what, BENCH_EXTRA)
        return False
    return True


def _setup_logging() -> None:
    """Warnings of thinwire go to stderr as ``thinwire: WARNING: ...`` lines."""
    root = logging.getLogger("thinwire")
    if not any(getattr(h, "_thinwire_cli", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("thinwire: %(levelname)s: %(message)s"))
        handler._thinwire_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        if root.level == logging.NOTSET:
            root.setLevel(logging.WARNING)


def _print_table(title: str, headers: list[str], rows: list[list[str]], rich: bool) -> None:
    if not rich:  # aligned plain text
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=160).print(table)


# --- thinwire demo ----------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from thinwire.bench.codec_demo import HEADERS, demo_tensor, format_rows, run_demo

    rich = _have("rich", "printing a plain-text table")
    x = demo_tensor(args.rows, args.cols, args.seed)
    rows = run_demo(x)
    title = (
        f"thinwire codecs on a built-in {args.rows}x{args.cols} fp32 tensor "
        f"({x.numel() * 4:,} bytes dense; seed {args.seed})"
    )
    _print_table(title, HEADERS, format_rows(rows), rich)
    return 0


# --- thinwire bench ---------------------------------------------------------------------------


class _ProgressLines:
    """Plain progress lines on stderr: each (method, seed) run started and finished, and one line
    per 10% of its steps. Fed the harness's ``on_event`` events (rank 0, from a background
    thread); the runs of rank 0 follow ``for seed in seeds: for method in methods``."""

    def __init__(self, methods: list[str], seeds: list[int], steps: int) -> None:
        self.order = [(m, s) for s in seeds for m in methods]
        self.steps = steps
        self.current = -1
        self.t0 = 0.0
        self.shown = 0  # tenths of this run's steps already reported
        self.lock = threading.Lock()

    def _line(self, text: str) -> None:
        print(f"thinwire bench: {text}", file=sys.stderr, flush=True)

    def _start_next(self) -> None:
        self.current += 1
        self.shown = 0
        self.t0 = time.perf_counter()
        if self.current < len(self.order):
            m, s = self.order[self.current]
            self._line(f"{m} (seed {s}) started [{self.current + 1}/{len(self.order)}]")

    def _finish_current(self) -> None:
        m, s = self.order[self.current]
        self._line(f"{m} (seed {s}) finished in {time.perf_counter() - self.t0:.1f} s")
        self._start_next()

    def start(self) -> None:
        with self.lock:
            self._start_next()

    def __call__(self, ev: tuple) -> None:
        kind, method, seed, _rank, step = ev
        with self.lock:
            # Catch up if an event was lost: finish every run before this one.
            while self.current < len(self.order) and self.order[self.current] != (method, seed):
                self._finish_current()
            if self.current >= len(self.order):
                return
            if kind == "done":
                self._finish_current()
                return
            tenth = step * _PROGRESS_FRACTION // self.steps
            if tenth > self.shown and step < self.steps:
                self.shown = tenth
                self._line(
                    f"{method} (seed {seed}) step {step}/{self.steps} ({100 * step // self.steps}%)"
                )

    def close(self) -> None:
        """Finish the runs whose last events the harness did not deliver."""
        with self.lock:
            while self.current < len(self.order):
                self._finish_current()


def _run_with_rich_progress(cfg: Any, run_bench: Callable[..., Any]) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    tasks: dict[tuple[str, int], int] = {}
    with progress:
        overall = progress.add_task(
            "all methods", total=len(cfg.methods) * len(cfg.seeds) * cfg.steps
        )

        def on_event(ev: tuple) -> None:
            kind, method, seed, _rank, step = ev
            key = (method, seed)
            if key not in tasks:
                tasks[key] = progress.add_task(f"{method} (seed {seed})", total=cfg.steps)
            progress.update(tasks[key], completed=step)
            done = sum(progress.tasks[i].completed for i in tasks.values())
            progress.update(overall, completed=done)

        return run_bench(cfg, on_event)


def _check_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """Cross-flag checks; returns the validated ``BenchConfig``. Exits through ``parser.error``."""
    from thinwire.bench.harness import BenchConfig

    if args.steps % args.inner_steps:
        parser.error(
            f"argument --steps: must be a multiple of --inner-steps ({args.inner_steps}), "
            f"got {args.steps}"
        )
    if args.data:
        import torch

        from thinwire.bench.tiny import ByteCorpus, TinyConfig

        length = TinyConfig(vocab=256).context + 1
        try:
            ByteCorpus(args.data).batch(
                args.world_size - 1, args.world_size, 1, length, torch.Generator()
            )
        except ValueError as exc:
            parser.error(f"argument --data: {exc} (--world-size {args.world_size})")
    if args.topology:
        from thinwire.collectives import WanConfig

        size = WanConfig.from_json(args.topology).size()
        if size is not None and size < args.world_size:
            parser.error(
                f"argument --topology: must describe at least --world-size ({args.world_size}) "
                f"ranks, got a file for {size}"
            )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: must be a directory, got the file {args.out!r}")
    cfg = BenchConfig(
        methods=args.methods,
        engine=args.engine,
        world_size=args.world_size,
        preset=args.preset,
        topology=args.topology,
        wan_mode=args.wan_mode,
        steps=args.steps,
        inner_steps=args.inner_steps,
        seeds=args.seeds,
        batch=args.batch,
        data=args.data,
    )
    try:
        cfg.validate()
    except ValueError as exc:  # any remaining constraint: name the flag of the field it names
        field, _, rest = str(exc).partition(" ")
        flag = f"--{field.replace('_', '-')}"
        parser.error(f"argument {flag}: {rest}" if field in cfg.__dict__ else str(exc))
    return cfg


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from thinwire.bench.report import COMPARE_HEADERS, compare_rows, describe_run, load_results

    defaults = vars(parser.parse_args([]))  # a run flag next to --compare would be ignored
    extra = [
        f"--{k.replace('_', '-')}"
        for k, v in defaults.items()
        if k not in ("compare", "func", "parser") and getattr(args, k) != v
    ]
    if extra:
        parser.error(f"argument --compare: takes no other flags, got {', '.join(extra)}")
    runs = []
    for path in args.compare:
        try:
            runs.append(load_results(path))
        except ValueError as exc:
            parser.error(f"argument --compare: {exc}")
    a, b = runs
    rich = _have("rich", "printing a plain-text table")
    title = (
        f"thinwire bench --compare: A = {args.compare[0]} ({describe_run(a)}); "
        f"B = {args.compare[1]} ({describe_run(b)})"
    )
    _print_table(title, COMPARE_HEADERS, compare_rows(a, b), rich)
    return 0


def _bench(args: argparse.Namespace) -> int:
    parser = args.parser
    if args.compare:
        return _compare(args, parser)
    cfg = _check_bench(args, parser)

    from thinwire.bench.harness import run_bench
    from thinwire.bench.report import NOTE, TABLE_HEADERS, summarize, table_rows, write_outputs

    show_table = not (args.quiet or args.json_only)
    plot = not (args.no_plot or args.json_only) and _have("matplotlib", "skipping the PNG plot")
    tty = sys.stdout.isatty()
    rich = (show_table or (tty and not args.quiet)) and _have(
        "rich", "printing a plain-text table and progress lines"
    )
    t0 = time.perf_counter()
    if args.quiet:
        per_rank = run_bench(cfg)
    elif tty and rich:
        per_rank = _run_with_rich_progress(cfg, run_bench)
    else:
        print(
            f"thinwire bench: {len(cfg.methods)} methods x {len(cfg.seeds)} seed(s), "
            f"{cfg.steps} steps, {cfg.world_size} ranks ({cfg.engine}), preset {cfg.preset}",
            file=sys.stderr,
            flush=True,
        )
        lines = _ProgressLines(cfg.methods, cfg.seeds, cfg.steps)
        lines.start()
        per_rank = run_bench(cfg, lines)
        lines.close()
    summary = summarize(per_rank)
    paths = write_outputs(summary, cfg.__dict__ | {"seeds": cfg.seeds}, Path(args.out), plot=plot)
    if show_table:
        floor = next(iter(summary.values()))["loss_floor"]
        floor_text = (
            f"loss floor {floor:.4f} nats" if math.isfinite(floor) else "no known loss floor"
        )
        title = (
            f"thinwire bench: {cfg.world_size} ranks ({cfg.engine}), preset {cfg.preset}, "
            f"{cfg.steps} steps, H={cfg.inner_steps}, seeds {','.join(map(str, cfg.seeds))}; "
            f"{floor_text}; {NOTE}"
        )
        _print_table(title, TABLE_HEADERS, table_rows(summary), rich)
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.0f} s")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    from thinwire.bench.harness import ENGINES
    from thinwire.bench.methods import METHODS
    from thinwire.collectives import PRESETS

    parser = argparse.ArgumentParser(
        prog="thinwire", description=_wrap(_DESCRIPTION), formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"thinwire {thinwire.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,demo,netcheck}")

    demo = sub.add_parser(
        "demo",
        help="bytes and error of every codec on a built-in tensor",
        description=_wrap("Bytes and error of every codec on a built-in fp32 tensor."),
        formatter_class=_HelpFormatter,
    )
    demo.add_argument("--rows", type=_int_at_least(1), default=1024, help="tensor rows")
    demo.add_argument("--cols", type=_int_at_least(1), default=1024, help="tensor columns")
    demo.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the tensor")
    demo.set_defaults(func=_demo, parser=demo)

    width = max(map(len, [*METHODS, *PRESETS]))
    epilog = "\n".join(
        ["methods:"]
        + [f"  {m.name:<{width}}  {m.description}" for m in METHODS.values()]
        + ["", "WAN presets (--preset):", f"  {'none':<{width}}  no WAN model: wall clock only"]
        + [
            f"  {p.name:<{width}}  {p.up_mbps:g}/{p.down_mbps:g} Mbit/s up/down, "
            f"RTT {p.rtt_ms:g} ms, jitter {p.jitter_ms:g} ms"
            for p in PRESETS.values()
        ]
    )
    b = sub.add_parser(
        "bench",
        help="bytes, loss and simulated time of every method vs DDP",
        description=_wrap(
            "Train the built-in tiny GPT with every method side by side against DDP under a "
            "simulated WAN, and report bytes sent, loss and simulated time. Writes results.json, "
            "curves.csv and a PNG plot into --out. With --compare A B, print two results.json "
            "files side by side instead."
        ),
        epilog=epilog,
        formatter_class=_HelpFormatter,
    )
    b.add_argument(
        "--methods",
        type=_methods_arg,
        default="all",
        metavar="NAMES",
        help=f"comma-separated method names ({', '.join(METHODS)}), or 'all'",
    )
    b.add_argument(
        "--engine",
        default="gloo",
        choices=ENGINES,
        help="gloo: one process per rank; inproc: ranks as threads of this process",
    )
    b.add_argument(
        "--world-size", type=_int_at_least(1), default=4, metavar="N", help="number of ranks"
    )
    b.add_argument(
        "--preset",
        default="home_broadband",
        choices=["none", *PRESETS],
        metavar="PRESET",
        help=f"WAN preset: none, {', '.join(PRESETS)}",
    )
    b.add_argument(
        "--topology",
        type=_topology_arg,
        default=None,
        metavar="FILE",
        help="JSON topology file with per-rank links (replaces --preset)",
    )
    b.add_argument(
        "--wan-mode",
        default="virtual",
        choices=["virtual", "sleep"],
        help="virtual: modelled clock; sleep: really wait out the modelled delays",
    )
    b.add_argument(
        "--steps", type=_int_at_least(1), default=200, metavar="N", help="training steps"
    )
    b.add_argument(
        "--inner-steps",
        type=_int_at_least(1),
        default=20,
        metavar="H",
        help="steps between syncs (H); --steps must be a multiple of it",
    )
    b.add_argument(
        "--seeds",
        type=_seeds_arg,
        default="0",
        metavar="S,S,...",
        help="comma-separated seeds (mean ± std over them)",
    )
    b.add_argument(
        "--batch",
        type=_int_at_least(1),
        default=16,
        metavar="N",
        help="sequences per rank per step",
    )
    b.add_argument(
        "--data",
        type=_data_arg,
        default=None,
        metavar="FILE",
        help="a local text file to train on (byte-level) instead of the built-in language",
    )
    b.add_argument("--out", default="bench_out", metavar="DIR", help="output directory")
    b.add_argument(
        "--quiet", action="store_true", help="print only errors, warnings and the output paths"
    )
    b.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    b.add_argument(
        "--json-only", action="store_true", help="write results.json and curves.csv only, no table"
    )
    b.add_argument(
        "--compare",
        nargs=2,
        default=None,
        metavar=("A.json", "B.json"),
        help="print two results.json files side by side (A, B and B/A per method) and exit; "
        "takes no other flag",
    )
    b.set_defaults(func=_bench, parser=b)

    nc = sub.add_parser(
        "netcheck",
        help="root only: check the WAN model against kernel traffic shaping",
        add_help=False,
    )
    nc.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``thinwire`` console script."""
    if argv is None:
        argv = sys.argv[1:]
    _setup_logging()
    if argv and argv[0] == "netcheck":  # its own parser and flags
        from thinwire.collectives import netcheck_main

        return netcheck_main(argv[1:])
    args = _build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
