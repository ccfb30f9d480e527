"""More architectures of the one table: Gemma, Gemma2, Gemma3 (text), Phi-3; MoE models get a clear error."""

import pytest
import torch
from torch import nn

import calibrate
from wush_compile import WushConfig, WushLinear

from .conftest import VOCAB, tiny_batches


def _tiny(model_type, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, head_dim=16, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()


@pytest.mark.parametrize("model_type, count", [("gemma", 14), ("gemma2", 14), ("gemma3_text", 14), ("phi3", 8)])
def test_supported(model_type, count):
    ref, model = _tiny(model_type), _tiny(model_type)
    calibrate.calibrate(model, tiny_batches(2, 2, 16), WushConfig(method="gptq", nsamples=4, seqlen=16))
    report = calibrate.get_report(model)
    wls = [m for m in model.modules() if isinstance(m, WushLinear)]
    assert len(wls) == count == len(report.layers) and report.skipped == []
    assert [n for n, m in model.named_modules() if type(m) is nn.Linear] == ["lm_head"]
    ids = tiny_batches(1, 1, 16, seed=5)[0]
    with torch.no_grad():
        ref_logits, logits = ref(ids).logits, model(ids).logits
    err = float((logits - ref_logits).norm() / ref_logits.norm())
    assert torch.isfinite(logits).all() and err < 0.5, err


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_moe_clear_error(model_type):
    with pytest.raises(ValueError, match="mixture-of-experts.*not Linears"):
        calibrate.calibrate(_tiny(model_type), tiny_batches(1), WushConfig())
