"""Small dense linear algebra (the (G, G) transform algebra, per-block GPTQ factorizations) on one thread.

LAPACK's threading costs far more than it saves on 16x16 / 32x32 matrices (a batched ``eigh`` of 48 such
matrices takes ~10x longer on two threads than on one), so calibration runs those calls single-threaded and
restores the caller's setting afterwards. Nothing is changed at import time.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["single_thread"]


@contextlib.contextmanager
def single_thread():
    """Run the enclosed torch CPU work on one intra-op thread; restore the previous count on exit."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
