"""Resumable calibration (calibrate.resume): a run killed mid-way continues bit-identically; foreign
checkpoints are refused; ``wush quantize --resume DIR`` reaches calibrate()."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import calibrate
from calibrate import pipeline
from calibrate.resume import CheckpointMismatchError
from wush_compile import WushConfig, WushLinear

from .conftest import tiny_batches, tiny_model

ROOT = Path(__file__).resolve().parents[2]
LAYERS = 4

CASES = {
    "mxfp4-gptq-wush": dict(format="mxfp4", method="gptq", transform="wush"),
    "nvfp4-gptq-wush-shared-static": dict(format="nvfp4", method="gptq", transform="wush", shared_transform=True),
}

#: The driver: calibrate with checkpoint_dir and SIGKILL itself at the chosen point (after block 1 is committed).
DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    import calibrate
    from calibrate import capture, resume
    from wush_compile import WushConfig
    from conftest import tiny_batches, tiny_model

    where, ckpt, cfg = sys.argv[1], sys.argv[2], WushConfig(**json.loads(sys.argv[3]))

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "mid-block-2":  # while block 2 runs, its quantized Linears swapped in but nothing saved
        run_block = capture.run_block
        def killing_run_block(block, index, inputs, *, device):
            if index == 2:
                die()
            return run_block(block, index, inputs, device=device)
        capture.run_block = killing_run_block
    elif where == "before-commit-2":  # block 2's files written, its manifest not yet
        replace = resume.os.replace
        def killing_replace(src, dst):
            if dst.endswith("manifest.json") and os.path.exists(os.path.join(os.path.dirname(dst), "hidden-00002.pt")):
                die()
            return replace(src, dst)
        resume.os.replace = killing_replace
    calibrate.calibrate(tiny_model(layers={layers}), tiny_batches(), cfg, checkpoint_dir=ckpt)
    print("NOT KILLED")
    """
)


def _state(model):
    """Every WushLinear's buffers and attributes, and the report."""
    wls = {n: m for n, m in model.named_modules() if isinstance(m, WushLinear)}
    return wls, calibrate.get_report(model)


def _assert_bit_identical(got, ref, ids):
    g_wls, g_rep = _state(got)
    r_wls, r_rep = _state(ref)
    assert sorted(g_wls) == sorted(r_wls) and len(r_wls) == 7 * LAYERS
    for name, r in r_wls.items():
        g = g_wls[name]
        assert (g.fmt, g.transform_kind, g.share_group, g.transform_key) == (r.fmt, r.transform_kind, r.share_group,
                                                                              r.transform_key), name
        g_sd, r_sd = g.state_dict(), r.state_dict()
        assert sorted(g_sd) == sorted(r_sd), name
        for key, rt in r_sd.items():
            gt = g_sd[key]
            assert gt.dtype == rt.dtype and gt.shape == rt.shape, f"{name}.{key}"
            assert torch.equal(gt.view(torch.uint8) if gt.dim() else gt, rt.view(torch.uint8) if rt.dim() else rt), \
                f"{name}.{key} differs"
    assert [vars(r) for r in g_rep.layers] == [vars(r) for r in r_rep.layers]  # rel_err bit for bit
    assert g_rep.skipped == r_rep.skipped and g_rep.tokens == r_rep.tokens
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


def _count_blocks(monkeypatch):
    seen = []
    original = pipeline._calibrate_block

    def counting(i, *args, **kwargs):
        seen.append(i)
        return original(i, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_calibrate_block", counting)
    return seen


@pytest.mark.parametrize(
    "case,where",
    [("mxfp4-gptq-wush", "mid-block-2"), ("mxfp4-gptq-wush", "before-commit-2"),
     ("nvfp4-gptq-wush-shared-static", "mid-block-2")],
)
def test_killed_run_resumes_bit_identical(case, where, tmp_path, monkeypatch):
    cfg = CASES[case]
    ckpt = tmp_path / "ckpt"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(ROOT / "tests" / "calibrate"), layers=LAYERS))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(driver), where, str(ckpt), json.dumps(cfg)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["last_finished_block"] == 1 and not manifest["complete"]
    if where == "before-commit-2":  # written but not committed: redone on resume
        assert (ckpt / "block-00002.pt").exists()

    config = WushConfig(**cfg)
    seen = _count_blocks(monkeypatch)
    resumed = calibrate.calibrate(tiny_model(layers=LAYERS), tiny_batches(), config, checkpoint_dir=str(ckpt))
    assert seen == [2, 3]  # blocks 0 and 1 came from the checkpoint
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["last_finished_block"] == LAYERS - 1 and manifest["complete"]
    assert not list(ckpt.glob("hidden-*")) and not list(ckpt.glob(".*.tmp"))

    seen.clear()
    ref = calibrate.calibrate(tiny_model(layers=LAYERS), tiny_batches(), config)
    assert seen == list(range(LAYERS))
    _assert_bit_identical(resumed, ref, tiny_batches(1, 2, 32, seed=7)[0])


def test_failed_run_keeps_checkpoint_and_completed_one_restores(tmp_path, monkeypatch):
    """An exception in block 2 undoes every swap but keeps blocks 0-1 on disk; the retry continues there; a
    call on a completed directory rebuilds the model without calibrating any block."""
    config = WushConfig(format="mxfp4", method="gptq", transform="wush")
    ckpt = str(tmp_path / "ckpt")
    original = pipeline._calibrate_block

    def failing(i, *args, **kwargs):
        if i == 2:
            raise RuntimeError("injected failure")
        return original(i, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_calibrate_block", failing)
    model = tiny_model(layers=LAYERS)
    with pytest.raises(RuntimeError, match="injected failure"):
        calibrate.calibrate(model, tiny_batches(), config, checkpoint_dir=ckpt)
    assert not any(isinstance(m, WushLinear) for m in model.modules())  # still atomic for the caller
    assert json.loads(Path(ckpt, "manifest.json").read_text())["last_finished_block"] == 1

    monkeypatch.setattr(pipeline, "_calibrate_block", original)
    seen = _count_blocks(monkeypatch)
    resumed = calibrate.calibrate(model, tiny_batches(), config, checkpoint_dir=ckpt)
    assert seen == [2, 3]
    seen.clear()
    again = calibrate.calibrate(tiny_model(layers=LAYERS), tiny_batches(), config, checkpoint_dir=ckpt)
    assert seen == []
    ref = calibrate.calibrate(tiny_model(layers=LAYERS), tiny_batches(), config)
    ids = tiny_batches(1, 2, 32, seed=7)[0]
    _assert_bit_identical(resumed, ref, ids)
    _assert_bit_identical(again, ref, ids)


@pytest.mark.parametrize(
    "change,named",
    [
        (dict(config=WushConfig(format="mxfp4", method="rtn", transform="wush")), "config.method: saved 'gptq', now 'rtn'"),
        (dict(batches=tiny_batches(seed=5)), "calibration_tokens"),
        (dict(model_seed=3), "model_weights"),
        (dict(layers=3), "num_blocks: saved 4, now 3"),
    ],
)
def test_foreign_checkpoint_refused(change, named, tmp_path):
    config = WushConfig(format="mxfp4", method="gptq", transform="wush")
    ckpt = str(tmp_path / "ckpt")
    calibrate.calibrate(tiny_model(layers=LAYERS), tiny_batches(), config, checkpoint_dir=ckpt)
    model = tiny_model(seed=change.get("model_seed", 0), layers=change.get("layers", LAYERS))
    with pytest.raises(CheckpointMismatchError, match="another calibration run") as info:
        calibrate.calibrate(model, change.get("batches", tiny_batches()), change.get("config", config),
                            checkpoint_dir=ckpt)
    assert named in str(info.value) and ckpt in str(info.value)
    assert not any(isinstance(m, WushLinear) for m in model.modules())


def test_checkpoint_dir_that_is_a_file_or_foreign_refused(tmp_path):
    config = WushConfig(format="mxfp4", method="rtn", transform="hadamard")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        calibrate.calibrate(tiny_model(), tiny_batches(), config, checkpoint_dir=str(f))
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "block-00000.pt").write_text("x")
    with pytest.raises(CheckpointMismatchError, match="no manifest.json"):
        calibrate.calibrate(tiny_model(), tiny_batches(), config, checkpoint_dir=str(d))


def test_cli_resume_flag_reaches_calibrate(tmp_path, monkeypatch):
    """``wush quantize --resume DIR`` passes DIR/<format>-<method>-<transform> to calibrate()."""
    from calibrate import cli as qcli
    from wush_compile.cli import main

    got = {}
    real_run_quantize = qcli.run_quantize

    def fake_run(settings):
        got["settings"] = settings
        return {}

    monkeypatch.setattr(qcli, "run_quantize", fake_run)
    assert main(["quantize", "--no-compare", "--format", "nvfp4", "--method", "rtn", "--resume", str(tmp_path)]) == 0
    s = got["settings"]
    assert s.resume == str(tmp_path)
    cfg = qcli._configs(s)[0]
    assert qcli.resume_dir(s.resume, cfg) == os.path.join(str(tmp_path), "nvfp4-rtn-wush")
    assert qcli.resume_dir(None, cfg) is None
    assert main(["quantize", "--no-compare"]) is not None and got["settings"].resume is None

    # run_quantize hands it to calibrate()
    calls = []

    def fake_calibrate(model, batches, cfg, *, device=None, checkpoint_dir=None):
        calls.append(checkpoint_dir)
        raise RuntimeError("stop here")

    monkeypatch.setattr(calibrate, "calibrate", fake_calibrate)
    monkeypatch.setattr(qcli, "_perplexity_on", lambda *a, **k: 1.0)
    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    from .test_cli import _byte_tokenizer

    _byte_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 400, encoding="utf-8")
    with pytest.raises(RuntimeError, match="stop here"):
        real_run_quantize(qcli.QuantizeSettings(
            model=str(model_dir), calib_text=str(text), eval_text=str(text), nsamples=2, seqlen=32, eval_tokens=64,
            compare=False, resume=str(tmp_path / "r"),
        ))
    assert calls == [os.path.join(str(tmp_path / "r"), "mxfp4-gptq-wush")]


def test_cli_resume_end_to_end_and_mismatch_is_a_clean_error(tmp_path, capsys):
    """A real ``wush quantize --resume``: the checkpoint is written, a rerun restores it (same perplexity), and
    a rerun with other settings exits 2 with one line naming the difference."""
    from wush_compile.cli import main

    from .test_cli import _byte_tokenizer

    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    _byte_tokenizer().save_pretrained(model_dir)
    calib, evals = calibrate.data.default_texts()
    (tmp_path / "calib.txt").write_text(calib[:6000], encoding="utf-8")
    (tmp_path / "eval.txt").write_text(evals[:3000], encoding="utf-8")
    resume = tmp_path / "resume"
    argv = ["quantize", "--model", str(model_dir), "--calib-text", str(tmp_path / "calib.txt"), "--eval-text",
            str(tmp_path / "eval.txt"), "--seqlen", "64", "--eval-tokens", "256", "--no-compare", "--method", "gptq",
            "--resume", str(resume)]
    results = []
    for _ in range(2):
        assert main(argv + ["--nsamples", "4", "--json", str(tmp_path / "r.json")]) == 0
        results.append(json.loads((tmp_path / "r.json").read_text())["results"][0]["ppl"])
        manifest = json.loads((resume / "mxfp4-gptq-wush" / "manifest.json").read_text())
        assert manifest["complete"] and manifest["last_finished_block"] == 1
    assert results[0] == results[1]
    capsys.readouterr()
    assert main(argv + ["--nsamples", "2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("wush quantize: error:")]
    assert "Traceback" not in err and len(errors) == 1 and "config.nsamples: saved 4, now 2" in errors[0], err


def test_one_call_quantize_passes_checkpoint_dir_through(tmp_path, monkeypatch):
    """wush_compile.quantize(..., checkpoint_dir=DIR): an interrupted call continues where it stopped."""
    import wush_compile

    config = WushConfig(format="mxfp4", method="gptq", transform="wush", nsamples=4, seqlen=32)
    data = {"input_ids": torch.cat(tiny_batches(2, 2, 32))}  # (4, 32) ready token ids
    ckpt = str(tmp_path / "ckpt")
    original = pipeline._calibrate_block

    def failing(i, *args, **kwargs):
        if i == 2:
            raise RuntimeError("injected failure")
        return original(i, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_calibrate_block", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        wush_compile.quantize(tiny_model(layers=LAYERS), config, dataset=data, checkpoint_dir=ckpt)
    assert json.loads(Path(ckpt, "manifest.json").read_text())["last_finished_block"] == 1
    monkeypatch.setattr(pipeline, "_calibrate_block", original)
    seen = _count_blocks(monkeypatch)
    resumed, report = wush_compile.quantize(tiny_model(layers=LAYERS), config, dataset=data, checkpoint_dir=ckpt)
    assert seen == [2, 3] and report is calibrate.get_report(resumed)
    seen.clear()
    ref, _ = wush_compile.quantize(tiny_model(layers=LAYERS), config, dataset=data)
    assert seen == list(range(LAYERS))
    _assert_bit_identical(resumed, ref, tiny_batches(1, 2, 32, seed=7)[0])
