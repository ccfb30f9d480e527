"""The fp8 W8A8 baseline of the end-to-end benchmark: per-row e4m3 quantization and the scaled GEMM against a
float64 computation of the same quantized operands, the model swap, and torch.compile of a converted model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wush_compile.bench.fp8_baseline import E4M3_MAX, Fp8Linear, quantize_rows_fp8, to_fp8


def test_row_quantization_maps_each_row_amax_to_448():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 7.0])[:, None]
    q, s = quantize_rows_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    amax = q.float().abs().amax(-1)
    assert torch.equal(amax[[0, 1, 2, 4]], torch.full((4,), E4M3_MAX))
    assert amax[3] == 0 and torch.isfinite(s).all()
    # dequantized rows within e4m3's half-ulp (2^-4 relative) of the input
    err = ((q.float() * s - x).abs() / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)).amax()
    assert err <= 2**-4, err


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_equals_its_quantized_operands_in_float64(bias, dtype):
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(48, generator=gen))
    f = Fp8Linear(lin.to(dtype))
    x = torch.randn(3, 7, 64, generator=gen).to(dtype)
    y = f(x)
    assert y.shape == (3, 7, 48) and y.dtype == dtype
    qx, sx = quantize_rows_fp8(x.reshape(-1, 64))
    ref = (qx.double() * sx.double()) @ (f.weight_fp8.double() * f.weight_scale.double().t()).t()
    if bias:
        ref = ref + lin.bias.double()
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    rel = ((y.reshape(-1, 48).double() - ref).abs().amax() / ref.abs().amax()).item()
    assert rel <= tol, rel


def test_misaligned_layer_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="multiples of 16.*high precision"):
        Fp8Linear(nn.Linear(40, 16))


def test_to_fp8_swaps_decoder_linears_and_compiles():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    assert to_fp8(model) == "in-repo"
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 2 * 7
    assert isinstance(model.lm_head, nn.Linear)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-4)
    # W8A8 of a random model stays close to full precision (per-row e4m3: a few percent)
    assert ((eager - ref).norm() / ref.norm()).item() < 0.1
