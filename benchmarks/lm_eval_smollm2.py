"""lm-evaluation-harness on SmolLM2-135M-Instruct, full precision vs MXFP4 GPTQ + WUSH, on a local task (no hub):
rolling log-likelihood (word / byte perplexity, bits per byte) of held-out pydoc_data.topics paragraphs.

    python benchmarks/lm_eval_smollm2.py [--docs 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
import time

import torch

import calibrate
from calibrate import data, lm_tasks, models
from calibrate.cli import run_tasks
from wush_compile import WushConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--docs", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    calib_text, eval_text = data.default_texts()
    folder = tempfile.mkdtemp(prefix="wush-lm-tasks-")
    task = lm_tasks.write_rolling_task(folder, "pydoc_heldout_rolling", lm_tasks.split_documents(eval_text, args.docs))
    model, tok = models.load_model()
    out = {"git": sha, "torch": torch.__version__, "docs": args.docs}
    t = time.perf_counter()
    out["fp"] = run_tasks(model, tok, [task], include_path=folder)[task]
    out["fp_s"] = time.perf_counter() - t
    cfg = WushConfig(format="mxfp4", method="gptq", transform="wush", nsamples=8, seqlen=512)
    batches = data.calibration_batches(data.tokenize(tok, calib_text), 8, 512, seed=0, batch_size=8)
    calibrate.calibrate(model, batches, cfg)
    t = time.perf_counter()
    out["mxfp4_gptq_wush"] = run_tasks(model, tok, [task], include_path=folder)[task]
    out["q_s"] = time.perf_counter() - t
    for key in ("fp", "mxfp4_gptq_wush"):
        r = out[key]
        print(f"{key:<16} word_perplexity {r['word_perplexity,none']:.3f}  byte_perplexity "
              f"{r['byte_perplexity,none']:.4f}  bits_per_byte {r['bits_per_byte,none']:.4f}")
    print(f"git {sha}; {args.docs} documents; lm_eval seconds fp {out['fp_s']:.0f}, quantized {out['q_s']:.0f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
