"""wush_compile: WUSH-calibrated FP4 (MXFP4 / NVFP4) linear layers that run fast under
``torch.compile(model, backend="wush")``.

Importing the package registers the ``torch.ops.wush`` ops, the ``wush`` dynamo backend and the
transformers quantizer (quant_method "wush"); it sets no global torch flags.
"""

from __future__ import annotations

import torch

from . import formats, transforms  # noqa: F401
from .config import ActScale, Format, KernelChoice, Method, TransformKind, WushConfig
from .modules import WushLinear
from .ops import library as _library, reference as _reference  # noqa: F401  (registers torch.ops.wush.*)
from .ops.dispatch import pin_kernel
from . import backend as _backend
from .explain import explain
from .api import quantize
from . import generation  # noqa: F401  (wush_compile.generation.generate; warns on eager generate of a compiled model)
from . import hf  # noqa: F401  (registers quant_method "wush" with transformers: save_pretrained / from_pretrained)

generation.register()
_backend.register()  # backend="wush" (also resolvable through the torch_dynamo_backends entry point)
torch._logging._internal.register_log("wush_compile", "wush_compile")  # TORCH_LOGS="+wush_compile"

__version__ = "0.1.0"

__all__ = [
    "ActScale",
    "Format",
    "KernelChoice",
    "Method",
    "TransformKind",
    "WushConfig",
    "WushLinear",
    "explain",
    "quantize",
    "pin_kernel",
    "formats",
    "transforms",
]
