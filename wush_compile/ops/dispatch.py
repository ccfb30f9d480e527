"""The router: which route runs a calibrated linear, and the one place that runs it.

:func:`route` is a pure function of the problem (M bucket, N, K, format), the machine (device type and
capability, what is built and importable: Triton, the Blackwell cubins, the Hopper CUDA decode cubin), the
runtime :class:`~wush_compile.settings.Settings` and the pin. It returns (route, reason); :func:`choose_kernel`
wraps it with the counters and the fallback warning, :func:`decide` bakes a compile-time choice into the graph,
:func:`runtime_choice` resolves "auto" per call. The ops of :mod:`.library` run the chosen route through
:func:`run_linear` / :func:`run_linear_group` / :func:`run_fp4_gemm` / :func:`run_transform_quantize`, the only
callers of the backends (the Triton launchers of :mod:`.kernels`, the CUDA launchers of :mod:`wush_compile.cuda`),
and :func:`prepare` / :func:`clear` hold the backends' device state for the compiler backend.

The automatic choice is :data:`AUTO_ROUTES`, read top to bottom; the first row whose M bucket and format match,
whose switch is on and that can run on the machine (:func:`supports`) wins:

    ==============  =======  ======  =====================  ==========================================
    route           M        format  on when                runs
    ==============  =======  ======  =====================  ==========================================
    cutlass         any      any     always                 native block-scaled FP4 MMA (capability 10.x/12.x)
    fp8core         prefill  mxfp4   never (slot)           fp8 tensor-core GEMM, FP4 expanded in the kernel
    cuda_decode     decode   any     WUSH_CUDA_DECODE=1     the Hopper CUDA decode kernels (sm_90, K % 256 == 0)
    triton_decode   decode   any     always                 Triton: fused transform+quantize, FP4 in registers
    triton_fp8      prefill  mxfp4   always                 exact MXFP4 -> fp8 re-encoding, torch._scaled_mm
    cublas_bf16     prefill  any     always                 exact bf16 dequantization (Triton) + cuBLAS bf16
    ==============  =======  ======  =====================  ==========================================

before it: tensors off CUDA run the reference (the torch twin), and so does CUDA without Triton or below
:data:`MIN_TRITON_CAPABILITY` when no cubin route applies. "decode" is M <= :data:`DECODE_MAX_M`.

A pinned route (``wush_compile.pin_kernel`` or ``options={"kernel": ...}``) wins when it can run; when it cannot
(wrong format, wrong device, M out of its range, kernels missing) the automatic choice runs instead and the
reason says why - a fallback is never silent.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from typing import Iterable, Iterator, Optional, Sequence

import torch

from .. import settings
from ..config import Format, KernelChoice
from . import reference
from .operands import LinearOperands

logger = logging.getLogger(__name__)

__all__ = [
    "DECODE_MAX_M",
    "MIN_TRITON_CAPABILITY",
    "MIN_FP8_CAPABILITY",
    "CUTLASS_CAPABILITY_MAJORS",
    "CUDA_DECODE_CAPABILITY",
    "FP4_GEMM_TRITON_MAX_M",
    "PREFILL_PROBE_M",
    "AutoRoute",
    "AUTO_ROUTES",
    "Machine",
    "Decision",
    "route",
    "machine",
    "choose_kernel",
    "decide",
    "pin_kernel",
    "current_pin",
    "kernel_path",
    "supports",
    "triton_kernels_status",
    "TRITON_CHOICES",
    "runtime_choice",
    "gemm_route",
    "run_linear",
    "run_linear_group",
    "run_fp4_gemm",
    "run_transform_quantize",
    "prepare",
    "clear",
]

# ---- thresholds (the kernels engineer tunes these from measurements) ----
#: Largest M (tokens in the call) that takes a decode route. Measured on an H100 (benchmarks/RESULTS.md,
#: 2026-11-23): the decode kernel is the fastest route at M = 1 and 16 on every shape and format, and slower
#: than the prefill routes at M = 128 on all of them.
DECODE_MAX_M = 16
#: Oldest capability the Triton kernels run on (bf16 MMA).
MIN_TRITON_CAPABILITY = (8, 0)
#: Oldest capability with fp8 tensor cores (the MXFP4 -> fp8 re-encoding).
MIN_FP8_CAPABILITY = (8, 9)
#: Capability majors with native block-scaled FP4 MMA (Blackwell datacenter / consumer).
CUTLASS_CAPABILITY_MAJORS = (10, 12)
#: The one capability the Hopper CUDA decode cubin is built for (sm_90a).
CUDA_DECODE_CAPABILITY = (9, 0)
#: ``wush::fp4_gemm`` (quantized activations given) runs the Triton FP4 GEMM up to this M for MXFP4, above it
#: (and for NVFP4) exact bf16 dequantization + cuBLAS.
FP4_GEMM_TRITON_MAX_M = 64
#: M used to ask "what would a long prefill take" when M is symbolic at compile time.
PREFILL_PROBE_M = 4096
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AutoRoute:
    """One row of the automatic choice: ``route`` is taken for M in ``bucket`` ("decode", "prefill" or "any")
    and the ``formats`` listed when the switch ``on`` is true ("always", "never" or the name of a
    :class:`~wush_compile.settings.Settings` field) and :func:`supports` says it can run. ``off_reason`` is
    what the report says about a row that is never on."""

    route: KernelChoice
    bucket: str
    formats: tuple[Format, ...]
    on: str = "always"
    off_reason: str = ""


_ANY_FORMAT = (Format.MXFP4, Format.NVFP4)

#: The automatic choice, first applicable row wins (see the module doc for the table in words).
AUTO_ROUTES: tuple[AutoRoute, ...] = (
    AutoRoute(KernelChoice.CUTLASS, "any", _ANY_FORMAT),
    # The slot of the fp8 tensor-core route (wush_compile.ops.fp8core): off until it is measured faster than
    # triton_fp8 end to end.
    AutoRoute(KernelChoice.FP8CORE, "prefill", (Format.MXFP4,), on="never", off_reason="not measured faster"),
    # Off by default: per layer in isolation the CUDA decode kernels beat the Triton ones (1.32x vs 1.22x bf16,
    # geomean), but end to end under CUDA graphs the Triton route was faster (Llama-3.1-8B shape, H100,
    # 2026-11-23: 179.3 vs 169.4 tok/s at batch 1, 2051 vs 2002 at batch 16; benchmarks/RESULTS.md).
    AutoRoute(KernelChoice.CUDA_DECODE, "decode", _ANY_FORMAT, on="cuda_decode"),
    AutoRoute(KernelChoice.TRITON_DECODE, "decode", _ANY_FORMAT),
    AutoRoute(KernelChoice.TRITON_FP8, "prefill", (Format.MXFP4,)),
    AutoRoute(KernelChoice.CUBLAS_BF16, "prefill", _ANY_FORMAT),
)

#: The routes the Triton launcher module (:mod:`.kernels`) runs.
TRITON_CHOICES = (KernelChoice.TRITON_DECODE, KernelChoice.TRITON_FP8, KernelChoice.CUBLAS_BF16)

_PATHS = {
    KernelChoice.REFERENCE: "reference (torch twin)",
    KernelChoice.TRITON_DECODE: "decode (fused transform+quantize prologue, FP4 weights in registers)",
    KernelChoice.CUDA_DECODE: "decode (Hopper CUDA kernels: transform+quantize, then swap-AB stream-K mma.sync)",
    KernelChoice.TRITON_FP8: "prefill (exact MXFP4 -> fp8 re-encoding, fp8 GEMM)",
    KernelChoice.CUBLAS_BF16: "prefill (exact bf16 dequantization, cuBLAS bf16 GEMM)",
    KernelChoice.FP8CORE: "prefill (fp8 tensor-core GEMM, FP4 weights expanded to e4m3 in the kernel)",
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


def _cuda_decode_status(device: str) -> tuple[bool, str]:
    try:
        from ..cuda import decode as cuda_decode

        return cuda_decode.available(torch.device(device))
    except Exception as exc:  # a loader failure is a reason, not a crash
        return False, f"wush_compile.cuda.decode.available failed ({type(exc).__name__}: {exc})"


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the router knows about where a call runs: device type and capability, whether each backend can
    run there ((ok, reason) pairs) and the runtime switches."""

    device_type: str
    capability: Optional[tuple[int, int]]
    triton: tuple[bool, str]
    cutlass: tuple[bool, str]
    cuda_decode: tuple[bool, str]
    settings: settings.Settings

    @property
    def interpreter(self) -> bool:
        return self.settings.triton_interpret


def _status(given, default) -> tuple[bool, str]:
    if isinstance(given, bool):
        return given, "given"
    if given is not None:
        return tuple(given)  # type: ignore[return-value]
    return default()


def machine(device, capability=None, triton_ok=None, cutlass_ok=None, cuda_decode_ok=None,
            switches: Optional[settings.Settings] = None) -> Machine:
    """The :class:`Machine` of ``device`` now; the keywords override what it reports (tests of the policy)."""
    device = torch.device(device)
    if device.type == "cuda":
        cap = tuple(capability) if capability is not None else _capability(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    else:
        cap = tuple(capability) if capability is not None else None
    switches = switches if switches is not None else settings.current()
    triton = _status(triton_ok, triton_kernels_status)
    blackwell = device.type == "cuda" and cap is not None and cap[0] in CUTLASS_CAPABILITY_MAJORS
    if switches.cutlass_disabled and cutlass_ok is None:
        cutlass = (False, "the CUTLASS cubin path is disabled by WUSH_DISABLE_CUTLASS")
    else:
        cutlass = _status(cutlass_ok, (lambda: _cutlass_status(str(device))) if blackwell
                          else (lambda: (False, "not a Blackwell device")))
    hopper = device.type == "cuda" and cap == CUDA_DECODE_CAPABILITY
    if switches.cuda_decode_disabled:
        cuda_dec = (False, "the CUDA decode kernels are disabled by WUSH_DISABLE_CUDA_DECODE")
    else:
        cuda_dec = _status(cuda_decode_ok, (lambda: _cuda_decode_status(str(device))) if hopper
                           else (lambda: (False, f"the CUDA decode kernels need capability "
                                                 f"{CUDA_DECODE_CAPABILITY}, this is {device.type} {cap}")))
    return Machine(device.type, cap, triton, cutlass, cuda_dec, switches)


def _machine_of(device, overrides: dict) -> Machine:
    return machine(device, overrides.get("capability"), overrides.get("triton_ok"), overrides.get("cutlass_ok"),
                   overrides.get("cuda_decode_ok"), overrides.get("switches"))


def supports(choice: KernelChoice | str, fmt: Format | str, device, m: Optional[int] = None, n: int = 1,
             k: Optional[int] = None, **overrides) -> tuple[bool, str]:
    """Whether ``choice`` can run format ``fmt`` on ``device`` (for M tokens, N x K weights where the route
    cares; None = any): (ok, reason when not)."""
    choice, fmt = KernelChoice.parse(choice), Format.parse(fmt)
    return _supports(choice, fmt, m, n, k, _machine_of(device, overrides))


def _supports(choice: KernelChoice, fmt: Format, m: Optional[int], n: int, k: Optional[int],
              mach: Machine) -> tuple[bool, str]:
    if choice is KernelChoice.REFERENCE:
        return True, ""
    if choice is KernelChoice.AUTO:
        return False, "auto is not a concrete kernel"
    if choice is KernelChoice.CUTLASS:
        if mach.device_type != "cuda":
            return False, f"cutlass needs CUDA tensors, these are on {mach.device_type}"
        return mach.cutlass if not mach.cutlass[0] else (True, "")
    if choice is KernelChoice.FP8CORE:
        return _supports_fp8core(fmt, k, mach)
    if choice is KernelChoice.CUDA_DECODE:
        return _supports_cuda_decode(fmt, m, n, k, mach)
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
            return False, f"triton_fp8 re-encodes MXFP4 exactly into fp8; {fmt.value} scales do not fold (use cublas_bf16)"
        if mach.device_type == "cuda" and mach.capability is not None and mach.capability < MIN_FP8_CAPABILITY:
            return False, f"capability {mach.capability} has no fp8 tensor cores (needs {MIN_FP8_CAPABILITY})"
    return True, ""


def _supports_fp8core(fmt: Format, k, mach: Machine) -> tuple[bool, str]:
    if fmt is not Format.MXFP4:
        return False, f"fp8core folds MXFP4's power-of-two scales exactly into e4m3; {fmt.value} has no exact fold"
    if k is not None and k % 128:
        return False, f"fp8core needs K % 128 == 0, this layer has K={k}"
    if not mach.triton[0]:
        return False, mach.triton[1]
    if mach.device_type == "cpu":
        return (True, "") if mach.interpreter else (False, "Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    if mach.device_type != "cuda":
        return False, f"fp8core needs CUDA tensors, these are on {mach.device_type}"
    if mach.capability is not None and mach.capability < MIN_FP8_CAPABILITY:
        return False, f"capability {mach.capability} has no fp8 tensor cores (needs {MIN_FP8_CAPABILITY})"
    return True, ""


def _supports_cuda_decode(fmt: Format, m, n, k, mach: Machine) -> tuple[bool, str]:
    if mach.device_type != "cuda":
        return False, f"cuda_decode needs CUDA tensors, these are on {mach.device_type}"
    if not mach.cuda_decode[0]:
        return False, mach.cuda_decode[1]
    from ..cuda import decode as cuda_decode  # the kernels' own shape rule (pure; imports no driver)

    ok, why = cuda_decode.supports(1 if m is None else m, n, cuda_decode.STAGE_K if k is None else k, fmt,
                                   torch.float32)
    return (True, "") if ok else (False, why)


# ---- the choice ----


def _bucket(m: int) -> str:
    return "decode" if m <= DECODE_MAX_M else "prefill"


def _row_on(row: AutoRoute, mach: Machine) -> bool:
    if row.on == "always":
        return True
    if row.on == "never":
        return False
    return bool(getattr(mach.settings, row.on))


def _auto(m: int, n: int, k: int, fmt: Format, mach: Machine) -> tuple[KernelChoice, str]:
    if mach.device_type != "cuda":
        return KernelChoice.REFERENCE, f"{mach.device_type} tensors run the torch reference"
    notes: list[str] = []
    blackwell = mach.capability is not None and mach.capability[0] in CUTLASS_CAPABILITY_MAJORS
    bucket = _bucket(m)
    skipped_fp8 = ""
    for row in AUTO_ROUTES:
        if row.bucket not in ("any", bucket) or fmt not in row.formats or not _row_on(row, mach):
            continue
        if row.route is KernelChoice.CUTLASS:
            if not blackwell:
                continue
            if mach.cutlass[0]:
                return KernelChoice.CUTLASS, f"capability {mach.capability}: native FP4 MMA"
            notes.append(f"no cutlass ({mach.cutlass[1]})")
            # the Triton routes below need Triton and a capability it runs on
            if not mach.triton[0]:
                return KernelChoice.REFERENCE, "; ".join(notes + [mach.triton[1]])
            continue
        if row.route in TRITON_CHOICES or row.route is KernelChoice.CUDA_DECODE:
            if not mach.triton[0]:
                return KernelChoice.REFERENCE, "; ".join(notes + [mach.triton[1]])
            if mach.capability is not None and mach.capability < MIN_TRITON_CAPABILITY:
                return KernelChoice.REFERENCE, f"capability {mach.capability} below {MIN_TRITON_CAPABILITY}"
        ok, why = _supports(row.route, fmt, m, n, k, mach)
        prefix = "; ".join(notes) + "; " if notes else ""
        if not ok:
            if row.route is KernelChoice.TRITON_FP8:
                skipped_fp8 = why
            elif row.route is KernelChoice.CUDA_DECODE:
                notes.append(f"no cuda_decode ({why})")
            continue
        if row.route is KernelChoice.CUDA_DECODE:
            return row.route, f"{prefix}M={m} <= DECODE_MAX_M={DECODE_MAX_M}: CUDA decode kernels"
        if row.route is KernelChoice.TRITON_DECODE:
            return row.route, f"{prefix}M={m} <= DECODE_MAX_M={DECODE_MAX_M}: decode kernel"
        if row.route is KernelChoice.TRITON_FP8:
            return row.route, f"{prefix}M={m} > {DECODE_MAX_M}, mxfp4: exact fp8 re-encoding"
        if row.route is KernelChoice.CUBLAS_BF16:
            if skipped_fp8:
                return row.route, f"{prefix}M={m} > {DECODE_MAX_M}, mxfp4 but {skipped_fp8}: bf16 path"
            return row.route, f"{prefix}M={m} > {DECODE_MAX_M}, {fmt.value}: exact bf16 dequantization"
        return row.route, f"{prefix}M={m}: {row.route.value}"
    return KernelChoice.REFERENCE, "; ".join(notes + ["no route applies"])


def route(m: int, n: int, k: int, fmt: Format | str, mach: Machine,
          pinned: KernelChoice | str = KernelChoice.AUTO) -> tuple[KernelChoice, str, bool]:
    """The routing policy, a pure function: (route, reason, whether a pin could not run) for an (M, K) x (N, K)
    calibrated linear on ``mach`` (see :func:`machine`)."""
    fmt, pinned = Format.parse(fmt), KernelChoice.parse(pinned)
    if pinned is not KernelChoice.AUTO:
        ok, why = _supports(pinned, fmt, m, n, k, mach)
        if ok:
            return pinned, f"pinned to {pinned.value}", False
        auto, auto_reason = _auto(m, n, k, fmt, mach)
        return auto, f"pinned {pinned.value} cannot run ({why}); fell back: {auto_reason}", True
    choice, reason = _auto(m, n, k, fmt, mach)
    return choice, reason, False


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
    cuda_decode_ok: Optional[bool] = None,
    switches: Optional[settings.Settings] = None,
    count: bool = True,
) -> tuple[KernelChoice, str]:
    """Pick the route for an (M, K) x (N, K) calibrated linear: returns (choice, reason).

    Args:
        m, n, k: tokens in the call, output features, input features.
        fmt: "mxfp4" or "nvfp4".
        device: where the tensors live (``torch.device`` or string).
        pinned: a concrete choice to use if it can run; AUTO lets the policy decide.
        capability, triton_ok, cutlass_ok, cuda_decode_ok, switches: override what the machine reports and the
            runtime settings (tests of the policy).
        count: add the choice (and any fallback reason) to ``torch._dynamo.utils.counters["wush"]``.
    """
    if not isinstance(m, int) or m < 0:
        raise ValueError(f"choose_kernel: m must be a non-negative int, got {m!r}")
    fmt = Format.parse(fmt)
    pinned = KernelChoice.parse(pinned)
    mach = machine(device, capability, triton_ok, cutlass_ok, cuda_decode_ok, switches)
    choice, reason, fell_back = route(m, n, k, fmt, mach, pinned)
    if fell_back:
        if count:
            _count(f"fallback:pinned {pinned.value} unsupported")
        logger.warning("wush dispatch: %s", reason)
    elif count and choice is KernelChoice.REFERENCE and mach.device_type == "cuda" and pinned is KernelChoice.AUTO:
        _count(f"fallback:reference on cuda ({reason})")
    if count:
        _count(f"kernel:{choice.value}")
    return choice, reason


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the rewrite records for one linear: the kernel string baked into the graph, and why.

    ``graph_kernel`` is a concrete choice when it does not depend on M, else "auto" (the op then calls
    :func:`runtime_choice` with the real M on every call). ``at_hint`` is the choice for the example M.
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


def runtime_choice(kernel: str, m: int, n: int, k: int, fmt, device: torch.device) -> KernelChoice:
    """The concrete kernel for one op call: a baked choice as is; "auto" resolved now (with the current pin and
    the settings as they are now)."""
    choice = KernelChoice.parse(kernel)
    if choice is not KernelChoice.AUTO:
        return choice
    dev = str(device)
    pin = current_pin()
    return _runtime_auto(m <= DECODE_MAX_M, n, k, Format.parse(fmt), dev, pin, _routing_switches(dev, pin))


@functools.lru_cache(maxsize=None)
def _device_family(device: str) -> str:
    d = torch.device(device)
    if d.type != "cuda":
        return d.type
    cap = _capability(d.index if d.index is not None else torch.cuda.current_device())
    if cap == CUDA_DECODE_CAPABILITY:
        return "hopper"
    return "blackwell" if cap[0] in CUTLASS_CAPABILITY_MAJORS else "cuda"


def _routing_switches(device: str, pin: KernelChoice) -> tuple[bool, bool, bool, bool]:
    """(triton_interpret, cuda_decode, cuda_decode_disabled, cutlass_disabled) as far as they can change the
    choice on ``device``, read now (one environment lookup in the common case: this runs on every "auto" call)."""
    family = _device_family(device)
    if family == "hopper":
        on = settings.cuda_decode()
        off = (on or pin is KernelChoice.CUDA_DECODE) and settings.cuda_decode_disabled()
        return False, on, off, False
    if family == "blackwell":
        return False, False, False, settings.cutlass_disabled()
    if family == "cpu" and pin is not KernelChoice.AUTO:
        return settings.triton_interpret(), False, False, False
    return False, False, False, False


@functools.lru_cache(maxsize=1024)
def _runtime_auto(small: bool, n: int, k: int, fmt: Format, device: str, pin: KernelChoice,
                  switches: tuple[bool, bool, bool, bool]) -> KernelChoice:
    interp, cuda_dec, cuda_dec_off, cutlass_off = switches
    now = settings.Settings(triton_interpret=interp, cuda_decode=cuda_dec, cuda_decode_disabled=cuda_dec_off,
                            cutlass_disabled=cutlass_off)
    m = 1 if small else max(PREFILL_PROBE_M, DECODE_MAX_M + 1)
    choice, _ = choose_kernel(m, n, k, fmt, device, pin, switches=now, count=False)
    return choice


def gemm_route(m: int, fmt: Format | str) -> KernelChoice:
    """The route of ``wush::fp4_gemm`` on CUDA (activations already quantized): the Triton FP4 GEMM
    (TRITON_DECODE's split-K kernel) for MXFP4 up to :data:`FP4_GEMM_TRITON_MAX_M`, else CUBLAS_BF16."""
    if m <= FP4_GEMM_TRITON_MAX_M and Format.parse(fmt) is Format.MXFP4:
        return KernelChoice.TRITON_DECODE
    return KernelChoice.CUBLAS_BF16


# ---- running a route (the only caller of the backends) ----

#: The backend modules this process has used (what :func:`clear` clears).
_USED: dict[str, object] = {}


@functools.lru_cache(maxsize=None)
def _note_once(message: str) -> None:
    logger.warning("%s", message)


def _kernels():
    """The Triton launchers module, or None (with one logged note) when it cannot be imported."""
    ok, why = triton_kernels_status()
    if not ok:
        _note_once(f"wush ops: Triton kernels unavailable, running the torch reference instead: {why}")
        return None
    from . import kernels

    _USED["kernels"] = kernels
    return kernels


def _cuda():
    try:
        from .. import cuda as wcuda
    except Exception as exc:
        _note_once(f"wush ops: wush_compile.cuda unavailable ({type(exc).__name__}: {exc}); reference instead")
        return None
    _USED["cuda"] = wcuda
    return wcuda


def _fp8core():
    from . import fp8core

    _USED["fp8core"] = fp8core
    return fp8core


def _runnable(choice: KernelChoice, x: torch.Tensor, fmt: Format) -> KernelChoice:
    """Triton on CPU tensors runs only in the interpreter; anything that cannot run on CPU is the reference."""
    if x.device.type == "cpu" and choice is not KernelChoice.REFERENCE:
        ok, why = supports(choice, fmt, x.device)
        if not ok:
            _note_once(f"wush ops: kernel {choice.value} cannot run on CPU tensors ({why}); reference instead")
            return KernelChoice.REFERENCE
    return choice


def run_linear(choice: KernelChoice, x2: torch.Tensor, ops: LinearOperands) -> torch.Tensor:
    """(M, K) -> (M, N) with the given concrete route on checked operands (from :meth:`LinearOperands.checked`)."""
    choice = _runnable(choice, x2, ops.fmt)
    if choice in TRITON_CHOICES:
        kernels = _kernels()
        if kernels is not None:
            return kernels.run_linear(x2.contiguous(), ops, choice)
    elif choice is KernelChoice.CUDA_DECODE:
        wcuda = _cuda()
        if wcuda is not None:
            if x2.shape[0] == 0:
                return x2.new_empty((0, ops.n))
            return wcuda.decode.linear(x2.contiguous(), *ops.args())
    elif choice is KernelChoice.CUTLASS:
        wcuda = _cuda()
        if wcuda is not None:
            return wcuda.run_linear(x2.contiguous(), ops)
    elif choice is KernelChoice.FP8CORE:
        return _fp8core().run_linear(x2.contiguous(), ops)
    return reference.linear_ref(x2, *ops.args())


def run_linear_group(choice: KernelChoice, x2: torch.Tensor, members: Sequence[LinearOperands]) -> list[torch.Tensor]:
    """Members sharing x (M, K), the transform and the act scale, on one route: (M, N_i) per member."""
    fmt = members[0].fmt
    choice = _runnable(choice, x2, fmt)
    kernels = _kernels() if choice in TRITON_CHOICES else None
    if kernels is not None:
        # The Triton decode route quantizes x once for the group; elsewhere each member's kernel quantizes it.
        outs = kernels.run_linear_group(x2.contiguous(), members, choice)
        if outs is None:
            outs = [kernels.run_linear(x2.contiguous(), ops, choice) for ops in members]
        return outs
    if choice is KernelChoice.FP8CORE:
        return _fp8core().run_linear_group(x2.contiguous(), members)
    if choice in (KernelChoice.CUTLASS, KernelChoice.CUDA_DECODE):
        return [run_linear(choice, x2, ops) for ops in members]
    # Reference: transform + quantize x once, then one FP4 GEMM per member on the shared codes.
    first = members[0]
    a_codes, a_scales = reference.transform_quantize_ref(x2, first.transform, first.act_global_scale, fmt.value)
    return [
        reference.fp4_gemm_ref(a_codes, a_scales, first.act_global_scale, ops.weight_codes, ops.weight_scales,
                               ops.weight_global_scale, ops.bias, fmt.value, x2.dtype)
        for ops in members
    ]


def run_transform_quantize(x2: torch.Tensor, transform: torch.Tensor, act_global_scale: torch.Tensor,
                           fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """``wush::transform_quantize`` on CUDA tensors (M, K): the Triton kernel, else the torch twin."""
    kernels = _kernels()
    if kernels is not None:
        return kernels.transform_quantize(x2.contiguous(), transform, act_global_scale, fmt.value)
    return reference.transform_quantize_ref(x2, transform, act_global_scale, fmt.value)


def run_fp4_gemm(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias, fmt: Format,
                 out_dtype) -> torch.Tensor:
    """``wush::fp4_gemm`` on CUDA tensors: the route of :func:`gemm_route`, else the torch twin."""
    kernels = _kernels()
    if kernels is None:
        return reference.fp4_gemm_ref(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias,
                                      fmt.value, out_dtype)
    return kernels.fp4_gemm(a_codes.contiguous(), a_scales.contiguous(), a_global_scale, w_codes, w_scales,
                            w_global_scale, bias, fmt.value, out_dtype, route=gemm_route(a_codes.shape[0], fmt))


# ---- device state ----


def prepare(device, transforms: Sequence[torch.Tensor] = (), biases: Sequence[torch.Tensor] = (),
            routes: Iterable[KernelChoice | str] = ()) -> None:
    """Allocate the backends' persistent device buffers on ``device`` now (outside any CUDA-graph capture or
    graph memory pool): the Triton launchers' always, the CUDA decode kernels' (with per-layer fp32 copies of
    ``transforms`` and ``biases``) when ``routes`` (the graph's baked kernels) may take the CUDA decode route.
    Idempotent; the compiler backend calls it for every graph it rewrites."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kernels = _kernels()
    if kernels is not None:
        kernels.prepare(device)
    routes = {KernelChoice.parse(r) for r in routes}
    maybe_cuda_decode = KernelChoice.CUDA_DECODE in routes or (
        KernelChoice.AUTO in routes and settings.cuda_decode()
    )
    if maybe_cuda_decode and machine(device).cuda_decode[0]:
        wcuda = _cuda()
        if wcuda is not None:
            wcuda.decode.prepare(device, transforms, biases)


def clear() -> None:
    """Drop the backends' device state and derived per-layer operands (fp32 transforms, swizzled scales) that
    hold their sources alive; the next call allocates again. The compiler backend calls it when dynamo resets."""
    for mod in list(_USED.values()):
        mod.clear()  # type: ignore[attr-defined]

    _runtime_auto.cache_clear()
    _device_family.cache_clear()
