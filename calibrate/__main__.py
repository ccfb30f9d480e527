"""``python -m calibrate quantize|eval ...``: the calibration subcommands of ``wush`` on their own."""

from __future__ import annotations

import argparse
import logging
import sys

from .cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrate", description="WUSH FP4 calibration: quantize | eval")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    level = logging.INFO if args.verbose <= 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from wush_compile.errors import run_command

    return run_command(lambda: args.func(args), args.command, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
