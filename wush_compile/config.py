"""Configuration: the enums every other module speaks, and the frozen calibration config.

The numeric constants of the formats live in :mod:`wush_compile.formats`; this module only
names choices. A config is validated once, on construction, with errors that name the bad value
and the fix.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from typing import Any


class _StrEnum(str, enum.Enum):
    """A str-valued enum that parses its own values with a clear error."""

    @classmethod
    def parse(cls, value: Any) -> "_StrEnum":
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{cls.__name__}: unknown value {value!r}; choose one of {choices}")

    def __str__(self) -> str:  # f-strings and logs show the plain value
        return self.value


class Format(_StrEnum):
    """FP4 storage formats (SPEC section 3)."""

    MXFP4 = "mxfp4"  # e2m1 codes, one e8m0 scale per 32 values
    NVFP4 = "nvfp4"  # e2m1 codes, one e4m3 scale per 16 values, fp32 global scale

    @property
    def group_size(self) -> int:
        return 32 if self is Format.MXFP4 else 16


class TransformKind(_StrEnum):
    """Per-block (G, G) transforms (SPEC section 2)."""

    IDENTITY = "identity"
    HADAMARD = "hadamard"
    RANDOM = "random"
    WUS = "wus"
    WUSH = "wush"


class Method(_StrEnum):
    """Weight quantization algorithm (SPEC section 4)."""

    RTN = "rtn"
    GPTQ = "gptq"


class ActScale(_StrEnum):
    """How the NVFP4 activation global scale is chosen (SPEC section 3)."""

    STATIC = "static"  # amax of the transformed calibration activations, with headroom
    FIXED = "fixed"  # the paper's constant (0.1 for both operands)
    DYNAMIC = "dynamic"  # per call: amax of that call's transformed activations (never saturates; see WushLinear)


class KernelChoice(_StrEnum):
    """Which route runs a calibrated linear, named for what it runs. AUTO lets the router
    (:mod:`wush_compile.ops.dispatch`) decide; its table says when each route is taken."""

    AUTO = "auto"
    REFERENCE = "reference"  # the pure-torch twin (any device)
    TRITON_DECODE = "triton_decode"  # small M, Triton: transform+quantize prologue, FP4 weights in registers
    CUDA_DECODE = "cuda_decode"  # small M on sm_90: the Hopper CUDA decode kernels (wush_compile.cuda.decode)
    TRITON_FP8 = "triton_fp8"  # MXFP4 prefill: exact re-encoding into an fp8 GEMM (torch._scaled_mm)
    CUBLAS_BF16 = "cublas_bf16"  # exact bf16 dequantization (Triton) + cuBLAS bf16 GEMM (NVFP4 prefill, fallback)
    FP8CORE = "fp8core"  # MXFP4 as an fp8 tensor-core GEMM expanding FP4 in the kernel (wush_compile.ops.fp8core)
    CUTLASS = "cutlass"  # native block-scaled FP4 MMA (Blackwell cubins)

    #: Deprecated spelling (it runs cuBLAS, not Triton): the same member as CUBLAS_BF16.
    TRITON_BF16 = "cublas_bf16"

    @classmethod
    def _missing_(cls, value: Any) -> "KernelChoice | None":
        if isinstance(value, str) and value.lower() in _DEPRECATED_KERNEL_VALUES:
            new = _DEPRECATED_KERNEL_VALUES[value.lower()]
            warnings.warn(f"kernel {value!r} is deprecated; it is called {new!r} now", DeprecationWarning,
                          stacklevel=3)
            return cls(new)
        return None


#: Old kernel values still accepted (with a DeprecationWarning): old value -> current value.
_DEPRECATED_KERNEL_VALUES = {"triton_bf16": "cublas_bf16"}


#: The choices of the GPTQ knobs of :class:`WushConfig` (the first is the default).
GPTQ_CHOICES = {
    "gptq_order": ("forward", "reverse", "act"),
    "gptq_damp_scope": ("full", "block"),
    "gptq_inblock": ("sequential", "act", "none"),
}

#: The fixed global scale the paper uses for NVFP4 (both operands).
NVFP4_FIXED_GLOBAL_SCALE = 0.1


@dataclasses.dataclass(frozen=True)
class WushConfig:
    """Everything that decides how a model is calibrated. Frozen; validated on construction.

    Args:
        format: "mxfp4" (G=32) or "nvfp4" (G=16). The group size follows from it.
        method: "rtn" or "gptq".
        transform: "identity", "hadamard", "random", "wus" or "wush".
        nsamples: calibration sequences.
        seqlen: tokens per calibration sequence.
        seed: seeds the random transform and the calibration sample order.
        shared_transform: layers that read the same input (q/k/v, gate/up) get one transform computed
            from their concatenated weights, so the runtime quantizes the activation once.
        offload_activations: keep the per-block calibration activations on the CPU between blocks.
        skip_layers: fully qualified names (or suffixes, e.g. "down_proj") of Linears to leave alone.
        damp: relative damping of the Hessians (fraction of the mean diagonal).
        act_scale: NVFP4 activation global scale, "static" (from calibration), "fixed" (paper's 0.1) or "dynamic"
            (from each call's own transformed activations: inputs above the calibration range do not saturate,
            at the cost of one more transform and reduction per call; NVFP4 only).
        act_headroom: the static activation global scale covers this multiple of the calibration amax.
        gptq_order: the order GPTQ walks the column blocks in: "forward" (first to last), "reverse" (last to
            first) or "act" (descending trace of the block's Hessian diagonal; a block stays contiguous).
        gptq_damp_scope: where the GPTQ damping is scaled: "full" (``damp * mean(diag H)`` on all of H) or
            "block" (each block's columns get ``damp * mean(diag H_bb)`` of their own block).
        gptq_inblock: the updates inside a block, in transformed space: "sequential" (column by column,
            left to right), "act" (column by column, largest transformed-Hessian diagonal first) or "none"
            (round every column of the block with the frozen scales; only the block error is propagated).
        sequential: block i is calibrated on the outputs of the already quantized blocks (True, SPEC
            section 4) or of the full-precision blocks (False).
    """

    format: Format = Format.MXFP4
    method: Method = Method.GPTQ
    transform: TransformKind = TransformKind.WUSH
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    shared_transform: bool = False
    offload_activations: bool = True
    skip_layers: tuple[str, ...] = ()
    damp: float = 0.01
    act_scale: ActScale = ActScale.STATIC
    act_headroom: float = 2.0
    gptq_order: str = "forward"
    gptq_damp_scope: str = "full"
    gptq_inblock: str = "sequential"
    sequential: bool = True

    def __post_init__(self) -> None:
        # Accept plain strings for the enums; store the enum.
        for name, enum_cls in (
            ("format", Format),
            ("method", Method),
            ("transform", TransformKind),
            ("act_scale", ActScale),
        ):
            object.__setattr__(self, name, enum_cls.parse(getattr(self, name)))
        if self.act_scale is ActScale.DYNAMIC and self.format is not Format.NVFP4:
            raise ValueError(
                f"WushConfig.act_scale 'dynamic' applies to NVFP4 only; {self.format.value} activation scales are "
                "per-block powers of two with no global scale to saturate - use act_scale='static' (the default)"
            )
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"WushConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"WushConfig.seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.damp, (int, float)) and 0.0 < float(self.damp) < 1.0):
            raise ValueError(f"WushConfig.damp must be in (0, 1), got {self.damp!r}; the usual value is 0.01")
        if not (
            isinstance(self.act_headroom, (int, float))
            and not isinstance(self.act_headroom, bool)
            and 1.0 <= float(self.act_headroom) < float("inf")
        ):
            raise ValueError(f"WushConfig.act_headroom must be a finite number >= 1, got {self.act_headroom!r}")
        skip = (self.skip_layers,) if isinstance(self.skip_layers, str) else self.skip_layers
        if not isinstance(skip, (tuple, list)) or not all(isinstance(s, str) and s for s in skip):
            raise ValueError(
                f"WushConfig.skip_layers must be a list of non-empty layer names or suffixes (e.g. ['down_proj']), "
                f"got {self.skip_layers!r}"
            )
        object.__setattr__(self, "skip_layers", tuple(skip))
        for name, choices in GPTQ_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"WushConfig.{name}: unknown value {getattr(self, name)!r}; choose one of "
                    f"{', '.join(repr(c) for c in choices)}"
                )
        for flag in ("shared_transform", "offload_activations", "sequential"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"WushConfig.{flag} must be True or False, got {getattr(self, flag)!r}")

    @property
    def group_size(self) -> int:
        return self.format.group_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (enums as their values); inverse of :meth:`from_dict`."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WushConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"WushConfig: unknown settings {unknown}; known settings are {sorted(known)}")
        kwargs = dict(data)
        if "skip_layers" in kwargs:
            kwargs["skip_layers"] = tuple(kwargs["skip_layers"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "WushConfig":
        return dataclasses.replace(self, **changes)
