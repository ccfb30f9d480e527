"""``wush bench``: ``--layers`` runs the per-layer benchmark (``--e2e`` plugs in here later)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks on the GPU (per layer; end to end later)")
    p.add_argument("--layers", action="store_true", help="per-layer benchmark: WUSH linear vs bf16 and fp8")
    p.add_argument("--layer", action="append", default=None,
                   help="layer shape(s) to run (default: all of qkv, o, gate_up, down, 70b_down)")
    p.add_argument("--m", type=int, action="append", default=None, help="token counts M (default 1 16 128 2048 8192)")
    p.add_argument("--fmt", action="append", default=None, choices=["mxfp4", "nvfp4"], help="formats (default both)")
    p.add_argument("--sweep", action="store_true", help="first time the decode tile candidates (layers.SWEEP)")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="folder for JSON + PNG (default out/bench)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if not args.layers:
        logger.error("wush bench: choose what to run, e.g. --layers")
        return 2
    from . import layers

    unknown = [name for name in (args.layer or []) if name not in layers.LAYERS]
    if unknown:
        logger.error("wush bench: unknown layer(s) %s; choose from %s", unknown, sorted(layers.LAYERS))
        return 2
    layers.run(layers=args.layer, ms=tuple(args.m or layers.MS), fmts=tuple(args.fmt or layers.FORMATS),
               out_dir=args.out, do_sweep=args.sweep)
    return 0
