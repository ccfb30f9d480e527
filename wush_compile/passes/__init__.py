"""FX rewrites the ``wush`` backend runs on the dynamo graph before handing it to Inductor, one per file:

1. :mod:`.lower_linear` - ``wush.linear`` -> ``wush.fused_linear`` with the dispatcher's kernel choice.
2. :mod:`.group_shared_input` - fused linears reading the same x with an identical transform ->
   ``wush.fused_linear_group`` (x quantized once).

Each pass counts what it did in ``torch._dynamo.utils.counters["wush"]`` and logs each rewrite
(``TORCH_LOGS="+wush_compile"``).
"""

from __future__ import annotations

from ._common import LinearRecord, PassContext, normalize_module_path
from .lower_linear import NOT_CALIBRATED, rewrite_linears
from .group_shared_input import group_shared_inputs

__all__ = [
    "LinearRecord",
    "PassContext",
    "NOT_CALIBRATED",
    "normalize_module_path",
    "rewrite_linears",
    "group_shared_inputs",
]
