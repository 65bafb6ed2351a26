"""The ``thinwire`` command line: ``thinwire demo`` (codec table) and later ``thinwire bench``."""

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``thinwire`` console script."""
    parser = argparse.ArgumentParser(prog="thinwire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="bytes and error of every codec on a built-in tensor")
    demo.add_argument("--rows", type=int, default=1024)
    demo.add_argument("--cols", type=int, default=1024)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
