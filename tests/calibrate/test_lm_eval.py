"""`wush eval --tasks` through lm-evaluation-harness on a tiny local task (a JSON-lines file and a task YAML written
by the test; no hub): lm_eval's bits per byte equal the model's own log-likelihood of the documents."""

import math
import re

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")

from calibrate import data, lm_tasks  # noqa: E402
from calibrate.cli import run_tasks  # noqa: E402

from .conftest import tiny_model  # noqa: E402
from .test_cli import _byte_tokenizer, _main, workdir  # noqa: E402, F401  (module fixture)

TASK = "wush_tiny_rolling"


def _tokenizer():
    tok = _byte_tokenizer()
    tok.eos_token = tok.convert_ids_to_tokens(0)  # lm_eval prefixes every document with it
    return tok


def _docs():
    # < 256 bytes each: one window of the tiny model's 256 positions, [eos] + the document's bytes
    return [d[:180] for d in lm_tasks.split_documents(data.default_texts()[1], 3)]


def _own_bits_per_byte(model, tok, docs):
    nll, nbytes = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([[tok.eos_token_id] + tok(d, add_special_tokens=False).input_ids])  # (1, 1 + T)
            logp = torch.log_softmax(model(ids).logits.double()[0, :-1], -1)  # (T, V)
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            nbytes += len(d.encode("utf-8"))
    return nll / nbytes / math.log(2)


def test_lm_eval_on_a_local_task_matches_the_models_own_likelihood(tmp_path):
    docs = _docs()
    lm_tasks.write_rolling_task(tmp_path, TASK, docs)
    model, tok = tiny_model(), _tokenizer()
    res = run_tasks(model, tok, [TASK], include_path=str(tmp_path))[TASK]
    want = _own_bits_per_byte(model, tok, docs)
    assert res["bits_per_byte,none"] == pytest.approx(want, rel=1e-5), (res, want)
    assert res["byte_perplexity,none"] == pytest.approx(2 ** want, rel=1e-5)


@pytest.fixture(scope="module")
def wush_ckpt(workdir):  # noqa: F811
    """A wush checkpoint written by `wush quantize --out` (MXFP4 RTN + Hadamard), its tokenizer with an eos token."""
    from .test_cli import _base

    out = workdir / "lm-eval-wush"
    assert _main(_base(workdir, "--method", "rtn", "--transform", "hadamard", "--out", str(out))) == 0
    _tokenizer().save_pretrained(out)
    return out


def test_wush_eval_tasks_on_a_saved_wush_checkpoint(wush_ckpt, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import wush_compile  # noqa: F401
    from wush_compile.modules import WushLinear

    out, tok = wush_ckpt, _tokenizer()
    docs = _docs()
    lm_tasks.write_rolling_task(tmp_path, TASK, docs)
    capsys.readouterr()
    assert _main(["eval", str(out), "--tasks", TASK, "--include-path", str(tmp_path), "--batch-size", "2"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"{TASK}:"))
    got = float(re.search(r"bits_per_byte,none ([0-9.]+)", line).group(1))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, WushLinear) for m in model.modules())
    assert got == pytest.approx(_own_bits_per_byte(model, tok, docs), rel=1e-4), line


def test_write_rolling_task_errors(tmp_path):
    with pytest.raises(ValueError, match="fewer than the 5 asked"):
        lm_tasks.split_documents("short\n\ntext", 5)
    with pytest.raises(ValueError, match="no documents"):
        lm_tasks.write_rolling_task(tmp_path, "x", [])


def test_lm_eval_own_cli_on_a_wush_checkpoint_through_the_launcher(wush_ckpt, tmp_path):
    """`python -m wush_compile.lm_eval_cli run --model hf ...` in a fresh process: lm_eval's CLI, wush layers loaded."""
    import json
    import os
    import subprocess
    import sys

    out = wush_ckpt
    lm_tasks.write_rolling_task(tmp_path, TASK, _docs())
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, HF_DATASETS_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, "-m", "wush_compile.lm_eval_cli", "run", "--model", "hf", "--model_args",
         f"pretrained={out},dtype=float32", "--tasks", TASK, "--include_path", str(tmp_path), "--device", "cpu",
         "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("results_*.json")]
    assert results, res.stdout[-2000:]
    got = results[0]["results"][TASK]["bits_per_byte,none"]
    from transformers import AutoModelForCausalLM

    import wush_compile  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out)
    from transformers import AutoTokenizer

    assert got == pytest.approx(_own_bits_per_byte(model, AutoTokenizer.from_pretrained(out), _docs()), rel=1e-5)


def _own_choice_scores(model, tok, items):
    """acc and acc_norm (log-likelihood per byte of the choice) computed directly from the model."""
    acc = acc_norm = 0
    with torch.no_grad():
        for it in items:
            ctx = tok(it["context"], add_special_tokens=False).input_ids
            ll, ll_norm = [], []
            for ch in it["choices"]:
                cont = tok(ch, add_special_tokens=False).input_ids
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids).logits.double()[0, :-1], -1)
                s = float(logp[len(ctx) - 1:].gather(1, ids[0, len(ctx):, None]).sum())
                ll.append(s)
                ll_norm.append(s / len(ch.encode("utf-8")))
            acc += int(max(range(len(ll)), key=ll.__getitem__) == it["gold"])
            acc_norm += int(max(range(len(ll_norm)), key=ll_norm.__getitem__) == it["gold"])
    return acc / len(items), acc_norm / len(items)


def test_choice_task_scores_equal_the_models_own_likelihoods(tmp_path):
    items = lm_tasks.continuation_items(data.default_texts()[1], 12, context_words=8, continuation_words=4, seed=1)
    assert all(it["choices"][it["gold"]] != c for it in items for i, c in enumerate(it["choices"]) if i != it["gold"])
    assert len({it["gold"] for it in items}) > 1  # the true continuation is not always in one place
    assert items == lm_tasks.continuation_items(data.default_texts()[1], 12, context_words=8, continuation_words=4,
                                                seed=1)
    lm_tasks.write_choice_task(tmp_path, "wush_tiny_choice", items)
    model, tok = tiny_model(), _tokenizer()
    res = run_tasks(model, tok, ["wush_tiny_choice"], include_path=str(tmp_path))["wush_tiny_choice"]
    acc, acc_norm = _own_choice_scores(model, tok, items)
    assert res["acc,none"] == pytest.approx(acc) and res["acc_norm,none"] == pytest.approx(acc_norm), (res, acc, acc_norm)


def test_choice_task_errors(tmp_path):
    with pytest.raises(ValueError, match="fewer than the 5 needed"):
        lm_tasks.continuation_items("one two three four\n\nfive six", 5, context_words=2, continuation_words=1)
    with pytest.raises(ValueError, match="n_choices=1"):
        lm_tasks.continuation_items("x", 1, n_choices=1)
    with pytest.raises(ValueError, match="no items"):
        lm_tasks.write_choice_task(tmp_path, "x", [])
    with pytest.raises(ValueError, match="item 0 needs"):
        lm_tasks.write_choice_task(tmp_path, "x", [{"context": "a", "choices": ["b", "c"], "gold": 2}])
    with pytest.raises(ValueError, match="item 1 needs 'context'"):
        lm_tasks.write_choice_task(tmp_path, "x", [{"context": "a", "choices": ["b", "c"], "gold": 0},
                                                   {"choices": ["b", "c"], "gold": 0}])
