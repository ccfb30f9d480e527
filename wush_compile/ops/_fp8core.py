"""``@triton.jit`` bodies of the MXFP4 W4A4 linear on fp8 tensor cores (Hopper), see :mod:`.fp8core`.

Exactness: an e2m1 magnitude {0.5 .. 6} times 2**d is an exact e4m3 value for -8 <= d <= 6. Per row a
reference exponent ref = (largest group exponent) - 6 folds every group of the row into e4m3 with
d = E_group - ref; the row scale 2**ref goes to the GEMM epilogue. Activations are folded through an fp32 ->
e4m3 cast (exact down to d = -8, subnormals included, spread <= 14); weights in the GEMM with an integer
expansion that keeps the exponent field normal (d >= -5, spread <= 11). Rows that do not fold take the exact
per-group fallback kernel.

Layouts. Activations: e4m3 (M, K) in natural column order. Weights: the fp8core packing (see
``fp8core.pack_weights``): per chunk of 128 columns, byte j (0..63) holds column j in its low nibble and column
j + 64 in its high nibble, so the low nibbles of a chunk expand to columns 0..63 and the high nibbles to
64..127, each in natural order. Every 32-column k-step of the fp8 MMA then covers exactly one scale group of
both operands: its 32 products share one scale and their sum (multiples of 1/4, at most 32 * 36) is exact
inside the MMA; the fp32 accumulator takes one add per group (``max_num_imprecise_acc=32``).
"""

from __future__ import annotations

import triton
import triton.language as tl

CHUNK = tl.constexpr(128)
#: smallest group offset d the weight expansion handles (e4m3 exponent field stays >= 1)
W_DMIN = tl.constexpr(-5)
#: smallest group offset d the activation fold handles (e4m3 subnormals, via the fp32 cast)
A_DMIN = tl.constexpr(-8)


@triton.jit
def _pow2(e):
    """Exact 2**e as fp32 for int32 e in [-149, 127]."""
    normal = (tl.maximum(e, -126) + 127) << 23
    sub = tl.full(e.shape, 1, tl.int32) << tl.minimum(tl.maximum(e + 149, 0), 22)
    return tl.where(e >= -126, normal, sub).to(tl.float32, bitcast=True)


@triton.jit
def _round_e2m1(v):
    """RNE of |v| onto the e2m1 grid, saturating at 6 -> rounded magnitude fp32 (formats.round_to_e2m1)."""
    m = tl.minimum(tl.abs(v), 6.0)
    lo = m < 2.0
    mid = m < 4.0
    s = tl.where(lo, 2.0, tl.where(mid, 1.0, 0.5))
    r = (m * s + 8388608.0) - 8388608.0
    return r * tl.where(lo, 0.5, tl.where(mid, 1.0, 2.0))


@triton.jit
def _bf16_rne(y):
    b = y.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _transform_group(x_ptr, stride_xm, rows, rmask, t_ptr, k0, G: tl.constexpr, DOT_IEEE: tl.constexpr):
    """x[rows, k0:k0+G] @ T_b^T -> (BM, G) fp32 (one dot, fp32 accumulation), and per row whether the group
    holds a NaN/Inf (zeroed before the dot so that it cannot spread)."""
    c = tl.arange(0, G)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + (k0 + c)[None, :], mask=rmask[:, None],
                other=0.0).to(tl.float32)
    nonfin = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >= 0x7F800000
    bad_in = tl.max(nonfin.to(tl.int32), axis=1)
    x = tl.where(nonfin, 0.0, x).to(x_ptr.dtype.element_ty)
    tt = tl.load(t_ptr + (k0 // G) * (G * G) + c[:, None] * G + c[None, :])
    if DOT_IEEE:
        xt = tl.dot(x.to(tl.float32), tl.trans(tt.to(tl.float32)), input_precision="ieee")
    else:
        xt = tl.dot(x, tl.trans(tt))
    return xt, bad_in


@triton.jit
def _group_codes(xt, bad_in):
    """(BM, G) transformed values -> group exponent e (BM,), bad (BM,), and the signed e2m1 values (fp32)."""
    ab = tl.max(xt.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    bad = (ab >= 0x7F800000) | (bad_in != 0)
    e = (ab >> 23) - 127
    v = (xt * _pow2(-e)[:, None]) * 3.0
    v = tl.where(bad[:, None], 0.0, v)
    mag = _round_e2m1(v)
    sgn = v.to(tl.int32, bitcast=True) & -2147483648
    val = (mag.to(tl.int32, bitcast=True) | sgn).to(tl.float32, bitcast=True)
    return e, bad, ab, val


@triton.jit
def _store_group(q_ptr, rows64, rmask, K, k0, val, G: tl.constexpr):
    """Signed fp32 values (BM, G), exact in e4m3 -> e4m3 bytes of columns k0 .. k0 + G."""
    q = val.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    c = tl.arange(0, G)
    tl.store(q_ptr + rows64[:, None] * K + k0 + c[None, :], q, mask=rmask[:, None])


@triton.jit
def _act_quant_kernel(x_ptr, stride_xm, t_ptr, q_ptr, rs_ptr, sc_ptr, flag_ptr, list_ptr, count_ptr, stats_ptr,
                      M, K, BM: tl.constexpr, G: tl.constexpr, DOT_IEEE: tl.constexpr):
    """Transform + MXFP4 quantize + row fold of BM rows: pass 1 gets the row's group exponents, pass 2
    recomputes each group (x from L2) and writes e4m3 (layout above), scale bytes and the row scale."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    emax = tl.full((BM,), -127, tl.int32)
    emin = tl.full((BM,), 127, tl.int32)
    nbad = tl.zeros((BM,), tl.int32)
    for k0 in range(0, K, G):
        xt, bad_in = _transform_group(x_ptr, stride_xm, rows, rmask, t_ptr, k0, G, DOT_IEEE)
        ab = tl.max(xt.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
        bad = (ab >= 0x7F800000) | (bad_in != 0)
        e = (ab >> 23) - 127
        ok = (ab > 0) & (~bad)
        emax = tl.maximum(emax, tl.where(ok, e, -127))
        emin = tl.minimum(emin, tl.where(ok, e, 127))
        nbad += bad.to(tl.int32)
    ref = emax - 6
    wide = (emax - emin) > (6 - A_DMIN)  # emin > emax when the row is all zero: not wide
    wide = wide & rmask & (nbad == 0)
    rows64 = rows.to(tl.int64)
    rs = tl.where(nbad > 0, float("nan"), _pow2(tl.maximum(ref, -149)))
    tl.store(rs_ptr + rows, rs, mask=rmask)
    for k0 in range(0, K, G):
        xt, bad_in = _transform_group(x_ptr, stride_xm, rows, rmask, t_ptr, k0, G, DOT_IEEE)
        e, bad, ab, val = _group_codes(xt, bad_in)
        # folded: code * 2**(E - ref); wide rows keep the bare code (the fallback applies 2**E per group)
        dd = tl.where(wide, 0, tl.maximum(e - ref, -30))
        val = val * _pow2(dd)[:, None]
        _store_group(q_ptr, rows64, rmask, K, k0, val, G)
        sb = tl.where(bad, 255, e + 127)
        tl.store(sc_ptr + rows64 * (K // G) + k0 // G, sb.to(tl.uint8), mask=rmask)
    # list the wide rows for the fallback (flags dedup, one atomic per program)
    tl.store(flag_ptr + rows, wide.to(tl.int32), mask=rmask)
    n_new = tl.sum(wide.to(tl.int32), axis=0)
    if n_new > 0:
        base_i = tl.atomic_add(count_ptr, n_new)
        slot = base_i + tl.cumsum(wide.to(tl.int32), axis=0) - 1
        tl.store(list_ptr + slot, rows, mask=wide)
        tl.atomic_add(stats_ptr, n_new)
    tl.atomic_add(stats_ptr + 1, tl.sum(rmask.to(tl.int32), axis=0))


# 4 packed weight bytes + 4 biased group offsets d + 5 of their low nibbles and 4 of their high nibbles (one
# byte each, 0..11) -> 4 e4m3 of the low nibbles and 4 of the high nibbles. Each output byte uses its own
# offset byte, so the result does not depend on how Triton assigns elements to registers. LUT bytes {0, .5, 1, 1.5 | 2, 3, 4, 6} as e4m3 bits minus 8 * 5,
# picked with prmt by the 3 magnitude bits; + 8 * (d + 5) per byte (no carry: <= 0x7C); code 0 masked to 0;
# the sign bit goes to bit 7.
_ASM_EXPAND = tl.constexpr("""{
.reg .b32 d8, e8, llo, lhi, mlo, mhi, x, y, sel, s, m, v;
mov.b32 llo, 0x14100800;
mov.b32 lhi, 0x24201C18;
mov.b32 mlo, 0xFFFFFF00;
mov.b32 mhi, 0xFFFFFFFF;
shl.b32 d8, $3, 3;
shl.b32 e8, $4, 3;
and.b32 x, $2, 0x07070707;
shr.b32 y, x, 4;
or.b32 y, x, y;
prmt.b32 sel, y, 0, 0x4420;
prmt.b32 v, llo, lhi, sel;
prmt.b32 m, mlo, mhi, sel;
add.u32 v, v, d8;
and.b32 v, v, m;
shl.b32 s, $2, 4;
and.b32 s, s, 0x80808080;
or.b32 $0, v, s;
shr.b32 x, $2, 4;
and.b32 x, x, 0x07070707;
shr.b32 y, x, 4;
or.b32 y, x, y;
prmt.b32 sel, y, 0, 0x4420;
prmt.b32 v, llo, lhi, sel;
prmt.b32 m, mlo, mhi, sel;
add.u32 v, v, e8;
and.b32 v, v, m;
and.b32 s, $2, 0x80808080;
or.b32 $1, v, s;
}""")


@triton.jit
def _nib_e4m3(n, d):
    """e2m1 nibble (int32 0..15) times 2**d -> e4m3 bits (int32), exact for -5 <= d <= 6."""
    i = n & 7
    b = (i << 2) + 48 - tl.where(i == 1, 4, 0) + (d << 3)
    return tl.where(i == 0, 0, b) | ((n & 8) << 4)


@triton.jit
def expand_weights(wb, d_lo, d_hi, USE_ASM: tl.constexpr):
    """Packed bytes (uint8) and the group offsets of their low and high nibbles (int32, broadcastable to wb,
    -5 <= d <= 6) -> (low, high) e4m3 tensors of wb's shape."""
    if USE_ASM:
        dl = tl.broadcast_to((d_lo + 5).to(tl.uint8), wb.shape)
        dh = tl.broadcast_to((d_hi + 5).to(tl.uint8), wb.shape)
        lo, hi = tl.inline_asm_elementwise(_ASM_EXPAND, "=r,=r,r,r,r", [wb, dl, dh],
                                           dtype=(tl.float8e4nv, tl.float8e4nv), is_pure=True, pack=4)
    else:
        b = wb.to(tl.int32)
        lo = _nib_e4m3(b & 15, d_lo).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        hi = _nib_e4m3(b >> 4, d_hi).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return lo, hi


@triton.jit
def _epilogue(acc, out_ptr, wn, wmask, tk, tmask, rs_w, rs_a, gscale, bias_ptr, N, HAS_BIAS: tl.constexpr):
    y = acc * rs_w[:, None] * rs_a[None, :]
    y = y * gscale
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + wn, mask=wmask, other=0.0).to(tl.float32)[:, None]
    op = out_ptr + tk.to(tl.int64)[None, :] * N + wn[:, None]
    if out_ptr.dtype.element_ty == tl.float32:
        yo = y
    elif out_ptr.dtype.element_ty == tl.bfloat16:
        yo = _bf16_rne(y)
    else:
        yo = y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(op, yo, mask=wmask[:, None] & tmask[None, :])


@triton.jit
def _gemm_kernel(q_ptr, rs_a_ptr, w_ptr, ws_ptr, wexp_ptr, ga_ptr, gw_ptr, bias_ptr, out_ptr, M, N, K,
                 HAS_BIAS: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
                 USE_ASM: tl.constexpr, IMP_ACC: tl.constexpr, SPLIT: tl.constexpr):
    """Swap-AB fp8 GEMM: weight rows on the MMA's M side (expanded from FP4 in registers), tokens on its N
    side (e4m3 from smem). out[tok, n] = acc * 2**ref_w[n] * rs_a[tok] * ga * gw (+ bias).

    SPLIT > 1: program axis 1 takes one K range and writes its fp32 partial (scales applied, no bias) to
    out_ptr + pid_k * M * N; :func:`_splitk_reduce_kernel` sums them in a fixed order."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_w = tl.cdiv(N, BW)
    n_t = tl.cdiv(M, BT)
    per_group = GROUP * n_t
    gid = pid // per_group
    first = gid * GROUP
    gsz = tl.minimum(n_w - first, GROUP)
    pid_w = first + (pid % per_group) % gsz
    pid_t = (pid % per_group) // gsz
    wn = pid_w * BW + tl.arange(0, BW)
    wmask = wn < N
    tk = pid_t * BT + tl.arange(0, BT)
    tmask = tk < M
    wn64 = wn.to(tl.int64)
    tk64 = tk.to(tl.int64)
    NB = K // 32
    n_ch = K // 128
    per = tl.cdiv(n_ch, SPLIT)
    c_lo = pid_k * per
    c_hi = tl.minimum(c_lo + per, n_ch)
    rexp = tl.load(wexp_ptr + wn, mask=wmask, other=0)
    rexp = tl.where(rexp < 0, -rexp - 1, rexp)  # fallback rows: their slot is overwritten later
    h2 = tl.arange(0, 2)
    c32 = tl.arange(0, 32)
    c2 = tl.arange(0, 64)
    # one chunk of 128 columns = 64 packed bytes as (BW, 2, 32): low nibbles -> groups 0, 1, high -> 2, 3
    w_rows = w_ptr + wn64[:, None, None] * (K // 2) + (h2 * 32)[None, :, None] + c32[None, None, :]
    s_rows = ws_ptr + wn64[:, None] * NB + h2[None, :]
    q_rows = q_ptr + tk64[:, None] * K + c2[None, :]
    acc = tl.zeros((BW, BT), tl.float32)
    for ci in range(c_lo, c_hi):
        k0 = ci * 128
        wb = tl.load(w_rows + k0 // 2, mask=wmask[:, None, None], other=0)
        s_lo = tl.load(s_rows + k0 // 32, mask=wmask[:, None], other=0)
        s_hi = tl.load(s_rows + (k0 // 32 + 2), mask=wmask[:, None], other=0)
        d_lo = (s_lo.to(tl.int32) - rexp[:, None])[:, :, None]
        d_hi = (s_hi.to(tl.int32) - rexp[:, None])[:, :, None]
        lo, hi = expand_weights(wb, d_lo, d_hi, USE_ASM)
        lo = tl.reshape(lo, (BW, 64))
        hi = tl.reshape(hi, (BW, 64))
        xe = tl.load(q_rows + k0, mask=tmask[:, None], other=0.0)
        xo = tl.load(q_rows + (k0 + 64), mask=tmask[:, None], other=0.0)
        if IMP_ACC >= 128:  # the chunk's 4 wgmma k-steps accumulate in the MMA, then one fp32 add
            part = tl.dot(lo, tl.trans(xe))
            part = tl.dot(hi, tl.trans(xo), part)
            acc += part
        else:
            acc = tl.dot(lo, tl.trans(xe), acc, max_num_imprecise_acc=IMP_ACC)
            acc = tl.dot(hi, tl.trans(xo), acc, max_num_imprecise_acc=IMP_ACC)
    rs_w = _pow2(tl.maximum(rexp - 127, -149))
    rs_a = tl.load(rs_a_ptr + tk, mask=tmask, other=0.0)
    gscale = tl.load(ga_ptr) * tl.load(gw_ptr)
    if SPLIT == 1:
        _epilogue(acc, out_ptr, wn, wmask, tk, tmask, rs_w, rs_a, gscale, bias_ptr, N, HAS_BIAS)
    else:
        part = out_ptr + pid_k.to(tl.int64) * M * N
        _epilogue(acc, part, wn, wmask, tk, tmask, rs_w, rs_a, gscale, bias_ptr, N, False)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out = sum over the SPLIT fp32 partials in order (+ bias), rounded like the GEMM's epilogue."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M * N
    y = tl.zeros((BLOCK,), tl.float32)
    for s in range(SPLIT):
        y += tl.load(part_ptr + s * M * N + i, mask=mask, other=0.0)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + i % N, mask=mask, other=0.0).to(tl.float32)
    if out_ptr.dtype.element_ty == tl.float32:
        yo = y
    elif out_ptr.dtype.element_ty == tl.bfloat16:
        yo = _bf16_rne(y)
    else:
        yo = y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(out_ptr + i, yo, mask=mask)


@triton.jit
def _fallback_tile(q_ptr, rs_a_ptr, asc_ptr, aflag_ptr, w_ptr, ws_ptr, tk, tmask, wn, wmask, K,
                   BW: tl.constexpr, BT: tl.constexpr, USE_ASM: tl.constexpr):
    """Exact per-group sum: each 32-wide group product is exact in fp32 (codes x folded codes), scaled by
    2**E_w(group) and the token side's group scale, accumulated in fp32 (the reference's own rounding)."""
    NB = K // 32
    c = tl.arange(0, 32)
    wn64 = wn.to(tl.int64)
    tk64 = tk.to(tl.int64)
    aflag = tl.load(aflag_ptr + tk, mask=tmask, other=0)
    rs_a = tl.load(rs_a_ptr + tk, mask=tmask, other=0.0)
    acc = tl.zeros((BW, BT), tl.float32)
    zero = tl.zeros((BW, 32), tl.int32)
    for g in range(0, NB):
        k0 = g * 32
        gi = g % 4
        # the group's 32 codes: bytes (gi % 2) * 32 .. + 32 of its chunk, low nibbles for gi < 2
        wb = tl.load(w_ptr + wn64[:, None] * (K // 2) + ((g // 4) * 64 + (gi % 2) * 32 + c)[None, :],
                     mask=wmask[:, None], other=0)
        wb = ((wb.to(tl.int32) >> (4 * (gi // 2))) & 15).to(tl.uint8)
        sw = tl.load(ws_ptr + wn64 * NB + g, mask=wmask, other=0).to(tl.int32)
        lo, hi = expand_weights(wb, zero, zero, USE_ASM)  # bare codes (d = 0)
        xa = tl.load(q_ptr + tk64[:, None] * K + (k0 + c)[None, :], mask=tmask[:, None], other=0.0)
        p = tl.dot(lo.to(tl.float32), tl.trans(xa.to(tl.float32)), input_precision="ieee")
        sa_b = tl.load(asc_ptr + tk64 * NB + g, mask=tmask, other=0).to(tl.int32)
        sa = tl.where(aflag != 0, _pow2(tl.maximum(sa_b - 127, -149)), rs_a)
        sa = tl.where(sa_b == 255, float("nan"), sa)
        swv = tl.where(sw == 255, float("nan"), _pow2(tl.maximum(sw - 127, -149)))
        acc += p * (swv[:, None] * sa[None, :])
    return acc


@triton.jit
def _fallback_kernel(q_ptr, rs_a_ptr, asc_ptr, aflag_ptr, alist_ptr, count_ptr, w_ptr, ws_ptr, wlist_ptr, n_wlist,
                     stats_ptr, ga_ptr, gw_ptr, bias_ptr, out_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                     BW: tl.constexpr, BT: tl.constexpr, USE_ASM: tl.constexpr):
    """Program p: listed token rows x weight tile p, then token tile p x listed weight rows. Returns at once
    when both lists are empty."""
    pid = tl.program_id(0)
    if pid == 0:
        tl.atomic_add(stats_ptr + 2, n_wlist)
        tl.atomic_add(stats_ptr + 3, N)
    gscale = tl.load(ga_ptr) * tl.load(gw_ptr)
    one_w = tl.full((BW,), 1.0, tl.float32)
    one_t = tl.full((BT,), 1.0, tl.float32)
    n_tok = tl.load(count_ptr)
    wn = pid * BW + tl.arange(0, BW)
    wmask = wn < N
    n_here = tl.where(pid * BW < N, n_tok, 0)
    for c0 in range(0, n_here, BT):
        i = c0 + tl.arange(0, BT)
        tmask = i < n_tok
        tk = tl.load(alist_ptr + i, mask=tmask, other=0)
        acc = _fallback_tile(q_ptr, rs_a_ptr, asc_ptr, aflag_ptr, w_ptr, ws_ptr, tk, tmask, wn, wmask, K,
                             BW, BT, USE_ASM)
        _epilogue(acc, out_ptr, wn, wmask, tk, tmask, one_w, one_t, gscale, bias_ptr, N, HAS_BIAS)
    tk2 = pid * BT + tl.arange(0, BT)
    tmask2 = tk2 < M
    nw_here = tl.where(pid * BT < M, n_wlist, 0)
    for c0 in range(0, nw_here, BW):
        i = c0 + tl.arange(0, BW)
        wmask2 = i < n_wlist
        wn2 = tl.load(wlist_ptr + i, mask=wmask2, other=0)
        acc = _fallback_tile(q_ptr, rs_a_ptr, asc_ptr, aflag_ptr, w_ptr, ws_ptr, tk2, tmask2, wn2, wmask2, K,
                             BW, BT, USE_ASM)
        _epilogue(acc, out_ptr, wn2, wmask2, tk2, tmask2, one_w, one_t, gscale, bias_ptr, N, HAS_BIAS)


@triton.jit
def _act_codes_kernel(x_ptr, stride_xm, t_ptr, q_ptr, sc_ptr, rowst_ptr, M, K, BM: tl.constexpr, G: tl.constexpr,
                      GPP: tl.constexpr, DOT_IEEE: tl.constexpr):
    """Split activation path, step 1 (grid: row blocks x K ranges of GPP groups): transform + MXFP4 quantize,
    writes the scale bytes and the bare signed e2m1 values as e4m3 (layout above), and merges the row's
    group-exponent max / min and bad-group count into rowst (M, 3) int32 (zero-initialised) with atomics:
    [emax + 128, 128 - emin, nbad]."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    emax = tl.full((BM,), -127, tl.int32)
    emin = tl.full((BM,), 127, tl.int32)
    nbad = tl.zeros((BM,), tl.int32)
    for j in range(GPP):
        k0 = (pid_k * GPP + j) * G
        if k0 < K:
            xt, bad_in = _transform_group(x_ptr, stride_xm, rows, rmask, t_ptr, k0, G, DOT_IEEE)
            e, bad, ab, val = _group_codes(xt, bad_in)
            ok = (ab > 0) & (~bad)
            emax = tl.maximum(emax, tl.where(ok, e, -127))
            emin = tl.minimum(emin, tl.where(ok, e, 127))
            nbad += bad.to(tl.int32)
            _store_group(q_ptr, rows64, rmask, K, k0, val, G)
            sb = tl.where(bad, 255, e + 127)
            tl.store(sc_ptr + rows64 * (K // G) + k0 // G, sb.to(tl.uint8), mask=rmask)
    tl.atomic_max(rowst_ptr + rows * 3, emax + 128, mask=rmask)
    tl.atomic_max(rowst_ptr + rows * 3 + 1, 128 - emin, mask=rmask)
    tl.atomic_add(rowst_ptr + rows * 3 + 2, nbad, mask=rmask)


@triton.jit
def _act_fold_kernel(q_ptr, sc_ptr, rowst_ptr, rs_ptr, flag_ptr, list_ptr, count_ptr, stats_ptr, M, K,
                     BM: tl.constexpr, BK: tl.constexpr, G: tl.constexpr):
    """Split activation path, step 2 (grid: row blocks x column blocks of BK): fold each bare e4m3 value by
    2**(E_group - ref) in place (exact: fp32 multiply, e4m3 RNE of a representable value); the column block 0
    programs write the row scales, the wide-row flags and list, and the counters."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    emax = tl.load(rowst_ptr + rows * 3, mask=rmask, other=1) - 128
    emin = 128 - tl.load(rowst_ptr + rows * 3 + 1, mask=rmask, other=1)
    nbad = tl.load(rowst_ptr + rows * 3 + 2, mask=rmask, other=0)
    ref = emax - 6
    wide = ((emax - emin) > (6 - A_DMIN)) & rmask & (nbad == 0)
    cols = pid_k * BK + tl.arange(0, BK)
    cmask = cols < K
    grp = cols // G
    mk = rmask[:, None] & cmask[None, :]
    qp = q_ptr + rows64[:, None] * K + cols[None, :]
    qv = tl.load(qp, mask=mk, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    sb = tl.load(sc_ptr + rows64[:, None] * (K // G) + grp[None, :], mask=mk, other=127).to(tl.int32)
    dd = tl.where(wide[:, None], 0, tl.minimum(tl.maximum(sb - 127 - ref[:, None], -30), 6))
    val = qv * _pow2(dd)
    tl.store(qp, val.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mk)
    if pid_k == 0:
        rs = tl.where(nbad > 0, float("nan"), _pow2(tl.maximum(ref, -149)))
        tl.store(rs_ptr + rows, rs, mask=rmask)
        tl.store(flag_ptr + rows, wide.to(tl.int32), mask=rmask)
        n_new = tl.sum(wide.to(tl.int32), axis=0)
        if n_new > 0:
            base_i = tl.atomic_add(count_ptr, n_new)
            slot = base_i + tl.cumsum(wide.to(tl.int32), axis=0) - 1
            tl.store(list_ptr + slot, rows, mask=wide)
            tl.atomic_add(stats_ptr, n_new)
        tl.atomic_add(stats_ptr + 1, tl.sum(rmask.to(tl.int32), axis=0))
