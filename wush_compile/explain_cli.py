"""``wush explain DIR``: load a saved (calibrated) checkpoint, compile it with the wush backend on an example
input, and print the per-layer report (what was rewritten, into which kernel and group, and why)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["register", "run", "load_checkpoint"]

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain",
        help="show how torch.compile(backend='wush') rewrites a saved checkpoint",
        description=__doc__,
    )
    p.add_argument("dir", type=Path, help="checkpoint directory (model.save_pretrained output)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="example text (needs the tokenizer saved in DIR)")
    src.add_argument("--tokens", type=int, default=16, help="random example tokens when no --prompt (default 16)")
    p.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    p.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="load dtype (default: the checkpoint's)")
    p.add_argument("--kernel", default="auto", help="pin a kernel (a KernelChoice value, default auto)")
    p.add_argument("--no-inductor", action="store_true", help="skip Inductor code generation (faster)")
    p.add_argument("--graph", action="store_true", help="also print the rewritten FX graph")
    p.set_defaults(func=run)


def load_checkpoint(path: Path, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer or None) from a ``save_pretrained`` directory; wush checkpoints load through the
    transformers quantizer that ``import wush_compile`` registers (wush_compile.hf)."""
    import torch
    from transformers import AutoModelForCausalLM

    import wush_compile  # noqa: F401  (registers quant_method "wush")

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"wush explain: {path} is not a directory; pass a checkpoint directory (model.save_pretrained output)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"wush explain: {path} has no config.json; pass a model.save_pretrained() directory")
    quant = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    if quant.get("quant_method") == "wush":
        try:
            import wush_compile.hf  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                f"wush explain: {path} is a wush checkpoint but wush_compile.hf cannot be imported ({exc}); "
                "install the full wush_compile package"
            ) from exc
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a checkpoint without a tokenizer is fine with --tokens
        logger.info("wush explain: no tokenizer in %s (%s); using random token ids", path, type(exc).__name__)
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    from .explain import explain

    if args.tokens < 1 or args.batch < 1:
        raise SystemExit(f"wush explain: --tokens and --batch must be >= 1, got {args.tokens} and {args.batch}")
    model, tokenizer = load_checkpoint(args.dir, args.device, args.dtype)
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"wush explain: --prompt needs a tokenizer in {args.dir}; use --tokens N instead")
        ids = tokenizer([args.prompt] * args.batch, return_tensors="pt").input_ids
    else:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), generator=gen)
    options = {"kernel": args.kernel}
    if args.no_inductor:
        options["inductor"] = False
    report = explain(model, ids.to(args.device), compile_options=options)
    print(report)
    if args.graph:
        print()
        print(report.graph_code)
    return 0
