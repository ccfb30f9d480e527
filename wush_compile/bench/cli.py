"""``wush bench``: ``--layers`` runs the per-layer benchmark, ``--e2e`` the end-to-end generation benchmark."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import WushUserError, run_command

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks on the GPU: per layer (--layers) and end to end (--e2e)")
    p.add_argument("--layers", action="store_true", help="per-layer benchmark: WUSH linear vs bf16 and fp8")
    p.add_argument("--e2e", action="store_true",
                   help="end to end: compiled prefill/decode tokens/s, wush vs bf16 (and SmolLM2 greedy text)")
    p.add_argument("--model", action="append", default=None,
                   help="--e2e models: smollm2_shape, llama8b (random weights, speed only), smollm2 (real weights, greedy text check), or a checkpoint DIR; "
                        "default smollm2_shape and llama8b")
    p.add_argument("--prompt-len", type=int, default=2048, help="--e2e prefill prompt length (default 2048)")
    p.add_argument("--new-tokens", type=int, default=256, help="--e2e decode steps (default 256)")
    p.add_argument("--batch", type=int, action="append", default=None, help="--e2e decode batch sizes (default 1 16 64)")
    p.add_argument("--profile", action="store_true",
                   help="--e2e: also profile one prefill and 16 decode steps (kernels by category, time outside GEMMs)")
    p.add_argument("--shared-transform", action="store_true",
                   help="--e2e random models: one transform per input group (q/k/v, gate/up), so the backend groups them")
    p.add_argument("--also-cuda-decode", action="store_true",
                   help="--e2e: also measure the wush model with the Hopper CUDA decode kernels (opt-in) instead of Triton's")
    p.add_argument("--layer", action="append", default=None,
                   help="layer shape(s) to run (default: all of qkv, o, gate_up, down, 70b_down)")
    p.add_argument("--m", type=int, action="append", default=None, help="token counts M (default 1 16 128 2048 8192)")
    p.add_argument("--fmt", action="append", default=None, choices=["mxfp4", "nvfp4"], help="formats (default both)")
    p.add_argument("--no-fp8", action="store_true",
                   help="--e2e: skip the fp8 W8A8 baseline (measured by default in the same run)")
    p.add_argument("--variants", default=None,
                   help="--e2e random models: comma-separated subset of bf16,fp8,wush to measure (default all); "
                        "lets one model's variants be split over several runs when compile time is long")
    p.add_argument("--sweep", action="store_true", help="first time the decode tile candidates (layers.SWEEP)")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="folder for JSON + PNG (default out/bench)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if not (args.layers or args.e2e):
        raise WushUserError("choose what to run: --layers and/or --e2e")
    if args.layers:  # before any --e2e work
        from . import layers

        unknown = [name for name in (args.layer or []) if name not in layers.LAYERS]
        if unknown:
            raise WushUserError(f"unknown layer(s) {unknown}; choose from {sorted(layers.LAYERS)}")
    if args.e2e:
        from . import e2e

        settings = e2e.E2ESettings(
            models=tuple(args.model or e2e.E2ESettings.models), fmt=(args.fmt or ["mxfp4"])[0],
            prompt_len=args.prompt_len, new_tokens=args.new_tokens, batches=tuple(args.batch or e2e.E2ESettings.batches), fp8=not args.no_fp8,
            profile=args.profile, also_cuda_decode=args.also_cuda_decode,
            shared_transform=args.shared_transform,
            variants=tuple(v.strip() for v in args.variants.split(",")) if args.variants else e2e.E2ESettings.variants)
        e2e.run(settings, out_dir=args.out, log=print)
        if not args.layers:
            return 0
    from . import layers

    layers.run(layers=args.layer, ms=tuple(args.m or layers.MS), fmts=tuple(args.fmt or layers.FORMATS),
               out_dir=args.out, do_sweep=args.sweep)
    return 0


def script_main(flag: str, description: str, argv: list[str] | None = None) -> int:
    """Entry point of the scripts in benchmarks/: the same as ``wush bench <flag> ARGS``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=description)
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", flag, *(sys.argv[1:] if argv is None else argv)])
    return run_command(lambda: _run(args), "bench")
