"""Compiled generation: ``model.generate`` with a static KV cache and the forward compiled by backend="wush".

The supported path is transformers' own: ``generate(..., cache_implementation="static", compile_config=
CompileConfig(backend="wush", ...))`` compiles the decoding forward once per shape (on CUDA with
``mode="reduce-overhead"``: CUDA graphs). :func:`generate` sets that up (also on the CPU, which transformers
skips unless asked).

``torch.compile(model, backend="wush").generate(...)`` does NOT compile anything: ``generate`` is the wrapped
model's own method and calls the uncompiled module. Importing wush_compile makes that call warn (once per model),
pointing here.
"""

from __future__ import annotations

import functools
import gc
import logging
import warnings

import torch
from torch import nn

from .modules import WushLinear

logger = logging.getLogger(__name__)

__all__ = ["compile_config", "generate", "EagerGenerateWarning", "register"]


class EagerGenerateWarning(UserWarning):
    """``generate`` of a torch.compile-wrapped wush model runs eagerly."""


def compile_config(device: torch.device | str | None = None, *, mode: str | None = None, fullgraph: bool = True,
                   options: dict | None = None):
    """A transformers ``CompileConfig`` for backend="wush" (CUDA: ``mode="reduce-overhead"``, CUDA graphs)."""
    from transformers import CompileConfig

    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if mode is None:
        mode = "reduce-overhead" if on_cuda and options is None else None
    cfg = CompileConfig(backend="wush", fullgraph=fullgraph, mode=mode, options=options)
    if not on_cuda:
        cfg._compile_all_devices = True  # transformers compiles on CUDA only unless asked
    return cfg


def generate(model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int, mode: str | None = None,
             options: dict | None = None, **kwargs) -> torch.Tensor:
    """``model.generate`` on a static cache with the forward compiled by backend="wush" (greedy by default)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    kwargs.setdefault("do_sample", False)
    return model.generate(
        input_ids, max_new_tokens=max_new_tokens, cache_implementation="static",
        compile_config=compile_config(input_ids.device, mode=mode, options=options), **kwargs,
    )


def _wrapped_by_torch_compile(model: nn.Module) -> bool:
    """Whether an OptimizedModule (torch.compile of a module) holds ``model`` as its ``_orig_mod``: the model is
    in that module's ``_modules`` dict, which its instance dict (or the instance itself) refers to."""
    optimized = torch._dynamo.eval_frame.OptimizedModule
    frontier = [model]
    for _ in range(3):
        nxt = []
        for obj in frontier:
            for ref in gc.get_referrers(obj):
                if isinstance(ref, optimized):
                    return True
                if isinstance(ref, dict) and (ref.get("_orig_mod") is model or "_modules" in ref):
                    nxt.append(ref)
        frontier = nxt
    return False


def _wrap_generate(orig):
    @functools.wraps(orig)
    def generate(self, *args, **kwargs):
        if (
            not getattr(self, "_wush_eager_warned", False)
            and getattr(self, "_compiled_call_impl", None) is None
            and kwargs.get("compile_config") is None
            and any(isinstance(m, WushLinear) for m in self.modules())
            and _wrapped_by_torch_compile(self)
        ):
            self._wush_eager_warned = True
            warnings.warn(
                "torch.compile(model, backend='wush').generate(...) runs the model eagerly (generate calls the "
                "uncompiled module). Use wush_compile.generation.generate(model, ids, max_new_tokens=...) or "
                "model.generate(..., cache_implementation='static', compile_config="
                "wush_compile.generation.compile_config()) to decode with the compiled forward",
                EagerGenerateWarning,
                stacklevel=2,
            )
        return orig(self, *args, **kwargs)

    generate.__wush_original__ = orig
    return generate


def register() -> None:
    """Hook ``GenerationMixin.generate`` (idempotent)."""
    from transformers.generation.utils import GenerationMixin

    current = GenerationMixin.generate
    GenerationMixin.generate = _wrap_generate(getattr(current, "__wush_original__", current))
