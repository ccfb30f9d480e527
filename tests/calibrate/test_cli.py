"""``wush quantize`` / ``wush eval`` on a tiny model directory saved by the test (byte-level tokenizer)."""

import json

import pytest
import torch

from calibrate import data

from .conftest import tiny_model


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 symbols: one token per byte
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny"
    tiny_model().save_pretrained(model_dir)
    _byte_tokenizer().save_pretrained(model_dir)
    calib, evals = data.default_texts()
    (root / "calib.txt").write_text(calib[:6000], encoding="utf-8")
    (root / "eval.txt").write_text(evals[:3000], encoding="utf-8")
    (root / "short.txt").write_text("too short", encoding="utf-8")
    return root


def _main(argv):
    from wush_compile.cli import main

    return main(argv)


def _base(workdir, *extra):
    return [
        "quantize", "--model", str(workdir / "tiny"), "--calib-text", str(workdir / "calib.txt"),
        "--eval-text", str(workdir / "eval.txt"), "--nsamples", "4", "--seqlen", "64", "--eval-tokens", "512",
        *extra,
    ]


def test_quantize_compare_table_and_json(workdir, capsys):
    out_json = workdir / "compare.json"
    assert _main(_base(workdir, "--json", str(out_json))) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("format"))
    rows = [line.split() for line in lines[header + 2 : header + 9]]
    assert rows[0][:3] == ["fp", "-", "-"]
    assert sorted((r[0], r[1], r[2]) for r in rows[1:]) == sorted(
        ("mxfp4", m, t) for m in ("rtn", "gptq") for t in ("identity", "hadamard", "wush")
    )
    result = json.loads(out_json.read_text())
    assert set(result) >= {"fp", "results"}
    assert set(result["fp"]) == {"ppl"} and result["fp"]["ppl"] > 1.0
    assert len(result["results"]) == 6
    for r in result["results"]:
        assert set(r) == {"format", "method", "transform", "ppl", "layer_rel_err"}
        assert isinstance(r["ppl"], float) and r["ppl"] > 1.0
        assert isinstance(r["layer_rel_err"], float) and 0.0 < r["layer_rel_err"] < 1.0
    # The table prints the JSON's numbers.
    fp_row = rows[0]
    assert float(fp_row[3]) == pytest.approx(result["fp"]["ppl"], abs=1e-3)


def test_quantize_no_compare_all_formats_methods(workdir, capsys):
    out_json = workdir / "grid.json"
    argv = _base(workdir, "--no-compare", "--format", "all", "--method", "all", "--transform", "hadamard",
                 "--json", str(out_json))
    assert _main(argv) == 0
    result = json.loads(out_json.read_text())
    got = sorted((r["format"], r["method"], r["transform"]) for r in result["results"])
    assert got == sorted((f, m, "hadamard") for f in ("mxfp4", "nvfp4") for m in ("rtn", "gptq"))


def test_quantize_out_then_eval_reproduces_perplexity(workdir, capsys):
    pytest.importorskip("wush_compile.hf")
    out_dir = workdir / "saved"
    out_json = workdir / "saved.json"
    argv = _base(workdir, "--no-compare", "--method", "rtn", "--out", str(out_dir), "--json", str(out_json))
    assert _main(argv) == 0
    ppl = json.loads(out_json.read_text())["results"][0]["ppl"]
    capsys.readouterr()
    assert _main(["eval", str(out_dir), "--eval-text", str(workdir / "eval.txt"), "--seqlen", "64",
                  "--eval-tokens", "512"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("perplexity ")
    assert float(printed.split()[1]) == pytest.approx(ppl, rel=1e-4)


def test_python_m_calibrate_eval(workdir, capsys):
    from calibrate.__main__ import main

    assert main(["eval", str(workdir / "tiny"), "--eval-text", str(workdir / "eval.txt"), "--seqlen", "64",
                 "--eval-tokens", "256"]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "x", "--format", "all"], "--out saves one configuration"),
        (["--nsamples", "500"], "calibration text is too short"),
    ],
)
def test_quantize_user_errors(workdir, capsys, extra, message):
    assert _main(_base(workdir, *extra)) == 2
    assert message in capsys.readouterr().err


def test_quantize_missing_model_and_text(workdir, capsys):
    assert _main(["quantize", "--model", str(workdir / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    argv = _base(workdir)
    argv[argv.index("--calib-text") + 1] = str(workdir / "missing.txt")
    assert _main(argv) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_eval_short_text_error(workdir, capsys):
    assert _main(["eval", str(workdir / "tiny"), "--eval-text", str(workdir / "short.txt"), "--seqlen", "64"]) == 2
    err = capsys.readouterr().err
    assert "evaluation text is too short" in err and "seqlen=64" in err


def test_bad_cli_values_rejected_by_argparse(workdir, capsys):
    with pytest.raises(SystemExit):
        _main(_base(workdir, "--nsamples", "0"))
    with pytest.raises(SystemExit):
        _main(_base(workdir, "--format", "fp8"))
    assert "invalid choice" in capsys.readouterr().err
