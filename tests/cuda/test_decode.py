"""Hopper decode kernels (wush_compile/cuda/decode.py, kernels/decode_sm90.cu).

CPU part: the layout and index logic of the CUDA kernels, emulated in numpy/torch step by step (cp.async placement
into XOR-swizzled shared memory, ldmatrix.x4 distribution, the nibble -> e4m3 -> fp16 unpack, the m16n8k16 fragment
layouts, MXFP4 per-group promotion / NVFP4 folded scales, stream-K segments with partial slots and the last-CTA
reduction, the epilogue) and compared with the fp64 reference; the act kernel's torch twin against the quantizer.
GPU part (``-m gpu``): the kernels themselves against the same references, bit for bit where the spec says so.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wush_compile import formats
from wush_compile.config import Format
from wush_compile.cuda import decode
from wush_compile.ops import reference

FMTS = ["mxfp4", "nvfp4"]


def _g(fmt):
    return Format.parse(fmt).group_size


def _weights(n, k, fmt, gen, scale=0.05):
    w = torch.randn(n, k, generator=gen, device=gen.device) * scale
    codes, scales, gs = formats.quantize(w, fmt)
    return codes, scales, gs.to(torch.float32).reshape(())


def _act_gs(fmt):
    return torch.tensor(formats.MXFP4_GLOBAL_SCALE if fmt == "mxfp4" else 0.0037, dtype=torch.float32)


def _ref64(x, codes, scales, t, w_gs, a_gs, bias, fmt):
    ac, asc = reference.transform_quantize_ref(x, t, a_gs, fmt)
    one = torch.ones((), device=x.device)
    a = formats.dequantize(ac, asc, one, fmt).double()
    w = formats.dequantize(codes, scales, one, fmt).double()
    gs = (a_gs.float() * w_gs.float()).double()  # the fp32 product of the two global scales, as the kernels use
    y = (a @ w.t()) * gs
    return y + bias.double() if bias is not None else y


# ---------------------------------------------------------------- the nibble unpack


def _e4m3(bytes_u8: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(bytes_u8)).view(torch.float8_e4m3fn).double().numpy()


def _unpack8(words: np.ndarray) -> np.ndarray:
    """The CUDA unpack8 on uint32 words (...,) -> (..., 4 half2, 2) values (float64): h0 = (0,2), h1 = (4,6),
    h2 = (1,3), h3 = (5,7) in nibble columns; cvt.rn.f16x2.e4m3x2 puts the low byte in the low half."""
    w = words.astype(np.uint32)
    mag = np.uint32(0x1C1C1C1C)
    s = w & np.uint32(0x88888888)
    lo = ((w << np.uint32(2)) & mag) | ((s << np.uint32(4)) & ~mag)
    hi = ((w >> np.uint32(2)) & mag) | (s & ~mag)
    lo_b = lo.view(np.uint8).reshape(*w.shape, 4)
    hi_b = hi.view(np.uint8).reshape(*w.shape, 4)
    vals = np.stack([_e4m3(lo_b[..., 0:2]), _e4m3(lo_b[..., 2:4]), _e4m3(hi_b[..., 0:2]), _e4m3(hi_b[..., 2:4])], -2)
    return vals  # (..., 4, 2)


def test_unpack_bit_trick_every_nibble_pair():
    """Every byte value in every byte position: the halves hold e2m1 * 2^-6 of the promised nibble columns."""
    b = np.arange(256, dtype=np.uint32)
    e2m1 = np.array(formats.E2M1_SIGNED_VALUES)
    for pos in range(4):
        words = (b << (8 * pos)) | (0x53 << (8 * ((pos + 1) % 4)))  # a neighbour byte must not leak in
        vals = _unpack8(words)  # (256, 4, 2)
        nib = np.stack([(words >> (4 * j)) & 15 for j in range(8)], -1)  # (256, 8) nibble j = column j
        want = e2m1[nib] * 2.0**-6
        cols = np.array([[0, 2], [4, 6], [1, 3], [5, 7]])  # unpack8's half2 order (k16 #0 takes h0, h2)
        np.testing.assert_array_equal(vals, want[:, cols])
        # -0 stays -0 (sign bit kept)
        assert np.all(np.signbit(vals) == np.signbit(want[:, cols]))


# ---------------------------------------------------------------- the act operand layout


def test_operand_layout_matches_slot_k():
    m, k, tiles = 11, 512, 2
    vals = torch.arange(m * k, dtype=torch.float32).reshape(m, k) % 2039  # exact in fp16
    buf = decode.operand_from_values(vals, tiles).float().reshape(tiles, k // 32, 32, 8)
    for tile in range(tiles):
        for c in range(k // 32):
            for lane in range(32):
                tok = 8 * tile + lane // 4
                cols = [32 * c + 8 * (lane % 4) + decode.SLOT_K[h] for h in range(8)]
                want = vals[tok, cols] if tok < m else torch.zeros(8)
                assert torch.equal(buf[tile, c, lane], want), (tile, c, lane)


@pytest.mark.parametrize("fmt", FMTS)
def test_act_operand_ref_holds_the_reference_codes(fmt):
    gen = torch.Generator().manual_seed(0)
    g = _g(fmt)
    m, k = 13, 256
    x = torch.randn(m, k, generator=gen) * 3
    x[2, :g] = float("nan")
    t = torch.linalg.qr(torch.randn(k // g, g, g, generator=gen))[0]
    b, sa = decode.act_operand_ref(x, t, _act_gs(fmt), fmt)
    codes, scales = reference.transform_quantize_ref(x, t, _act_gs(fmt), fmt)
    deq = formats.dequantize(codes, scales, torch.ones(()), fmt)  # (M, K) code * block scale
    vals = b.float().reshape(2, k // 32, 32, 8)
    if fmt == "mxfp4":
        s = sa.reshape(k // 32, 2, 8)
        for tok in range(m):
            for c in range(k // 32):
                cols = [32 * c + 8 * t4 + decode.SLOT_K[h] for t4 in range(4) for h in range(8)]
                got = vals[tok // 8, c, (tok % 8) * 4: (tok % 8) * 4 + 4].reshape(-1) / 64 * s[c, tok // 8, tok % 8]
                torch.testing.assert_close(got, deq[tok, cols], equal_nan=True, rtol=0, atol=0)
    else:
        rec = decode.operand_from_values(deq, 2)
        assert torch.equal(rec.isnan(), b.isnan()) and torch.equal(rec.nan_to_num(), b.nan_to_num())


# ---------------------------------------------------------------- the GEMM, emulated fragment by fragment


def _start(i, units, ctas):
    return i * units // ctas


def _cta_of(u, units, ctas):
    return ((u + 1) * ctas - 1) // units


def test_stream_k_partition():
    for units in (1, 2, 3, 7, 16, 100, 768, 3584):
        for ctas in sorted({1, 2, 3, 5, units // 2 or 1, units, 132, 264}):
            if ctas > units:
                continue
            starts = [_start(i, units, ctas) for i in range(ctas + 1)]
            assert starts[0] == 0 and starts[-1] == units and all(b > a for a, b in zip(starts, starts[1:]))
            for u in range(units):
                c = _cta_of(u, units, ctas)
                assert starts[c] <= u < starts[c + 1], (units, ctas, u)


def _emulate(w_codes, w_scales, b, sa, m, n, k, fmt, w_gs, a_gs, bias, ctas, out_dtype=torch.float32, warps=4):
    """The GEMM kernel's data flow for every CTA, warp and lane (float64 arithmetic; the MMA's fp32 rounding aside)."""
    f = Format.parse(fmt)
    nv = f is Format.NVFP4
    rows = warps * 32
    spr = k // decode.STAGE_K
    n_rb = -(-n // rows)
    units = n_rb * spr
    tiles = 1 if m <= 8 else 2
    kc = k // 32
    codes = w_codes.numpy()
    scl = w_scales.numpy()
    bv = b.double().numpy().reshape(tiles, kc, 32, 8)
    sav = sa.double().numpy().reshape(kc, tiles, 8) if sa is not None else None
    lanes = np.arange(32)
    g, t4 = lanes // 4, lanes % 4
    part = {}
    counters = np.zeros(n_rb, dtype=np.int64)
    out = np.full((m, n), np.nan)
    gscale = float(np.float32(np.float32(a_gs) * np.float32(w_gs)))
    pre = 64.0 if nv else 1.0

    def write_out(rb, v):  # v: (warps, 32 lanes, 2 f, tiles, 4)
        for w in range(warps):
            for f_ in range(2):
                for tt in range(tiles):
                    for i in range(4):
                        row = rb * rows + w * 32 + f_ * 16 + g + 8 * (i >> 1)
                        tok = tt * 8 + 2 * t4 + (i & 1)
                        ok = (row < n) & (tok < m)
                        y = v[w, :, f_, tt, i] * pre * gscale
                        if bias is not None:
                            y = y + bias.double().numpy()[np.minimum(row, n - 1)]
                        out[tok[ok], row[ok]] = y[ok]

    for cta in range(ctas):
        u0, u1 = _start(cta, units, ctas), _start(cta + 1, units, ctas)
        acc = np.zeros((warps, 32, 2, tiles, 4))
        seg = u0
        for u in range(u0, u1):
            rb, st = divmod(u, spr)
            # cp.async into the swizzled stage buffer (rows past N read row N - 1)
            smem = np.zeros(rows * 128, dtype=np.uint8)
            for r in range(rows):
                src = codes[min(rb * rows + r, n - 1), st * 128: st * 128 + 128]
                for cc in range(8):
                    dst = r * 128 + ((cc ^ (r & 7)) << 4)
                    smem[dst: dst + 16] = src[cc * 16: cc * 16 + 16]
            srow = np.minimum(rb * rows + np.arange(rows), n - 1)
            sbytes = scl[srow][:, st * (16 if nv else 8): (st + 1) * (16 if nv else 8)].astype(np.int64)  # (rows, .)
            for w in range(warps):
                for cc in range(8):
                    # ldmatrix.x4: thread T gives the address of row T % 8 of matrix T // 8
                    addr = np.array([(w * 32 + (T >> 3) * 8 + (T & 7)) * 128 + ((cc ^ (T & 7)) << 4) for T in range(32)])
                    mats = smem[addr[:, None] + np.arange(16)].reshape(4, 8, 16)  # (matrix, row, 16 bytes)
                    # thread (g, t4) receives bytes 4 t4 .. 4 t4 + 3 of row g of each matrix
                    q = np.stack([mats[j][g[:, None], 4 * t4[:, None] + np.arange(4)] for j in range(4)])  # (4, 32, 4)
                    words = q.copy().view(np.uint32).reshape(4, 32)
                    hv = _unpack8(words)  # (4 j, 32 lanes, 4 half2, 2)
                    if nv:
                        grp = 2 * cc + (t4 >> 1)
                        for j in range(4):
                            r_loc = w * 32 + 8 * j + g
                            s = formats.e4m3_to_float(torch.from_numpy(sbytes[r_loc, grp].astype(np.uint8))).double().numpy()
                            hv[j] = hv[j] * s[:, None, None]
                    else:
                        sw = np.stack([formats.e8m0_to_float(torch.from_numpy(
                            sbytes[w * 32 + 8 * j + g, cc].astype(np.uint8))).double().numpy() for j in range(4)])  # (4, 32)
                    for f_ in range(2):
                        # A (16 x 16) of each k16 step from the 32 lanes' registers
                        A = np.zeros((2, 16, 16))
                        for h, (x_, y_) in enumerate(((0, 2), (1, 3))):  # k16 #h uses half2 slots (h, h + 2)
                            A[h, g, 2 * t4] = hv[2 * f_, :, x_, 0]
                            A[h, g, 2 * t4 + 1] = hv[2 * f_, :, x_, 1]
                            A[h, g + 8, 2 * t4] = hv[2 * f_ + 1, :, x_, 0]
                            A[h, g + 8, 2 * t4 + 1] = hv[2 * f_ + 1, :, x_, 1]
                            A[h, g, 2 * t4 + 8] = hv[2 * f_, :, y_, 0]
                            A[h, g, 2 * t4 + 9] = hv[2 * f_, :, y_, 1]
                            A[h, g + 8, 2 * t4 + 8] = hv[2 * f_ + 1, :, y_, 0]
                            A[h, g + 8, 2 * t4 + 9] = hv[2 * f_ + 1, :, y_, 1]
                        for tt in range(tiles):
                            rec = bv[tt, st * 8 + cc]  # (32 lanes, 8 halves)
                            B = np.zeros((2, 16, 8))
                            for h in range(2):
                                B[h, 2 * t4, g] = rec[:, 4 * h + 0]
                                B[h, 2 * t4 + 1, g] = rec[:, 4 * h + 1]
                                B[h, 2 * t4 + 8, g] = rec[:, 4 * h + 2]
                                B[h, 2 * t4 + 9, g] = rec[:, 4 * h + 3]
                            D = A[0] @ B[0] + A[1] @ B[1]  # (16, 8)
                            d = np.stack([D[g, 2 * t4], D[g, 2 * t4 + 1], D[g + 8, 2 * t4], D[g + 8, 2 * t4 + 1]], -1)
                            if nv:
                                acc[w, :, f_, tt] += d
                            else:
                                sa2 = sav[st * 8 + cc, tt]  # (8 tokens)
                                s = np.stack([sw[2 * f_] * sa2[2 * t4], sw[2 * f_] * sa2[2 * t4 + 1],
                                              sw[2 * f_ + 1] * sa2[2 * t4], sw[2 * f_ + 1] * sa2[2 * t4 + 1]], -1)
                                acc[w, :, f_, tt] += d * s
            if (u + 1) % spr == 0 or u + 1 == u1:  # flush the segment [seg, u + 1) of row block rb
                full = seg == rb * spr and u + 1 == (rb + 1) * spr
                if full:
                    write_out(rb, acc)
                else:
                    part[(cta, 0 if seg == u0 else 1)] = acc.copy()
                    cf, cl = _cta_of(rb * spr, units, ctas), _cta_of((rb + 1) * spr - 1, units, ctas)
                    counters[rb] += 1
                    if counters[rb] == cl - cf + 1:  # the CTAs run in order here, so the last one is the highest
                        v = np.zeros_like(acc)
                        for c in range(cf, cl + 1):
                            v += part[(c, 1 if _start(c, units, ctas) < rb * spr else 0)]
                        write_out(rb, v)
                        counters[rb] = 0
                acc[:] = 0
                seg = u + 1
    assert not counters.any(), "every row-block counter is re-armed"
    return torch.from_numpy(out).to(out_dtype)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k,ctas", [(1, 200, 512, 3), (5, 300, 768, 4), (13, 130, 256, 1), (16, 290, 768, 9)])
def test_fragment_emulation_matches_reference(fmt, m, n, k, ctas):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    g = _g(fmt)
    x = torch.randn(m, k, generator=gen) * 2
    t = torch.linalg.qr(torch.randn(k // g, g, g, generator=gen))[0]
    codes, scales, w_gs = _weights(n, k, fmt, gen)
    a_gs = _act_gs(fmt)
    bias = torch.randn(n, generator=gen) if m % 2 else None
    b, sa = decode.act_operand_ref(x, t, a_gs, fmt)
    y = _emulate(codes, scales, b, sa, m, n, k, fmt, w_gs, a_gs, bias, ctas, out_dtype=torch.float64)
    ref = _ref64(x, codes, scales, t, w_gs, a_gs, bias, fmt)
    assert not y.isnan().any(), "every output written"
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < 1e-12, f"fragment emulation rel err {err:.2e}"


def test_fragment_emulation_nan_groups_poison_their_rows_and_tokens():
    gen = torch.Generator().manual_seed(7)
    for fmt in FMTS:
        g = _g(fmt)
        m, n, k = 4, 140, 256
        x = torch.randn(m, k, generator=gen)
        x[1, 3 * g: 4 * g] = float("inf")  # token 1 -> NaN everywhere
        t = torch.eye(g).repeat(k // g, 1, 1)
        codes, scales, w_gs = _weights(n, k, fmt, gen)
        scales[7, 2] = 0xFF if fmt == "mxfp4" else 0x7F  # weight row 7 -> NaN for every token
        b, sa = decode.act_operand_ref(x, t, _act_gs(fmt), fmt)
        y = _emulate(codes, scales, b, sa, m, n, k, fmt, w_gs, _act_gs(fmt), None, 2)
        nan = torch.zeros(m, n, dtype=torch.bool)
        nan[1, :] = True
        nan[:, 7] = True
        assert torch.equal(y.isnan(), nan), fmt


# ---------------------------------------------------------------- plan / supports


def test_plan_geometry_and_occupancy():
    for fmt in FMTS:
        for m in (1, 16):
            p = decode.plan(m, 6144, 4096, fmt)
            assert p.tiles == (1 if m == 1 else 2) and p.rows == 128 and p.row_blocks == 48 and p.stages_per_rb == 16
            assert p.units == 768 and p.ctas == 132 * 2 and p.smem_bytes <= 113 * 1024, p
            assert p.gemm_kernel == f"wush_dec_gemm_{fmt}_t{p.tiles}_w4_s{4 if m == 1 else 3}"
            assert p.config == decode.default_config(m)
    small = decode.plan(3, 100, 256, "mxfp4")
    assert small.units == 1 and small.ctas == 1
    assert decode.plan(9, 28672, 4096, "nvfp4", sms=114).ctas == 114 * 2
    assert decode.smem_bytes("mxfp4", 1, decode.DecodeConfig(4, 3)) < decode.smem_bytes("mxfp4", 1)
    assert decode.plan(1, 6144, 4096, "mxfp4", config=decode.DecodeConfig(4, 3)).ctas == 132 * 3


def test_supports_names_the_reason():
    assert decode.supports(16, 10, 512, "mxfp4", torch.bfloat16) == (True, "ok")
    ok, why = decode.supports(17, 10, 512, "mxfp4", torch.bfloat16)
    assert not ok and "M=17" in why
    ok, why = decode.supports(4, 10, 576, "nvfp4", torch.float32)
    assert not ok and "K=576" in why and "256" in why
    ok, why = decode.supports(4, 10, 512, "nvfp4", torch.float64)
    assert not ok and "float64" in why
    with pytest.raises(ValueError, match="K=576"):
        decode.plan(4, 10, 576, "mxfp4")
    with pytest.raises(ValueError, match="not compiled"):
        decode.DecodeConfig(warps=8, stages=4)


def test_available_without_a_gpu_says_why(monkeypatch):
    decode._available_cached.cache_clear()
    assert decode.available("cpu")[0] is False
    monkeypatch.setenv("WUSH_DISABLE_CUDA_DECODE", "1")
    ok, why = decode.available("cuda:0")
    assert not ok and "WUSH_DISABLE_CUDA_DECODE" in why


# ---------------------------------------------------------------- GPU


def _need_hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ok, why = decode.available("cuda")
    if not ok:
        pytest.skip(why)


def exact_inputs(m, k, g, dtype, gen, dev):
    """x = small integers * 2**j per row, T entries in {0, +-1} * 2**i: every product and sum is exact in fp32."""
    x = torch.randint(-8, 9, (m, k), generator=gen).to(torch.float32)
    x = x * torch.pow(2.0, torch.randint(-6, 4, (m, 1), generator=gen).float())
    t = torch.randint(-1, 2, (k // g, g, g), generator=gen).float() * torch.pow(
        2.0, torch.randint(-2, 2, (k // g, 1, 1), generator=gen).float())
    return x.to(dtype).to(dev), t.to(dtype).to(dev)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 16])
def test_gpu_act_kernel_bit_exact(fmt, dtype, m):
    _need_hopper()
    gen = torch.Generator().manual_seed(m)
    g = _g(fmt)
    k = 1024
    x, t = exact_inputs(m, k, g, dtype, gen, "cuda")
    x[0, :g] = 0
    if m > 3:
        x[1, g: 2 * g] = float("nan")
        x[2, :g] = float("inf")
        x[3, :g] = x[3, :g] * 2.0**-40
    ags = _act_gs(fmt).cuda()
    b, sa, c, s = decode.act_operand(x, t, ags, fmt, debug=True)
    cr, sr = reference.transform_quantize_ref(x, t, ags, fmt)
    assert torch.equal(s, sr), f"{(s != sr).sum()} scale bytes differ"
    assert torch.equal(c, cr), f"{(c != cr).sum()} code bytes differ"
    br, sar = decode.act_operand_ref(x, t, ags, fmt)
    assert torch.equal(b.isnan(), br.isnan()) and torch.equal(b.nan_to_num().view(torch.int16), br.nan_to_num().view(torch.int16))
    if sa is not None:
        assert torch.equal(sa.isnan(), sar.isnan()) and torch.equal(sa.nan_to_num(), sar.nan_to_num())


LLAMA_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", list(LLAMA_8B) + ["odd"])
@pytest.mark.parametrize("m", [1, 16, 5])
def test_gpu_linear_matches_fp64_reference(fmt, shape, m):
    _need_hopper()
    gen = torch.Generator().manual_seed(1000 * m + len(shape) + (7 if fmt == "nvfp4" else 0))
    g = _g(fmt)
    n, k = LLAMA_8B.get(shape, (1000, 1280))
    x = (torch.randn(m, k, generator=gen) * 3).to(torch.bfloat16).cuda()
    t = torch.linalg.qr(torch.randn(k // g, g, g, generator=gen))[0].to(torch.bfloat16).cuda()
    codes, scales, w_gs = _weights(n, k, fmt, torch.Generator(device="cuda").manual_seed(n + m))
    a_gs = _act_gs(fmt).cuda()
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).cuda() if shape == "odd" else None
    for out_dtype in (torch.bfloat16, torch.float32):
        xx = x.to(out_dtype)
        y = decode.linear(xx, codes, scales, t, w_gs, a_gs, bias, fmt)
        assert y.dtype == out_dtype and y.shape == (m, n)
        ref = _ref64(xx, codes, scales, t, w_gs, a_gs, bias, fmt)
        yr = reference.linear_ref(xx, codes, scales, t, w_gs, a_gs, bias, fmt)
        err = float((y.double() - ref).norm() / ref.norm())
        err_ref = float((yr.double() - ref).norm() / ref.norm())
        if out_dtype == torch.float32:
            assert err < 1e-5, f"rel err {err:.3e} (reference twin {err_ref:.3e})"
        else:
            assert err < 2 * err_ref + 1e-4, f"rel err {err:.3e} (reference twin {err_ref:.3e})"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
def test_gpu_nan_groups_and_determinism(fmt):
    _need_hopper()
    gen = torch.Generator().manual_seed(11)
    g = _g(fmt)
    m, n, k = 6, 4096, 4096
    x = torch.randn(m, k, generator=gen).cuda()
    x[2, 5 * g: 6 * g] = float("nan")
    t = torch.eye(g).repeat(k // g, 1, 1).cuda()
    codes, scales, w_gs = _weights(n, k, fmt, gen)
    scales[300, 9] = 0xFF if fmt == "mxfp4" else 0x7F
    codes, scales, w_gs = codes.cuda(), scales.cuda(), w_gs.cuda()
    y1 = decode.linear(x, codes, scales, t, w_gs, _act_gs(fmt).cuda(), None, fmt)
    y2 = decode.linear(x, codes, scales, t, w_gs, _act_gs(fmt).cuda(), None, fmt)
    nan = torch.zeros(m, n, dtype=torch.bool, device="cuda")
    nan[2] = True
    nan[:, 300] = True
    assert torch.equal(y1.isnan(), nan)
    assert torch.equal(y1.nan_to_num(), y2.nan_to_num()), "split-K reduction must be deterministic"
    assert not decode._COUNTERS[str(x.device)].any(), "counters re-armed"


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [True, False])
def test_gpu_cuda_graph_capture_and_replay(pdl):
    _need_hopper()
    gen = torch.Generator().manual_seed(12)
    fmt, g = "nvfp4", 16
    m, n, k = 16, 6144, 4096
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    t = torch.linalg.qr(torch.randn(k // g, g, g, generator=gen))[0].to(torch.bfloat16).cuda()
    codes, scales, w_gs = _weights(n, k, fmt, gen)
    codes, scales, w_gs, a_gs = codes.cuda(), scales.cuda(), w_gs.cuda(), _act_gs(fmt).cuda()
    want = decode.linear(x, codes, scales, t, w_gs, a_gs, None, fmt, pdl=pdl)  # warm-up (loads the kernels)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        y = decode.linear(x, codes, scales, t, w_gs, a_gs, None, fmt, pdl=pdl)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        x.copy_(torch.randn(m, k, generator=gen).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        want = decode.linear(x, codes, scales, t, w_gs, a_gs, None, fmt, pdl=pdl)
        assert torch.equal(y, want)


@pytest.mark.gpu
def test_gpu_router_takes_the_cuda_decode_route_when_on(monkeypatch):
    _need_hopper()
    from wush_compile import settings
    from wush_compile.config import KernelChoice
    from wush_compile.ops import dispatch
    from wush_compile.ops.operands import LinearOperands

    gen = torch.Generator().manual_seed(13)
    fmt, g = "mxfp4", 32
    m, n, k = 3, 1000, 1024
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    t = torch.linalg.qr(torch.randn(k // g, g, g, generator=gen))[0].to(torch.bfloat16).cuda()
    codes, scales, w_gs = _weights(n, k, fmt, gen)
    codes, scales, w_gs, a_gs = codes.cuda(), scales.cuda(), w_gs.cuda(), _act_gs(fmt).cuda()
    ops = LinearOperands.checked(x, codes, scales, t, w_gs, a_gs, None, fmt)
    calls = []
    real = decode.linear
    monkeypatch.setattr(decode, "linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def run():
        choice, _ = dispatch.choose_kernel(m, n, k, fmt, x.device, count=False)
        return choice, dispatch.run_linear(choice, x, ops)

    assert settings.cuda_decode() is False  # opt-in
    choice, _ = run()
    assert choice is KernelChoice.TRITON_DECODE and not calls, "off by default: the Triton decode kernels run"
    with settings.overridden(cuda_decode=True):
        choice, y = run()
        assert choice is KernelChoice.CUDA_DECODE and calls, "on sm_90 the router takes cuda_decode once turned on"
        monkeypatch.setenv("WUSH_DISABLE_CUDA_DECODE", "1")
        choice, y_triton = run()
    assert choice is KernelChoice.TRITON_DECODE and len(calls) == 1
    ref = _ref64(x, codes, scales, t, w_gs, a_gs, None, fmt)
    for yy in (y, y_triton):
        assert float((yy.double() - ref).norm() / ref.norm()) < 1e-2


def test_launch_structs_mirror_the_cuda_source():
    """DecActArgs / DecGemmArgs of decode_sm90.cu, made by the loader's one struct helper."""
    import ctypes

    assert ctypes.sizeof(decode._DecActArgs) == 7 * 8 + 3 * 8 + 2 * 4
    assert decode._DecActArgs.m.offset == 56 and decode._DecActArgs.tiles.offset == 80
    assert ctypes.sizeof(decode._DecGemmArgs) == 10 * 8 + 4 * 8 + 4 * 4
    assert decode._DecGemmArgs.m.offset == 80 and decode._DecGemmArgs.out_dtype.offset == 120
