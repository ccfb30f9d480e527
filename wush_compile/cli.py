"""The ``wush`` command: ``wush quantize | eval | explain | bench``.

Each subcommand lives with the code it drives and plugs in through a ``register(subparsers)`` function that
adds its parser and sets ``func`` (called with the parsed namespace, returns an exit code). Arguments are
parsed here and in those functions only; library code never sees a namespace. This module adds what every
subcommand shares: ``-v`` / ``-q`` (before or after the subcommand), the examples of ``--help``, and the one
spelling of each flag (``--format``, ``--batch-size``; the old ``--fmt`` / ``--batch`` still parse), and the
one handler of user errors (:func:`wush_compile.errors.run_command`): one line ``wush COMMAND: error: ...``
on stderr and exit code 2, the traceback only with ``-v``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from .errors import run_command

# subcommand -> module providing register(subparsers)
_SUBCOMMANDS = {
    "quantize": "calibrate.cli",
    "eval": "calibrate.cli",
    "explain": "wush_compile.explain_cli",
    "bench": "wush_compile.bench.cli",
}

#: ``--help`` examples per subcommand.
EXAMPLES = {
    "quantize": """examples:
  wush quantize                                   # the comparison table on SmolLM2-135M-Instruct (CPU)
  wush quantize --out smollm2-wush                # calibrate MXFP4 GPTQ + WUSH only and save it
  wush quantize --model DIR --device cuda --out Q # a bigger model: on the CPU, one block at a time on the GPU
  wush quantize --format nvfp4 --method all --no-compare --json out.json""",
    "eval": """examples:
  wush eval smollm2-wush                          # held-out perplexity of a saved checkpoint
  wush eval smollm2-wush --device cuda --compile --batch-size 4
  wush eval smollm2-wush --tasks arc_easy,hellaswag --device cuda   # lm-evaluation-harness (pip install lm_eval)""",
    "explain": """examples:
  wush explain smollm2-wush                       # per Linear: rewritten?, kernel, path, group, why
  wush explain smollm2-wush --prompt "hello" --graph""",
    "bench": """examples:
  wush bench --layers --out out/bench             # per-layer kernels vs bf16 / fp8 (CUDA)
  wush bench --e2e --model llama8b --profile      # end-to-end generation vs compiled bf16 (CUDA)
  wush bench --e2e --model smollm2-wush           # your own checkpoint directory""",
}

#: old spelling -> the one used everywhere (the old one still parses, hidden from --help).
ALIASES = {"--fmt": "--format", "--batch": "--batch-size"}


def _plain(text: str | None) -> str | None:
    """Docstring markup off for ``--help``: ``code`` -> code, :func:`x` -> x."""
    if text is None:
        return None
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def _verbosity(parser: argparse.ArgumentParser, top: bool) -> None:
    kw = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="count", help="more logging (-v debug for wush, -vv debug everywhere)",
                        **({"default": 0} if top else kw))
    parser.add_argument("-q", "--quiet", action="count", help="less logging (-q warnings and errors only, -qq errors)",
                        **({"default": 0} if top else kw))


def _canonical_flags(parser: argparse.ArgumentParser) -> None:
    """Show the canonical spelling of aliased flags; keep the old one parsing (hidden)."""
    for old, new in ALIASES.items():
        action = parser._option_string_actions.get(old)
        if action is None or new in parser._option_string_actions:
            continue
        action.option_strings = [new if s == old else s for s in action.option_strings]
        parser._option_string_actions[new] = action


def polish(name: str, parser: argparse.ArgumentParser) -> None:
    """What every subcommand parser gets: -v/-q, plain-text description, examples, canonical flag names."""
    _verbosity(parser, top=False)
    _canonical_flags(parser)
    parser.description = _plain(parser.description)
    parser.epilog = EXAMPLES.get(name, parser.epilog)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wush",
        description="WUSH FP4 quantization and torch.compile runtime: quantize | eval | explain | bench",
        epilog="run 'wush COMMAND --help' for a command's options and examples",
    )
    _verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in dict.fromkeys(_SUBCOMMANDS.values()):
        importlib.import_module(module_name).register(sub)
    for name, subparser in sub.choices.items():
        polish(name, subparser)
    return parser


def log_level(verbose: int, quiet: int) -> tuple[int, int]:
    """``(level of the wush_compile / calibrate loggers, level of every other logger)``."""
    if quiet:
        level = logging.WARNING if quiet == 1 else logging.ERROR
        return level, level
    if verbose >= 2:
        return logging.DEBUG, logging.DEBUG
    if verbose == 1:
        return logging.DEBUG, logging.INFO
    return logging.INFO, logging.WARNING


def configure_logging(verbose: int, quiet: int) -> None:
    own, other = log_level(verbose, quiet)
    logging.basicConfig(level=other, format="%(levelname)s %(name)s: %(message)s", force=True)
    for name in ("wush_compile", "calibrate"):
        logging.getLogger(name).setLevel(own)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose or 0, args.quiet or 0)
    return run_command(lambda: args.func(args), args.command, args.verbose or 0)


if __name__ == "__main__":
    sys.exit(main())
