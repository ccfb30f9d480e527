"""``@triton.jit`` bodies of the FP4 GEMMs and the weight re-encoders.

* :func:`_fp4_linear_kernel` - the fused calibrated linear for small M (decode): swap-AB tiles
  (weight rows on the MMA's M side, tokens on its N side), the activation transform + quantize of the
  tile's tokens in the prologue, FP4 weights unpacked in registers (nibble -> e4m3 bit pattern -> fp16,
  a handful of integer ops per value), one fp16 MMA per scale group (K = G) with the block scales
  applied to the fp32 group result ("promotion"), split-K with a last-program-reduces fix-up (no
  atomics on the output, no memset, CUDA-graph safe).
* :func:`_fp4_linear_exact_kernel` - the same tile over a device-side list of token rows (or weight
  rows): the exact fallback of the fp8 route for rows whose exponent spread does not fold into e4m3.
* :func:`_expand_weight_fp8_kernel` - MXFP4 weights -> row-folded e4m3 codes + fp32 column scales.
* :func:`_dequant_kernel` - packed FP4 codes + scales -> exact values code * block scale (bf16).

Every product of two decoded codes is exact in fp32 and a group's sum of G of them is exact too, so
the only rounding is the fp32 accumulation over groups - the reference's own rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._quant import (
    FMT_MX,
    FMT_NV,
    e4m3_value,
    load_transformed,
    mx_quantize,
    nv_quantize,
    pow2,
)


@triton.jit
def e2m1_to_f16(n):
    """e2m1 nibbles (uint8, high bits zero) -> fp16 value * 2**-6, exactly.

    The 3 magnitude bits land on e4m3's low exponent bits and top mantissa bit, the sign on e4m3's
    sign: that e4m3 value is code * 2**-6 (index 1 becomes e4m3's subnormal 2**-7), and the hardware
    e4m3 -> fp16 conversion does the rest.
    """
    f8 = ((n & 7) << 2) | ((n & 8) << 4)
    return f8.to(tl.float8e4nv, bitcast=True).to(tl.float16)


# e2m1 nibbles of 4 packed bytes -> 4 fp16 values code * 2**-6, two PTX lanes at a time: the nibble's
# magnitude bits go to e4m3 bits 4..2, its sign to bit 7, then cvt.rn.f16x2.e4m3x2 (sm_89+).
_ASM_LO = tl.constexpr("""{
.reg .b32 a, t;
.reg .b16 h0, h1;
shl.b32 a, $2, 2;
and.b32 a, a, 0x1C1C1C1C;
shl.b32 t, $2, 4;
and.b32 t, t, 0x80808080;
or.b32 a, a, t;
mov.b32 {h0, h1}, a;
cvt.rn.f16x2.e4m3x2 $0, h0;
cvt.rn.f16x2.e4m3x2 $1, h1;
}""")
_ASM_HI = tl.constexpr("""{
.reg .b32 a, t;
.reg .b16 h0, h1;
shr.b32 a, $2, 2;
and.b32 a, a, 0x1C1C1C1C;
and.b32 t, $2, 0x80808080;
or.b32 a, a, t;
mov.b32 {h0, h1}, a;
cvt.rn.f16x2.e4m3x2 $0, h0;
cvt.rn.f16x2.e4m3x2 $1, h1;
}""")


@triton.jit
def unpack_fp4_f16(b, USE_ASM: tl.constexpr):
    """Packed bytes (uint8) -> (low nibbles, high nibbles) as fp16 code * 2**-6, each b's shape."""
    if USE_ASM:
        lo = tl.inline_asm_elementwise(_ASM_LO, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(_ASM_HI, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)
    else:
        lo = e2m1_to_f16(b & 15)
        hi = e2m1_to_f16(b >> 4)
    return lo, hi


@triton.jit
def bf16_rne(y):
    """fp32 -> bf16, round to nearest even, in integer ops (the CPU interpreter's own cast truncates)."""
    b = y.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)  # NaN stays NaN
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def scale_value(byte, FMT: tl.constexpr):
    """Scale bytes (int32) -> fp32 block scale: e8m0 2**(byte-127) (MXFP4) or e4m3 (NVFP4); NaN bytes -> NaN."""
    if FMT == FMT_MX:
        v = pow2(byte - 127)
        v = tl.where(byte == 255, float("nan"), v)
    else:
        v = e4m3_value(byte & 127)
        v = tl.where((byte & 127) == 127, float("nan"), v)
    return v


@triton.jit
def _linear_tile(x_ptr, stride_xm, t_ptr, ga, a_ptr, as_ptr, w_ptr, ws_ptr, tok, tok_mask, wn, w_mask,
                 blk_lo, blk_hi, NB,
                 FMT: tl.constexpr, A_FUSED: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, NG: tl.constexpr,
                 G: tl.constexpr, DOT_IEEE: tl.constexpr, USE_ASM: tl.constexpr):
    """sum over blocks [blk_lo, blk_hi) of dequant(W[wn]) . quant(x[tok] T^T): (BN, BM) fp32, global scales left out.

    A_FUSED: the tokens are transformed and quantized here from x; otherwise their packed codes
    (a_ptr, (M, K/2)) and scale bytes (as_ptr, (M, K/G)) are read.
    """
    acc = tl.zeros((NG, BN, BM), tl.float32)
    jj = tl.arange(0, G // 2)
    wn64 = wn.to(tl.int64)
    tok64 = tok.to(tl.int64)
    for blk0 in range(blk_lo, blk_hi, NG):
        blk = blk0 + tl.arange(0, NG)
        bmask = blk < blk_hi
        if A_FUSED:
            # activations: transform + quantize in registers -> codes (exact in fp16) and block scales
            xt = load_transformed(x_ptr, stride_xm, tok, tok_mask, t_ptr, blk0, blk_hi, NG, G, DOT_IEEE)
            if FMT == FMT_MX:
                idx, neg, mag, e, bad = mx_quantize(xt)
                sa = tl.where(bad, float("nan"), pow2(e))  # (NG, BM)
            else:
                idx, neg, mag, s_byte, s_val, bad = nv_quantize(xt, ga)
                sa = tl.where(bad, float("nan"), s_val)
            av = tl.where(neg == 1, -mag, mag).to(tl.float16)  # (NG, BM, G)
        else:
            amask = bmask[:, None] & tok_mask[None, :]
            ab = tl.load(a_ptr + tok64[None, :, None] * (NB * (G // 2)) + (blk[:, None, None] * (G // 2) + jj[None, None, :]),
                         mask=amask[:, :, None], other=0)  # (NG, BM, G/2)
            asb = tl.load(as_ptr + tok64[None, :] * NB + blk[:, None], mask=amask, other=0)
            sa = scale_value(asb.to(tl.int32), FMT) * 64.0
            alo, ahi = unpack_fp4_f16(ab, USE_ASM)
            av = tl.reshape(tl.join(alo, ahi), (NG, BM, G))
        # weights: packed nibbles -> fp16 code * 2**-6
        wp = w_ptr + wn64[None, :, None] * (NB * (G // 2)) + (blk[:, None, None] * (G // 2) + jj[None, None, :])
        wb = tl.load(wp, mask=bmask[:, None, None] & w_mask[None, :, None], other=0)  # (NG, BN, G/2) uint8
        sb = tl.load(ws_ptr + wn64[None, :] * NB + blk[:, None], mask=bmask[:, None] & w_mask[None, :], other=0)
        sw = scale_value(sb.to(tl.int32), FMT) * 64.0  # (NG, BN)
        wlo, whi = unpack_fp4_f16(wb, USE_ASM)
        wv = tl.reshape(tl.join(wlo, whi), (NG, BN, G))
        d = tl.dot(wv, tl.permute(av, (0, 2, 1)))  # (NG, BN, BM), exact per group
        acc += d * (sw[:, :, None] * sa[:, None, :])
    return tl.sum(acc, axis=0)


@triton.jit
def _store_out(out_ptr, y, tok, tok_mask, wn, w_mask, gscale, bias_ptr, N, HAS_BIAS: tl.constexpr):
    """out[tok, wn] = y^T * gscale (+ bias), cast to out's dtype. y is (BN, BM)."""
    y = y * gscale
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + wn, mask=w_mask, other=0.0).to(tl.float32)[:, None]
    op = out_ptr + tok.to(tl.int64)[None, :] * N + wn[:, None]
    if out_ptr.dtype.element_ty == tl.float32:
        yo = y
    elif out_ptr.dtype.element_ty == tl.bfloat16:
        yo = bf16_rne(y)
    else:
        yo = y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(op, yo, mask=w_mask[:, None] & tok_mask[None, :])


@triton.jit
def _split_k_store(out_ptr, part_ptr, lock_ptr, acc, pid_n, pid_m, pid_k, tok, tok_mask, wn, w_mask, gscale, bias_ptr,
                   N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """Epilogue of the split-K GEMMs: store the (BN, BM) tile, or (SPLIT_K > 1) park the partial tile; the last
    program to arrive sums them all in split order (deterministic), writes the output and re-arms the tile's
    counter for the next call."""
    if SPLIT_K == 1:
        _store_out(out_ptr, acc, tok, tok_mask, wn, w_mask, gscale, bias_ptr, N, HAS_BIAS)
    else:
        n_tiles = tl.num_programs(0) * tl.num_programs(1)
        tile = pid_m * tl.num_programs(0) + pid_n
        offs = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
        tl.store(part_ptr + (pid_k * n_tiles + tile).to(tl.int64) * (BN * BM) + offs, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1)
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BN, BM), tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(part_ptr + (s * n_tiles + tile).to(tl.int64) * (BN * BM) + offs, cache_modifier=".cg")
            _store_out(out_ptr, total, tok, tok_mask, wn, w_mask, gscale, bias_ptr, N, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0)


@triton.jit
def _fp4_linear_kernel(
    x_ptr, stride_xm, t_ptr, ga_ptr, a_ptr, as_ptr, w_ptr, ws_ptr, gw_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, NB, BLK_PER_SPLIT,
    FMT: tl.constexpr, A_FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, NG: tl.constexpr, G: tl.constexpr, DOT_IEEE: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    wn = pid_n * BN + tl.arange(0, BN)
    w_mask = wn < N
    tok = pid_m * BM + tl.arange(0, BM)
    tok_mask = tok < M
    ga = tl.load(ga_ptr)
    gscale = ga * tl.load(gw_ptr)
    blk_lo = pid_k * BLK_PER_SPLIT
    blk_hi = tl.minimum(blk_lo + BLK_PER_SPLIT, NB)
    acc = _linear_tile(x_ptr, stride_xm, t_ptr, ga, a_ptr, as_ptr, w_ptr, ws_ptr, tok, tok_mask, wn, w_mask,
                       blk_lo, blk_hi, NB, FMT, A_FUSED, BN, BM, NG, G, DOT_IEEE, USE_ASM)
    _split_k_store(out_ptr, part_ptr, lock_ptr, acc, pid_n, pid_m, pid_k, tok, tok_mask, wn, w_mask, gscale, bias_ptr,
                   N, HAS_BIAS, SPLIT_K, BN, BM)


@triton.jit
def _fp4_linear_exact_kernel(
    x_ptr, stride_xm, t_ptr, ga_ptr, w_ptr, ws_ptr, gw_ptr, bias_ptr, out_ptr, tok_list_ptr, w_list_ptr, count_ptr,
    M, N, NB,
    FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, NG: tl.constexpr, G: tl.constexpr, DOT_IEEE: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """Exact outputs for the listed token rows (count_ptr[0] of them, program p covers weight tile p) and the
    listed weight rows (count_ptr[1], program p covers token tile p). Nothing to do when both lists are empty."""
    pid = tl.program_id(0)
    n_tok = tl.load(count_ptr)
    n_w = tl.load(count_ptr + 1)
    ga = tl.load(ga_ptr)
    gscale = ga * tl.load(gw_ptr)
    # listed token rows x weight tile pid
    wn = pid * BN + tl.arange(0, BN)
    w_mask = wn < N
    n_tok_here = tl.where(pid * BN < N, n_tok, 0)
    for c0 in range(0, n_tok_here, BM):
        i = c0 + tl.arange(0, BM)
        tok_mask = i < n_tok
        tok = tl.load(tok_list_ptr + i, mask=tok_mask, other=0)
        acc = _linear_tile(x_ptr, stride_xm, t_ptr, ga, x_ptr, x_ptr, w_ptr, ws_ptr, tok, tok_mask, wn, w_mask,
                           0, NB, NB, FMT, True, BN, BM, NG, G, DOT_IEEE, USE_ASM)
        _store_out(out_ptr, acc, tok, tok_mask, wn, w_mask, gscale, bias_ptr, N, HAS_BIAS)
    # token tile pid x listed weight rows
    tok2 = pid * BM + tl.arange(0, BM)
    tok2_mask = tok2 < M
    n_w_here = tl.where(pid * BM < M, n_w, 0)
    for c0 in range(0, n_w_here, BN):
        i = c0 + tl.arange(0, BN)
        w2_mask = i < n_w
        wn2 = tl.load(w_list_ptr + i, mask=w2_mask, other=0)
        acc = _linear_tile(x_ptr, stride_xm, t_ptr, ga, x_ptr, x_ptr, w_ptr, ws_ptr, tok2, tok2_mask, wn2, w2_mask,
                           0, NB, NB, FMT, True, BN, BM, NG, G, DOT_IEEE, USE_ASM)
        _store_out(out_ptr, acc, tok2, tok2_mask, wn2, w2_mask, gscale, bias_ptr, N, HAS_BIAS)


@triton.jit
def _expand_fp8_kernel(
    c_ptr, s_ptr, g1_ptr, g2_ptr, q_ptr, row_scale_ptr, flag_ptr, count_ptr, list_ptr, stats_ptr, R, NB,
    BR: tl.constexpr, NGC: tl.constexpr, NGS: tl.constexpr, G: tl.constexpr,
):
    """MXFP4 rows (packed codes + e8m0 bytes) -> row-folded e4m3 (R, K) + fp32 row scales 2**R_r * g1 * g2.

    Program (row block, chunk of NGC blocks). R_r = (largest group exponent of the row) - 6, from all the
    row's scale bytes; a group's codes become code * 2**(E - R_r), exact in e4m3 for E - R_r >= -8. A row with
    a nonzero code in a group below that (or a NaN scale) is listed once (``flag_ptr`` dedups across chunks)
    for the exact fallback.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    bmax = tl.zeros((BR,), tl.int32)
    nbad = tl.zeros((BR,), tl.int32)
    for blk0 in range(0, NB, NGS):
        blk = blk0 + tl.arange(0, NGS)
        m2 = rmask[:, None] & (blk < NB)[None, :]
        sb = tl.load(s_ptr + rows64[:, None] * NB + blk[None, :], mask=m2, other=0).to(tl.int32)  # (BR, NGS)
        bad = sb == 255
        bmax = tl.maximum(bmax, tl.max(tl.where(bad, 0, sb), axis=1))
        nbad += tl.sum(bad.to(tl.int32), axis=1)
    r = bmax - 127 - 6
    blk = pid_c * NGC + tl.arange(0, NGC)
    m2 = rmask[:, None] & (blk < NB)[None, :]
    sb = tl.load(s_ptr + rows64[:, None] * NB + blk[None, :], mask=m2, other=0).to(tl.int32)  # (BR, NGC)
    d = tl.maximum(sb - 127 - r[:, None], -100)
    jj = tl.arange(0, G // 2)
    m3 = m2[:, :, None]
    cb = tl.load(c_ptr + rows64[:, None, None] * (NB * (G // 2)) + blk[None, :, None] * (G // 2) + jj[None, None, :],
                 mask=m3, other=0)  # (BR, NGC, G/2) uint8
    nz = ((cb & 0x77) != 0).to(tl.int32)
    viol = tl.sum(tl.sum(nz * (d < -8).to(tl.int32)[:, :, None], axis=2), axis=1)
    f = pow2(d + 6)[:, :, None]
    lo = (e2m1_to_f16(cb & 15).to(tl.float32) * f).to(tl.float8e4nv)
    hi = (e2m1_to_f16(cb >> 4).to(tl.float32) * f).to(tl.float8e4nv)
    q = tl.reshape(tl.join(lo, hi), (BR, NGC, G))
    j = tl.arange(0, G)
    tl.store(q_ptr + rows64[:, None, None] * (NB * G) + blk[None, :, None] * G + j[None, None, :], q, mask=m3)
    first = pid_c == 0
    if first:
        gscale = tl.load(g1_ptr) * tl.load(g2_ptr)
        tl.store(row_scale_ptr + rows64, pow2(r) * gscale, mask=rmask)
        tl.atomic_add(stats_ptr + 1, tl.sum(rmask.to(tl.int32), axis=0))
    nbad_here = tl.where(first, nbad, 0)
    flag = ((viol + nbad_here) > 0) & rmask
    old = tl.atomic_xchg(flag_ptr + rows, tl.full((BR,), 1, tl.int32), mask=flag)
    new = flag & (old == 0)
    nnew = tl.sum(new.to(tl.int32), axis=0)
    base = tl.atomic_add(count_ptr, nnew)
    slot = base + tl.cumsum(new.to(tl.int32), axis=0) - 1
    tl.store(list_ptr + slot, rows, mask=new)
    tl.atomic_add(stats_ptr, nnew)


@triton.jit
def _fp4_gemv_kernel(
    a_ptr, a_scale_ptr, w_ptr, ws_ptr, ga_ptr, gw_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, NB, NSTEP, STEP_PER_SPLIT,
    FMT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, USE_ASM: tl.constexpr,
):
    """Decode GEMM on step-folded fp16 activations (see ``_quantize_act_f16_kernel``), swap-AB, split-K.

    Per K step of BK columns: FP4 weights -> fp16 code * 2**(E_g - E_step) (MXFP4) or code * s_g (NVFP4),
    exact; one fp16 MMA over the step (fp32 accumulation); MXFP4 multiplies the step's fp32 result by
    2**E_step(weight row) * 2**E_step(token) - a power of two, exact.
    """
    NGS: tl.constexpr = BK // G
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    wn = pid_n * BN + tl.arange(0, BN)
    w_mask = wn < N
    tok = pid_m * BM + tl.arange(0, BM)
    tok_mask = tok < M
    wn64 = wn.to(tl.int64)
    tok64 = tok.to(tl.int64)
    K = NB * G
    kk2 = tl.arange(0, BK // 2)
    gg = tl.arange(0, NGS)
    acc = tl.zeros((BN, BM), tl.float32)
    s_lo = pid_k * STEP_PER_SPLIT
    s_hi = tl.minimum(s_lo + STEP_PER_SPLIT, NSTEP)
    for st in range(s_lo, s_hi):
        k0 = st * BK
        # K is a multiple of BK (the launcher picks BK so): only row masks, so the loads vectorize
        wb = tl.load(w_ptr + wn64[:, None] * (K // 2) + (k0 // 2 + kk2)[None, :], mask=w_mask[:, None], other=0)
        sb = tl.load(ws_ptr + wn64[:, None] * NB + (st * NGS + gg)[None, :], mask=w_mask[:, None], other=0).to(tl.int32)
        if FMT == FMT_MX:
            emax = tl.max(sb, axis=1)  # (BN,)
            mult = pow2(tl.maximum(sb - emax[:, None] + 6, -30)).to(tl.float16)  # (BN, NGS), exact
            mult = tl.where(sb == 255, float("nan"), mult)
        else:
            mult = (scale_value(sb, FMT) * 64.0).to(tl.float16)  # s * 2**6 <= 28672: exact in fp16
        mult2 = tl.reshape(tl.broadcast_to(mult[:, :, None], (BN, NGS, G // 2)), (BN, BK // 2))
        wlo, whi = unpack_fp4_f16(wb, USE_ASM)  # columns k0 + 2j and k0 + 2j + 1
        # the activation operand stores each step as [even columns | odd columns]
        a_base = a_ptr + tok64[:, None] * K + (k0 + kk2)[None, :]
        a_even = tl.load(a_base, mask=tok_mask[:, None], other=0.0)  # (BM, BK/2) fp16
        a_odd = tl.load(a_base + BK // 2, mask=tok_mask[:, None], other=0.0)
        if FMT == FMT_MX:
            d = tl.dot(wlo * mult2, tl.trans(a_even))
            d = tl.dot(whi * mult2, tl.trans(a_odd), d)  # (BN, BM)
            sa = tl.load(a_scale_ptr + tok64 * NSTEP + st, mask=tok_mask, other=0.0)  # (BM,) fp32
            acc += d * (pow2(emax - 127)[:, None] * sa[None, :])
        else:
            acc = tl.dot(wlo * mult2, tl.trans(a_even), acc)
            acc = tl.dot(whi * mult2, tl.trans(a_odd), acc)
    ga = tl.load(ga_ptr)
    gscale = ga * tl.load(gw_ptr)
    _split_k_store(out_ptr, part_ptr, lock_ptr, acc, pid_n, pid_m, pid_k, tok, tok_mask, wn, w_mask, gscale, bias_ptr,
                   N, HAS_BIAS, SPLIT_K, BN, BM)


@triton.jit
def _dequant_kernel(c_ptr, s_ptr, out_ptr, R, NB, FMT: tl.constexpr, BR: tl.constexpr, NG: tl.constexpr,
                    G: tl.constexpr):
    """Packed codes (R, K/2) + scale bytes (R, K/G) -> exact values code * block scale (R, K) in out's dtype."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    blk = tl.program_id(1) * NG + tl.arange(0, NG)
    m2 = (rows < R)[:, None] & (blk < NB)[None, :]
    rows64 = rows.to(tl.int64)
    jj = tl.arange(0, G // 2)
    cb = tl.load(c_ptr + rows64[:, None, None] * (NB * (G // 2)) + blk[None, :, None] * (G // 2) + jj[None, None, :],
                 mask=m2[:, :, None], other=0)  # (BR, NG, G/2)
    sb = tl.load(s_ptr + rows64[:, None] * NB + blk[None, :], mask=m2, other=0).to(tl.int32)
    sv = (scale_value(sb, FMT) * 64.0)[:, :, None]
    lo = e2m1_to_f16(cb & 15).to(tl.float32) * sv
    hi = e2m1_to_f16(cb >> 4).to(tl.float32) * sv
    v = tl.reshape(tl.join(lo, hi), (BR, NG, G))
    j = tl.arange(0, G)
    tl.store(out_ptr + rows64[:, None, None] * (NB * G) + blk[None, :, None] * G + j[None, None, :],
             v.to(out_ptr.dtype.element_ty), mask=m2[:, :, None])
