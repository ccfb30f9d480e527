"""Public launchers of the Triton kernels; same signatures and semantics as the torch twins in
:mod:`wush_compile.ops.reference` (``transform_quantize`` / ``fp4_gemm`` / ``linear``), plus the helper ops
of the Hopper routes.

Routes of :func:`linear` (``kernel`` is a concrete :class:`~wush_compile.config.KernelChoice`):

* ``TRITON_DECODE`` (small M): one fused kernel - transform + quantize of the tokens in the prologue, FP4
  weights unpacked in registers, split-K; no host sync, no data-dependent allocation (CUDA-graph safe).
  (The Hopper CUDA decode kernels are a route of their own, ``CUDA_DECODE``, run by the router.)
* ``TRITON_FP8`` (MXFP4 prefill): activations quantized straight into row-folded e4m3 + row scales, the
  FP4 weights expanded into a scratch e4m3 buffer, ``torch._scaled_mm`` with row-wise scales
  (``use_fast_accum=False``), then an exact fallback kernel for the rows (token or weight) whose exponent
  spread does not fold into e4m3 - listed on the device, counted in :func:`fallback_stats`.
* ``CUBLAS_BF16`` (NVFP4 prefill, any format): both operands dequantized exactly to bf16 by Triton kernels
  (every code * block scale fits bf16), cuBLAS bf16 GEMM with the global scales as its fp32 alpha.

Which route runs is the router's choice (:mod:`wush_compile.ops.dispatch`); this module only launches. Its
per-device buffers are made by :func:`prepare` and dropped by :func:`clear`. Importing this module does not
import Triton; the kernels load on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import weakref
from typing import Sequence

import torch

from .. import formats, settings
from ..config import Format, KernelChoice
from .operands import LinearOperands

logger = logging.getLogger(__name__)

__all__ = [
    "QuantTiles",
    "LinearTiles",
    "quant_tiles",
    "linear_tiles",
    "transform_quantize",
    "transform_dequantize",
    "expand_fp8",
    "quantize_act_f16",
    "dequantize_codes",
    "fp4_gemm",
    "linear",
    "run_linear",
    "run_linear_group",
    "clear",
    "fallback_stats",
    "decode_linear",
    "decode_gemm",
    "sm_count",
    "prepare",
    "linear_group",
    "triton_available",
]

#: SMs of the H100 the heuristics were measured on; the real count is read from the device.
_DEFAULT_SMS = 132
#: Programs per SM the split-K heuristic aims for (enough loads in flight to cover DRAM latency).
_PROGRAMS_PER_SM = 4
#: cuBLAS's fp8 GEMM needs the output width to be a multiple of this; the fp8 route pads N with zero rows.
FP8_N_ALIGN = 16
#: N * K from which a layer counts as large for the decode tiles (2**25 weights, e.g. 8B down / gate_up).
_LARGE_LAYER = 1 << 25
#: Largest number of split-K tiles (counters) one device keeps.
_MAX_LOCKS = 1 << 16


def triton_available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        return False, f"triton is not importable ({e})"
    return True, "ok"


@functools.lru_cache(maxsize=None)
def _mods():
    from . import _gemm, _quant

    return _quant, _gemm


# ----------------------------------------------------------------------------------------------
# Tile heuristics (pure functions of the problem shape)


@dataclasses.dataclass(frozen=True)
class QuantTiles:
    """Tiles of the stand-alone transform + quantize kernels: rows per program, transform blocks per step."""

    block_m: int
    groups: int
    num_warps: int


@dataclasses.dataclass(frozen=True)
class LinearTiles:
    """Tiles of the decode GEMMs: weight rows per program (the MMA's M side), tokens (its N side), columns
    per K step, split-K factor and K steps per split; ``fused_act`` picks the kernel that transforms and
    quantizes the tokens in its prologue (else a separate quantize launch writes the fp16 operand)."""

    block_n: int
    block_m: int
    block_k: int
    split_k: int
    steps_per_split: int
    num_warps: int
    num_stages: int
    fused_act: bool = False

    def groups(self, fmt: Format | str) -> int:
        return self.block_k // Format.parse(fmt).group_size


def quant_tiles(m: int, k: int, fmt: Format | str) -> QuantTiles:
    """128 columns per program (4 MXFP4 / 8 NVFP4 blocks); 64 rows for MXFP4, 32 for NVFP4 (16 for tiny M).

    Measured at M=8192, K=4096 (benchmarks/results/h100_2026-11-23/sweep_kernels.log): MXFP4 64 rows 55.6% of
    copy (32: 55.0%, 128: 30.7%); NVFP4 32 rows 37.3% (64: 30.2%, 128: 23.1%)."""
    f = Format.parse(fmt)
    g = f.group_size
    block_m = 16 if m <= 16 else (64 if f is Format.MXFP4 else 32)
    return QuantTiles(block_m=block_m, groups=max(1, 128 // g), num_warps=4)


def linear_tiles(
    m: int, n: int, k: int, fmt: Format | str, sms: int = _DEFAULT_SMS, *, block_n: int = 64,
    block_k: int | None = None, fused_act: bool = False, programs_per_sm: int | None = None,
    num_warps: int | None = None, num_stages: int = 3,
) -> LinearTiles:
    """Split-K so that about ``programs_per_sm`` programs per SM stream weights."""
    f = Format.parse(fmt)
    g = f.group_size
    if block_k is None:  # measured (benchmarks/NOTES_kernels.md): 256 pays on large MXFP4 layers only
        block_k = 256 if (f is Format.MXFP4 and n * k >= _LARGE_LAYER) else 128
    if programs_per_sm is None:
        programs_per_sm = 8 if n * k >= 2 * _LARGE_LAYER else _PROGRAMS_PER_SM
    if fused_act:
        block_k = 128  # the fused prologue's register budget
    while block_k > 2 * g and k % block_k:  # the step must divide K (no column masks in the GEMM)
        block_k //= 2
    if k % block_k:
        block_k = g
    block_m = 16 if (m <= 16 or fused_act) else (64 if m <= 64 else 128)  # one token tile up to M = 128
    if num_warps is None:
        num_warps = 8 if block_m == 128 else 4
    tiles = math.ceil(n / block_n) * math.ceil(m / block_m)
    steps = math.ceil(k / block_k)
    split = max(1, min(steps, round(sms * programs_per_sm / tiles)))
    per_split = math.ceil(steps / split)
    split = math.ceil(steps / per_split)
    return LinearTiles(block_n, block_m, block_k, split, per_split, num_warps, num_stages, fused_act)


# ----------------------------------------------------------------------------------------------
# helpers


def _fmt_id(f: Format) -> int:
    return 0 if f is Format.MXFP4 else 1


def _check_x(x: torch.Tensor, transform: torch.Tensor, f: Format) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected 2-D activations (M, K), got shape {tuple(x.shape)}; reshape to (-1, K)")
    g = f.group_size
    formats.check_group_divisible(x.shape[1], f, what="activations")
    if tuple(transform.shape) != (x.shape[1] // g, g, g):
        raise ValueError(f"transform must be {(x.shape[1] // g, g, g)} for K={x.shape[1]} ({f.value}), got {tuple(transform.shape)}")
    if x.device != transform.device:
        raise ValueError(f"activations on {x.device} but transform on {transform.device}; move them to one device")


def _use_asm(device: torch.device) -> bool:
    """The PTX nibble unpacker (cvt e4m3x2 -> f16x2) needs sm_89+; the interpreter runs the portable path."""
    if _interpreting() or device.type != "cuda" or settings.portable_unpack():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _interpreting() -> bool:
    return settings.triton_interpret()


def _dot_ieee(x: torch.Tensor, t: torch.Tensor) -> bool:
    """Use the fp32 (ieee) transform dot unless both operands are the same 16-bit float type on a GPU.

    (Triton's CPU interpreter multiplies bf16 operands of ``tl.dot`` as raw integers, so it gets fp32.)"""
    return _interpreting() or not (x.dtype == t.dtype and x.dtype in (torch.bfloat16, torch.float16))


def _as_scalar_tensor(v, device) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=device).reshape(1)


_MX_GLOBAL: dict = {}


def mx_global_scale(device) -> torch.Tensor:
    """MXFP4's fixed 1/3 as a (1,) device tensor, made once per device (read-only; shared by the Triton routes)."""
    key = str(device)
    t = _MX_GLOBAL.get(key)
    if t is None:
        t = torch.full((1,), formats.MXFP4_GLOBAL_SCALE, dtype=torch.float32, device=device)
        _MX_GLOBAL[key] = t
    return t


_mx_global = mx_global_scale


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the split-K heuristic's input; the H100's count off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


_LOCKS: dict = {}
_STATS: dict = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    """Self-resetting split-K counters (back to zero after every launch), one set per device.

    Per device, not per stream: CUDA-graph trees warm up and capture on their own stream, and a buffer first
    allocated there would land in the graph's memory pool. :func:`prepare` allocates it up front (the backend
    calls it at compile time). Split-K launches on one device must not run concurrently on two streams.
    """
    if n > _MAX_LOCKS:
        raise ValueError(f"split-K needs {n} tile counters, more than {_MAX_LOCKS}; use fewer splits")
    key = str(device)
    t = _LOCKS.get(key)
    if t is None:
        t = torch.zeros(_MAX_LOCKS, dtype=torch.int32, device=device)
        _LOCKS[key] = t
    return t


def _stats(device: torch.device) -> torch.Tensor:
    key = str(device)
    t = _STATS.get(key)
    if t is None:
        t = torch.zeros(4, dtype=torch.int32, device=device)
        _STATS[key] = t
    return t


def prepare(device) -> None:
    """Allocate the launchers' persistent device buffers (split-K counters, fallback counters, MXFP4's global
    scale) on ``device`` now, outside any CUDA-graph capture or graph memory pool. Idempotent."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _locks(device, 0)
    _stats(device)
    _mx_global(device)


def clear() -> None:
    """Drop every per-device buffer and the host copies of scalar buffers (the next call or :func:`prepare`
    makes them again). Split-K counters are dropped with the CUDA graphs that captured them."""
    _LOCKS.clear()
    _STATS.clear()
    _MX_GLOBAL.clear()
    _HOST_SCALARS.clear()


def fallback_stats(device=None, reset: bool = False) -> dict:
    """Rows the fp8 route sent to the exact fallback since the last reset (reads the device counters)."""
    device = torch.device(device) if device is not None else None
    out = {}
    for key, t in list(_STATS.items()):
        if device is not None and key != str(device):
            continue
        v = t.tolist()
        out[key] = {"act_rows_fallback": v[0], "act_rows": v[1], "weight_rows_fallback": v[2], "weight_rows": v[3]}
        if reset:
            t.zero_()
    return out


_HOST_SCALARS: dict[int, tuple] = {}


def _host_scalar(t: torch.Tensor) -> float:
    """A scalar buffer's value on the host, cached per tensor object and version: one sync per buffer value
    (later calls, CUDA-graph captures included, read the cache)."""
    hit = _HOST_SCALARS.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    v = float(t.reshape(()))
    if len(_HOST_SCALARS) > 4096:
        _HOST_SCALARS.clear()
    _HOST_SCALARS[id(t)] = (weakref.ref(t), t._version, v)
    return v


# ----------------------------------------------------------------------------------------------
# activation transform + quantize


def transform_quantize(
    x: torch.Tensor, transform: torch.Tensor, act_global_scale: torch.Tensor, fmt: str,
    tiles: QuantTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise transform (fp32 accumulation) + quantize: x (M, K) -> codes (M, K/2) uint8, scales (M, K/G) uint8."""
    f = Format.parse(fmt)
    _check_x(x, transform, f)
    _quant, _ = _mods()
    m, k = x.shape
    g = f.group_size
    nb = k // g
    x = x.contiguous()
    t = transform.contiguous()
    codes = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((m, nb), dtype=torch.uint8, device=x.device)
    gs = _mx_global(x.device) if f is Format.MXFP4 else _as_scalar_tensor(act_global_scale, x.device)
    cfg = tiles or quant_tiles(m, k, f)
    grid = (triton_cdiv(m, cfg.block_m), triton_cdiv(nb, cfg.groups))
    _quant._transform_quantize_kernel[grid](
        x, x.stride(0), t, gs, codes, scales, codes, m, nb,
        FMT=_fmt_id(f), MODE=0, BM=cfg.block_m, NG=cfg.groups, G=g, DOT_IEEE=_dot_ieee(x, t),
        num_warps=cfg.num_warps,
    )
    return codes, scales


def transform_dequantize(
    x: torch.Tensor, transform: torch.Tensor, act_global_scale: torch.Tensor, fmt: str,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Transform + quantize, written as exact values code * block scale (global scale left out): (M, K).

    Every such value is exact in bf16 (2 significant bits of e2m1 times a power of two or an e4m3 scale)."""
    f = Format.parse(fmt)
    _check_x(x, transform, f)
    _quant, _ = _mods()
    m, k = x.shape
    g = f.group_size
    nb = k // g
    x = x.contiguous()
    t = transform.contiguous()
    out = torch.empty((m, k), dtype=dtype, device=x.device)
    gs = _mx_global(x.device) if f is Format.MXFP4 else _as_scalar_tensor(act_global_scale, x.device)
    cfg = quant_tiles(m, k, f)
    grid = (triton_cdiv(m, cfg.block_m), triton_cdiv(nb, cfg.groups))
    _quant._transform_quantize_kernel[grid](
        x, x.stride(0), t, gs, out, out, out, m, nb,
        FMT=_fmt_id(f), MODE=1, BM=cfg.block_m, NG=cfg.groups, G=g, DOT_IEEE=_dot_ieee(x, t),
        num_warps=cfg.num_warps,
    )
    return out


def expand_fp8(
    codes: torch.Tensor, scales: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
    flags: torch.Tensor, counter: torch.Tensor, stats: torch.Tensor, rows_out: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXFP4 rows (codes (R, K/2), e8m0 scales (R, K/G)) -> (row-folded e4m3 (R', K), fp32 row scales
    2**R_r * g1 * g2 (R',), listed rows (R,) int32 - the first ``counter`` entries). R' = rows_out >= R pads
    with zero rows. ``flags`` (R,) int32 must be zero; ``stats`` gets [listed, rows]."""
    _, _gemm = _mods()
    r, k2 = codes.shape
    g = Format.MXFP4.group_size
    nb = 2 * k2 // g
    rp = rows_out or r
    q = torch.empty((rp, 2 * k2), dtype=torch.float8_e4m3fn, device=codes.device)
    row_scale = torch.empty((rp,), dtype=torch.float32, device=codes.device)
    if rp > r:
        q[r:].zero_()
        row_scale[r:].zero_()
    rows = torch.empty((max(r, 1),), dtype=torch.int32, device=codes.device)
    br, ngc = 32, 16
    _gemm._expand_fp8_kernel[(triton_cdiv(r, br), triton_cdiv(nb, ngc))](
        codes, scales, _as_scalar_tensor(g1, codes.device), _as_scalar_tensor(g2, codes.device), q, row_scale,
        flags, counter, rows, stats, r, nb, BR=br, NGC=ngc, NGS=32, G=g, num_warps=4,
    )
    return q, row_scale, rows


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, fmt: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Packed codes (R, K/2) + scales (R, K/G) -> exact values code * block scale (R, K) (no global scale)."""
    f = Format.parse(fmt)
    _, _gemm = _mods()
    r, k2 = codes.shape
    g = f.group_size
    nb = 2 * k2 // g
    if tuple(scales.shape) != (r, nb):
        raise ValueError(f"scales must be {(r, nb)} for codes {tuple(codes.shape)} ({f.value}), got {tuple(scales.shape)}")
    out = torch.empty((r, 2 * k2), dtype=dtype, device=codes.device)
    br, ng = 64, max(1, 128 // g)
    _gemm._dequant_kernel[(triton_cdiv(r, br), triton_cdiv(nb, ng))](
        codes.contiguous(), scales.contiguous(), out, r, nb, FMT=_fmt_id(f), BR=br, NG=ng, G=g, num_warps=4
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# GEMMs


def _bf16_gemm(a: torch.Tensor, w: torch.Tensor, a_gs: torch.Tensor, w_gs: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """(a @ w^T) * (a_gs * w_gs) (+ bias): the fp32 global-scale product is cuBLAS's alpha (one rounding)."""
    alpha = float(torch.tensor(_host_scalar(a_gs), dtype=torch.float32) * torch.tensor(_host_scalar(w_gs), dtype=torch.float32))
    if out_dtype == a.dtype:
        if bias is not None:
            return torch.addmm(bias.to(out_dtype), a, w.t(), alpha=alpha)
        if a.device.type == "cpu":
            return torch.mm(a.float(), w.float().t()).mul_(alpha).to(out_dtype)
        return torch.addmm(a.new_zeros(()), a, w.t(), beta=0, alpha=alpha)
    y = torch.mm(a.float(), w.float().t()) * alpha  # fp32 models: plain fp32 GEMM of exact values
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def fp4_gemm(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    a_global_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    out_dtype: torch.dtype,
    route: KernelChoice | str = KernelChoice.CUBLAS_BF16,
) -> torch.Tensor:
    """Block-scaled FP4 x FP4 GEMM (M, K/2) x (N, K/2) -> (M, N), twin of fp4_gemm_ref. ``route`` (the router's
    :func:`~wush_compile.ops.dispatch.gemm_route`): CUBLAS_BF16 = exact bf16 dequantization of both operands and
    a bf16 GEMM with fp32 accumulation, then the global scales and the bias; TRITON_DECODE = the split-K FP4
    GEMM of the decode route (MXFP4)."""
    if a_codes.shape[1] != w_codes.shape[1]:
        raise ValueError(f"fp4_gemm: activations hold K={2 * a_codes.shape[1]}, weights K={2 * w_codes.shape[1]}")
    f = Format.parse(fmt)
    route = KernelChoice.parse(route)
    if route not in (KernelChoice.CUBLAS_BF16, KernelChoice.TRITON_DECODE):
        raise ValueError(f"fp4_gemm: route must be cublas_bf16 or triton_decode, got {route.value}")
    if route is KernelChoice.TRITON_DECODE and f is not Format.MXFP4:
        raise ValueError("fp4_gemm: the triton_decode FP4 GEMM runs MXFP4 only; use cublas_bf16 for nvfp4")
    m, n, k = a_codes.shape[0], w_codes.shape[0], 2 * a_codes.shape[1]
    if route is KernelChoice.TRITON_DECODE:
        cfg = linear_tiles(m, n, k, f, sm_count(a_codes.device), block_k=128, fused_act=True)
        return _fp4_linear(None, a_codes.contiguous(), a_scales.contiguous(), None, a_global_scale,
                           w_codes.contiguous(), w_scales.contiguous(), w_global_scale, bias, f, out_dtype, cfg)
    a = dequantize_codes(a_codes, a_scales, fmt)
    w = dequantize_codes(w_codes, w_scales, fmt)
    return _bf16_gemm(a, w, a_global_scale, w_global_scale, bias, out_dtype)


def decode_linear(x, w_codes, w_scales, transform, w_gs, a_gs, bias, f: Format, out_dtype, tiles=None):
    """The Triton decode route on x (M, K) -> (M, N) in ``out_dtype``; ``tiles`` (from :func:`linear_tiles`)
    pins the tile config (benchmarks, sweeps). Arguments are checked by the op."""
    m, k = x.shape
    n = w_codes.shape[0]
    x, transform = x.contiguous(), transform.contiguous()
    cfg = tiles or linear_tiles(m, n, k, f, sm_count(x.device))
    if cfg.fused_act:
        if f is not Format.MXFP4:
            raise ValueError("the fused-prologue decode kernel runs MXFP4 only; use the two-launch decode for nvfp4")
        return _fp4_linear(x, None, None, transform, a_gs, w_codes, w_scales, w_gs, bias, f, out_dtype, cfg)
    return _gemv_linear(x, w_codes, w_scales, transform, w_gs, a_gs, bias, f, out_dtype, cfg)


def _fp4_linear(x, a_codes, a_scales, transform, a_gs, w_codes, w_scales, w_gs, bias, f: Format, out_dtype, cfg):
    """The exact per-group FP4 GEMM (split-K); activations from x (fused transform + quantize) or from codes."""
    _, _gemm = _mods()
    fused = a_codes is None
    src = x if fused else a_codes
    m = src.shape[0]
    n = w_codes.shape[0]
    g = f.group_size
    nb = w_scales.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=src.device)
    gn, gm = triton_cdiv(n, cfg.block_n), triton_cdiv(m, cfg.block_m)
    if cfg.split_k > 1:
        part = torch.empty((cfg.split_k * gn * gm * cfg.block_n * cfg.block_m,), dtype=torch.float32, device=src.device)
        locks = _locks(src.device, gn * gm)
    else:
        part = locks = out
    ga = _mx_global(src.device) if f is Format.MXFP4 else _as_scalar_tensor(a_gs, src.device)
    if fused:
        xa, stride, t, ac, asc, ieee = x, x.stride(0), transform, x, x, _dot_ieee(x, transform)
    else:
        xa, stride, t, ac, asc, ieee = a_codes, 0, a_codes, a_codes, a_scales, True
    _gemm._fp4_linear_kernel[(gn, gm, cfg.split_k)](
        xa, stride, t, ga, ac, asc, w_codes, w_scales, _as_scalar_tensor(w_gs, src.device),
        bias if bias is not None else out, out, part, locks, m, n, nb, cfg.steps_per_split * cfg.groups(f),
        FMT=_fmt_id(f), A_FUSED=fused, HAS_BIAS=bias is not None, SPLIT_K=cfg.split_k, BN=cfg.block_n,
        BM=cfg.block_m, NG=cfg.groups(f), G=g, DOT_IEEE=ieee, USE_ASM=_use_asm(src.device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def quantize_act_f16(x: torch.Tensor, transform: torch.Tensor, act_global_scale, fmt: str, block_k: int):
    """Transform + quantize into the decode GEMM's operand: (fp16 values (M, K), fp32 step scales (M, K/block_k))."""
    f = Format.parse(fmt)
    _check_x(x, transform, f)
    _quant, _ = _mods()
    m, k = x.shape
    g = f.group_size
    nb = k // g
    nstep = triton_cdiv(k, block_k)
    out = torch.empty((m, k), dtype=torch.float16, device=x.device)
    sc = torch.empty((m, nstep), dtype=torch.float32, device=x.device)
    gs = _mx_global(x.device) if f is Format.MXFP4 else _as_scalar_tensor(act_global_scale, x.device)
    bm = 16
    _quant._quantize_act_f16_kernel[(triton_cdiv(m, bm), nstep)](
        x, x.stride(0), transform, gs, out, sc, m, nb, nstep, FMT=_fmt_id(f), BM=bm, NGS=block_k // g, G=g,
        DOT_IEEE=_dot_ieee(x, transform), num_warps=4,
    )
    return out, sc


def _gemv_linear(x, w_codes, w_scales, transform, w_gs, a_gs, bias, f: Format, out_dtype, cfg: LinearTiles):
    a_sa = quantize_act_f16(x, transform, a_gs, f.value, cfg.block_k)
    return decode_gemm(a_sa, w_codes, w_scales, w_gs, a_gs, f, cfg, bias, out_dtype)


def decode_gemm(a_sa, w_codes, w_scales, w_gs, a_gs, f: Format, cfg: LinearTiles, bias=None, out_dtype=torch.bfloat16):
    """The decode GEMM on an operand from :func:`quantize_act_f16` (same ``cfg.block_k``)."""
    _, _gemm = _mods()
    a, sa = a_sa
    x = a
    m, k = a.shape
    n = w_codes.shape[0]
    g = f.group_size
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    gn, gm = triton_cdiv(n, cfg.block_n), triton_cdiv(m, cfg.block_m)
    if cfg.split_k > 1:
        part = torch.empty((cfg.split_k * gn * gm * cfg.block_n * cfg.block_m,), dtype=torch.float32, device=x.device)
        locks = _locks(x.device, gn * gm)
    else:
        part = locks = out
    ga = _mx_global(x.device) if f is Format.MXFP4 else _as_scalar_tensor(a_gs, x.device)
    _gemm._fp4_gemv_kernel[(gn, gm, cfg.split_k)](
        a, sa, w_codes, w_scales, ga, _as_scalar_tensor(w_gs, x.device), bias if bias is not None else out, out,
        part, locks, m, n, k // g, triton_cdiv(k, cfg.block_k), cfg.steps_per_split,
        FMT=_fmt_id(f), HAS_BIAS=bias is not None, SPLIT_K=cfg.split_k, BN=cfg.block_n, BM=cfg.block_m,
        BK=cfg.block_k, G=g, USE_ASM=_use_asm(x.device), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _exact_rows(x, w_codes, w_scales, transform, w_gs, bias, f: Format, out, tok_rows, w_rows, counts):
    """Overwrite out's listed token rows and listed weight columns with exact values (one launch; its
    programs return at once when both lists are empty)."""
    _, _gemm = _mods()
    m, k = x.shape
    n = w_codes.shape[0]
    g = f.group_size
    bn, bm, ng = 64, 16, max(1, 128 // g)
    grid = (max(triton_cdiv(m, bm), triton_cdiv(n, bn)),)
    _gemm._fp4_linear_exact_kernel[grid](
        x, x.stride(0), transform, _mx_global(x.device), w_codes, w_scales, _as_scalar_tensor(w_gs, x.device),
        bias if bias is not None else out, out, tok_rows, w_rows, counts, m, n, k // g,
        FMT=_fmt_id(f), HAS_BIAS=bias is not None, BN=bn, BM=bm, NG=ng, G=g,
        DOT_IEEE=_dot_ieee(x, transform), USE_ASM=_use_asm(x.device), num_warps=4,
    )


def _fp8_linear(x, w_codes, w_scales, transform, w_gs, a_gs, bias, out_dtype):
    f = Format.MXFP4
    m = x.shape[0]
    n = w_codes.shape[0]
    a_codes, a_scales = transform_quantize(x, transform, None, f.value)
    buf = torch.zeros(2 + m + n, dtype=torch.int32, device=x.device)  # counts, then per-row flags
    ga = _mx_global(x.device)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    st = _stats(x.device)
    qa, sa, rows_a = expand_fp8(a_codes, a_scales, one, one, buf[2 : 2 + m], buf[0:1], st[0:2])
    n_pad = triton_cdiv(n, FP8_N_ALIGN) * FP8_N_ALIGN  # cuBLAS fp8 needs N % 16 == 0
    qw, sw, rows_w = expand_fp8(w_codes, w_scales, ga, w_gs, buf[2 + m :], buf[1:2], st[2:4], rows_out=n_pad)
    mm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.float32
    bias_mm = None
    if bias is not None and mm_dtype != torch.float32:  # cuBLAS takes no bias with an fp32 output
        bias_mm = bias.to(mm_dtype)
        if n_pad > n:
            bias_mm = torch.cat((bias_mm, bias_mm.new_zeros(n_pad - n)))
    y = torch._scaled_mm(qa, qw.t(), scale_a=sa[:, None], scale_b=sw[None, :], bias=bias_mm, out_dtype=mm_dtype,
                         use_fast_accum=False)
    if n_pad > n:
        y = y[:, :n].contiguous()
    if bias is not None and mm_dtype == torch.float32:
        y += bias.to(torch.float32)
    _exact_rows(x, w_codes, w_scales, transform, w_gs, bias, f, y, rows_a, rows_w, buf[0:2])
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _bf16_linear(x, w_codes, w_scales, transform, w_gs, a_gs, bias, f: Format, out_dtype):
    a = transform_dequantize(x, transform, a_gs, f.value)
    w = dequantize_codes(w_codes, w_scales, f.value)
    ga = _MX_GS_CPU if f is Format.MXFP4 else a_gs
    return _bf16_gemm(a, w, ga, w_gs, bias, out_dtype)


_MX_GS_CPU = torch.tensor(formats.MXFP4_GLOBAL_SCALE, dtype=torch.float32)


def linear_group(
    x: torch.Tensor,
    codes: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    transform: torch.Tensor,
    w_global_scales: Sequence[torch.Tensor],
    a_global_scale: torch.Tensor,
    biases: Sequence[torch.Tensor | None],
    fmt: str,
    kernel: KernelChoice | str,
) -> list[torch.Tensor] | None:
    """Members sharing x (M, K) and one transform, on the Triton decode route (see :func:`run_linear_group`).
    Arguments are checked by the op."""
    f = Format.parse(fmt)
    members = [LinearOperands(c, s, transform, g, a_global_scale, b, f)
               for c, s, g, b in zip(codes, scales, w_global_scales, biases)]
    return run_linear_group(x, members, kernel)


def run_linear_group(x: torch.Tensor, members: Sequence[LinearOperands],
                     kernel: KernelChoice | str) -> list[torch.Tensor] | None:
    """Members sharing x (M, K), the transform and the act scale on the Triton decode route: x is transformed and
    quantized once, then one GEMV per member reads that operand (outputs equal each member's :func:`linear` bit
    for bit). None where this does not apply (other routes, the fused-prologue tiles): the caller then runs each
    member on its own."""
    if KernelChoice.parse(kernel) is not KernelChoice.TRITON_DECODE or x.shape[0] == 0:
        return None
    first = members[0]
    f = first.fmt
    m, k = x.shape
    sms = sm_count(x.device)
    cfgs = [linear_tiles(m, ops.n, k, f, sms) for ops in members]
    if len({c.block_k for c in cfgs}) != 1:  # one operand needs one K step: the smallest fits every member
        step = min(c.block_k for c in cfgs)
        cfgs = [linear_tiles(m, ops.n, k, f, sms, block_k=step) for ops in members]
    if any(c.fused_act for c in cfgs):
        return None
    a_sa = quantize_act_f16(x.contiguous(), first.transform.contiguous(), first.act_global_scale, f.value,
                            cfgs[0].block_k)
    return [
        decode_gemm(a_sa, ops.weight_codes.contiguous(), ops.weight_scales.contiguous(), ops.weight_global_scale,
                    ops.act_global_scale, f, cfg, ops.bias, x.dtype)
        for ops, cfg in zip(members, cfgs)
    ]


def linear(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    transform: torch.Tensor,
    w_global_scale: torch.Tensor,
    a_global_scale: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    kernel: KernelChoice | str,
) -> torch.Tensor:
    """The fused calibrated linear on x (..., K) -> (..., N) with the chosen Triton route (see module doc):
    checks the arguments, then :func:`run_linear`."""
    ops = LinearOperands.checked(x, w_codes, w_scales, transform, w_global_scale, a_global_scale, bias, fmt)
    lead = x.shape[:-1]
    y = run_linear(x.reshape(-1, x.shape[-1]), ops, kernel)
    return y.reshape(*lead, ops.n)


def run_linear(x: torch.Tensor, ops: LinearOperands, kernel: KernelChoice | str) -> torch.Tensor:
    """The Triton route ``kernel`` on x (M, K) -> (M, N) with checked operands (the router's entry point)."""
    choice = KernelChoice.parse(kernel)
    f = ops.fmt
    x = x.contiguous()
    n = ops.n
    out_dtype = x.dtype
    w_codes = ops.weight_codes.contiguous()
    w_scales = ops.weight_scales.contiguous()
    transform = ops.transform.contiguous()
    w_gs, a_gs, bias = ops.weight_global_scale, ops.act_global_scale, ops.bias
    if x.shape[0] == 0:
        return x.new_empty((0, n))
    if choice is KernelChoice.TRITON_DECODE:
        return decode_linear(x, w_codes, w_scales, transform, w_gs, a_gs, bias, f, out_dtype)
    if choice is KernelChoice.TRITON_FP8:
        if f is not Format.MXFP4:
            raise ValueError(
                f"kernel triton_fp8 re-encodes MXFP4 exactly into fp8 and does not support {f.value} "
                "(its e4m3 block scales do not fold); use cublas_bf16 or triton_decode"
            )
        return _fp8_linear(x, w_codes, w_scales, transform, w_gs, a_gs, bias, out_dtype)
    if choice is KernelChoice.CUBLAS_BF16:
        return _bf16_linear(x, w_codes, w_scales, transform, w_gs, a_gs, bias, f, out_dtype)
    raise ValueError(
        f"kernels.linear runs the routes triton_decode, triton_fp8 or cublas_bf16, got {choice.value}; "
        "the router (wush_compile.ops.dispatch) runs auto / reference / cuda_decode / cutlass"
    )
