"""fp8core (MXFP4 W4A4 on fp8 tensor cores) against the fp64 reference: Triton interpreter on CPU (small
shapes) and the GPU (``-m gpu`` for the large-K ones)."""

from __future__ import annotations

import pytest
import torch

from wush_compile import formats
from wush_compile.ops import fp8core, reference

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
G = 32


def _layer(n, k, gen, wide_rows=()):
    w = torch.randn(n, k, generator=gen) * 0.05
    for r in wide_rows:
        w[r, :G] *= 2.0**20
    codes, scales, gs = formats.quantize(w.to(DEV), "mxfp4")
    return codes, scales, gs.to(torch.float32).reshape(())


def _ref64(x, codes, scales, t, w_gs, bias):
    a_gs = torch.tensor(formats.MXFP4_GLOBAL_SCALE, device=x.device)
    ac, asc = reference.transform_quantize_ref(x, t, a_gs, "mxfp4")
    one = torch.ones((), device=x.device)
    a = formats.dequantize(ac, asc, one, "mxfp4").double()
    w = formats.dequantize(codes, scales, one, "mxfp4").double()
    y = (a @ w.t()) * (a_gs.double() * w_gs.double())
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("m", [5, 40])
def test_quantize_act_fp8_matches_reference(m, split):
    gen = torch.Generator().manual_seed(1)
    k = 256
    x = (torch.randn(m, k, generator=gen) * 2).to(DEV)
    x[1, 5] = float("nan")
    x[2, :G] = 0
    t = torch.linalg.qr(torch.randn(k // G, G, G, generator=gen))[0].contiguous().to(DEV)
    q, rs, sc, state = fp8core.quantize_act_fp8(x, t, split=split)
    cr, sr = reference.transform_quantize_ref(x, t, None, "mxfp4")
    assert torch.equal(sc, sr)
    vals = formats.dequantize(cr, sr, torch.ones((), device=DEV), "mxfp4")  # code * 2**E
    got = q.float() * rs[:, None]
    ok = torch.isfinite(rs)
    assert not bool(ok[1]) and bool(ok[0])
    assert torch.equal(got[ok], vals[ok])
    assert int(state[0]) == 0


def test_act_split_path_writes_the_same_bytes_as_one_kernel():
    """Both activation paths: same e4m3 bytes, row scales, scale bytes and wide-row list (planted wide and
    NaN rows, K not a multiple of the split path's K range)."""
    gen = torch.Generator().manual_seed(11)
    m, k = 37, 640
    x = torch.randn(m, k, generator=gen) * 2
    x[3, :G] *= 2.0**20  # spread > 14: wide
    x[8, 100] = float("inf")
    x = x.to(DEV)
    t = torch.linalg.qr(torch.randn(k // G, G, G, generator=gen))[0].contiguous().to(DEV)
    a = fp8core.quantize_act_fp8(x, t, split=False)
    b = fp8core.quantize_act_fp8(x, t, split=True)
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
    assert torch.equal(a[1], b[1]) or torch.equal(torch.isnan(a[1]), torch.isnan(b[1])) and torch.equal(
        a[1].nan_to_num(), b[1].nan_to_num())
    assert torch.equal(a[2], b[2])
    sa, sb = a[3].cpu(), b[3].cpu()
    assert int(sa[0]) == int(sb[0]) == 1
    assert torch.equal(sa[2 : 2 + m], sb[2 : 2 + m]) and int(sb[2 + m]) == 3


def _check_linear(m, n, k, gen, dtype=torch.float32, bias=False, wide_w=(), wide_a=(), tiles=None, tol=1e-5):
    x = (torch.randn(m, k, generator=gen) * 3).float()
    for r in wide_a:
        x[r, :G] *= 2.0**20
    x = x.to(dtype).to(DEV)
    t = torch.eye(G).expand(k // G, G, G).contiguous().to(dtype).to(DEV) if wide_a else \
        torch.linalg.qr(torch.randn(k // G, G, G, generator=gen))[0].contiguous().to(dtype).to(DEV)
    codes, scales, w_gs = _layer(n, k, gen, wide_w)
    b = torch.randn(n, generator=gen).to(dtype).to(DEV) if bias else None
    packed = fp8core.pack_weights(codes)
    fp8core.fallback_stats(reset=True)
    y = fp8core.linear(x, packed, scales, t, w_gs, b, tiles=tiles)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = _ref64(x, codes, scales, t, w_gs, b)
    if dtype == torch.float32:
        row_err = (y.double() - ref).norm(dim=1) / ref.norm(dim=1)
        assert float(row_err.max()) < tol, float(row_err.max())
    else:
        yr = reference.linear_ref(x, codes, scales, t, w_gs, torch.tensor(1 / 3, device=DEV), b, "mxfp4")
        err = float((y.double() - ref).norm() / ref.norm())
        err_ref = float((yr.double() - ref).norm() / ref.norm())
        assert err < 2 * err_ref + 1e-4, (err, err_ref)
    s = next(iter(fp8core.fallback_stats(reset=True).values()))
    assert s["act_rows_fallback"] == len(wide_a) and s["act_rows"] == m
    return x, packed, scales, t, w_gs


def test_pack_weights_round_trip_and_layout():
    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 256, (3, 128), generator=gen, dtype=torch.uint8)
    p = fp8core.pack_weights(codes)
    assert torch.equal(fp8core.unpack_weights(p), codes)
    c = formats.unpack_fp4(codes)  # (3, 256)
    assert int(p[1, 70] & 15) == int(c[1, 128 + 6]) and int(p[1, 70] >> 4) == int(c[1, 128 + 64 + 6])
    with pytest.raises(ValueError, match="K % 128"):
        fp8core.pack_weights(codes[:, :40])


@pytest.mark.parametrize("dtype,bias", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_linear_matches_reference(dtype, bias):
    gen = torch.Generator().manual_seed(2)
    m, n, k = (19, 70, 256) if DEV == "cpu" else (300, 1000, 2048)
    _check_linear(m, n, k, gen, dtype, bias)


@pytest.mark.parametrize("split_k", [2, 3])
def test_linear_split_k_matches_reference(split_k):
    gen = torch.Generator().manual_seed(5)
    m, n, k = (19, 70, 512) if DEV == "cpu" else (40, 1000, 4096)
    _check_linear(m, n, k, gen, bias=True, wide_w=(4,), wide_a=(2,),
                  tiles=fp8core.Fp8Tiles(block_w=64, block_t=16 if DEV == "cpu" else 64, split_k=split_k))


def test_tiles_reject_bad_values():
    with pytest.raises(ValueError, match="block_t"):
        fp8core.Fp8Tiles(block_t=48)
    with pytest.raises(ValueError, match="split_k"):
        fp8core.Fp8Tiles(split_k=0)


def test_linear_fallback_rows_exact_and_nan():
    gen = torch.Generator().manual_seed(3)
    m, n, k = (21, 70, 256) if DEV == "cpu" else (200, 700, 2048)
    x, packed, scales, t, w_gs = _check_linear(m, n, k, gen, wide_w=(2, 65), wide_a=(3, 17))
    x[5, 7] = float("nan")
    y = fp8core.linear(x, packed, scales, t, w_gs, None)
    assert bool(torch.isnan(y[5]).all()) and bool(torch.isfinite(y[6]).all())
    s2 = scales.clone()
    s2[4, 1] = 255  # a NaN weight scale: that output column is NaN for every token, as in the reference
    y2 = fp8core.linear(x, packed, s2, t, w_gs, None)
    assert bool(torch.isnan(y2[:, 4]).all()) and bool(torch.isfinite(y2[6, :4]).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [17, 100, 1000])
@pytest.mark.parametrize("use_asm", [True, False])
def test_linear_gpu_large_k(m, use_asm):
    """K = 14336 (the down projection): fp32 promotion keeps the fp8 sum at fp32-accumulation accuracy."""
    gen = torch.Generator().manual_seed(4 + m)
    base = fp8core.tiles_for(m, 1000, 14336)
    tiles = fp8core.Fp8Tiles(**{**base.__dict__, "use_asm": use_asm})
    _check_linear(m, 1000, 14336, gen, tiles=tiles, wide_w=(7,), wide_a=(1,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("split_k", [1, 4])
def test_linear_gpu_wide_but_foldable_spread_is_fp32_exact(split_k):
    """Group exponents spread across a row: weights 12 binades + the data's own (any spread is exact: each
    group's scale multiplies its MMA sum in fp32), activations 10 + own (as wide as still folds): the fp8 MMA
    path must keep fp32-accumulation accuracy. Bound: 4x an fp32 matmul's error on the same dequantized operands, or 2**-21."""
    gen = torch.Generator(device=DEV).manual_seed(12)
    n, k, m = 512, 4096, 64
    w = torch.randn(n, k, generator=gen, device=DEV)
    w = w * torch.pow(2.0, torch.randint(-12, 1, (n, k // G, 1), generator=gen, device=DEV).float()).repeat_interleave(G, 1).reshape(n, k)
    codes, scales, w_gs = formats.quantize(w, "mxfp4")
    w_gs = w_gs.float().reshape(())
    x = torch.randn(m, k, generator=gen, device=DEV)
    x = x * torch.pow(2.0, torch.randint(-10, 1, (m, k // G, 1), generator=gen, device=DEV).float()).repeat_interleave(G, 1).reshape(m, k)
    t = torch.eye(G, device=DEV).expand(k // G, G, G).contiguous()
    y = fp8core.linear(x, fp8core.pack_weights(codes), scales, t, w_gs, None, tiles=fp8core.Fp8Tiles(64, 64, split_k=split_k))
    ref = _ref64(x, codes, scales, t, w_gs, None)
    a_gs = torch.tensor(formats.MXFP4_GLOBAL_SCALE, device=DEV)
    ac, asc = reference.transform_quantize_ref(x, t, a_gs, "mxfp4")
    one = torch.ones((), device=DEV)
    torch.backends.cuda.matmul.allow_tf32 = False
    y32 = (formats.dequantize(ac, asc, one, "mxfp4") @ formats.dequantize(codes, scales, one, "mxfp4").t()).double() \
        * (a_gs.double() * w_gs.double())
    rn = ref.norm(dim=1)
    err = float(((y.double() - ref).norm(dim=1) / rn).max())
    err32 = float(((y32 - ref).norm(dim=1) / rn).max())
    assert err <= max(4 * err32, 2.0**-21), (err, err32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bw,bt,warps", [(64, 64, 4), (128, 64, 4), (64, 16, 4), (128, 128, 8), (128, 256, 8)])
def test_asm_expansion_equals_portable(bw, bt, warps):
    """The PTX expansion reads one offset byte per weight byte, so it equals the integer expansion at any
    tile / layout (bit for bit: same e4m3 operands, same MMA)."""
    gen = torch.Generator().manual_seed(9)
    m, n, k = 100, 512, 1024
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    t = torch.linalg.qr(torch.randn(k // G, G, G, generator=gen))[0].contiguous().to(torch.bfloat16).to(DEV)
    codes, scales, w_gs = _layer(n, k, gen)
    packed = fp8core.pack_weights(codes)
    ys = [fp8core.linear(x.float(), packed, scales, t.float(), w_gs, None,
                         tiles=fp8core.Fp8Tiles(block_w=bw, block_t=bt, num_warps=warps, use_asm=a))
          for a in (True, False)]
    assert torch.equal(ys[0], ys[1])


def test_router_runs_fp8core_when_pinned_single_and_group():
    """The router's fp8core entry (checked operands, weights packed once per tensor) equals the module's own
    linear, for one layer and for a group sharing x; NVFP4 and K % 128 != 0 are refused with the reason."""
    from wush_compile.config import Format, KernelChoice
    from wush_compile.ops import dispatch
    from wush_compile.ops.operands import LinearOperands, group_operands

    gen = torch.Generator().manual_seed(21)
    m, k = 9, 256
    x = torch.randn(m, k, generator=gen).to(DEV)
    t = torch.linalg.qr(torch.randn(k // G, G, G, generator=gen))[0].contiguous().to(DEV)
    a_gs = torch.tensor(formats.MXFP4_GLOBAL_SCALE, device=DEV)
    layers = [_layer(n, k, gen) for n in (40, 24)]
    ops = LinearOperands.checked(x, *layers[0][:2], t, layers[0][2], a_gs, None, "mxfp4")
    y = dispatch.run_linear(KernelChoice.FP8CORE, x, ops)
    want = fp8core.linear(x, fp8core.pack_weights(layers[0][0]), layers[0][1], t, layers[0][2])
    assert torch.equal(y, want)
    assert fp8core.packed_codes(layers[0][0]) is fp8core.packed_codes(layers[0][0])  # packed once
    members = group_operands(x, [c for c, _, _ in layers], [s for _, s, _ in layers], t, [g for _, _, g in layers],
                             a_gs, [None, None], "mxfp4")
    outs = dispatch.run_linear_group(KernelChoice.FP8CORE, x, members)
    for (c, s, g), o in zip(layers, outs):
        assert torch.equal(o, fp8core.linear(x, fp8core.pack_weights(c), s, t, g))
    ok, why = dispatch.supports("fp8core", Format.NVFP4, DEV)
    assert not ok and "nvfp4" in why
    ok, why = dispatch.supports("fp8core", Format.MXFP4, DEV, k=96)
    assert not ok and "K=96" in why
    dispatch.clear()
    assert not fp8core._PACKED
    codes = layers[1][0].clone()
    fp8core.packed_codes(codes)
    assert len(fp8core._PACKED) == 1
    del codes  # the packed copy goes with its codes
    assert not fp8core._PACKED


def test_bad_shapes_get_clear_errors():
    x = torch.randn(4, 96, device=DEV)
    with pytest.raises(ValueError, match="K % 128 == 0, got K=96"):
        fp8core.quantize_act_fp8(x, torch.eye(G, device=DEV).expand(3, G, G).contiguous())
    x = torch.randn(4, 128, device=DEV)
    with pytest.raises(ValueError, match=r"transform must be \(4, 32, 32\)"):
        fp8core.quantize_act_fp8(x, torch.eye(G, device=DEV).expand(3, G, G).contiguous())
    with pytest.raises(ValueError, match="2-D activations"):
        fp8core.quantize_act_fp8(x[None], torch.eye(G, device=DEV).expand(4, G, G).contiguous())
    q, rs, sc, st = fp8core.quantize_act_fp8(x, torch.eye(G, device=DEV).expand(4, G, G).contiguous())
    with pytest.raises(ValueError, match="packed codes"):
        fp8core.gemm(q, rs, sc, st, torch.zeros(8, 32, dtype=torch.uint8, device=DEV),
                     torch.zeros(8, 4, dtype=torch.uint8, device=DEV), torch.ones(()))
