"""Runtime ops: torch.library schemas (``torch.ops.wush.*``, :mod:`.library`), fakes, torch twins
(:mod:`.reference`), the kernel-choice policy (:mod:`.dispatch`) and the Triton kernels (:mod:`.kernels`).

Importing this package imports none of them (``import wush_compile`` registers the ops), so a backend can use a
leaf module here (:mod:`.checks`, :mod:`.reference`) without pulling in the schema layer.
"""
