"""Tiny fp32 random Llama checkpoints calibrated by wush_compile, with a word-level tokenizer (no downloads), and
the transformers + wush_compile reference of their prompt logprobs."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 160
#: head_dim 64 (what vLLM's CPU attention supports), 4 query / 2 key-value heads (whole heads at tp 2), K of every
#: Linear a multiple of 2 * 32 (whole MXFP4 / NVFP4 blocks per rank at tp 2).
SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)


def tiny_llama(seed: int = 0, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
                      attention_bias=bias, mlp_bias=False, bos_token_id=1, eos_token_id=2, **SIZES)
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # spread in the norms / biases: anisotropic Hessians, biases that matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        path)


def build(path: Path, fmt: str, *, shared: bool, bias: bool = False, seed: int = 0) -> Path:
    """Calibrate (RTN, WUSH transforms from random-token Hessians) and save to ``path``."""
    import calibrate
    from wush_compile import WushConfig

    model = tiny_llama(seed, bias)
    gen = torch.Generator().manual_seed(seed + 7)
    batches = [torch.randint(3, VOCAB, (2, 32), generator=gen) for _ in range(8)]  # 512 tokens >= K
    calibrate.calibrate(model, batches, WushConfig(format=fmt, method="rtn", transform="wush",
                                                   shared_transform=shared))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


def prompts(n: int = 3, seed: int = 11) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, VOCAB, (int(length),), generator=gen).tolist() for length in (7, 12, 19)[:n]]


def reference_logprobs(path: Path, token_lists: list[list[int]]) -> list[list[float]]:
    """log p(token_i | tokens_<i) for i >= 1 from transformers + wush_compile (the saved checkpoint reloaded)."""
    import wush_compile  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for toks in token_lists:
            ids = torch.tensor([toks])
            lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            out.append([float(lp[i - 1, toks[i]]) for i in range(1, len(toks))])
    return out
