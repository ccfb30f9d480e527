"""MXFP4 W4A4 linear as an fp8 tensor-core GEMM with the FP4 weights expanded to e4m3 inside the kernel.

Public API (same semantics as :func:`wush_compile.ops.reference.linear_ref` for MXFP4):

* :func:`pack_weights` - once per layer (load time): the weight codes repacked so that each 32-column scale
  group is one contiguous run of low or high nibbles (same size; :func:`unpack_weights` inverts it).
* :func:`quantize_act_fp8` - blockwise transform + MXFP4 quantize + row fold ->
  (e4m3 (M, K), fp32 row scales (M,), e8m0 scale bytes (M, K/32), wide-row state).
* :func:`gemm` - the swap-AB fp8 GEMM on those operands (+ the exact fallback launch for activation rows
  whose exponent spread does not fold); it reads the packed FP4 codes and expands them to e4m3 in registers
  (no e4m3 weight copy in memory), one fp8 MMA per scale group, each group's sum scaled into fp32.
* :func:`linear` - both.
* :func:`tiles_for` - the pure tile heuristic (frozen :class:`Fp8Tiles`); :func:`fallback_stats` - counters.

K must be a multiple of 128. Importing this module does not import Triton.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch

from .. import formats, settings

__all__ = ["Fp8Tiles", "tiles_for", "quantize_act_fp8", "gemm", "linear",
           "fallback_stats", "act_split_for", "A_SPREAD_MAX", "pack_weights", "unpack_weights"]

#: Widest exponent spread (max - min group exponent) of an activation row that folds into e4m3 with one row
#: scale (fp32 -> e4m3 cast, subnormals included, d >= -8); wider rows take the exact fallback.
A_SPREAD_MAX = 14
CHUNK = 128


@functools.lru_cache(maxsize=None)
def _k():
    from . import _fp8core

    return _fp8core


def _interpreting() -> bool:
    return settings.triton_interpret()


@dataclasses.dataclass(frozen=True)
class Fp8Tiles:
    """GEMM tiles: weight rows per program (MMA M), tokens per program (MMA N), grouped order, warps,
    pipeline stages, the PTX expansion (else integer ops), and the number of K ranges (split-K, fp32
    partials summed in a fixed order)."""

    def __post_init__(self):
        for name in ("block_w", "block_t"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"Fp8Tiles.{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1:
            raise ValueError(f"Fp8Tiles.split_k must be >= 1, got {self.split_k}")

    block_w: int = 128
    block_t: int = 64
    group: int = 8
    num_warps: int = 4
    num_stages: int = 3
    use_asm: bool = True
    split_k: int = 1


def tiles_for(m: int, n: int, k: int) -> Fp8Tiles:
    """Pure heuristic from the H100 sweep (benchmarks/RESULTS.md, fp8core): 64 weight rows per program below
    2048 tokens, tokens per program the power of two >= M up to 128, split-K while the grid is small."""
    bt = 16
    while bt < min(m, 128):
        bt *= 2
    if m >= 2048:
        return Fp8Tiles(block_w=128, block_t=128, num_warps=8)
    programs = triton_cdiv(n, 64) * triton_cdiv(m, bt)
    split = 1
    while programs * split < 264 and split < 8 and k // CHUNK >= 8 * split:
        split *= 2
    return Fp8Tiles(block_w=64, block_t=bt, split_k=split)


def pack_weights(codes: torch.Tensor) -> torch.Tensor:
    """MXFP4 codes (N, K/2) in the canonical packing (byte = column 2j | column 2j+1 << 4) -> the fp8core
    packing: per chunk of 128 columns, byte j = column j | column j + 64 << 4. Same bytes count; one pass."""
    if codes.dtype != torch.uint8 or codes.dim() != 2 or (codes.shape[1] * 2) % CHUNK:
        raise ValueError(f"pack_weights expects (N, K/2) uint8 codes with K % {CHUNK} == 0, got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    n, kh = codes.shape
    c = formats.unpack_fp4(codes).reshape(n, kh * 2 // CHUNK, 2, CHUNK // 2)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, kh).contiguous()


def unpack_weights(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_weights` (canonical packing)."""
    n, kh = packed.shape
    p = packed.reshape(n, kh * 2 // CHUNK, CHUNK // 2)
    c = torch.stack([p & 15, p >> 4], dim=2).reshape(n, kh * 2)
    return formats.pack_fp4(c)


_STATS: dict = {}
_PACKED: dict = {}


def _stats(device) -> torch.Tensor:
    key = str(device)
    t = _STATS.get(key)
    if t is None:
        t = torch.zeros(2, dtype=torch.int32, device=device)
        _STATS[key] = t
    return t


def _mx_gs(device) -> torch.Tensor:
    from .kernels import mx_global_scale  # one per-device 1/3 for every Triton route

    return mx_global_scale(device)


def fallback_stats(device=None, reset: bool = False) -> dict:
    """Activation rows sent to the exact fallback since the last reset (act_rows_fallback) out of act_rows,
    counted on the device."""
    out = {}
    for key, t in list(_STATS.items()):
        if device is not None and key != str(torch.device(device)):
            continue
        v = t.tolist()
        out[key] = {"act_rows_fallback": v[0], "act_rows": v[1]}
        if reset:
            t.zero_()
    return out


def _check(x, transform):
    if x.dim() != 2:
        raise ValueError(f"expected 2-D activations (M, K), got {tuple(x.shape)}; reshape to (-1, K)")
    k = x.shape[1]
    if k % CHUNK:
        raise ValueError(f"fp8core needs K % {CHUNK} == 0, got K={k}; use the triton_fp8 route for this layer")
    if tuple(transform.shape) != (k // 32, 32, 32):
        raise ValueError(f"transform must be {(k // 32, 32, 32)} for K={k} (mxfp4), got {tuple(transform.shape)}")


def act_split_for(m: int, k: int) -> bool:
    """Pure heuristic: the split activation path (two kernels, grid over rows x K) when the one-kernel path
    would run too few programs to fill the GPU."""
    return triton_cdiv(m, 16 if m <= 256 else 32) < 132


def quantize_act_fp8(x: torch.Tensor, transform: torch.Tensor, block_m: int | None = None,
                     split: bool | None = None):
    """Transform + MXFP4 quantize + row fold of x (M, K).

    ``split=False``: one kernel, BM rows per program, two passes over K (the second recomputes the
    transform). ``split=True``: two kernels over a (rows x K chunks) grid - codes and per-row exponent
    range first (atomics), the fold second - for small M. Both write the same bytes. None: heuristic.

    Returns (q (M, K) float8_e4m3fn, row_scale (M,) fp32 = 2**ref (NaN for rows holding
    NaN/Inf), scales (M, K/32) uint8 (bit-identical to the reference's), state (2 + 2M,) int32:
    [count, 0, flags (M), list (M)] of the rows whose spread exceeds A_SPREAD_MAX)."""
    _check(x, transform)
    k = _k()
    m, kk = x.shape
    x = x.contiguous()
    t = transform.contiguous()
    q = torch.empty((m, kk), dtype=torch.uint8, device=x.device)
    rs = torch.empty((m,), dtype=torch.float32, device=x.device)
    sc = torch.empty((m, kk // 32), dtype=torch.uint8, device=x.device)
    if split is None:
        split = act_split_for(m, kk)
    ieee = _interpreting() or not (x.dtype == t.dtype and x.dtype in (torch.bfloat16, torch.float16))
    if not split:
        state = torch.zeros(2 + 2 * m, dtype=torch.int32, device=x.device)
        bm = block_m or (16 if m <= 256 else 32)
        k._act_quant_kernel[(triton_cdiv(m, bm),)](
            x, x.stride(0), t, q, rs, sc, state[2 : 2 + m], state[2 + m :], state[0:1], _stats(x.device),
            m, kk, BM=bm, G=32, DOT_IEEE=ieee, num_warps=4,
        )
        return q.view(torch.float8_e4m3fn), rs, sc, state
    # one zeroed buffer: [count, 0, flags (M), list (M), row stats (3M)]
    buf = torch.zeros(2 + 5 * m, dtype=torch.int32, device=x.device)
    state = buf[: 2 + 2 * m]
    rowst = buf[2 + 2 * m :]
    bm = block_m or (16 if m <= 256 else 64)
    n_g = kk // 32
    gm = triton_cdiv(m, bm)
    gpp = max(1, min(n_g, (gm * n_g) // 528))
    k._act_codes_kernel[(gm, triton_cdiv(n_g, gpp))](
        x, x.stride(0), t, q, sc, rowst, m, kk, BM=bm, G=32, GPP=gpp, DOT_IEEE=ieee, num_warps=4,
    )
    bk = 512
    k._act_fold_kernel[(triton_cdiv(m, 16), triton_cdiv(kk, bk))](
        q, sc, rowst, rs, state[2 : 2 + m], state[2 + m :], state[0:1], _stats(x.device), m, kk,
        BM=16, BK=bk, G=32, num_warps=4,
    )
    return q.view(torch.float8_e4m3fn), rs, sc, state


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm(q, row_scale, a_scales, state, w_packed, w_scales, w_global_scale, bias=None,
         out_dtype=torch.bfloat16, tiles: Fp8Tiles | None = None) -> torch.Tensor:
    """out (M, N) = A @ W^T * global scales (+ bias) from :func:`quantize_act_fp8`'s outputs and the weights
    (codes from :func:`pack_weights`, canonical e8m0 scale bytes)."""
    k = _k()
    m, kk = q.shape
    n = w_packed.shape[0]
    if tuple(w_packed.shape) != (n, kk // 2) or tuple(w_scales.shape) != (n, kk // 32):
        raise ValueError(f"weights must be packed codes {(n, kk // 2)} and scales {(n, kk // 32)} for K={kk}, got "
                         f"{tuple(w_packed.shape)} and {tuple(w_scales.shape)}")
    cfg = tiles or tiles_for(m, n, kk)
    use_asm = cfg.use_asm and not _interpreting() and q.device.type == "cuda"
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)
    ga = _mx_gs(q.device)
    gw = torch.as_tensor(w_global_scale, dtype=torch.float32, device=q.device).reshape(1)
    bias_arg = bias if bias is not None else out
    qb = q.view(torch.float8_e4m3fn)
    split = max(1, min(cfg.split_k, kk // CHUNK))
    grid = (triton_cdiv(n, cfg.block_w) * triton_cdiv(m, cfg.block_t), split)
    dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=q.device)
    k._gemm_kernel[grid](
        qb, row_scale, w_packed, w_scales, ga, gw, bias_arg, dst, m, n, kk,
        HAS_BIAS=bias is not None, BW=cfg.block_w, BT=cfg.block_t, GROUP=cfg.group, USE_ASM=use_asm,
        SPLIT=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        blk = 1024
        k._splitk_reduce_kernel[(triton_cdiv(m * n, blk),)](
            dst, bias_arg, out, m, n, SPLIT=split, HAS_BIAS=bias is not None, BLOCK=blk, num_warps=4,
        )
    bw = 64
    k._fallback_kernel[(triton_cdiv(n, bw),)](
        qb, row_scale, a_scales, state[2 : 2 + m], state[2 + m :], state[0:1], w_packed, w_scales,
        ga, gw, bias_arg, out, m, n, kk, HAS_BIAS=bias is not None, BW=bw, BT=16, USE_ASM=use_asm, num_warps=4,
    )
    return out


def linear(x, w_packed, w_scales, transform, w_global_scale, bias=None, tiles: Fp8Tiles | None = None) -> torch.Tensor:
    """MXFP4 W4A4 linear on x (..., K) -> (..., N) in x's dtype (reference.linear_ref semantics); weight codes
    from :func:`pack_weights`."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n = w_packed.shape[0]
    if x2.shape[0] == 0:
        return x.new_empty((*lead, n))
    q, rs, sc, state = quantize_act_fp8(x2, transform)
    y = gemm(q, rs, sc, state, w_packed.contiguous(), w_scales.contiguous(), w_global_scale, bias, x.dtype, tiles)
    return y.reshape(*lead, n)


# ---- the router's entry points (checked operands from ops.operands.LinearOperands) ----


def packed_codes(codes: torch.Tensor) -> torch.Tensor:
    """The fp8core packing of a layer's codes, made once per tensor (and version) and kept while the codes
    live: the first call of a layer packs (eagerly, before any CUDA-graph capture), later calls reuse it."""
    hit = _PACKED.get(id(codes))
    if hit is not None and hit[0]() is codes and hit[1] == codes._version:
        return hit[2]
    packed = pack_weights(codes.contiguous())
    key = id(codes)
    if hit is None:  # drop the packed copy with the codes (a deleted model frees its device memory)
        weakref.finalize(codes, _PACKED.pop, key, None)
    _PACKED[key] = (weakref.ref(codes), codes._version, packed)
    return packed


def clear() -> None:
    """Drop the packed weights and the counters (the backend calls this through dispatch.clear)."""
    _PACKED.clear()
    _STATS.clear()


def run_linear(x2: torch.Tensor, ops) -> torch.Tensor:
    if x2.shape[0] == 0:
        return x2.new_empty((0, ops.n))
    return linear(x2, packed_codes(ops.weight_codes), ops.weight_scales.contiguous(), ops.transform,
                  ops.weight_global_scale, ops.bias)


def run_linear_group(x2: torch.Tensor, members) -> list[torch.Tensor]:
    """Members sharing x and the transform: the activations are quantized once, one GEMM per member."""
    if x2.shape[0] == 0:
        return [x2.new_empty((0, ops.n)) for ops in members]
    q, rs, sc, state = quantize_act_fp8(x2, members[0].transform)
    return [gemm(q, rs, sc, state, packed_codes(ops.weight_codes), ops.weight_scales.contiguous(),
                 ops.weight_global_scale, ops.bias, x2.dtype) for ops in members]
