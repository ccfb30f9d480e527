"""Native FP4 on Blackwell: CUTLASS block-scaled GEMMs compiled ahead of time to cubins and launched through
cuda-python, behind torch.library ops ``wush::cutlass_*`` (see :mod:`.ops`).

- :func:`available` says whether the FP4 cubin path can run on a device, and why not (the dispatcher selects
  KernelChoice.CUTLASS on capability 10.x / 12.x when it is true; the reason goes to the explain report).
- :func:`linear`, :func:`fp4_gemm`, :func:`transform_quantize`: launchers with the signatures of the torch
  twins in :mod:`wush_compile.ops.reference`.
- :mod:`.decode`: the Hopper (sm_90a) decode kernels, the router's ``cuda_decode`` route.
- Build: ``python -m wush_compile.cuda.build`` (:mod:`.build`); cubins are otherwise built on first use and
  cached. ``WUSH_DISABLE_CUTLASS=1`` turns the path off (with that reason).

Importing this package registers the ops and imports neither cuda-python nor the toolkit.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Union

import torch

from .. import settings
from . import builder, decode, layout, loader  # noqa: F401
from . import ops
from .ops import fp4_gemm, linear, run_linear, transform_quantize  # noqa: F401  (registers wush::cutlass_*)

logger = logging.getLogger(__name__)

__all__ = ["available", "status", "linear", "run_linear", "fp4_gemm", "transform_quantize", "clear", "decode"]

_FP4_ARCHS = ("sm_100a", "sm_120a")


def _as_device(device: Union[torch.device, str, int, None]) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _check(device: torch.device, archs: tuple[str, ...], what: str) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"{device} is not a CUDA device"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = tuple(torch.cuda.get_device_capability(index))
    arch = loader.arch_for_capability(cap)
    if arch not in archs:
        return False, (
            f"{what} cubins are built for {', '.join(archs)} (capability "
            + ", ".join(f"{builder.ARCHS[a][0][0]}.{builder.ARCHS[a][0][1]}" for a in archs)
            + f"); cuda:{index} has capability {cap[0]}.{cap[1]}"
        )
    try:
        loader.driver()
    except Exception as exc:  # CudaUnavailable (no cuda-python) or a driver error
        return False, f"cuda-python cannot drive the GPU: {exc}"
    core = [t for t in builder.targets(arch) if t.kind in ("host", "quantize")]
    d, reason = loader.find_artifacts(arch, core)
    if d is not None:
        return True, f"{what} cubins for {arch}: {reason}"
    if settings.cubin_dir():
        return False, reason
    try:
        tc = builder.find_toolchain()
    except builder.BuildError as exc:
        return False, f"{reason}, and they cannot be built here: {exc}"
    if not tc.supports(arch):
        need = ".".join(map(str, builder.ARCHS[arch][1]))
        return False, f"{reason}, and nvcc {tc.version_text} cannot target {arch} (needs CUDA {need}+)"
    return True, (
        f"{what} cubins for {arch} will be built on first use with nvcc {tc.version_text} into "
        f"{builder.cache_dir(arch, tc)} (minutes; prebuild with python -m wush_compile.cuda.build --arch {arch})"
    )


@functools.lru_cache(maxsize=None)
def _available_cached(device: str, archs: tuple[str, ...], what: str) -> tuple[bool, str]:
    ok, reason = _check(torch.device(device), archs, what)
    logger.info("%s path on %s: %s (%s)", what, device, "available" if ok else "unavailable", reason)
    return ok, reason


def available(device: Union[torch.device, str, int, None] = None) -> tuple[bool, str]:
    """(True, where the cubins come from) when the native FP4 GEMMs can run on ``device``, else (False, why).

    Cheap and cached per device; it never builds. True means: capability 10.0 (sm_100a) or 12.0 (sm_120a),
    cuda-python drives the GPU, and the cubins are built or buildable here (nvcc + CUTLASS headers).
    """
    if settings.cutlass_disabled():  # read per call (not cached): turning it on later takes effect
        return False, "the CUTLASS cubin path is disabled by WUSH_DISABLE_CUTLASS"
    d = _as_device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return _available_cached(str(d), _FP4_ARCHS, "FP4")


def status(device: Union[torch.device, str, int, None] = None) -> dict[str, Any]:
    """What the explain report shows about the cubin path on ``device``."""
    ok, reason = available(device)
    info: dict[str, Any] = {"available": ok, "reason": reason, "source_hash": builder.source_hash()[:16]}
    d = _as_device(device)
    if d.type == "cuda" and torch.cuda.is_available():
        arch = loader.arch_for_capability(tuple(torch.cuda.get_device_capability(d)))
        if arch is not None:
            info["arch"] = arch
            info["search_dirs"] = [str(p) for p in loader.search_dirs(arch)]
    try:
        tc = builder.find_toolchain()
        info["nvcc"] = f"{tc.nvcc} ({tc.version_text})"
        info["cutlass"] = tc.cutlass_version
    except builder.BuildError as exc:
        info["toolchain"] = str(exc)
    try:
        import cuda.bindings as cb  # noqa: F401

        info["cuda_python"] = getattr(cb, "__version__", "?")
    except ImportError:
        info["cuda_python"] = None
    info["cache"] = str(builder.cache_root())
    return info


def clear() -> None:
    """Drop the device state of the CUDA launchers: the derived per-layer operands (fp32 transforms, swizzled
    scales, fp32 biases) and the decode kernels' per-device buffers (the router's :func:`clear` calls this)."""
    ops.clear_caches()
    decode.clear()


def clear_availability_cache() -> None:
    """Forget the cached :func:`available` answers (after building cubins or changing the environment)."""
    _available_cached.cache_clear()
