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
    s = e2e.E2ESettings(models=("tiny",), prompt_len=16, new_tokens=4, batches=(1, 2), profile=True, profile_steps=3)
    logged = []
    out = e2e.run(s, out_dir=tmp_path, log=logged.append)
    (r,) = out["results"]
    assert r["wush_linears"] == r["quantized_layers"] == 2 * 7
    for variant in ("bf16", "wush"):
        v = r[variant]
        assert v["recompiles_while_timing"] == 0, v
        assert v["prefill_tok_s"] > 0 and v["decode_b1_tok_s"] > 0 and v["decode_b2_tok_s"] > 0
    assert r["wush"]["model_bytes"] < r["bf16"]["model_bytes"]
    assert set(r["ratios"]) == {"prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s", "model_bytes"}
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["results"][0]["model"] == "tiny" and "environment" in saved
    assert (tmp_path / "e2e.png").stat().st_size > 0
    assert "tiny" in e2e.format_table(out["results"])
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
