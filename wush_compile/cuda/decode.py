"""Decode path (M <= 16 tokens) of the calibrated FP4 linear on Hopper (sm_90a): two CUDA kernels from one cubin
(``kernels/decode_sm90.cu``), launched through cuda-python on the current torch stream.

1. ``wush_dec_act_*``: transform + quantize of the tokens (bit-identical codes and scales to
   :func:`wush_compile.ops.reference.transform_quantize_ref` wherever the fp32 transform is exact), written as the
   fp16 B operand of the GEMM in MMA fragment order (:func:`act_operand_ref` is its torch twin).
2. ``wush_dec_gemm_*``: swap-AB stream-K GEMM with ``mma.sync.m16n8k16`` (weights as A, FP4 unpacked to fp16 in
   registers, exact per-group MXFP4 promotion / NVFP4 scales folded into fp16), global scales, bias, x's dtype.
   The GEMM is launched with programmatic dependent launch (PDL): it streams weights while (1) still runs.

:func:`linear` has the signature of :func:`wush_compile.ops.reference.linear_ref`; it is the route
``KernelChoice.CUDA_DECODE`` of the router (:mod:`wush_compile.ops.dispatch`), taken when pinned
(``pin_kernel("cuda_decode")``) or, automatically for M <= 16, with ``WUSH_CUDA_DECODE=1`` (off by default: end
to end the Triton decode kernels measured faster, see ``dispatch.AUTO_ROUTES``); ``WUSH_DISABLE_CUDA_DECODE=1``
turns it off even when pinned (with that reason). Nothing here synchronizes the host; after one warm-up call per
shape both launches can be captured in a CUDA graph.

Layout (shared with the CUDA source; the CPU tests emulate the fragment mapping with it): a 32-column chunk of a
token row is one 16-byte record per lane (lane = 4 * (token % 8) + t4) holding columns 8 * t4 + SLOT_K[h] in
half h; token tiles of 8; MXFP4 block scales (K/32, tiles, 8) fp32 beside it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import threading
from typing import Optional, Sequence

import torch

from .. import formats, settings
from ..config import Format
from . import loader

logger = logging.getLogger(__name__)

__all__ = [
    "SLOT_K",
    "CHUNK_K",
    "STAGE_K",
    "MAX_M",
    "DecodeConfig",
    "DecodePlan",
    "plan",
    "supports",
    "available",
    "prepare",
    "act_operand",
    "act_operand_ref",
    "linear",
]

#: Column (of a lane's 8 within a 32-column chunk) held by each half of the lane's B record. Mirrors the weight
#: unpack: the e4m3 bytes of the low nibbles (columns 0, 2, 4, 6) and of the high nibbles (1, 3, 5, 7) convert to
#: half2 pairs (0,2) (4,6) (1,3) (5,7); MMA k16 #0 takes (0,2) and (1,3), k16 #1 takes (4,6) and (5,7).
SLOT_K = (0, 2, 1, 3, 4, 6, 5, 7)
#: Columns per chunk (one MXFP4 group, two NVFP4 groups, 16 bytes of a weight row).
CHUNK_K = 32
#: Columns per pipeline stage / stream-K unit; K must be a multiple.
STAGE_K = 256
#: Largest M the kernels take (two token tiles of 8).
MAX_M = 16
#: Weight rows per warp (two m16 fragments).
ROWS_PER_WARP = 32
#: Shared memory per SM on sm_90 (what the occupancy estimate divides; the driver is asked when it can be).
_SMEM_PER_SM = 228 * 1024
#: Static shared memory of a GEMM CTA (128 B) plus the 1 KB the driver reserves per CTA on sm_90.
_SMEM_PER_CTA_EXTRA = 1152
_X_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_OUT_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_MAX_COUNTERS = 1 << 16


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """GEMM variant: warps per CTA (32 weight rows each) and cp.async pipeline depth (stages of 256 columns)."""

    warps: int = 4
    stages: int = 4

    def __post_init__(self):
        if (self.warps, self.stages) not in COMPILED_CONFIGS:
            raise ValueError(
                f"decode config warps={self.warps}, stages={self.stages} is not compiled; choose one of "
                f"{sorted(COMPILED_CONFIGS)} (kernels/decode_sm90.cu WUSH_DEC_GEMM_FMTS)"
            )


#: (warps, stages) instantiated in decode_sm90.cu.
COMPILED_CONFIGS = frozenset({(4, 4), (4, 3)})
DEFAULT_CONFIG = DecodeConfig()
#: Measured on an H100 (benchmarks/RESULTS.md, 2026-11-23): 4 stages win at one token tile (M <= 8), 3 stages
#: at two (same 2 CTAs per SM, 24 KB less shared memory each; 2-11% faster on the four Llama-3.1-8B shapes).
_DEFAULT_BY_TILES = {1: DecodeConfig(4, 4), 2: DecodeConfig(4, 3)}


def default_config(m: int) -> DecodeConfig:
    """The GEMM variant :func:`linear` runs for M tokens."""
    return _DEFAULT_BY_TILES[1 if m <= 8 else 2]


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Launch geometry of one call (a pure function of the shape, see :func:`plan`)."""

    m: int
    n: int
    k: int
    fmt: Format
    tiles: int  # token tiles of 8
    rows: int  # weight rows per CTA
    row_blocks: int
    stages_per_rb: int
    units: int  # row blocks x stages: the stream-K work items
    ctas: int
    smem_bytes: int
    config: DecodeConfig

    @property
    def chunks(self) -> int:
        return self.k // CHUNK_K

    @property
    def part_numel(self) -> int:
        return self.ctas * 2 * self.rows * 8 * self.tiles

    @property
    def gemm_kernel(self) -> str:
        return gemm_kernel_name(self.fmt, self.tiles, self.config)


def gemm_kernel_name(fmt: Format | str, tiles: int, config: DecodeConfig = DEFAULT_CONFIG) -> str:
    return f"wush_dec_gemm_{Format.parse(fmt).value}_t{tiles}_w{config.warps}_s{config.stages}"


def smem_bytes(fmt: Format | str, tiles: int, config: DecodeConfig = DEFAULT_CONFIG) -> int:
    """Dynamic shared memory of a GEMM variant (mirrors GemmLayout in decode_sm90.cu)."""
    nv = Format.parse(fmt) is Format.NVFP4
    rows = config.warps * ROWS_PER_WARP
    chunks = STAGE_K // CHUNK_K
    stage = rows * chunks * 16 + rows * (16 if nv else 8) + tiles * chunks * 32 * 16 + (0 if nv else tiles * chunks * 8 * 4)
    warp_scales = chunks * 2 * 32 * 4 if nv else chunks * 32 * 4
    return config.stages * stage + config.warps * warp_scales


def supports(m: int, n: int, k: int, fmt: Format | str, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the kernels take this problem (shape and dtype only; :func:`available` checks the device)."""
    if not 1 <= m <= MAX_M:
        return False, f"M={m} is outside 1..{MAX_M} (the CUDA decode kernels take at most two token tiles of 8)"
    if n < 1 or k < 1 or k % STAGE_K:
        return False, f"K={k} is not a positive multiple of {STAGE_K} (the CUDA decode pipeline stage)"
    if dtype not in _X_NAMES:
        return False, f"activations of dtype {dtype} (the CUDA decode kernels take float32, bfloat16, float16)"
    Format.parse(fmt)
    return True, "ok"


def plan(m: int, n: int, k: int, fmt: Format | str, sms: int = 132, ctas_per_sm: Optional[int] = None,
         config: Optional[DecodeConfig] = None) -> DecodePlan:
    """Stream-K geometry: ``units = ceil(N / rows) * K / 256``, one contiguous unit range per CTA over
    ``min(units, sms * ctas_per_sm)`` CTAs (ctas_per_sm from shared memory unless given)."""
    f = Format.parse(fmt)
    ok, why = supports(m, n, k, f, torch.float32)
    if not ok:
        raise ValueError(f"CUDA decode: {why}")
    tiles = 1 if m <= 8 else 2
    config = config or default_config(m)
    rows = config.warps * ROWS_PER_WARP
    row_blocks = -(-n // rows)
    spr = k // STAGE_K
    units = row_blocks * spr
    smem = smem_bytes(f, tiles, config)
    if ctas_per_sm is None:
        ctas_per_sm = max(1, min(_SMEM_PER_SM // (smem + _SMEM_PER_CTA_EXTRA), 2048 // (config.warps * 32)))
    ctas = max(1, min(units, sms * ctas_per_sm))
    if row_blocks > _MAX_COUNTERS:
        raise ValueError(f"CUDA decode: N={n} needs {row_blocks} row-block counters, more than {_MAX_COUNTERS}")
    return DecodePlan(m, n, k, f, tiles, rows, row_blocks, spr, units, ctas, smem, config)


# ---------------------------------------------------------------- torch twin of the act kernel (layout reference)


def _lane_columns(device=None) -> torch.Tensor:
    """(32 lanes, 8 halves) -> column of the 32-column chunk held there (t4 = lane % 4)."""
    lanes = torch.arange(32, device=device)
    return (8 * (lanes % 4))[:, None] + torch.tensor(SLOT_K, device=device)[None, :]  # (32, 8)


def operand_from_values(vals: torch.Tensor, tiles: int) -> torch.Tensor:
    """Token values (M, K) (any float) -> the B fragment buffer (tiles * K/32 * 32 * 8,) fp16, zero padding tokens."""
    m, k = vals.shape
    kc = k // CHUNK_K
    full = vals.new_zeros((8 * tiles, k), dtype=torch.float32)
    full[:m] = vals.to(torch.float32)
    chunked = full.reshape(tiles, 8, kc, CHUNK_K)  # (tiles, token % 8, chunk, column)
    cols = _lane_columns(vals.device)  # (32, 8)
    tok = torch.arange(32, device=vals.device) // 4  # token % 8 of each lane
    rec = chunked[:, tok[:, None], :, cols]  # (32, 8, tiles, kc)
    return rec.permute(2, 3, 0, 1).to(torch.float16).reshape(-1)  # (tiles, kc, 32, 8)


def act_operand_ref(x: torch.Tensor, transform: torch.Tensor, act_global_scale: torch.Tensor, fmt: str,
                    tiles: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Torch twin of the act kernel: (B fragments fp16 (tiles*K/32*32*8,), MXFP4 block scales (K/32*tiles*8,) fp32
    or None). B holds code * 64 (MXFP4) or code * e4m3 scale (NVFP4) of the reference quantizer."""
    from ..ops.reference import transform_quantize_ref

    f = Format.parse(fmt)
    m, k = x.shape
    tiles = tiles or (1 if m <= 8 else 2)
    codes, scales = transform_quantize_ref(x, transform, act_global_scale, f.value)
    vals = formats.unpack_fp4(codes).long()  # (M, K)
    code_vals = torch.tensor(formats.E2M1_SIGNED_VALUES, device=x.device)[vals]  # (M, K) fp32
    if f is Format.MXFP4:
        b = operand_from_values(code_vals * 64.0, tiles)
        sv = formats.e8m0_to_float(scales)  # (M, K/32), NaN for 0xFF
        sa = torch.zeros((k // CHUNK_K, tiles, 8), dtype=torch.float32, device=x.device)
        sa.view(k // CHUNK_K, tiles * 8)[:, :m] = sv.t()
        return b, sa.reshape(-1)
    sv = formats.e4m3_to_float(scales).repeat_interleave(f.group_size, dim=1)  # (M, K)
    return operand_from_values(code_vals * sv, tiles), None


# ---------------------------------------------------------------- device side


#: decode_sm90.cu's DecActArgs and DecGemmArgs.
_DecActArgs = loader.kernel_args("DecActArgs", ("ptr", "x t gs b sa codes scales"), ("i64", "m k x_row_stride"),
                                 ("i32", "tiles reserved"))
_DecGemmArgs = loader.kernel_args("DecGemmArgs", ("ptr", "w ws b sa ga gw bias out part counters"),
                                  ("i64", "m n k units"), ("i32", "stages_per_rb ctas out_dtype reserved"))


def _target():
    from . import builder

    return next(t for t in builder.targets("sm_90a") if t.kind == "decode")


@functools.lru_cache(maxsize=None)
def _available_cached(device: str) -> tuple[bool, str]:
    from . import builder

    d = torch.device(device)
    if d.type != "cuda":
        return False, f"{d} is not a CUDA device"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    cap = tuple(torch.cuda.get_device_capability(d))
    if cap != (9, 0):
        return False, f"the CUDA decode kernels are built for sm_90a (capability 9.0); {d} has {cap[0]}.{cap[1]}"
    try:
        loader.driver()
    except Exception as exc:  # CudaUnavailable (no cuda-python) or a driver error
        return False, f"cuda-python cannot drive the GPU: {exc}"
    target = _target()
    found, reason = loader.find_artifacts("sm_90a", [target])
    if found is not None:
        return True, f"decode cubin: {reason}"
    if settings.cubin_dir():
        return False, reason
    try:
        builder.find_toolchain()
    except builder.BuildError as exc:
        return False, f"{reason}, and it cannot be built here: {exc}"
    return True, f"{reason}; it will be built on first use (about 15 s)"


def available(device=None) -> tuple[bool, str]:
    """(True, where the cubin comes from) when the decode kernels can run on ``device``, else (False, why).
    Cached per device; never builds."""
    if settings.cuda_decode_disabled():
        return False, "the CUDA decode kernels are disabled by WUSH_DISABLE_CUDA_DECODE"
    d = torch.device(device) if device is not None else torch.device("cuda")
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return _available_cached(str(d))


_STATE_LOCK = threading.Lock()
_COUNTERS: dict[str, torch.Tensor] = {}
_MX_GS: dict[str, torch.Tensor] = {}


def prepare(device, transforms: Sequence[torch.Tensor] = (), biases: Sequence[torch.Tensor] = ()) -> None:
    """Allocate the persistent per-device buffers (row-block counters, MXFP4's global scale) and the per-layer
    fp32 copies of ``transforms`` and ``biases`` now, outside any CUDA-graph capture or memory pool (made lazily,
    in CUDA-graph warm-up, they would stay alive in the graph's pool untracked). Idempotent;
    the router's :func:`wush_compile.ops.dispatch.prepare` calls it."""
    d = torch.device(device)
    if d.type != "cuda":
        return
    if d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    key = str(d)
    with _STATE_LOCK:
        if key not in _COUNTERS:
            _COUNTERS[key] = torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=d)
            _MX_GS[key] = torch.full((1,), formats.MXFP4_GLOBAL_SCALE, dtype=torch.float32, device=d)
    for t in transforms:
        if t.device == d and t.dtype != torch.float32 and (t.shape[0] * t.shape[-1]) % STAGE_K == 0:
            _fp32_transform(t)
    for b in biases:
        if b is not None and b.device == d:
            _bias32(b)


def clear() -> None:
    """Drop the per-device buffers (:func:`prepare` or the next call makes them again)."""
    with _STATE_LOCK:
        _COUNTERS.clear()
        _MX_GS.clear()


def _state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = str(device)
    c = _COUNTERS.get(key)
    if c is None:
        prepare(device)
        c = _COUNTERS[key]
    return c, _MX_GS[key]


_FUNCS: dict[tuple, object] = {}
_OCCUPANCY: dict[tuple, int] = {}


def _function(name: str, device_index: int, smem: int, params: type):
    key = (name, device_index)
    fn = _FUNCS.get(key)
    if fn is None:
        d = loader.artifacts("sm_90a", [_target()])
        fn = loader.cubin(d / _target().filename).function(name, device_index, smem, ctypes.sizeof(params))
        _FUNCS[key] = fn
    return fn


def _ctas_per_sm(fn, name: str, device_index: int, threads: int, smem: int) -> int:
    key = (name, device_index, smem)
    occ = _OCCUPANCY.get(key)
    if occ is None:
        drv = loader.driver()
        occ = int(loader.check_result(drv, drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, threads, smem),
                                f"cuOccupancyMaxActiveBlocksPerMultiprocessor({name})"))
        if occ < 1:
            raise loader.CudaLaunchError(f"{name} cannot be resident with {smem} B of shared memory")
        _OCCUPANCY[key] = occ
        logger.info("%s: %d CTAs per SM (%d B shared memory)", name, occ, smem)
    return occ


def _launch(fn, grid: int, threads: int, smem: int, stream: int, params, pdl: bool) -> None:
    loader.launch(fn, (grid, 1, 1), (threads, 1, 1), smem, stream, params, pdl=pdl)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _fp32_transform(t: torch.Tensor) -> torch.Tensor:
    from .ops import fp32_transform

    return fp32_transform(t)


def _index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def act_operand(x: torch.Tensor, transform: torch.Tensor, act_global_scale: torch.Tensor, fmt: str,
                tiles: Optional[int] = None, debug: bool = False):
    """Launch the act kernel: (B fragments, MXFP4 block scales or None, codes (M, K/2) or None, scales or None).

    ``debug`` also writes the reference-layout codes and scale bytes (for the bit-exact tests)."""
    f = Format.parse(fmt)
    m, k = x.shape
    ok, why = supports(m, 1, k, f, x.dtype)
    if not ok:
        raise ValueError(f"CUDA decode: {why}")
    tiles = tiles or (1 if m <= 8 else 2)
    x = _aligned(x)
    t = _fp32_transform(transform)
    kc = k // CHUNK_K
    b = torch.empty(tiles * kc * 256, dtype=torch.float16, device=x.device)
    sa = torch.empty(kc * tiles * 8, dtype=torch.float32, device=x.device) if f is Format.MXFP4 else None
    codes = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device) if debug else None
    scales = torch.empty((m, k // f.group_size), dtype=torch.uint8, device=x.device) if debug else None
    _, mx_gs = _state(x.device)
    gs = mx_gs if f is Format.MXFP4 else act_global_scale
    _launch_act(x, t, gs, b, sa, codes, scales, f, tiles)
    return b, sa, codes, scales


def _launch_act(x, t, gs, b, sa, codes, scales, f: Format, tiles: int) -> None:
    m, k = x.shape
    name = f"wush_dec_act_{f.value}_{_X_NAMES[x.dtype]}"
    idx = _index(x)
    fn = _function(name, idx, 0, _DecActArgs)
    args = _DecActArgs(
        x=x.data_ptr(), t=t.data_ptr(), gs=gs.data_ptr(), b=b.data_ptr(), sa=sa.data_ptr() if sa is not None else None,
        codes=codes.data_ptr() if codes is not None else None, scales=scales.data_ptr() if scales is not None else None,
        m=m, k=k, x_row_stride=x.stride(0), tiles=tiles, reserved=0,
    )
    _launch(fn, k // CHUNK_K, 128, 0, torch.cuda.current_stream(x.device).cuda_stream, args, False)


def linear(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    transform: torch.Tensor,
    w_global_scale: torch.Tensor,
    a_global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
    *,
    config: Optional[DecodeConfig] = None,
    pdl: bool = True,
) -> torch.Tensor:
    """The calibrated linear on x (M, K), M <= 16, on the decode kernels: (M, N) in x's dtype.

    ``config`` picks the GEMM variant (default: :func:`default_config`); ``pdl=False`` launches the GEMM without
    programmatic dependent launch (measured 3-15% slower).

    Same semantics as :func:`wush_compile.ops.reference.linear_ref` (MXFP4 uses the format's 1/3 activation
    global scale, like the Triton routes). Raises ValueError for shapes :func:`supports` rejects."""
    f = Format.parse(fmt)
    if x.dim() != 2:
        raise ValueError(f"CUDA decode: expected 2-D activations (M, K), got {tuple(x.shape)}")
    m, k = x.shape
    n = w_codes.shape[0]
    ok, why = supports(m, n, k, f, x.dtype)
    if not ok:
        raise ValueError(f"CUDA decode: {why}")
    if tuple(w_codes.shape) != (n, k // 2) or tuple(w_scales.shape) != (n, k // f.group_size):
        raise ValueError(
            f"CUDA decode: weight codes {tuple(w_codes.shape)} / scales {tuple(w_scales.shape)} do not match K={k} "
            f"({f.value}); expected ({n}, {k // 2}) and ({n}, {k // f.group_size})"
        )
    dev = x.device
    idx = _index(x)
    counters, mx_gs = _state(dev)
    tiles = 1 if m <= 8 else 2
    config = config or default_config(m)
    name = gemm_kernel_name(f, tiles, config)
    smem = smem_bytes(f, tiles, config)
    gemm_fn = _function(name, idx, smem, _DecGemmArgs)
    p = _plan_cached(m, n, k, f, loader.sm_count(idx), _ctas_per_sm(gemm_fn, name, idx, config.warps * 32, smem), config)

    x = _aligned(x)
    w_codes = _aligned(w_codes)
    w_scales = _aligned(w_scales)
    t = _fp32_transform(transform)
    bias32 = _bias32(bias) if bias is not None else None
    ga = mx_gs if f is Format.MXFP4 else a_global_scale
    kc = k // CHUNK_K
    b = torch.empty(p.tiles * kc * 256, dtype=torch.float16, device=dev)
    sa = torch.empty(kc * p.tiles * 8, dtype=torch.float32, device=dev) if f is Format.MXFP4 else None
    out = torch.empty((m, n), dtype=x.dtype, device=dev)
    part = torch.empty(p.part_numel, dtype=torch.float32, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream

    _launch_act(x, t, ga, b, sa, None, None, f, p.tiles)
    args = _DecGemmArgs(
        w=w_codes.data_ptr(), ws=w_scales.data_ptr(), b=b.data_ptr(), sa=sa.data_ptr() if sa is not None else None,
        ga=ga.data_ptr(), gw=w_global_scale.data_ptr(), bias=bias32.data_ptr() if bias32 is not None else None,
        out=out.data_ptr(), part=part.data_ptr(), counters=counters.data_ptr(), m=m, n=n, k=k, units=p.units,
        stages_per_rb=p.stages_per_rb, ctas=p.ctas, out_dtype=_OUT_CODES[x.dtype], reserved=0,
    )
    _launch(gemm_fn, p.ctas, config.warps * 32, p.smem_bytes, stream, args, pdl)
    return out


@functools.lru_cache(maxsize=4096)
def _plan_cached(m, n, k, f, sms, occ, config) -> DecodePlan:
    return plan(m, n, k, f, sms, occ, config)


def _bias32(bias: torch.Tensor) -> torch.Tensor:
    if bias.dtype == torch.float32 and bias.is_contiguous():
        return bias
    from .ops import fp32_bias

    return fp32_bias(bias)


