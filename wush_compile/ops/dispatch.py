"""Kernel-choice policy: which implementation runs a calibrated linear of a given shape on a given device.

:func:`choose_kernel` is a pure function of (M, N, K, format, device, pin) and the machine (device capability,
whether the Triton kernels import, whether Blackwell cubins load). It returns the choice and a one-line reason
that the backend logs, counts and shows in the explain report. The thresholds below are the only knobs; the
kernels engineer sets them from measurements (benchmarks/RESULTS.md).

Policy (INTERFACES.md):
    CPU tensors                           -> REFERENCE (the torch twin)
    CUDA capability 10.x / 12.x + cubins  -> CUTLASS (native block-scaled FP4 MMA)
    CUDA, M <= DECODE_MAX_M               -> TRITON_DECODE (FP4 weights in registers, fused prologue)
    CUDA, MXFP4, M > DECODE_MAX_M          -> TRITON_FP8 (exact re-encoding into an fp8 GEMM; needs sm_89+)
    CUDA, NVFP4, M > DECODE_MAX_M          -> TRITON_BF16 (exact bf16 dequantization + bf16 MMA)
    CUDA below MIN_TRITON_CAPABILITY      -> REFERENCE

TRITON_DECODE on sm_90 runs the Hopper CUDA decode kernels (``wush_compile.cuda.decode``) instead of Triton's
only when asked (``WUSH_CUDA_DECODE=1``): end to end under CUDA graphs the Triton ones measured faster
(``kernels.CUDA_DECODE``).

A pinned choice (``wush_compile.pin_kernel`` or ``options={"kernel": ...}``) wins when it can run; when it
cannot (wrong format, wrong device, kernels missing) the automatic choice runs instead and the reason says
why - a fallback is never silent.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from typing import Iterator, Optional

import torch

from .. import settings
from ..config import Format, KernelChoice

logger = logging.getLogger(__name__)

__all__ = [
    "DECODE_MAX_M",
    "MIN_TRITON_CAPABILITY",
    "MIN_FP8_CAPABILITY",
    "CUTLASS_CAPABILITY_MAJORS",
    "Decision",
    "choose_kernel",
    "decide",
    "pin_kernel",
    "current_pin",
    "kernel_path",
    "supports",
    "triton_kernels_status",
    "TRITON_CHOICES",
    "runtime_choice",
]

# ---- thresholds (the kernels engineer tunes these from measurements; nothing else in this file) ----
#: Largest M (tokens in the call) that takes the decode kernel. Measured on an H100 (benchmarks/RESULTS.md,
#: 2026-11-23): the decode kernel is the fastest route at M = 1 and 16 on every shape and format, and slower
#: than the prefill routes at M = 128 on all of them.
DECODE_MAX_M = 16
#: Oldest capability the Triton kernels run on (bf16 MMA).
MIN_TRITON_CAPABILITY = (8, 0)
#: Oldest capability with fp8 tensor cores (the MXFP4 -> fp8 re-encoding).
MIN_FP8_CAPABILITY = (8, 9)
#: Capability majors with native block-scaled FP4 MMA (Blackwell datacenter / consumer).
CUTLASS_CAPABILITY_MAJORS = (10, 12)
#: M used to ask "what would a long prefill take" when M is symbolic at compile time.
PREFILL_PROBE_M = 4096
# ------------------------------------------------------------------------------------------------------

TRITON_CHOICES = (KernelChoice.TRITON_DECODE, KernelChoice.TRITON_FP8, KernelChoice.TRITON_BF16)

_PATHS = {
    KernelChoice.REFERENCE: "reference (torch twin)",
    KernelChoice.TRITON_DECODE: "decode (fused transform+quantize prologue, FP4 weights in registers)",
    KernelChoice.TRITON_FP8: "prefill (exact MXFP4 -> fp8 re-encoding, fp8 GEMM)",
    KernelChoice.TRITON_BF16: "prefill (exact bf16 dequantization, bf16 MMA)",
    KernelChoice.CUTLASS: "native block-scaled FP4 MMA (CUTLASS cubin)",
    KernelChoice.AUTO: "chosen per call from M",
}


def kernel_path(choice: KernelChoice | str) -> str:
    """A short human description of the path a choice takes (for logs and the explain report)."""
    return _PATHS[KernelChoice.parse(choice)]


# ---- pinning ----

_PIN: contextvars.ContextVar[KernelChoice] = contextvars.ContextVar("wush_kernel_pin", default=KernelChoice.AUTO)


@contextlib.contextmanager
def pin_kernel(choice: KernelChoice | str) -> Iterator[KernelChoice]:
    """Pin the kernel for graphs compiled (and ``auto`` ops run) inside the ``with`` block.

    ``choice`` is a :class:`KernelChoice` or its value ("reference", "triton_decode", ...; "auto" un-pins).
    The pin is read when the backend compiles a graph; a graph compiled inside the block keeps the pinned
    kernel afterwards (``torch._dynamo.reset()`` to recompile).
    """
    parsed = KernelChoice.parse(choice)
    token = _PIN.set(parsed)
    try:
        yield parsed
    finally:
        _PIN.reset(token)


def current_pin() -> KernelChoice:
    """The kernel pinned by the innermost :func:`pin_kernel` block (AUTO outside any)."""
    return _PIN.get()


# ---- what the machine offers ----


@functools.lru_cache(maxsize=None)
def triton_kernels_status() -> tuple[bool, str]:
    """(importable, reason): whether ``wush_compile.ops.kernels`` (the Triton launchers) can be used."""
    try:
        from . import kernels
    except Exception as exc:  # the module failed to import
        return False, f"wush_compile.ops.kernels is not importable ({type(exc).__name__}: {exc})"
    ok, why = kernels.triton_available()
    if not ok:
        return False, why
    return True, "triton kernels importable"


def _triton_interpreter() -> bool:
    return settings.triton_interpret()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _cutlass_status(device: str) -> tuple[bool, str]:
    try:
        from .. import cuda as wcuda

        available = wcuda.available
    except Exception as exc:
        return False, f"wush_compile.cuda is not importable ({type(exc).__name__}: {exc})"
    try:
        ok, why = available(torch.device(device))
    except Exception as exc:  # a loader failure is a reason, not a crash
        return False, f"wush_compile.cuda.available failed ({type(exc).__name__}: {exc})"
    return bool(ok), str(why)


@dataclasses.dataclass(frozen=True)
class _Machine:
    device_type: str
    capability: Optional[tuple[int, int]]
    triton: tuple[bool, str]
    cutlass: tuple[bool, str]
    interpreter: bool


def _machine(device: torch.device, capability, triton_ok, cutlass_ok) -> _Machine:
    if device.type == "cuda":
        cap = tuple(capability) if capability is not None else _capability(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    else:
        cap = tuple(capability) if capability is not None else None
    triton = (triton_ok, "given") if isinstance(triton_ok, bool) else (triton_ok or triton_kernels_status())
    if isinstance(cutlass_ok, bool):
        cutlass = (cutlass_ok, "given")
    elif cutlass_ok is not None:
        cutlass = cutlass_ok
    elif device.type == "cuda" and cap is not None and cap[0] in CUTLASS_CAPABILITY_MAJORS:
        cutlass = _cutlass_status(str(device))
    else:
        cutlass = (False, "not a Blackwell device")
    return _Machine(device.type, cap, triton, cutlass, _triton_interpreter())


def supports(choice: KernelChoice | str, fmt: Format | str, device, **machine) -> tuple[bool, str]:
    """Whether ``choice`` can run format ``fmt`` on ``device``: (ok, reason when not)."""
    choice, fmt, device = KernelChoice.parse(choice), Format.parse(fmt), torch.device(device)
    return _supports(choice, fmt, _machine(device, machine.get("capability"), machine.get("triton_ok"),
                                           machine.get("cutlass_ok")))


def _supports(choice: KernelChoice, fmt: Format, mach: _Machine) -> tuple[bool, str]:
    if choice is KernelChoice.REFERENCE:
        return True, ""
    if choice is KernelChoice.AUTO:
        return False, "auto is not a concrete kernel"
    if choice is KernelChoice.CUTLASS:
        if mach.device_type != "cuda":
            return False, f"cutlass needs CUDA tensors, these are on {mach.device_type}"
        return mach.cutlass if not mach.cutlass[0] else (True, "")
    # Triton choices
    if not mach.triton[0]:
        return False, mach.triton[1]
    if mach.device_type == "cpu":
        if not mach.interpreter:
            return False, "Triton kernels on CPU tensors need TRITON_INTERPRET=1"
    elif mach.device_type != "cuda":
        return False, f"Triton kernels need CUDA tensors, these are on {mach.device_type}"
    elif mach.capability is not None and mach.capability < MIN_TRITON_CAPABILITY:
        return False, f"capability {mach.capability} is below {MIN_TRITON_CAPABILITY} (no bf16 MMA)"
    if choice is KernelChoice.TRITON_FP8:
        if fmt is not Format.MXFP4:
            return False, f"triton_fp8 re-encodes MXFP4 exactly into fp8; {fmt.value} scales do not fold (use triton_bf16)"
        if mach.device_type == "cuda" and mach.capability is not None and mach.capability < MIN_FP8_CAPABILITY:
            return False, f"capability {mach.capability} has no fp8 tensor cores (needs {MIN_FP8_CAPABILITY})"
    return True, ""


def _auto(m: int, fmt: Format, mach: _Machine) -> tuple[KernelChoice, str]:
    if mach.device_type != "cuda":
        return KernelChoice.REFERENCE, f"{mach.device_type} tensors run the torch reference"
    notes = []
    if mach.capability is not None and mach.capability[0] in CUTLASS_CAPABILITY_MAJORS:
        if mach.cutlass[0]:
            return KernelChoice.CUTLASS, f"capability {mach.capability}: native FP4 MMA"
        notes.append(f"no cutlass ({mach.cutlass[1]})")
    if not mach.triton[0]:
        return KernelChoice.REFERENCE, "; ".join(notes + [mach.triton[1]])
    if mach.capability is not None and mach.capability < MIN_TRITON_CAPABILITY:
        return KernelChoice.REFERENCE, f"capability {mach.capability} below {MIN_TRITON_CAPABILITY}"
    prefix = "; ".join(notes) + "; " if notes else ""
    if m <= DECODE_MAX_M:
        return KernelChoice.TRITON_DECODE, f"{prefix}M={m} <= DECODE_MAX_M={DECODE_MAX_M}: decode kernel"
    if fmt is Format.MXFP4:
        ok, why = _supports(KernelChoice.TRITON_FP8, fmt, mach)
        if ok:
            return KernelChoice.TRITON_FP8, f"{prefix}M={m} > {DECODE_MAX_M}, mxfp4: exact fp8 re-encoding"
        return KernelChoice.TRITON_BF16, f"{prefix}M={m} > {DECODE_MAX_M}, mxfp4 but {why}: bf16 path"
    return KernelChoice.TRITON_BF16, f"{prefix}M={m} > {DECODE_MAX_M}, {fmt.value}: exact bf16 dequantization"


def _count(key: str) -> None:
    from torch._dynamo.utils import counters

    counters["wush"][key] += 1


def choose_kernel(
    m: int,
    n: int,
    k: int,
    fmt: Format | str,
    device,
    pinned: KernelChoice | str = KernelChoice.AUTO,
    *,
    capability: Optional[tuple[int, int]] = None,
    triton_ok: Optional[bool] = None,
    cutlass_ok: Optional[bool] = None,
    count: bool = True,
) -> tuple[KernelChoice, str]:
    """Pick the kernel for an (M, K) x (N, K) calibrated linear: returns (choice, reason).

    Args:
        m, n, k: tokens in the call, output features, input features.
        fmt: "mxfp4" or "nvfp4".
        device: where the tensors live (``torch.device`` or string).
        pinned: a concrete choice to use if it can run; AUTO lets the policy decide.
        capability, triton_ok, cutlass_ok: override what the machine reports (tests of the policy).
        count: add the choice (and any fallback reason) to ``torch._dynamo.utils.counters["wush"]``.
    """
    if not isinstance(m, int) or m < 0:
        raise ValueError(f"choose_kernel: m must be a non-negative int, got {m!r}")
    fmt = Format.parse(fmt)
    pinned = KernelChoice.parse(pinned)
    mach = _machine(torch.device(device), capability, triton_ok, cutlass_ok)
    if pinned is not KernelChoice.AUTO:
        ok, why = _supports(pinned, fmt, mach)
        if ok:
            choice, reason = pinned, f"pinned to {pinned.value}"
        else:
            auto, auto_reason = _auto(m, fmt, mach)
            choice, reason = auto, f"pinned {pinned.value} cannot run ({why}); fell back: {auto_reason}"
            if count:
                _count(f"fallback:pinned {pinned.value} unsupported")
            logger.warning("wush dispatch: %s", reason)
    else:
        choice, reason = _auto(m, fmt, mach)
        if count and choice is KernelChoice.REFERENCE and mach.device_type == "cuda":
            _count(f"fallback:reference on cuda ({reason})")
    if count:
        _count(f"kernel:{choice.value}")
    return choice, reason


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the rewrite records for one linear: the kernel string baked into the graph, and why.

    ``graph_kernel`` is a concrete choice when it does not depend on M, else "auto" (the op then calls
    :func:`choose_kernel` with the real M on every call). ``at_hint`` is the choice for the example M.
    """

    graph_kernel: str
    at_hint: KernelChoice
    reason: str
    dynamic_m: bool


def decide(m_hint: int, m_is_static: bool, n: int, k: int, fmt, device, pinned=KernelChoice.AUTO, **machine) -> Decision:
    """Compile-time decision for one node. With a symbolic M, probe a decode-sized and a prefill-sized M: if
    both give the same kernel it is baked in, otherwise the graph says "auto" and the op decides per call."""
    choice, reason = choose_kernel(m_hint, n, k, fmt, device, pinned, **machine)
    if m_is_static:
        return Decision(choice.value, choice, reason, False)
    small, _ = choose_kernel(1, n, k, fmt, device, pinned, count=False, **machine)
    large, _ = choose_kernel(max(PREFILL_PROBE_M, DECODE_MAX_M + 1), n, k, fmt, device, pinned, count=False, **machine)
    if small is large:
        return Decision(choice.value, choice, f"{reason} (for every M)", True)
    return Decision(
        KernelChoice.AUTO.value,
        choice,
        f"M is dynamic: chosen per call (M<={DECODE_MAX_M} -> {small.value}, else {large.value}); "
        f"at the example M={m_hint}: {reason}",
        True,
    )


def runtime_choice(kernel: str, m: int, n: int, k: int, fmt: str, device: torch.device) -> KernelChoice:
    """The concrete kernel for one op call: a baked choice as is; "auto" resolved now (with the current pin)."""
    choice = KernelChoice.parse(kernel)
    if choice is not KernelChoice.AUTO:
        return choice
    return _runtime_auto(m <= DECODE_MAX_M, fmt, str(device), current_pin())


@functools.lru_cache(maxsize=256)
def _runtime_auto(small: bool, fmt: str, device: str, pin: KernelChoice) -> KernelChoice:
    m = 1 if small else max(PREFILL_PROBE_M, DECODE_MAX_M + 1)
    choice, _ = choose_kernel(m, 1, 1, fmt, device, pin, count=False)
    return choice
