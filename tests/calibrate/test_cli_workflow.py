"""The workflow side of the CLI: --out without the comparison, -v/-q, --help, flag spellings, eval options."""

import importlib.util
import json
import logging

import pytest

from calibrate.cli import baseline_label, resolve_compare
from wush_compile import cli as wcli

from .test_cli import _base, _main, workdir  # noqa: F401  (module fixture)


def _table_rows(text):
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("format"))
    rows = []
    for line in lines[header + 2 :]:
        parts = line.split()
        if not parts or parts[0] not in ("fp", "mxfp4", "nvfp4"):
            break
        rows.append(parts[:3])
    return rows, lines


def test_out_runs_only_the_chosen_configuration(workdir, capsys):  # noqa: F811
    out = workdir / "only-one"
    assert _main(_base(workdir, "--method", "rtn", "--transform", "hadamard", "--out", str(out), "--device", "cpu:0")) == 0
    rows, lines = _table_rows(capsys.readouterr().out)
    assert rows == [["fp", "-", "-"], ["mxfp4", "rtn", "hadamard"]]
    assert (out / "config.json").is_file()
    assert any(line.startswith("baseline (fp row): ") and "as loaded" in line for line in lines)


def test_compare_default():
    assert resolve_compare(None, None) is True and resolve_compare(None, "dir") is False
    assert resolve_compare(True, "dir") is True and resolve_compare(False, None) is False


def test_baseline_label_of_the_demo():
    assert "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized" in baseline_label(None)
    assert baseline_label("x/model.Q8_0.gguf") == "baseline (fp row): model.Q8_0.gguf, dequantized"


@pytest.mark.parametrize(
    "flags, own, other",
    [([], logging.INFO, logging.WARNING), (["-v"], logging.DEBUG, logging.INFO), (["-vv"], logging.DEBUG, logging.DEBUG),
     (["-q"], logging.WARNING, logging.WARNING), (["-qq"], logging.ERROR, logging.ERROR)],
)
def test_verbosity_before_and_after_the_subcommand(flags, own, other):
    parser = wcli.build_parser()
    for argv in ([*flags, "eval"], ["eval", *flags]):
        args = parser.parse_args(argv)
        assert wcli.log_level(args.verbose or 0, args.quiet or 0) == (own, other)
        wcli.configure_logging(args.verbose or 0, args.quiet or 0)
        assert logging.getLogger("calibrate").level == own and logging.getLogger().level == other


@pytest.mark.parametrize("command", ["quantize", "eval", "explain", "bench"])
def test_help_plain_text_with_examples(command, capsys):
    with pytest.raises(SystemExit):
        wcli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text
    assert "examples:" in text and f"wush {command}" in text.split("examples:")[1]
    assert "--fmt" not in text and " --batch " not in text


def test_old_flag_spellings_still_parse():
    parser = wcli.build_parser()
    new = parser.parse_args(["bench", "--e2e", "--format", "nvfp4", "--batch-size", "2"])
    old = parser.parse_args(["bench", "--e2e", "--fmt", "nvfp4", "--batch", "2"])
    assert (new.fmt, new.batch) == (old.fmt, old.batch) == (["nvfp4"], [2])
    ex = parser.parse_args(["explain", "DIR", "--batch-size", "3"])
    assert ex.batch == 3


def test_eval_batch_size_and_device_same_perplexity(workdir, capsys):  # noqa: F811
    common = ["eval", str(workdir / "tiny"), "--eval-text", str(workdir / "eval.txt"), "--seqlen", "64",
              "--eval-tokens", "512"]
    assert _main(common) == 0
    one = capsys.readouterr().out
    assert _main([*common, "--batch-size", "4", "--device", "cpu"]) == 0
    four = capsys.readouterr().out
    p1, p4 = float(one.split()[1]), float(four.split()[1])
    assert p1 == pytest.approx(p4, rel=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval is installed")
def test_eval_tasks_without_lm_eval_says_how_to_install(workdir, capsys):  # noqa: F811
    assert _main(["eval", str(workdir / "tiny"), "--tasks", "mytask"]) == 2
    assert "pip install lm_eval" in capsys.readouterr().err


def test_calibration_warnings_in_the_output_and_the_json(workdir, capsys):  # noqa: F811
    out_json = workdir / "warned.json"
    # 1 x 64 calibration tokens < K = 128 of down_proj: rank-deficient Hessians (GPTQ + WUSH)
    assert _main(_base(workdir, "--no-compare", "--nsamples", "1", "--json", str(out_json))) == 0
    printed = capsys.readouterr().out
    warnings = json.loads(out_json.read_text())["warnings"]
    assert warnings and all(w["format"] == "mxfp4" and w["method"] == "gptq" and w["transform"] == "wush"
                            for w in warnings)
    assert any("rank-deficient" in w["message"] and "K=128" in w["message"] for w in warnings), warnings
    assert "warning (mxfp4/gptq/wush): " + warnings[0]["message"] in printed
    out_json2 = workdir / "unwarned.json"
    assert _main(_base(workdir, "--no-compare", "--method", "rtn", "--transform", "hadamard",
                       "--json", str(out_json2))) == 0
    assert json.loads(out_json2.read_text())["warnings"] == []
