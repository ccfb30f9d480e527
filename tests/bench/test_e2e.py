"""The end-to-end benchmark on the CPU with a tiny random Llama: both variants compile and generate, the JSON
and the PNG are written, no recompiles while timing, every decoder Linear is a wush layer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wush_compile.bench import e2e

REPO = Path(__file__).resolve().parents[2]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="unknown model"):
        e2e.E2ESettings(models=("gpt5",))
    with pytest.raises(ValueError, match="positive"):
        e2e.E2ESettings(models=("tiny",), batches=(0,))


def test_tiny_model_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    s = e2e.E2ESettings(models=("tiny",), prompt_len=16, new_tokens=4, batches=(1, 2), profile=True, profile_steps=3,
                        also_cuda_decode=True)
    logged = []
    out = e2e.run(s, out_dir=tmp_path, log=logged.append)
    (r,) = out["results"]
    assert r["wush_linears"] == r["quantized_layers"] == 2 * 7
    assert r["fp8"]["label"].startswith("fp8 w8a8")
    assert set(r["ratios_vs_fp8"]) == {"prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s", "model_bytes"}
    assert r["fp8"]["model_bytes"] < r["bf16"]["model_bytes"]
    for variant in ("bf16", "fp8", "wush"):
        v = r[variant]
        assert v["recompiles_while_timing"] == 0, v
        assert v["prefill_tok_s"] > 0 and v["decode_b1_tok_s"] > 0 and v["decode_b2_tok_s"] > 0
    assert r["wush"]["model_bytes"] < r["bf16"]["model_bytes"]
    assert set(r["ratios"]) == {"prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s", "model_bytes"}
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["results"][0]["model"] == "tiny" and "environment" in saved
    assert (tmp_path / "e2e.png").stat().st_size > 0
    assert "tiny" in e2e.format_table(out["results"])
    # the extra variant (CUDA decode kernels) is measured, tabled and profiled; the default is restored
    from wush_compile import settings

    assert r["wush[cuda decode]"]["decode_b1_tok_s"] > 0 and settings.cuda_decode() is False
    assert "CUDA decode" in e2e.format_table(out["results"])
    # the profile: every phase of both variants, and the wush variant spends time in the wush ops
    for variant in ("bf16", "wush"):
        prof = r[variant]["profile"]
        assert set(prof) == {"prefill", "decode_b1", "decode_b2"}
        for p in prof.values():
            assert p["busy_ms"] > 0 and p["categories_ms"] and p["top"]
    assert r["wush"]["profile"]["decode_b1"]["categories_ms"].get("wush fp4 GEMM", 0) > 0
    assert "wush fp4 GEMM" not in r["bf16"]["profile"]["decode_b1"]["categories_ms"]
    assert any("outside GEMMs" in msg for msg in logged)


def test_script_help():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--e2e" in res.stdout, res.stderr


class _ByteTokenizer:
    """Token i = byte i % vocab (enough for the text check's bookkeeping)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, text, return_tensors="pt"):
        import types

        import torch

        return types.SimpleNamespace(input_ids=torch.tensor([[b % self.vocab for b in text.encode()]]))

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


def test_text_check_on_tiny_model():
    import torch

    from wush_compile.config import WushConfig

    device = torch.device("cpu")
    model = e2e._random_llama(device, torch.float32, None, "tiny")
    tok = _ByteTokenizer(model.config.vocab_size)
    s = e2e.E2ESettings(models=("tiny",), text_tokens=6)
    ids = tok(e2e.PROMPT).input_ids
    fp_tokens, _, _ = e2e.Runner(model, "", None, device).generate(ids, s.text_tokens)
    e2e.calibrate_random(model, WushConfig(format="mxfp4", method="rtn", transform="wush"))
    out = e2e._text_check(model, tok, e2e.Runner(model, "wush", None, device), fp_tokens, s, device)
    assert out["rewrite_only_equals_eager"] is True
    assert len(out["wush_eager"].split()) == len(out["wush_compiled"].split()) == s.text_tokens
    assert out["compiled_equals_eager"] == (out["first_difference_at"] is None)
    if out["first_difference_at"] is not None:  # the top-2 diagnosis is recorded
        assert "eager_top2_at_difference" in out


def test_a_failing_model_keeps_partial_results(tmp_path, monkeypatch):
    def half_done(name, s, device, out=None, checkpoint=None):
        out["model"] = name
        out["bf16"] = {"label": "bf16", "prefill_tok_s": 1.0}
        raise RuntimeError("boom after bf16")

    monkeypatch.setattr(e2e, "run_model", half_done)
    with pytest.raises(RuntimeError, match=r"\['tiny'\] failed .*boom after bf16"):
        e2e.run(e2e.E2ESettings(models=("tiny",)), out_dir=tmp_path, log=lambda msg: None)
    (r,) = json.loads((tmp_path / "e2e.json").read_text())["results"]
    assert r["bf16"]["prefill_tok_s"] == 1.0 and "boom" in r["error"]


def test_runner_takes_mode_and_options_together():
    import torch

    model = e2e._random_llama(torch.device("cpu"), torch.float32, None, "tiny")
    # torch.compile itself refuses mode= with options=; the runner folds the mode into the options
    e2e.Runner(model, "inductor", "reduce-overhead", torch.device("cpu"), options={"emulate_precision_casts": True})


def test_shared_transform_random_model_is_grouped():
    import torch

    from wush_compile import explain
    from wush_compile.config import WushConfig

    model = e2e._random_llama(torch.device("cpu"), torch.float32, None, "tiny")
    n = e2e.calibrate_random(model, WushConfig(format="mxfp4", method="rtn", transform="wush", shared_transform=True))
    assert n == 2 * 7
    layer = model.model.layers[0]
    assert torch.equal(layer.self_attn.q_proj.transform, layer.self_attn.v_proj.transform)
    assert layer.mlp.gate_proj.share_group == layer.mlp.up_proj.share_group == "model.layers.0.gate_proj+up_proj"
    report = explain(model, torch.randint(0, 500, (1, 8)))
    assert report.rewritten == n
    assert len({r.group for r in report.rows if r.group}) == 2 * 2  # q/k/v and gate/up per layer


def test_variants_subset_and_merge(tmp_path):
    """Variants split over two runs (each measures only its own) merge into one result with both ratios."""
    with pytest.raises(ValueError, match="unknown variant"):
        e2e.E2ESettings(models=("tiny",), variants=("bf16", "int8"))
    base = dict(models=("tiny",), prompt_len=8, new_tokens=2, batches=(1,))
    a = e2e.run(e2e.E2ESettings(**base, variants=("bf16", "fp8")), out_dir=tmp_path / "a", log=lambda _: None)
    (ra,) = a["results"]
    assert "bf16" in ra and "fp8" in ra and "wush" not in ra and "ratios" not in ra
    e2e.run(e2e.E2ESettings(**base, variants=("wush",)), out_dir=tmp_path / "b", log=lambda _: None)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import e2e_merge
    finally:
        sys.path.pop(0)
    m = e2e_merge.merge([tmp_path / "a" / "e2e.json", tmp_path / "b" / "e2e.json"])
    (r,) = m["results"]
    assert set(r["ratios"]) == {"prefill_tok_s", "decode_b1_tok_s", "model_bytes"}
    assert r["ratios"]["decode_b1_tok_s"] == r["wush"]["decode_b1_tok_s"] / r["bf16"]["decode_b1_tok_s"]
    assert "ratios_vs_fp8" in r
    with pytest.raises(SystemExit, match="measured twice"):
        e2e_merge.merge([tmp_path / "a" / "e2e.json", tmp_path / "a" / "e2e.json"])
