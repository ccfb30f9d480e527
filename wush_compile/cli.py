"""The ``wush`` command: ``wush quantize | eval | explain | bench``.

Each subcommand lives with the code it drives and plugs in through a ``register(subparsers)`` function that
adds its parser and sets ``func`` (called with the parsed namespace, returns an exit code). Arguments are
parsed here and in those functions only; library code never sees a namespace.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module providing register(subparsers)
_SUBCOMMANDS = {
    "quantize": "calibrate.cli",
    "eval": "calibrate.cli",
    "explain": "wush_compile.explain_cli",
    "bench": "wush_compile.bench.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wush", description="WUSH FP4 quantization and torch.compile runtime: quantize | eval | explain | bench")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    registered = set()
    for module_name in dict.fromkeys(_SUBCOMMANDS.values()):
        module = importlib.import_module(module_name)
        module.register(sub)
        registered.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=min(level, logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level if args.verbose else logging.INFO)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
