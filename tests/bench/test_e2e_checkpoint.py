"""``wush bench --e2e --model DIR``: the end-to-end benchmark on a user's saved checkpoint (CPU: the argument path
and the greedy-text part; the speed part needs CUDA)."""

import json

import pytest
import torch

import calibrate
from wush_compile import WushConfig, WushLinear
from wush_compile.bench import e2e

from ..calibrate.conftest import tiny_batches, tiny_model
from ..calibrate.test_cli import _byte_tokenizer


@pytest.fixture
def ckpt(tmp_path):
    model = tiny_model()
    calibrate.calibrate(model, tiny_batches(1), WushConfig(method="rtn", transform="hadamard"))
    model.save_pretrained(tmp_path / "ckpt")
    _byte_tokenizer().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_bench_e2e_on_a_checkpoint_dir(ckpt, tmp_path, monkeypatch):
    from wush_compile.cli import main

    seen = {}

    def fake_text_check(model, tok, runner, fp_tokens, s, device):  # the compiled part (Inductor) is the slow part
        seen["wush_linears"] = sum(isinstance(m, WushLinear) for m in model.modules())
        seen["tokens"] = fp_tokens
        return {"checked": True}

    monkeypatch.setattr(e2e, "_text_check", fake_text_check)
    out = tmp_path / "bench"
    assert main(["bench", "--e2e", "--model", str(ckpt), "--format", "mxfp4", "--out", str(out)]) == 0
    assert seen["wush_linears"] == 14 and seen["tokens"].shape == (1, e2e.E2ESettings.text_tokens)
    result = json.loads((out / "e2e.json").read_text())["results"][0]
    assert result["model"] == str(ckpt) and result["text"] == {"checked": True} and result["wush_linears"] == 14


def test_unknown_model_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="checkpoint directory"):
        e2e.E2ESettings(models=(str(tmp_path / "nothing"),))
