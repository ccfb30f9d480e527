"""The one table of supported decoder architectures.

For each Hugging Face ``config.model_type``: where the decoder blocks live and which Linears of a block read
the same input (they share one Hessian and, with ``shared_transform``, one transform). Groups are listed in
the order the block computes them; calibration walks them in that order.
"""

from __future__ import annotations

import dataclasses

from torch import nn

__all__ = ["Architecture", "ARCHITECTURES", "get_architecture", "decoder_layers"]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Where a model keeps its decoder blocks and how their Linears group by input."""

    layers_path: str  # attribute path from the CausalLM to its ModuleList of blocks
    groups: tuple[tuple[str, ...], ...]  # Linears (paths inside a block) that read the same input, in order


_LLAMA_LIKE = Architecture(
    layers_path="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

#: Phi-3: q/k/v and gate/up are fused into one Linear each.
_PHI3 = Architecture(
    layers_path="model.layers",
    groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
)

#: model_type -> Architecture. SmolLM / SmolLM2 checkpoints are ``llama``.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _PHI3,
}

#: Mixture-of-experts models: in transformers 5 their experts are one module holding 3-D weight tensors
#: (``MixtralExperts.gate_up_proj`` (E, 2I, D), ``down_proj`` (E, D, I)), not Linears, so WushLinear cannot
#: stand in for them (see the README's known gaps for the plan).
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "deepseek_v3", "olmoe", "gpt_oss")


def get_architecture(model: nn.Module) -> Architecture:
    """The table entry for ``model.config.model_type``; a clear error naming the supported ones otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in MOE_MODEL_TYPES:
        raise ValueError(
            f"calibrate: {model_type!r} ({type(model).__name__}) is a mixture-of-experts model; its experts are "
            "fused 3-D weight tensors in transformers, not Linears, and wush_compile has no FP4 expert layer yet. "
            f"Supported model_type values are: {', '.join(sorted(ARCHITECTURES))}"
        )
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(
            f"calibrate: unsupported architecture {model_type!r} ({type(model).__name__}); supported model_type "
            f"values are: {supported}. Add an entry to calibrate.architectures.ARCHITECTURES for another one"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    """The ModuleList of decoder blocks at ``arch.layers_path``."""
    obj = model
    for part in arch.layers_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"calibrate: {type(model).__name__} has no '{arch.layers_path}' (missing '{part}'); "
                "pass a *ForCausalLM model of a supported architecture"
            )
        obj = getattr(obj, part)
    if not isinstance(obj, nn.ModuleList):
        raise ValueError(f"calibrate: '{arch.layers_path}' of {type(model).__name__} is not a ModuleList")
    return obj
