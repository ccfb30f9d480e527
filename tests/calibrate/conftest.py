"""Tiny random decoder LMs built in the test (no downloads) and calibration batches for them."""

import pytest
import torch

VOCAB = 256


def tiny_config(model_type: str = "llama", *, intermediate: int = 128, layers: int = 2):
    """A 2-block decoder config of the given architecture: hidden 64, 4 heads / 2 KV heads."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if model_type == "qwen3":
        kw["head_dim"] = 16
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", *, seed: int = 0, dtype=torch.float32, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw)).to(dtype).eval()
    # Give the norms and biases some spread so the Hessians are anisotropic like a real model's.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((1.0 + 0.5 * torch.randn(p.shape, generator=gen)).to(dtype))
            elif name.endswith(".bias"):
                p.copy_((0.1 * torch.randn(p.shape, generator=gen)).to(dtype))
    return model


def tiny_batches(n: int = 2, batch: int = 2, seqlen: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seqlen), generator=gen) for _ in range(n)]


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def batches():
    return tiny_batches()
