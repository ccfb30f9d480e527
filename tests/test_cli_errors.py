"""User errors of the ``wush`` command: one line ``wush CMD: error: ...`` on stderr, exit code 2, no traceback
(subprocesses of ``python -m wush_compile.cli``); and the clear errors behind them (non-PSD / NaN Hessian,
weights on the meta device, a checkpoint without tokenizer files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wush_compile.config import Method, TransformKind, WushConfig
from wush_compile.errors import WushUserError, one_line

ROOT = Path(__file__).resolve().parents[1]


def _wush(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "wush_compile.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def _assert_one_line(proc: subprocess.CompletedProcess, cmd: str, *needles: str) -> str:
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err_lines) == 1, proc.stderr
    assert err_lines[0].startswith(f"wush {cmd}: error: "), err_lines[0]
    assert err_lines[0].count("error:") == 1, err_lines[0]
    for needle in needles:
        assert needle in err_lines[0], err_lines[0]
    return err_lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.calibrate.conftest import tiny_model
    from tests.calibrate.test_cli import _byte_tokenizer

    d = tmp_path_factory.mktemp("clierr") / "tiny"
    tiny_model().save_pretrained(d)
    _byte_tokenizer().save_pretrained(d)
    return d


def test_explain_missing_and_non_wush_dir(tmp_path):
    _assert_one_line(_wush("-q", "explain", str(tmp_path / "nope")), "explain", "nope", "not a directory")
    (tmp_path / "notes.txt").write_text("hello")
    _assert_one_line(_wush("-q", "explain", str(tmp_path)), "explain", "no config.json", "save_pretrained")


def test_eval_missing_path(tmp_path):
    _assert_one_line(_wush("-q", "eval", str(tmp_path / "missing")), "eval", "missing", "does not exist")


def test_quantize_missing_calib_text_and_out_onto_a_file(tiny_dir, tmp_path):
    base = ["-q", "quantize", "--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--eval-tokens", "64"]
    _assert_one_line(_wush(*base, "--calib-text", str(tmp_path / "missing.txt")), "quantize", "--calib-text",
                     "missing.txt")
    (tmp_path / "file").write_text("x")
    _assert_one_line(_wush(*base, "--out", str(tmp_path / "file")), "quantize", "is a file", "pass a directory")


def test_quantize_checkpoint_without_tokenizer(tmp_path):
    from tests.calibrate.conftest import tiny_model

    tiny_model().save_pretrained(tmp_path / "notok")
    line = _assert_one_line(_wush("-q", "quantize", "--model", str(tmp_path / "notok")), "quantize",
                            str(tmp_path / "notok"), "no tokenizer files", "tokenizer.json", "tokenizer.save_pretrained")
    assert "sentencepiece" not in line.lower()


def test_bench_no_mode_unknown_layer_unknown_model():
    _assert_one_line(_wush("-q", "bench"), "bench", "--layers and/or --e2e")
    _assert_one_line(_wush("-q", "bench", "--layers", "--layer", "qkvv"), "bench", "qkvv", "choose from")
    _assert_one_line(_wush("-q", "bench", "--e2e", "--model", "llama9000"), "bench", "llama9000", "choose from")


def test_verbose_shows_the_traceback(tmp_path):
    proc = _wush("-v", "eval", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("wush eval: error: ")


def test_one_line_joins_notes_and_drops_repeated_prefix():
    exc = ValueError("wush explain: bad\nthing")
    exc.add_note("calibrate: failed in block model.layers.1")
    assert one_line(exc, "explain") == "wush explain: error: bad thing; calibrate: failed in block model.layers.1"


# ---- the errors behind the one line ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", [Method.RTN, Method.GPTQ])
def test_nan_and_non_psd_hessian_name_the_layer_and_the_fix(method):
    from calibrate.layer import quantize_weight, quantize_weights

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    cfg = WushConfig(method=method, transform=TransformKind.WUSH)
    name = "model.layers.3.mlp.down_proj"
    h = torch.eye(64)
    h[5, 7] = float("nan")
    with pytest.raises(WushUserError, match=r"layer model\.layers\.3\.mlp\.down_proj: hessian contains NaN or Inf "
                                            r"\(1 of 4096 entries\).*check the model weights and the calibration inputs"):
        quantize_weight(w, h, cfg, name=name)
    h = torch.diag(torch.linspace(-1.0, 1.0, 64))  # indefinite: what used to give "not invertible (condition nan)"
    for call in (lambda: quantize_weight(w, h, cfg, name=name), lambda: quantize_weights([w], h, cfg, names=[name])):
        with pytest.raises(WushUserError) as info:
            call()
        msg = str(info.value)
        assert name in msg and "not positive semi-definite" in msg and "eigenvalues from -1 to 1" in msg
        assert "more calibration tokens" in msg and "larger damp" in msg and "now 0.01" in msg and "NaN" in msg


def test_positive_semidefinite_hessians_still_quantize():
    from calibrate.layer import quantize_weight

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = torch.randn(8, 64)
    for h in (torch.zeros(64, 64), x.T @ x / 8):  # rank 0 and rank 8 < K: PSD, so no error
        q = quantize_weight(w, h, WushConfig(transform=TransformKind.WUSH), name="l")
        assert torch.isfinite(q.transform.float()).all()


def test_meta_embedding_is_named_before_any_forward():
    import calibrate
    from tests.calibrate.conftest import tiny_model

    model = tiny_model()
    model.model.embed_tokens.to("meta")
    with pytest.raises(WushUserError, match=r"model\.embed_tokens \(model\.embed_tokens\.weight\) is on the meta "
                                            r"device.*load the model's weights.*device_map"):
        calibrate.calibrate(model, [torch.randint(0, 256, (1, 16))], WushConfig())
    assert not any(p.is_meta for n, p in model.named_parameters() if not n.startswith("model.embed_tokens"))


def test_checkpoint_without_tokenizer_files_names_the_directory(tmp_path):
    from calibrate import models
    from tests.calibrate.conftest import tiny_model

    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(WushUserError, match=r"has no tokenizer files \(tokenizer\.json / tokenizer_config\.json"):
        models.load_model(tmp_path)


def test_explain_bad_tokens_is_one_line(tmp_path):
    from tests.calibrate.conftest import tiny_model

    tiny_model().save_pretrained(tmp_path / "m")
    _assert_one_line(_wush("-q", "explain", str(tmp_path / "m"), "--tokens", "0"), "explain", "--tokens and --batch")
