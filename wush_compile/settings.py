"""Process settings read from the environment: the one module of the package that reads ``os.environ``.

Every setting is read when asked for (a few dictionary lookups), so a test that sets a variable sees it at the
next call; nothing is read at import time.

    TRITON_INTERPRET=1           Triton kernels run in the CPU interpreter (Triton's own switch)
    WUSH_CUDA_DECODE=1           the Hopper CUDA decode kernels take M <= 16 where they apply (default off)
    WUSH_DISABLE_CUDA_DECODE=1   never run the Hopper CUDA decode kernels
    WUSH_PORTABLE_UNPACK=1       the Triton kernels unpack FP4 without the sm_89 PTX converter
    WUSH_DISABLE_CUTLASS=1       never run the Blackwell CUTLASS cubins
    WUSH_CUDA_CUBIN_DIR=DIR      where the built cubins are (else prebuilt/ and the user cache)
    WUSH_NVCC, CUDA_HOME, CUDA_PATH, WUSH_CUTLASS_INCLUDE, WUSH_CUDA_CACHE, XDG_CACHE_HOME   the cubin build
    WUSH_GIT_SHA                 the git sha benchmarks report where no .git travels
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = [
    "flag",
    "value",
    "triton_interpret",
    "cuda_decode",
    "cuda_decode_disabled",
    "portable_unpack",
    "cutlass_disabled",
    "cubin_dir",
]


def value(name: str) -> Optional[str]:
    """The raw value of environment variable ``name`` (None when unset or empty)."""
    v = os.environ.get(name)
    return v if v else None


def flag(name: str) -> bool:
    """True when ``name`` is set to anything but "" or "0"."""
    return os.environ.get(name, "0") not in ("", "0")


def triton_interpret() -> bool:
    return flag("TRITON_INTERPRET")


def cuda_decode() -> bool:
    return flag("WUSH_CUDA_DECODE")


def cuda_decode_disabled() -> bool:
    return flag("WUSH_DISABLE_CUDA_DECODE")


def portable_unpack() -> bool:
    return os.environ.get("WUSH_PORTABLE_UNPACK", "0") == "1"


def cutlass_disabled() -> bool:
    return flag("WUSH_DISABLE_CUTLASS")


def cubin_dir() -> Optional[str]:
    return value("WUSH_CUDA_CUBIN_DIR")
