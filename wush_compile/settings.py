"""Process settings read from the environment: the one module of the package that reads ``os.environ``.

Every setting is read when asked for (a few dictionary lookups), so a test that sets a variable sees it at the
next call; nothing is read at import time and nothing caches a value. :func:`current` reads the runtime switches
into one frozen :class:`Settings` (what the router takes as one argument); the functions below read one each.

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

import contextlib
import contextvars
import dataclasses
import os
from typing import Iterator, Optional

__all__ = [
    "Settings",
    "current",
    "overridden",
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


#: Fields of :class:`Settings` set by :func:`overridden` in this context (they win over the environment).
_OVERRIDES: contextvars.ContextVar[dict] = contextvars.ContextVar("wush_settings_overrides", default={})


def _switch(field: str, name: str) -> bool:
    o = _OVERRIDES.get()
    if o and field in o:
        return o[field]
    return os.environ.get(name, "0") not in ("", "0")


def triton_interpret() -> bool:
    return _switch("triton_interpret", "TRITON_INTERPRET")


def cuda_decode() -> bool:
    return _switch("cuda_decode", "WUSH_CUDA_DECODE")


def cuda_decode_disabled() -> bool:
    return _switch("cuda_decode_disabled", "WUSH_DISABLE_CUDA_DECODE")


def portable_unpack() -> bool:
    o = _OVERRIDES.get()
    if o and "portable_unpack" in o:
        return o["portable_unpack"]
    return os.environ.get("WUSH_PORTABLE_UNPACK", "0") == "1"


def cutlass_disabled() -> bool:
    return _switch("cutlass_disabled", "WUSH_DISABLE_CUTLASS")


def cubin_dir() -> Optional[str]:
    return value("WUSH_CUDA_CUBIN_DIR")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The runtime switches at one moment (:func:`current`); the router decides from this, never from os.environ.

    Fields:
        triton_interpret: Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).
        cuda_decode: the automatic choice takes the Hopper CUDA decode route where it applies
            (``WUSH_CUDA_DECODE=1``; default off: end to end the Triton decode kernels measured faster).
        cuda_decode_disabled: never run the CUDA decode kernels, pinned or not (``WUSH_DISABLE_CUDA_DECODE=1``).
        portable_unpack: the Triton kernels unpack FP4 without the sm_89 PTX converter (``WUSH_PORTABLE_UNPACK=1``).
        cutlass_disabled: never run the Blackwell CUTLASS cubins (``WUSH_DISABLE_CUTLASS=1``).
    """

    triton_interpret: bool = False
    cuda_decode: bool = False
    cuda_decode_disabled: bool = False
    portable_unpack: bool = False
    cutlass_disabled: bool = False


def current() -> Settings:
    """The runtime switches as the environment has them now."""
    return Settings(
        triton_interpret=triton_interpret(),
        cuda_decode=cuda_decode(),
        cuda_decode_disabled=cuda_decode_disabled(),
        portable_unpack=portable_unpack(),
        cutlass_disabled=cutlass_disabled(),
    )


@contextlib.contextmanager
def overridden(**fields: bool) -> Iterator[Settings]:
    """Run the ``with`` block as if the environment set these :class:`Settings` fields (for tools and tests that
    compare routes, e.g. ``overridden(cuda_decode=True)``); yields the settings in effect inside."""
    names = {f.name for f in dataclasses.fields(Settings)}
    bad = sorted(set(fields) - names)
    if bad:
        raise ValueError(f"settings.overridden: unknown field(s) {bad}; choose from {sorted(names)}")
    for k, v in fields.items():
        if not isinstance(v, bool):
            raise ValueError(f"settings.overridden: {k} must be True or False, got {v!r}")
    token = _OVERRIDES.set({**_OVERRIDES.get(), **fields})
    try:
        yield current()
    finally:
        _OVERRIDES.reset(token)
