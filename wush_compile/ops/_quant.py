"""``@triton.jit`` bodies: blockwise activation transform + FP4 quantization (SPEC sections 3 and 5).

Every helper repeats the fp32 operation order of :mod:`wush_compile.formats` so that codes and scales
are bit-identical to the torch reference whenever the transform itself is exact:

* MXFP4: ``E = floor(log2(amax))`` read off the exponent bits of amax (0 and subnormals give -127),
  ``v = (x * 2**-E) * 3``.
* NVFP4: ``s = e4m3_rne(min(amax / (6 * g), 448))`` with a correctly rounded division (``div_rn``),
  ``v = x / (s * g)`` (``div_rn`` again).
* e2m1 rounding: nearest, ties to the even index, saturating at 6; the sign bit is copied.

Tensors of one program are (NG, BM, G): NG transform blocks of G columns for BM rows. The per-block
transform ``x_b @ T_b^T`` runs as one batched ``tl.dot`` (fp32 accumulation) on the tensor cores.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Formats (the launcher maps config.Format onto these).
FMT_MX = tl.constexpr(0)
FMT_NV = tl.constexpr(1)

# Output modes of the fused kernel.
MODE_FP4 = tl.constexpr(0)  # packed e2m1 codes (M, K/2) + scale bytes (M, K/G): the reference layout
MODE_DEQ = tl.constexpr(1)  # exact dequantized values code * block scale (no global scale), (M, K)

_F32_EXP_MASK = tl.constexpr(0x7F800000)
_F32_ABS_MASK = tl.constexpr(0x7FFFFFFF)


@triton.jit
def pow2(e):
    """Exact 2**e as fp32 for an int32 tensor e in [-149, 127] (subnormal results included)."""
    normal = (tl.maximum(e, -126) + 127) << 23
    sub = tl.full(e.shape, 1, tl.int32) << tl.minimum(tl.maximum(e + 149, 0), 22)
    return tl.where(e >= -126, normal, sub).to(tl.float32, bitcast=True)


@triton.jit
def round_e2m1(v):
    """RNE of |v| onto the e2m1 grid, saturating at 6. Returns (index 0..7 int32, rounded magnitude fp32).

    |v| < 2 rounds 2|v| to an integer, 2 <= |v| < 4 rounds |v|, 4 <= |v| rounds |v|/2; each with the
    fp32 add-and-subtract of 2**23 (exact round-half-even for these magnitudes). The ties land on the
    even e2m1 index exactly as :func:`wush_compile.formats.round_to_e2m1`.
    """
    m = tl.minimum(tl.abs(v), 6.0)
    lo = m < 2.0
    mid = m < 4.0
    s = tl.where(lo, 2.0, tl.where(mid, 1.0, 0.5))
    r = (m * s + 8388608.0) - 8388608.0
    idx = r.to(tl.int32) + tl.where(lo, 0, tl.where(mid, 2, 4))
    mag = r * tl.where(lo, 0.5, tl.where(mid, 1.0, 2.0))
    return idx, mag


@triton.jit
def sign_bit(v):
    """1 where the sign bit of fp32 v is set (-0.0 included), else 0 (int32)."""
    return (v.to(tl.int32, bitcast=True) >> 31) & 1


@triton.jit
def load_transformed(x_ptr, stride_xm, rows, row_mask, t_ptr, blk0, NB, NG: tl.constexpr, G: tl.constexpr,
                     DOT_IEEE: tl.constexpr):
    """x[rows, blocks blk0..blk0+NG) @ T_b^T per block -> (NG, BM, G) fp32.

    ``rows`` (BM,) int row indices; blocks past NB read as zero (their results are masked on store).
    """
    b = tl.arange(0, NG)
    j = tl.arange(0, G)
    blk = blk0 + b
    bmask = blk < NB
    xp = x_ptr + rows[None, :, None].to(tl.int64) * stride_xm + (blk[:, None, None] * G + j[None, None, :])
    x = tl.load(xp, mask=bmask[:, None, None] & row_mask[None, :, None], other=0.0)  # (NG, BM, G)
    # T_b loaded row-major (contiguous, vectorized), used transposed: x_b @ T_b^T
    tp = t_ptr + blk[:, None, None] * (G * G) + j[None, :, None] * G + j[None, None, :]
    t = tl.permute(tl.load(tp, mask=bmask[:, None, None], other=0.0), (0, 2, 1))  # (NG, G, G): T_b^T
    if DOT_IEEE:
        xt = tl.dot(x.to(tl.float32), t.to(tl.float32), input_precision="ieee")
    else:
        xt = tl.dot(x, t)
    return xt


@triton.jit
def mx_group_exponent(xt):
    """Per group of the last axis: (E int32, bad int1, amax_bits int32). E = floor(log2(amax)) in [-127, 127]."""
    bits = xt.to(tl.int32, bitcast=True) & _F32_ABS_MASK
    amax_bits = tl.max(bits, axis=2)
    bad = amax_bits >= _F32_EXP_MASK  # a NaN or +-Inf in the group
    e = (amax_bits >> 23) - 127  # exponent field; 0 (zero or subnormal amax) gives -127
    return e, bad, amax_bits


@triton.jit
def mx_quantize(xt):
    """MXFP4 per group: (idx, neg, mag, E, bad); v = (x * 2**-E) * 3, groups with NaN/Inf zeroed."""
    e, bad, amax_bits = mx_group_exponent(xt)
    v = (xt * pow2(-e)[:, :, None]) * 3.0
    v = tl.where(bad[:, :, None], 0.0, v)
    idx, mag = round_e2m1(v)
    return idx, sign_bit(v), mag, e, bad


@triton.jit
def e4m3_rne_byte(q):
    """Non-negative finite fp32 q <= 448 -> e4m3 byte (int32), round to nearest even."""
    qb = q.to(tl.int32, bitcast=True)
    lsb = (qb >> 20) & 1
    rb = (qb + 0x7FFFF + lsb) & -1048576  # keep 3 mantissa bits, RNE (a carry bumps the exponent)
    normal = (((rb >> 23) - 120) << 3) | ((rb >> 20) & 7)
    sub = ((q * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)  # multiples of 2**-9; 8 is the smallest normal
    return tl.where(q >= 0.015625, normal, sub)


@triton.jit
def e4m3_value(byte):
    """e4m3 byte (int32, no NaN) -> fp32 value."""
    e = byte >> 3
    m = byte & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    return tl.where(e > 0, normal, m.to(tl.float32) * 0.001953125)


@triton.jit
def nv_quantize(xt, g):
    """NVFP4 per group: (idx, neg, mag, s_byte, s_val, bad) with the fp32 global scale g."""
    bits = xt.to(tl.int32, bitcast=True) & _F32_ABS_MASK
    amax_bits = tl.max(bits, axis=2)
    bad = amax_bits >= _F32_EXP_MASK
    amax = tl.where(bad, 0, amax_bits).to(tl.float32, bitcast=True)
    q = tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32) * g)
    q = tl.minimum(q, 448.0)
    s_byte = e4m3_rne_byte(q)
    s_val = e4m3_value(s_byte)
    d = s_val * g  # (NG, BM)
    dd = tl.broadcast_to(d[:, :, None], xt.shape)
    v = tl.math.div_rn(xt, tl.where(dd == 0.0, 1.0, dd))
    signed_zero = (xt.to(tl.int32, bitcast=True) & -2147483648).to(tl.float32, bitcast=True)
    v = tl.where(dd == 0.0, signed_zero, v)  # scale underflow: zeros keeping x's sign
    v = tl.where(bad[:, :, None], 0.0, v)
    idx, mag = round_e2m1(v)
    return idx, sign_bit(v), mag, s_byte, s_val, bad


@triton.jit
def _transform_quantize_kernel(
    x_ptr, stride_xm, t_ptr, gs_ptr, codes_ptr, scales_ptr, deq_ptr, M, NB,
    FMT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    """One program: BM rows x NG blocks. MODE_FP4 writes codes + scales, MODE_DEQ exact values."""
    pid_m = tl.program_id(0)
    blk0 = tl.program_id(1) * NG
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < M
    xt = load_transformed(x_ptr, stride_xm, rows, row_mask, t_ptr, blk0, NB, NG, G, DOT_IEEE)  # (NG, BM, G)
    b = tl.arange(0, NG)
    blk = blk0 + b
    gmask = (blk < NB)[:, None] & row_mask[None, :]  # (NG, BM)
    rows64 = rows.to(tl.int64)
    if FMT == FMT_MX:
        idx, neg, mag, e, bad = mx_quantize(xt)
        s_byte = tl.where(bad, 255, e + 127)
        s_val = pow2(e)
    else:
        g = tl.load(gs_ptr)
        idx, neg, mag, s_byte, s_val, bad = nv_quantize(xt, g)
        s_byte = tl.where(bad, 127, s_byte)
    if MODE == MODE_FP4:
        codes = tl.where(bad[:, :, None], 0, idx | (neg << 3))  # (NG, BM, G)
        lo, hi = tl.split(tl.reshape(codes, (NG, BM, G // 2, 2)))
        packed = (lo | (hi << 4)).to(tl.uint8)  # (NG, BM, G/2)
        jj = tl.arange(0, G // 2)
        cp = codes_ptr + rows64[None, :, None] * (NB * (G // 2)) + (blk[:, None, None] * (G // 2) + jj[None, None, :])
        tl.store(cp, packed, mask=gmask[:, :, None])
        sp = scales_ptr + rows64[None, :] * NB + blk[:, None]
        tl.store(sp, s_byte.to(tl.uint8), mask=gmask)
    else:
        val = mag * s_val[:, :, None]
        val = tl.where(neg == 1, -val, val)
        val = tl.where(bad[:, :, None], float("nan"), val)
        j = tl.arange(0, G)
        dp = deq_ptr + rows64[None, :, None] * (NB * G) + (blk[:, None, None] * G + j[None, None, :])
        tl.store(dp, val.to(deq_ptr.dtype.element_ty), mask=gmask[:, :, None])


@triton.jit
def _quantize_act_f16_kernel(
    x_ptr, stride_xm, t_ptr, gs_ptr, out_ptr, step_scale_ptr, M, NB, NSTEP,
    FMT: tl.constexpr, BM: tl.constexpr, NGS: tl.constexpr, G: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    """Transform + quantize into the decode GEMM's operand: fp16 (M, K) and fp32 step scales (M, NSTEP).

    K must be a multiple of the step NGS * G; each step is stored as [even columns | odd columns], the order
    in which the GEMM unpacks the low and high nibbles of its weight bytes.

    MXFP4: value code * 2**(E - E_step) with E_step the largest group exponent of the row's step of NGS
    blocks, step scale 2**E_step (exact for groups within 23 binades of E_step). NVFP4: code * s exactly
    (step scale 1). Groups holding NaN/Inf give NaN.
    """
    pid_m = tl.program_id(0)
    st = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    blk0 = st * NGS
    xt = load_transformed(x_ptr, stride_xm, rows, row_mask, t_ptr, blk0, NB, NGS, G, DOT_IEEE)  # (NGS, BM, G)
    blk = blk0 + tl.arange(0, NGS)
    gmask = (blk < NB)[:, None] & row_mask[None, :]
    if FMT == FMT_MX:
        idx, neg, mag, e, bad = mx_quantize(xt)
        emax = tl.max(tl.where(gmask, e, -127), axis=0)  # (BM,)
        val = mag * pow2(tl.maximum(e - emax[None, :], -60))[:, :, None]
        sstep = pow2(emax)
    else:
        g = tl.load(gs_ptr)
        idx, neg, mag, s_byte, s_val, bad = nv_quantize(xt, g)
        val = mag * s_val[:, :, None]
        sstep = tl.full((BM,), 1.0, tl.float32)
    val = tl.where(neg == 1, -val, val)
    val = tl.where(bad[:, :, None], float("nan"), val)
    # within the step, column c is stored at (c % 2) * BK/2 + c // 2: [even columns | odd columns]
    c = (blk0 - st * NGS + tl.arange(0, NGS))[:, None, None] * G + tl.arange(0, G)[None, None, :]  # (NGS, 1, G)
    pos = (c % 2) * (NGS * G // 2) + c // 2
    op = out_ptr + rows64[None, :, None] * (NB * G) + (st * (NGS * G) + pos)
    tl.store(op, val.to(tl.float16), mask=gmask[:, :, None])
    tl.store(step_scale_ptr + rows64 * NSTEP + st, sstep, mask=row_mask)
