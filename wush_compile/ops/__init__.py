"""Runtime ops: torch.library schemas (``torch.ops.wush.*``), fakes, torch twins and kernels."""

from . import library, reference  # noqa: F401  (registers the ops)
