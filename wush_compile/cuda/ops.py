"""torch.library ops ``wush::cutlass_*`` (with fake implementations) and the launchers the runtime calls.

Ops (CUDA; each has a fake for tracing):

- ``wush::cutlass_transform_quantize(x, transform, act_global_scale, fmt, swizzled) -> (codes, scales)``: the
  fused per-block transform + FP4 quantize kernel; ``swizzled`` writes the scales in the 128x4 layout the
  block-scaled GEMMs read (a 1-D buffer, see :mod:`.layout`), else row-major (M, K/G) like the reference.
- ``wush::cutlass_fp4_gemm(a_codes, a_scales, a_gs, w_codes, w_scales, w_gs, bias, fmt, out_dtype)``: the
  block-scaled FP4 GEMM (sm_100a / sm_120a); both scale arguments are swizzled buffers.
- ``wush::cutlass_linear(x, w_codes, w_scales, transform, w_gs, a_gs, bias, fmt)``: the calibrated linear
  (same arguments as ``wush::linear``; row-major weight scales, swizzled once per weight and cached).

Launchers with the signatures of the torch twins in :mod:`wush_compile.ops.reference`:
:func:`transform_quantize`, :func:`fp4_gemm`, :func:`linear`. None of them synchronizes the host; all run on
the current stream and can be captured in a CUDA graph once warmed up.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, Optional

import torch

from ..config import Format
from ..ops.checks import check_linear_args
from ..ops.operands import LinearOperands
from . import builder, layout, loader

__all__ = [
    "cutlass_transform_quantize",
    "cutlass_fp4_gemm",
    "cutlass_linear",
    "transform_quantize",
    "fp4_gemm",
    "linear",
    "run_linear",
    "fp4_arch",
]

_OUT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_FP4_ARCHS = ("sm_100a", "sm_120a")


# ---------------------------------------------------------------- helpers


def _device_arch(device: torch.device) -> str:
    return _arch_of_index(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _arch_of_index(index: int) -> str:
    cap = tuple(torch.cuda.get_device_capability(index))
    arch = loader.arch_for_capability(cap)
    if arch is None:
        raise loader.CudaUnavailable(
            f"cuda:{index} has compute capability {cap[0]}.{cap[1]}; the cubins are built for "
            + ", ".join(f"{a} ({c[0]}.{c[1]})" for a, (c, _) in builder.ARCHS.items())
        )
    return arch


def fp4_arch(device: torch.device) -> str:
    """The FP4 GEMM architecture of ``device`` (sm_100a / sm_120a), or CudaUnavailable saying why not."""
    arch = _device_arch(device)
    if arch not in _FP4_ARCHS:
        raise loader.CudaUnavailable(
            f"{device} ({arch}) has no block-scaled FP4 tensor cores; the FP4 cubins target {', '.join(_FP4_ARCHS)}"
        )
    return arch


def _index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _require(cond: bool, exc: type, msg: Callable[[], str]) -> None:
    """Raise ``exc(msg())`` unless ``cond``; the message is only formatted on failure (these checks run on every
    eager call, where formatting shapes and devices would cost more than the launch)."""
    if not cond:
        raise exc(msg())


def _check_aligned(name: str, t: torch.Tensor) -> None:
    _require(t.data_ptr() % 16 == 0, ValueError,
             lambda: f"{name} starts at an address that is not 16-byte aligned (a view with an offset?); pass a fresh "
             "contiguous tensor (.clone())")


def _check_scalar(name: str, t: torch.Tensor, device: torch.device) -> None:
    _require(t.dtype == torch.float32 and t.numel() == 1, TypeError,
             lambda: f"{name} must be an fp32 scalar tensor, got {t.dtype} of shape {tuple(t.shape)}")
    _require(t.device == device, ValueError,
             lambda: f"{name} is on {t.device} but the operands are on {device}; move it")


def _check_bias(bias: Optional[torch.Tensor], n: int, device: torch.device) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    _require(tuple(bias.shape) == (n,), ValueError, lambda: f"bias must be ({n},), got {tuple(bias.shape)}")
    _require(bias.device == device, ValueError, lambda: f"bias is on {bias.device} but the operands are on {device}")
    return bias.to(torch.float32).contiguous()  # the epilogue adds it in fp32, like the reference


# ---------------------------------------------------------------- per-tensor caches


class _DerivedCache:
    """Derived tensors (swizzled weight scales, fp32 transforms, fp32 biases) cached per source storage, shape,
    strides and version.

    Keyed by data pointer rather than object identity: compiled code may hand the kernels a fresh view of the same
    buffer. Each entry holds its source alive, so a cached pointer can never be reused by another tensor. Under
    CUDA graphs a derived tensor made lazily during warm-up would land in the graph's memory pool, untracked;
    the backend makes them beforehand, at compile time (``dispatch.prepare``)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], size: int = 4096):
        self._fn = fn
        self._size = size
        self._entries: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride())

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[1] == t._version:
                return hit[2]
        value = self._fn(t)
        with self._lock:
            if len(self._entries) >= self._size:
                self._entries.clear()
            self._entries[key] = (t, t._version, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_swizzled_scales = _DerivedCache(layout.to_swizzled)
fp32_transform = _DerivedCache(lambda t: t.to(torch.float32).contiguous())
fp32_bias = _DerivedCache(lambda t: t.to(torch.float32).contiguous())


def clear_caches() -> None:
    """Drop every derived tensor (called when dynamo resets, with the recorded CUDA graphs that used them)."""
    for cache in (_swizzled_scales, fp32_transform, fp32_bias):
        cache.clear()


# ---------------------------------------------------------------- transform + quantize


def _require_cuda(t: torch.Tensor, op: str) -> None:
    _require(t.device.type == "cuda", ValueError,
             lambda: f"{op} runs CUDA tensors only, got a tensor on {t.device}; use the reference ops "
             "(wush_compile.ops.reference) on the CPU")


def _check_quantize_args(x, transform, act_global_scale, fmt) -> Format:
    f = Format.parse(fmt)
    g = f.group_size
    _require(x.dim() == 2, ValueError,
             lambda: f"transform_quantize expects 2-D activations (M, K), got {tuple(x.shape)}")
    _require(x.dtype in _OUT_NAMES, TypeError,
             lambda: f"activations must be float32, bfloat16 or float16, got {x.dtype}; cast the input")
    m, k = x.shape
    _require(k % g == 0 and k % layout.GEMM_ALIGN_K == 0, ValueError,
             lambda: f"K={k} must be a multiple of {layout.GEMM_ALIGN_K} for the CUDA kernels "
             f"({f.value} groups are {g}); "
             "pad K or use the Triton / reference kernels")
    if transform is not None:
        _require(tuple(transform.shape) == (k // g, g, g), ValueError,
                 lambda: f"transform must be {(k // g, g, g)}, got {tuple(transform.shape)}")
        _require(transform.is_floating_point(), TypeError,
                 lambda: f"transform must be floating point, got {transform.dtype}")
        _require(transform.device == x.device, ValueError,
                 lambda: f"transform is on {transform.device}, x on {x.device}")
    _check_scalar("act_global_scale", act_global_scale, x.device)
    return f


@torch.library.custom_op("wush::cutlass_transform_quantize", mutates_args=())
def cutlass_transform_quantize(
    x: torch.Tensor, transform: Optional[torch.Tensor], act_global_scale: torch.Tensor, fmt: str, swizzled: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused blockwise transform + quantize on (M, K): codes (M, K/2) uint8 and scales (swizzled or (M, K/G))."""
    _require_cuda(x, "wush::cutlass_transform_quantize")
    f = _check_quantize_args(x, transform, act_global_scale, fmt)
    m, k = x.shape
    g = f.group_size
    if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
        x = x.contiguous() if not x.is_contiguous() else x.clone()  # 16-byte row loads
    t = fp32_transform(transform) if transform is not None else None
    codes = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
    if swizzled:
        n_sf = layout.swizzled_scale_numel(m, k // g)
        padded = n_sf != m * (k // g)
        scales = (torch.zeros if padded else torch.empty)(n_sf, dtype=torch.uint8, device=x.device)
    else:
        scales = torch.empty((m, k // g), dtype=torch.uint8, device=x.device)
    plan = layout.quantize_launch(m, k, f, x.dtype, t is not None)
    arch = _device_arch(x.device)
    idx = _index(x)
    fn = loader.quantize_kernel(arch, plan.kernel, idx, plan.smem_bytes)
    args = loader.WushQuantArgs(
        x=x.data_ptr(), t=_ptr(t), gs=act_global_scale.data_ptr(), codes=codes.data_ptr(), scales=scales.data_ptr(),
        m=m, k=k, x_row_stride=x.stride(0), swizzled=int(swizzled), reserved=0,
    )
    loader.launch(fn, plan.grid, plan.block, plan.smem_bytes, torch.cuda.current_stream(x.device).cuda_stream, args)
    return codes, scales


@cutlass_transform_quantize.register_fake
def _(x, transform, act_global_scale, fmt, swizzled):
    f = _check_quantize_args(x, transform, act_global_scale, fmt)
    m, k = x.shape
    g = f.group_size
    codes = x.new_empty((m, k // 2), dtype=torch.uint8)
    if swizzled:
        rows = (m + layout.SF_TILE_ROWS - 1) // layout.SF_TILE_ROWS * layout.SF_TILE_ROWS
        cols = (k // g + layout.SF_TILE_COLS - 1) // layout.SF_TILE_COLS * layout.SF_TILE_COLS
        scales = x.new_empty((rows * cols,), dtype=torch.uint8)
    else:
        scales = x.new_empty((m, k // g), dtype=torch.uint8)
    return codes, scales


# ---------------------------------------------------------------- FP4 GEMM


def _check_fp4_gemm_args(a_codes, a_scales, a_gs, w_codes, w_scales, w_gs, bias, fmt, out_dtype):
    f = Format.parse(fmt)
    g = f.group_size
    for name, t in (("a_codes", a_codes), ("w_codes", w_codes)):
        _require(t.dtype == torch.uint8 and t.dim() == 2, TypeError,
                 lambda: f"{name} must be 2-D uint8 packed e2m1, got {t.dtype} {tuple(t.shape)}")
    m, k2 = a_codes.shape
    n, wk2 = w_codes.shape
    _require(k2 == wk2, ValueError, lambda: f"a_codes hold K={2 * k2} but w_codes K={2 * wk2}")
    k = 2 * k2
    layout.check_gemm_shape(m, n, k, out_dtype)
    for name, t, rows in (("a_scales", a_scales, m), ("w_scales", w_scales, n)):
        need = layout.swizzled_scale_numel(rows, k // g)
        _require(t.dtype == torch.uint8 and t.numel() == need, ValueError,
                 lambda: f"{name} must be a swizzled uint8 buffer of {need} bytes for ({rows}, {k // g}) {f.value} "
                 "scales "
                 f"(wush_compile.cuda.layout.to_swizzled), got {t.dtype} with {t.numel()} elements")
    for name, t in (("a_codes", a_codes), ("a_scales", a_scales), ("w_codes", w_codes), ("w_scales", w_scales)):
        _require(t.device == a_codes.device, ValueError,
                 lambda: f"{name} is on {t.device}, a_codes on {a_codes.device}")
    _check_scalar("a_global_scale", a_gs, a_codes.device)
    _check_scalar("w_global_scale", w_gs, a_codes.device)
    if bias is not None:
        _require(tuple(bias.shape) == (n,), ValueError, lambda: f"bias must be ({n},), got {tuple(bias.shape)}")
    return f, m, n, k


@torch.library.custom_op("wush::cutlass_fp4_gemm", mutates_args=())
def cutlass_fp4_gemm(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    a_global_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Block-scaled FP4 GEMM (M, K/2) x (N, K/2) -> (M, N): fp32 accumulation of decoded codes x block scales,
    times a_gs * w_gs, plus bias, in out_dtype. Scales are 128x4 swizzled buffers."""
    _require_cuda(a_codes, "wush::cutlass_fp4_gemm")
    f, m, n, k = _check_fp4_gemm_args(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias,
                                      fmt, out_dtype)
    arch = fp4_arch(a_codes.device)
    a_codes, w_codes = a_codes.contiguous(), w_codes.contiguous()
    for name, t in (("a_codes", a_codes), ("a_scales", a_scales), ("w_codes", w_codes), ("w_scales", w_scales)):
        _check_aligned(name, t)
    bias32 = _check_bias(bias, n, a_codes.device)
    out = torch.empty((m, n), dtype=out_dtype, device=a_codes.device)
    kernel = loader.gemm_kernel(arch, builder.gemm_variant_name(arch, f.value, _OUT_NAMES[out_dtype]))
    idx = _index(a_codes)
    args = loader.WushGemmArgs(
        m=m, n=n, k=k, a=a_codes.data_ptr(), b=w_codes.data_ptr(), a_scale=a_scales.data_ptr(),
        b_scale=w_scales.data_ptr(), alpha_a=a_global_scale.data_ptr(), alpha_b=w_global_scale.data_ptr(),
        bias=_ptr(bias32), d=out.data_ptr(), sm_count=loader.sm_count(idx), max_swizzle=0,
    )
    kernel.run(args, idx, torch.cuda.current_stream(a_codes.device).cuda_stream)
    return out


@cutlass_fp4_gemm.register_fake
def _(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias, fmt, out_dtype):
    _, m, n, _ = _check_fp4_gemm_args(a_codes, a_scales, a_global_scale, w_codes, w_scales, w_global_scale, bias,
                                      fmt, out_dtype)
    return a_codes.new_empty((m, n), dtype=out_dtype)


# ---------------------------------------------------------------- calibrated linear


@torch.library.custom_op("wush::cutlass_linear", mutates_args=())
def cutlass_linear(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scales: torch.Tensor,
    transform: torch.Tensor,
    weight_global_scale: torch.Tensor,
    act_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
) -> torch.Tensor:
    """SPEC section 5 on the native FP4 path: fused transform+quantize (swizzled scales), block-scaled GEMM."""
    _require_cuda(x, "wush::cutlass_linear")
    ops = LinearOperands.checked(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale,
                                 bias, fmt)
    y = run_linear(x.reshape(-1, x.shape[-1]), ops)
    return y.reshape(*x.shape[:-1], ops.n)


def run_linear(x: torch.Tensor, ops: LinearOperands) -> torch.Tensor:
    """The calibrated linear on x (M, K) with operands the op already checked (the router's entry point): the
    body of ``wush::cutlass_linear`` without checking them again."""
    fmt = ops.fmt.value
    a_codes, a_scales = cutlass_transform_quantize(x, ops.transform, ops.act_global_scale, fmt, True)
    return cutlass_fp4_gemm(a_codes, a_scales, ops.act_global_scale, ops.weight_codes.contiguous(),
                            _swizzled_scales(ops.weight_scales), ops.weight_global_scale, ops.bias, fmt, x.dtype)


@cutlass_linear.register_fake
def _(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, fmt):
    check_linear_args(x, weight_codes, weight_scales, transform, weight_global_scale, act_global_scale, bias, fmt)
    return x.new_empty((*x.shape[:-1], weight_codes.shape[0]))


# ---------------------------------------------------------------- launchers (torch-twin signatures)


def transform_quantize(
    x: torch.Tensor, transform: torch.Tensor, act_global_scale: torch.Tensor, fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`wush_compile.ops.reference.transform_quantize_ref`: codes (M, K/2), scales (M, K/G)."""
    return cutlass_transform_quantize(x, transform, act_global_scale, fmt, False)


def fp4_gemm(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    a_global_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Same as :func:`wush_compile.ops.reference.fp4_gemm_ref` (row-major (rows, K/G) scales): swizzles the
    activation scales per call and the weight scales once per weight tensor."""
    return cutlass_fp4_gemm(a_codes, layout.to_swizzled(a_scales), a_global_scale, w_codes,
                            _swizzled_scales(w_scales), w_global_scale, bias, fmt, out_dtype)


def linear(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    transform: torch.Tensor,
    w_global_scale: torch.Tensor,
    a_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
) -> torch.Tensor:
    """Same as :func:`wush_compile.ops.reference.linear_ref`, on the native FP4 path (``wush::cutlass_linear``)."""
    return cutlass_linear(x, w_codes, w_scales, transform, w_global_scale, a_global_scale, bias, fmt)

