"""``@triton.jit`` bodies of the MXFP4 W4A4 linear on fp8 tensor cores (Hopper), see :mod:`.fp8core`.

Exactness. Activations: an e2m1 magnitude {0.5 .. 6} times 2**d is an exact e4m3 value for -8 <= d <= 6. Per
row a reference exponent ref = (largest group exponent) - 6 folds every group of the row into e4m3 with
d = E_group - ref (fp32 -> e4m3 cast, subnormals included, spread <= 14); the row scale 2**ref goes to the
GEMM epilogue; rows that do not fold take the exact per-group fallback kernel. Weights: expanded to e4m3 as
code * 2**-6 (no exponent arithmetic, any spread); each group's own scale multiplies its exact MMA sum in fp32.

Layouts. Activations: e4m3 (M, K) in natural column order. Weights: the fp8core packing (see
``fp8core.pack_weights``): per chunk of 128 columns, byte j (0..63) holds column j in its low nibble and column
j + 64 in its high nibble, so the low nibbles of a chunk expand to columns 0..63 and the high nibbles to
64..127, each in natural order. Each group's 32 codes are then one contiguous (BW, 32) operand: one k = 32 MMA per
group of both operands.
"""

from __future__ import annotations

import triton
import triton.language as tl

CHUNK = tl.constexpr(128)
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
def _list_wide_rows(rows, rmask, wide, flag_ptr, list_ptr, count_ptr, stats_ptr):
    """Flag the block's wide rows and append them to the fallback list (one atomic per program); count the
    fallback rows and all rows."""
    tl.store(flag_ptr + rows, wide.to(tl.int32), mask=rmask)
    n_new = tl.sum(wide.to(tl.int32), axis=0)
    if n_new > 0:
        base_i = tl.atomic_add(count_ptr, n_new)
        slot = base_i + tl.cumsum(wide.to(tl.int32), axis=0) - 1
        tl.store(list_ptr + slot, rows, mask=wide)
        tl.atomic_add(stats_ptr, n_new)
    tl.atomic_add(stats_ptr + 1, tl.sum(rmask.to(tl.int32), axis=0))


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
    _list_wide_rows(rows, rmask, wide, flag_ptr, list_ptr, count_ptr, stats_ptr)


# 4 packed weight bytes -> 4 e4m3 of the low nibbles, 4 of the high nibbles: the e2m1 bits s e e m moved to
# e4m3's s . . e e m . . is the same value times 2**-6 (0.5 lands on the subnormal 2**-7), so the expansion is
# two masks and two shifts per half; the 2**6 goes to the epilogue.
_ASM_EXPAND = tl.constexpr("""{
.reg .b32 a, b;
and.b32 a, $2, 0x07070707;
shl.b32 a, a, 2;
and.b32 b, $2, 0x08080808;
shl.b32 b, b, 4;
or.b32 $0, a, b;
shr.b32 a, $2, 2;
and.b32 a, a, 0x1C1C1C1C;
and.b32 b, $2, 0x80808080;
or.b32 $1, a, b;
}""")


@triton.jit
def expand_weights(wb, USE_ASM: tl.constexpr):
    """Packed bytes (uint8) -> (low, high) nibbles as e4m3 = e2m1 value * 2**-6, exact, wb's shape."""
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(_ASM_EXPAND, "=r,=r,r", [wb], dtype=(tl.float8e4nv, tl.float8e4nv),
                                           is_pure=True, pack=4)
    else:
        b = wb.to(tl.int32)
        lo = (((b & 7) << 2) | ((b & 8) << 4)).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        hi = (((b >> 2) & 0x1C) | (b & 0x80)).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return lo, hi


@triton.jit
def _scale_of(sb):
    """e8m0 byte (int32) -> 2**(b - 127) as fp32, NaN for 255."""
    return tl.where(sb == 255, float("nan"), _pow2(sb - 127))


@triton.jit
def _epilogue(acc, out_ptr, wn, wmask, tk, tmask, rs_a, gscale, bias_ptr, N, HAS_BIAS: tl.constexpr):
    y = acc * rs_a[None, :]
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
def _gemm_kernel(q_ptr, rs_a_ptr, w_ptr, ws_ptr, ga_ptr, gw_ptr, bias_ptr, out_ptr, M, N, K,
                 HAS_BIAS: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
                 USE_ASM: tl.constexpr, SPLIT: tl.constexpr):
    """Swap-AB fp8 GEMM: weight rows on the MMA's M side (expanded from FP4 in registers), tokens on its N
    side (e4m3 from smem). One k = 32 MMA per scale group; its sum is exact (32 products of one scale, all
    multiples of 2**-8 in code units, at most 32 * 36), and the fp32 accumulator takes it times the group's
    weight scale: acc += mma_g * 2**E_w(n, g) - one fp32 rounding per group, as an fp32 reference.
    out[tok, n] = acc * 2**6 * rs_a[tok] * ga * gw (+ bias).

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
    c32 = tl.arange(0, 32)
    # a chunk of 128 columns is 64 packed bytes: low nibbles of bytes 0..31 -> group 0, of 32..63 -> group 1,
    # high nibbles -> groups 2 and 3
    w_rows = w_ptr + wn64[:, None] * (K // 2) + c32[None, :]
    s_rows = ws_ptr + wn64 * NB
    q_rows = q_ptr + tk64[:, None] * K + c32[None, :]
    acc = tl.zeros((BW, BT), tl.float32)
    for ci in range(c_lo, c_hi):
        k0 = ci * 128
        wa = tl.load(w_rows + k0 // 2, mask=wmask[:, None], other=0)
        wb = tl.load(w_rows + (k0 // 2 + 32), mask=wmask[:, None], other=0)
        s0 = _scale_of(tl.load(s_rows + k0 // 32, mask=wmask, other=127).to(tl.int32))
        s1 = _scale_of(tl.load(s_rows + (k0 // 32 + 1), mask=wmask, other=127).to(tl.int32))
        s2 = _scale_of(tl.load(s_rows + (k0 // 32 + 2), mask=wmask, other=127).to(tl.int32))
        s3 = _scale_of(tl.load(s_rows + (k0 // 32 + 3), mask=wmask, other=127).to(tl.int32))
        g0, g2 = expand_weights(wa, USE_ASM)
        g1, g3 = expand_weights(wb, USE_ASM)
        x0 = tl.load(q_rows + k0, mask=tmask[:, None], other=0.0)
        x1 = tl.load(q_rows + (k0 + 32), mask=tmask[:, None], other=0.0)
        x2 = tl.load(q_rows + (k0 + 64), mask=tmask[:, None], other=0.0)
        x3 = tl.load(q_rows + (k0 + 96), mask=tmask[:, None], other=0.0)
        acc += tl.dot(g0, tl.trans(x0)) * s0[:, None]
        acc += tl.dot(g1, tl.trans(x1)) * s1[:, None]
        acc += tl.dot(g2, tl.trans(x2)) * s2[:, None]
        acc += tl.dot(g3, tl.trans(x3)) * s3[:, None]
    acc = acc * 64.0
    rs_a = tl.load(rs_a_ptr + tk, mask=tmask, other=0.0)
    gscale = tl.load(ga_ptr) * tl.load(gw_ptr)
    if SPLIT == 1:
        _epilogue(acc, out_ptr, wn, wmask, tk, tmask, rs_a, gscale, bias_ptr, N, HAS_BIAS)
    else:
        part = out_ptr + pid_k.to(tl.int64) * M * N
        _epilogue(acc, part, wn, wmask, tk, tmask, rs_a, gscale, bias_ptr, N, False)


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
def _fallback_kernel(q_ptr, rs_a_ptr, asc_ptr, aflag_ptr, alist_ptr, count_ptr, w_ptr, ws_ptr, ga_ptr, gw_ptr,
                     bias_ptr, out_ptr, M, N, K, HAS_BIAS: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr,
                     USE_ASM: tl.constexpr):
    """Activation rows whose exponent spread does not fold (listed by the quantize kernel) x weight tile p:
    per group an exact fp32 dot of the bare codes (fp32 operands) times both group scales, accumulated in
    fp32. Returns at once when the list is empty."""
    pid = tl.program_id(0)
    n_tok = tl.load(count_ptr)
    if n_tok > 0:
        gscale = tl.load(ga_ptr) * tl.load(gw_ptr)
        one_t = tl.full((BT,), 1.0, tl.float32)
        wn = pid * BW + tl.arange(0, BW)
        wmask = wn < N
        wn64 = wn.to(tl.int64)
        NB = K // 32
        c = tl.arange(0, 32)
        for c0 in range(0, n_tok, BT):
            i = c0 + tl.arange(0, BT)
            tmask = i < n_tok
            tk = tl.load(alist_ptr + i, mask=tmask, other=0)
            tk64 = tk.to(tl.int64)
            acc = tl.zeros((BW, BT), tl.float32)
            for g in range(0, NB):
                gi = g % 4
                wb = tl.load(w_ptr + wn64[:, None] * (K // 2) + ((g // 4) * 64 + (gi % 2) * 32 + c)[None, :],
                             mask=wmask[:, None], other=0)
                lo, hi = expand_weights(wb, USE_ASM)
                wv = tl.where(gi < 2, lo.to(tl.float32), hi.to(tl.float32)) * 64.0
                xa = tl.load(q_ptr + tk64[:, None] * K + (g * 32 + c)[None, :], mask=tmask[:, None], other=0.0)
                p = tl.dot(wv, tl.trans(xa.to(tl.float32)), input_precision="ieee")
                sw = _scale_of(tl.load(ws_ptr + wn64 * NB + g, mask=wmask, other=127).to(tl.int32))
                sa = _scale_of(tl.load(asc_ptr + tk64 * NB + g, mask=tmask, other=127).to(tl.int32))
                acc += p * (sw[:, None] * sa[None, :])
            _epilogue(acc, out_ptr, wn, wmask, tk, tmask, one_t, gscale, bias_ptr, N, HAS_BIAS)


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
        _list_wide_rows(rows, rmask, wide, flag_ptr, list_ptr, count_ptr, stats_ptr)
