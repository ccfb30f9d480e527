"""``wush quantize --out``: refused before any work when it would lose data; written atomically."""

from __future__ import annotations

import json

import pytest

from calibrate import cli


def _wush_dir(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "wush"}}))
    (path / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (path / "model.safetensors.index.json").write_text("{}")
    (path / "notes.txt").write_text("mine")
    return path


def test_out_refuses_model_dir_nonempty_dir_and_foreign_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is the --model directory"):
        cli.check_out_dir(str(model), str(model), overwrite=True)
    with pytest.raises(ValueError, match="is not empty.*--overwrite"):
        cli.check_out_dir(str(model), None, overwrite=False)
    with pytest.raises(ValueError, match="not a wush checkpoint"):
        cli.check_out_dir(str(model), None, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        cli.check_out_dir(str(tmp_path / "file"), None, overwrite=False)
    cli.check_out_dir(str(tmp_path / "new" / "deeper"), None, overwrite=False)  # a new directory is fine


def test_run_quantize_checks_out_before_any_work(tmp_path, monkeypatch):
    from calibrate import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking --out"))
    s = cli.QuantizeSettings(out=str(_wush_dir(tmp_path / "o")), compare=False)
    with pytest.raises(ValueError, match="is not empty"):
        cli.run_quantize(s)


def test_overwrite_replaces_only_our_files_and_a_failed_write_leaves_out_untouched(tmp_path):
    out = _wush_dir(tmp_path / "o")
    cli.check_out_dir(str(out), None, overwrite=True)

    def crash(d):
        (tmp_path / "o_partial_seen").write_text(d)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.write_checkpoint_atomically(str(out), crash)
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"old"  # untouched
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name and p.is_dir()] == []  # temp removed

    def write(d):
        import os

        open(os.path.join(d, "config.json"), "w").write("{}")
        open(os.path.join(d, "model.safetensors"), "wb").write(b"new")

    cli.write_checkpoint_atomically(str(out), write)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    fresh = tmp_path / "fresh"
    cli.write_checkpoint_atomically(str(fresh), write)
    assert (fresh / "model.safetensors").read_bytes() == b"new"
