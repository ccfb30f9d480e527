"""SPEC section 3, pinned: the e2m1 code, nibble packing, e8m0 / e4m3 scale bytes, MXFP4 and NVFP4.

Every expectation here comes from SPEC.md, computed by an independent oracle written in this file (float64
numpy, brute-force nearest grid point). The implementation's fp32 arithmetic is part of the contract (the
kernels repeat it bit for bit), so the oracle rounds to fp32 exactly where SPEC's formula produces an fp32
intermediate: the scaled value ``x * 3 / 2**E`` (MXFP4), ``amax / (6 g)``, ``s * g`` and ``x / (s g)`` (NVFP4).
Products and quotients of two fp32 numbers computed in float64 and rounded once to fp32 are the correctly
rounded fp32 results, so these intermediates are the IEEE fp32 ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wush_compile import formats
from wush_compile.config import Format

FMTS = ("mxfp4", "nvfp4")
GROUP = {"mxfp4": 32, "nvfp4": 16}

# --------------------------------------------------------------------------------------------------------------
# Independent oracle (float64 numpy, written from SPEC section 3)
# --------------------------------------------------------------------------------------------------------------

MAGS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # index -> magnitude (SPEC)


def f32(a) -> np.ndarray:
    """Round float64 values to fp32 (one IEEE rounding, nearest even; overflow -> inf) as float64."""
    with np.errstate(over="ignore"):
        return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def oracle_e2m1(v: np.ndarray) -> np.ndarray:
    """Nearest of the 8 magnitudes by brute force, ties to the even index, >6 -> 6; sign bit copied."""
    v = np.asarray(v, dtype=np.float64)
    mag = np.minimum(np.abs(v), 6.0)  # saturation (also keeps the distances exact for huge values)
    dist = np.abs(mag[..., None] - MAGS)  # (..., 8)
    best = dist.min(-1, keepdims=True)
    is_best = dist == best  # one or two (a tie) candidates
    even_best = is_best & (np.arange(8) % 2 == 0)
    idx = np.where(even_best.any(-1), even_best.argmax(-1), is_best.argmax(-1))
    return (idx | (np.signbit(v).astype(np.int64) << 3)).astype(np.uint8)


def oracle_e2m1_value(code: int) -> float:
    mag = MAGS[code & 7]
    return -mag if code & 8 else mag


def oracle_e4m3_value(byte: int) -> float:
    """OCP e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp = (byte >> 3) & 0xF
    man = byte & 0x7
    if exp == 0xF and man == 0x7:
        return float("nan")
    if exp == 0:
        return sign * man / 8.0 * 2.0**-6
    return sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)


E4M3_POS = np.array([oracle_e4m3_value(b) for b in range(0x7F)])  # bytes 0..0x7E, increasing


def oracle_float_to_e4m3(x: np.ndarray) -> np.ndarray:
    """Non-negative values -> e4m3 byte: nearest finite value, ties to the even byte, saturating at 448."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape, dtype=np.uint8)
    flat, res = x.reshape(-1), out.reshape(-1)
    for i, val in enumerate(flat):
        if math.isnan(val):
            res[i] = 0x7F
            continue
        dist = np.abs(E4M3_POS - min(val, 448.0))
        cand = np.flatnonzero(dist == dist.min())
        even = [c for c in cand if c % 2 == 0]
        res[i] = even[0] if even else cand[0]
    return out


def oracle_quantize(x: np.ndarray, fmt: str, g: float | None = None):
    """(codes (..., K) unpacked, scale bytes (..., K/G), global scale, decoded (..., K)) per SPEC section 3.

    x: float64 array holding fp32 values, all finite.
    """
    gs = GROUP[fmt]
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // gs, gs)  # (..., K/G, G)
    amax = np.abs(xg).max(-1)  # (..., K/G)
    if fmt == "mxfp4":
        assert g is None
        e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))), -127.0)  # (..., K/G)
        e = np.clip(e, -127, 127)
        v = f32(xg / 2.0 ** e[..., None] * 3.0)  # exact in float64, one rounding to fp32
        codes = oracle_e2m1(v)
        scales = (e + 127).astype(np.uint8)
        glob = float(np.float32(1.0 / 3.0))
        decoded = f32(np.vectorize(oracle_e2m1_value)(codes) * 2.0 ** e[..., None] * glob)
        return codes.reshape(x.shape), scales, glob, decoded.reshape(x.shape)
    if g is None:
        g = float(f32(np.abs(x).max() / (448.0 * 6.0)))
        if g == 0:
            g = 1.0
    s_arg = f32(amax / f32(6.0 * g))  # (..., K/G)
    scales = oracle_float_to_e4m3(s_arg)
    s = E4M3_POS[scales.astype(np.int64)]  # (..., K/G)
    d = f32(s * g)[..., None]  # (..., K/G, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(d > 0, f32(xg / np.where(d > 0, d, 1.0)), np.copysign(0.0, xg))
    codes = oracle_e2m1(v)
    decoded = f32(np.vectorize(oracle_e2m1_value)(codes) * s[..., None] * g)
    return codes.reshape(x.shape), scales, g, decoded.reshape(x.shape)


def t32(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())


def check_against_oracle(x: torch.Tensor, fmt: str, global_scale=None) -> None:
    """quantize / dequantize / fake_quantize of fp32 ``x`` agree with the oracle bit for bit."""
    xn = x.double().numpy()
    o_codes, o_scales, o_g, o_dec = oracle_quantize(xn, fmt, global_scale)
    codes, scales, g = formats.quantize(x, fmt, global_scale)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.uint8 and g.dtype == torch.float32 and g.dim() == 0
    got_codes = formats.unpack_fp4(codes).numpy()
    bad = np.flatnonzero(got_codes.reshape(-1) != o_codes.reshape(-1))
    assert bad.size == 0, (
        f"{fmt}: {bad.size} codes differ; first at {bad[0]}: x={xn.reshape(-1)[bad[0]]!r} "
        f"got {got_codes.reshape(-1)[bad[0]]} want {o_codes.reshape(-1)[bad[0]]}"
    )
    np.testing.assert_array_equal(scales.numpy(), o_scales, err_msg=f"{fmt} scale bytes")
    assert float(g) == np.float32(o_g), (float(g), o_g)
    dec = formats.dequantize(codes, scales, g, fmt).double().numpy()
    np.testing.assert_array_equal(dec, o_dec, err_msg=f"{fmt} decoded values")
    fq = formats.fake_quantize(x, fmt, global_scale)
    np.testing.assert_array_equal(fq.double().numpy(), o_dec, err_msg=f"{fmt} fake_quantize")


# --------------------------------------------------------------------------------------------------------------
# e2m1 codes
# --------------------------------------------------------------------------------------------------------------


def test_all_16_codes_decode():
    """Every code decodes (bit 3 sign, bits 0-2 index -> 0, .5, 1, 1.5, 2, 3, 4, 6); code 8 is -0."""
    codes = torch.arange(16, dtype=torch.uint8)  # 16 codes = one NVFP4 group
    packed = formats.pack_fp4(codes)
    for fmt, scale_byte in (("nvfp4", 0x38), ("mxfp4", 0x7F)):
        k = GROUP[fmt]
        c = torch.cat([packed] * (k // 16))
        vals = formats.dequantize(c, torch.tensor([scale_byte], dtype=torch.uint8), torch.tensor(1.0), fmt)
        want = torch.tensor([oracle_e2m1_value(i) for i in range(16)] * (k // 16), dtype=torch.float32)
        assert torch.equal(vals, want), (fmt, vals)
        assert torch.equal(torch.signbit(vals), torch.signbit(want)), "code 8 must decode to -0.0"
    lut = torch.tensor(formats.E2M1_SIGNED_VALUES)
    assert torch.equal(lut, torch.tensor([oracle_e2m1_value(i) for i in range(16)]))
    assert bool(torch.signbit(lut[8]))


@pytest.mark.parametrize(
    "value,index",
    [(0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6)],
)
def test_every_tie_goes_to_even_index(value, index):
    v = torch.tensor([value, -value], dtype=torch.float32)
    codes = formats.round_to_e2m1(v)
    assert codes.tolist() == [index, index | 8], f"tie {value} -> {codes.tolist()}, SPEC wants index {index}"
    # one fp32 ulp on either side leaves the tie
    up = torch.nextafter(v.abs(), torch.tensor(math.inf))
    down = torch.nextafter(v.abs(), torch.tensor(0.0))
    lo_idx = int(np.flatnonzero(MAGS < value)[-1])
    hi_idx = lo_idx + 1
    assert formats.round_to_e2m1(up).tolist() == [hi_idx, hi_idx]
    assert formats.round_to_e2m1(down).tolist() == [lo_idx, lo_idx]


def test_exact_grid_points_and_saturation():
    mags = torch.tensor(MAGS, dtype=torch.float32)
    assert formats.round_to_e2m1(mags).tolist() == list(range(8))
    assert formats.round_to_e2m1(-mags[1:]).tolist() == [i | 8 for i in range(1, 8)]
    big = torch.tensor([6.0, 6.5, 7.0, 100.0, 3e38, math.inf], dtype=torch.float32)
    assert formats.round_to_e2m1(big).tolist() == [7] * 6
    assert formats.round_to_e2m1(-big).tolist() == [15] * 6


def test_sign_kept_for_values_rounding_to_zero():
    v = torch.tensor([-0.0, -1e-30, -0.1, -0.25, 0.0, 1e-30, 0.25], dtype=torch.float32)
    assert formats.round_to_e2m1(v).tolist() == [8, 8, 8, 8, 0, 0, 0]


def test_round_to_e2m1_matches_oracle_on_dense_grid():
    """Every fp32 multiple of 2**-10 in [-7, 7], plus each one nudged by one ulp either way."""
    base = torch.arange(-7 * 1024, 7 * 1024 + 1, dtype=torch.float32) / 1024
    v = torch.cat([base, torch.nextafter(base, torch.tensor(math.inf)), torch.nextafter(base, torch.tensor(-math.inf))])
    np.testing.assert_array_equal(formats.round_to_e2m1(v).numpy(), oracle_e2m1(v.double().numpy()))


# --------------------------------------------------------------------------------------------------------------
# Nibble packing
# --------------------------------------------------------------------------------------------------------------


def test_nibble_order_even_element_in_low_nibble():
    codes = torch.tensor([0x1, 0xF, 0x8, 0x3], dtype=torch.uint8)
    packed = formats.pack_fp4(codes)
    assert packed.tolist() == [0xF1, 0x38]
    assert formats.unpack_fp4(torch.tensor([0xA5], dtype=torch.uint8)).tolist() == [0x5, 0xA]


def test_pack_unpack_round_trip_all_pairs():
    hi, lo = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")  # byte b: lo = b % 16, hi = b // 16
    codes = torch.stack([lo.reshape(-1), hi.reshape(-1)], -1).reshape(-1).to(torch.uint8)  # (512,)
    packed = formats.pack_fp4(codes)
    assert packed.tolist() == list(range(256))  # byte = lo | hi << 4 covers every byte once
    assert torch.equal(formats.unpack_fp4(packed), codes)
    all_bytes = torch.arange(256, dtype=torch.uint8).reshape(4, 2, 32)  # 3-D
    assert torch.equal(formats.pack_fp4(formats.unpack_fp4(all_bytes)), all_bytes)


def test_quantize_packs_even_element_low():
    """End to end: the codes quantize() returns put x[2i] in the low nibble."""
    x = torch.zeros(32)
    x[0], x[1] = 6.0, -3.0  # MXFP4: amax 6 -> E = 2, v = x * 3 / 4 -> 4.5 -> index 6 (4), -2.25 -> index 4 (2)
    codes, _, _ = formats.quantize(x, "mxfp4")
    assert codes[0].item() == (6 | ((4 | 8) << 4))


def test_pack_errors():
    with pytest.raises(TypeError, match="uint8"):
        formats.pack_fp4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="even"):
        formats.pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        formats.unpack_fp4(torch.zeros(4, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------------------
# Scale bytes
# --------------------------------------------------------------------------------------------------------------


def test_every_e8m0_byte():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = formats.e8m0_to_float(b)
    assert vals.dtype == torch.float32
    for byte in range(255):
        assert vals[byte].item() == 2.0 ** (byte - 127), byte  # 2**-127 is an fp32 subnormal, exact
    assert math.isnan(vals[255].item())


def test_every_e4m3_byte():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = formats.e4m3_to_float(b)
    for byte in range(256):
        want = oracle_e4m3_value(byte)
        got = vals[byte].item()
        if math.isnan(want):
            assert math.isnan(got), byte
        else:
            assert got == want and math.copysign(1, got) == math.copysign(1, want), (byte, got, want)
    assert [i for i in range(256) if math.isnan(vals[i].item())] == [0x7F, 0xFF]
    assert vals[0x7E].item() == 448.0 == formats.E4M3_MAX


def _e4m3_probe_values() -> np.ndarray:
    """All finite e4m3 values, every midpoint, and each of those nudged one fp32 ulp either way."""
    pts = E4M3_POS
    mids = (pts[:-1] + pts[1:]) / 2
    extra = np.array([0.0, 2.0**-10, 2.0**-11, 1e-30, 447.0, 449.0, 464.0, 465.0, 480.0, 1000.0, 3e38, np.inf])
    base = np.concatenate([pts, mids, extra]).astype(np.float32)
    up = np.nextafter(base, np.float32(np.inf))
    down = np.nextafter(base, np.float32(0))
    return np.concatenate([base, up, down]).astype(np.float64)


def test_float_to_e4m3_rne_and_saturation():
    x = _e4m3_probe_values()
    got = formats.float_to_e4m3(t32(x)).numpy()
    want = oracle_float_to_e4m3(x)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"first mismatch x={x[bad[0]]!r}: got {got[bad[0]]:#x} want {want[bad[0]]:#x}"
    assert formats.float_to_e4m3(torch.tensor([float("nan")])).item() == 0x7F


def test_float_to_e4m3_random_log_uniform():
    rng = np.random.default_rng(0)
    x = f32(2.0 ** rng.uniform(-14, 10, size=4000))
    np.testing.assert_array_equal(formats.float_to_e4m3(t32(x)).numpy(), oracle_float_to_e4m3(x))


# --------------------------------------------------------------------------------------------------------------
# MXFP4
# --------------------------------------------------------------------------------------------------------------


def _mx_group(amax: float, rest: float = 0.0) -> torch.Tensor:
    x = torch.full((32,), rest, dtype=torch.float32)
    x[5] = amax
    return x


@pytest.mark.parametrize("k", [-126, -20, -3, -1, 0, 1, 2, 7, 60, 126, 127])
def test_mxfp4_exponent_at_and_below_powers_of_two(k):
    p = torch.tensor(2.0**k, dtype=torch.float32)
    below = torch.nextafter(p, torch.tensor(0.0))
    for amax, want_e in ((p, k), (below, k - 1), (-p, k), (-below, k - 1)):
        _, scales, g = formats.quantize(_mx_group(float(amax)), "mxfp4")
        assert scales.item() == want_e + 127, (float(amax), scales.item(), want_e + 127)
        assert float(g) == np.float32(1.0 / 3.0)


def test_mxfp4_group_max_lands_in_3_to_6_and_nothing_clips():
    rng = np.random.default_rng(1)
    x = f32(rng.standard_normal((64, 256)) * 2.0 ** rng.integers(-30, 30, size=(64, 1)))
    xt = t32(x)
    _, scales, _ = formats.quantize(xt, "mxfp4")
    e = scales.numpy().astype(np.float64) - 127  # (64, 8)
    amax = np.abs(x.reshape(64, 8, 32)).max(-1)
    scaled = amax * 3 / 2.0**e
    assert np.all((scaled >= 3) & (scaled < 6)), (scaled.min(), scaled.max())
    # nothing clips: the decoded group max is the nearest grid point, never the saturated 6 below a larger value
    fq = np.abs(formats.fake_quantize(xt, "mxfp4").double().numpy().reshape(64, 8, 32)).max(-1)
    unit = 2.0**e / 3  # one unit of the e2m1 grid at this scale
    assert np.all(np.abs(fq - amax) <= unit), np.abs(fq - amax).max()


def test_mxfp4_zero_group():
    x = torch.zeros(2, 64)
    x[1, 32:] = torch.linspace(-1, 1, 32)
    codes, scales, g = formats.quantize(x, "mxfp4")
    assert scales[0].tolist() == [0, 0]  # smallest scale, 2**-127
    assert scales[1, 0].item() == 0
    assert torch.all(formats.unpack_fp4(codes)[0] == 0)
    assert torch.all(formats.unpack_fp4(codes)[1, :32] == 0)
    out = formats.dequantize(codes, scales, g, "mxfp4")
    assert torch.all(out[0] == 0) and torch.all(out[1, :32] == 0)
    # -0.0 inputs decode to zero (code 8, -0, is allowed)
    neg = formats.fake_quantize(torch.full((32,), -0.0), "mxfp4")
    assert torch.all(neg == 0)


def test_mxfp4_top_exponents_decode_without_spurious_overflow():
    """E = 126 and 127: code * 2**E overflows fp32 before the 1/3, but the decoded value does not."""
    x = torch.zeros(2, 32)
    x[0, 0] = 2.0**126 * 5 / 3  # E = 126, v = 5 -> index 6 (4): decoded 4 * 2**126 / 3, finite
    x[1, 0] = 2.0**127  # E = 127, v = 3 -> index 5 (3): decoded 2**127
    out = formats.fake_quantize(x, "mxfp4")
    assert out[0, 0].item() == np.float32(4 * 2.0**126 * float(np.float32(1 / 3)))
    assert out[1, 0].item() == np.float32(2.0**127 * 3 * float(np.float32(1 / 3)))
    assert torch.isfinite(out).all()


def test_mxfp4_value_formula():
    """decoded = code * 2**E / 3, the 1/3 carried as the fp32 global scale."""
    rng = np.random.default_rng(2)
    x = t32(rng.standard_normal((8, 64)))
    codes, scales, g = formats.quantize(x, "mxfp4")
    e = scales.double() - 127
    unpacked = formats.unpack_fp4(codes).reshape(-1).tolist()
    vals = torch.tensor([oracle_e2m1_value(c) for c in unpacked]).reshape(8, 2, 32)
    exact = (vals.double() * (2.0**e)[..., None] / 3).reshape(8, 64)
    dec = formats.dequantize(codes, scales, g, "mxfp4").double()
    torch.testing.assert_close(dec, exact, rtol=2**-23, atol=0)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("spread", [0, 4, 40])
def test_random_inputs_match_oracle(fmt, spread):
    """Many random fp32 inputs with per-group magnitudes spread over 2**+-spread, plus exact ties."""
    rng = np.random.default_rng(100 + spread)
    gs = GROUP[fmt]
    x = rng.standard_normal((48, 8, gs)) * 2.0 ** rng.integers(-spread, spread + 1, size=(48, 8, 1))
    x = x.reshape(48, 8 * gs)
    if fmt == "mxfp4":
        # a group with amax 4 (E = 2, v = x * 3 / 4) whose elements sit at, or one fp32 rounding from, the ties
        ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
        x[1, :32] = 0
        x[1, 0] = 4.0
        x[1, 1:8] = f32(ties * 4 / 3)
        x[1, 8:15] = -f32(ties * 4 / 3)
    check_against_oracle(t32(x), fmt)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(FMTS),
    data=st.data(),
)
def test_property_matches_oracle(fmt, data):
    """Hypothesis: any finite fp32 tensor (subnormals and huge values included) matches the oracle bit for
    bit and never decodes to NaN. (MXFP4 decodes to +-Inf only where SPEC's own value code * 2**E / 3 is past
    the fp32 range: E = 127 and code 6, i.e. |x| >= 5 * 2**127 / 3.)"""
    gs = GROUP[fmt]
    rows = data.draw(st.integers(1, 3))
    ngroups = data.draw(st.integers(1, 3))
    elems = st.floats(width=32, allow_nan=False, allow_infinity=False)
    vals = data.draw(st.lists(elems, min_size=rows * ngroups * gs, max_size=rows * ngroups * gs))
    x = torch.tensor(vals, dtype=torch.float32).reshape(rows, ngroups * gs)
    check_against_oracle(x, fmt)
    fq = formats.fake_quantize(x, fmt)
    assert not torch.isnan(fq).any()
    if fmt == "nvfp4" or float(x.abs().max()) < 2.0**127:
        assert torch.isfinite(fq).all()


@settings(max_examples=60, deadline=None)
@given(
    vals=st.lists(
        st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
        min_size=16,
        max_size=16,
    ),
    g=st.sampled_from([0.1, 1e-3, 1.0, 37.5, 1e-30]),
)
def test_property_nvfp4_fixed_global_scale(vals, g):
    x = torch.tensor(vals, dtype=torch.float32).reshape(1, 16)
    check_against_oracle(x, "nvfp4", float(np.float32(g)))
    assert torch.isfinite(formats.fake_quantize(x, "nvfp4", torch.tensor(g))).all()


@settings(max_examples=80, deadline=None)
@given(
    scale=st.floats(min_value=1e-30, max_value=1e30),
    vals=st.lists(st.floats(min_value=-1.0, max_value=1.0, width=32), min_size=32, max_size=32),
)
def test_property_scaled_groups(scale, vals):
    """Hypothesis over the dynamic range: a group times any scale still matches the oracle."""
    x = torch.tensor(vals, dtype=torch.float32).reshape(1, 32) * scale
    if not torch.isfinite(x).all():
        return
    for fmt in FMTS:
        check_against_oracle(x, fmt)


# --------------------------------------------------------------------------------------------------------------
# NVFP4
# --------------------------------------------------------------------------------------------------------------


def test_nvfp4_fixed_global_scale_formula():
    """g = 0.1 (the paper's): s = e4m3(amax / 0.6), codes = RNE(x / (s * 0.1)), decoded code * s * 0.1."""
    g = float(np.float32(0.1))
    rng = np.random.default_rng(3)
    x = f32(rng.standard_normal((16, 64)) * 2.0 ** rng.integers(-8, 9, size=(16, 1)))
    check_against_oracle(t32(x), "nvfp4", g)
    codes, scales, gg = formats.quantize(t32(x), "nvfp4", torch.tensor(g))
    assert float(gg) == np.float32(0.1)
    s = formats.e4m3_to_float(scales).double()  # (16, 4)
    amax = torch.from_numpy(np.abs(x.reshape(16, 4, 16)).max(-1))
    np.testing.assert_array_equal(scales.numpy(), oracle_float_to_e4m3(f32(amax.numpy() / f32(6 * g))))
    assert torch.all(s > 0)


def test_nvfp4_data_derived_global_scale():
    rng = np.random.default_rng(4)
    x = t32(rng.standard_normal((32, 128)) * 5)
    _, scales, g = formats.quantize(x, "nvfp4")
    assert float(g) == np.float32(np.float32(x.abs().max().item()) / np.float32(2688.0))
    # the group holding the tensor's amax gets the largest scale, 448 (0x7E)
    row, col = divmod(int(x.abs().argmax()), 128)
    assert scales[row, col // 16].item() == 0x7E
    assert int(scales.max()) == 0x7E
    check_against_oracle(x, "nvfp4")
    # all-zero tensor: global scale 1, all zero codes and scales
    codes, scales, g = formats.quantize(torch.zeros(2, 32), "nvfp4")
    assert float(g) == 1.0 and torch.all(codes == 0) and torch.all(scales == 0)


def test_nvfp4_scale_underflow_group_decodes_to_zero():
    g = torch.tensor(0.1)
    x = torch.zeros(1, 48)
    x[0, :16] = torch.linspace(-1, 1, 16) * 1e-5  # amax / 0.6 ~ 1.7e-5, below half the smallest e4m3 (2**-10)
    x[0, 16:32] = torch.linspace(-1, 1, 16)
    x[0, 32:] = torch.linspace(-1, 1, 16) * 1e-3 * 0.6  # e4m3 subnormal scale range
    codes, scales, _ = formats.quantize(x, "nvfp4", g)
    assert scales[0, 0].item() == 0
    out = formats.dequantize(codes, scales, g, "nvfp4")
    assert torch.all(out[0, :16] == 0)
    assert torch.isfinite(out).all()
    # signs are kept: negative inputs give code 8
    c = formats.unpack_fp4(codes)[0, :16]
    assert torch.equal(c, torch.where(x[0, :16] < 0, 8, 0).to(torch.uint8))
    check_against_oracle(x, "nvfp4", float(np.float32(0.1)))


def test_nvfp4_saturates_codes_under_too_small_global_scale():
    """A fixed global scale too small for the data: scale saturates at 448, codes saturate at 6, finite."""
    g = torch.tensor(1e-4)
    x = torch.linspace(-10, 10, 16).reshape(1, 16)
    codes, scales, _ = formats.quantize(x, "nvfp4", g)
    assert scales.item() == 0x7E
    c = formats.unpack_fp4(codes)[0]
    assert c[0].item() == 15 and c[-1].item() == 7
    out = formats.fake_quantize(x, "nvfp4", g)
    assert torch.isfinite(out).all()
    assert out[0, -1].item() == pytest.approx(6 * 448 * 1e-4, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Non-finite inputs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_group_gets_nan_scale_and_only_it_decodes_nan(fmt, bad):
    gs = GROUP[fmt]
    rng = np.random.default_rng(5)
    clean = t32(rng.standard_normal((3, 4 * gs)))
    x = clean.clone()
    x[1, gs + 3] = bad  # row 1, group 1
    codes, scales, g = formats.quantize(x, fmt)
    nan_byte = 0xFF if fmt == "mxfp4" else 0x7F
    assert scales[1, 1].item() == nan_byte
    mask = torch.ones_like(scales, dtype=torch.bool)
    mask[1, 1] = False
    assert torch.all(scales[mask] != nan_byte)
    out = formats.dequantize(codes, scales, g, fmt)
    grp = out.reshape(3, 4, gs)
    assert torch.isnan(grp[1, 1]).all()
    assert torch.isfinite(grp.reshape(12, gs)[mask.reshape(-1)]).all()
    # the other groups are exactly what the finite tensor gives (the global scale ignores non-finite values)
    ref = formats.fake_quantize(clean, fmt).reshape(3, 4, gs)
    assert torch.equal(grp.reshape(12, gs)[mask.reshape(-1)], ref.reshape(12, gs)[mask.reshape(-1)])
    fq = formats.fake_quantize(x, fmt).reshape(3, 4, gs)
    assert torch.isnan(fq[1, 1]).all() and int(torch.isnan(fq).sum()) == gs


def test_nvfp4_nan_group_with_fixed_global_scale():
    x = torch.ones(1, 32)
    x[0, 20] = float("nan")
    _, scales, _ = formats.quantize(x, "nvfp4", torch.tensor(0.1))
    g = float(np.float32(0.1))
    want = int(oracle_float_to_e4m3(f32(1.0 / f32(6 * g))))
    assert scales.tolist() == [[want, 0x7F]]


# --------------------------------------------------------------------------------------------------------------
# API: shapes, dtypes, errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quantize_equals_dequantize_quantize(fmt, dtype):
    gs = GROUP[fmt]
    x = (torch.randn(5, 4 * gs, generator=torch.Generator().manual_seed(6)) * 3).to(dtype)
    fq = formats.fake_quantize(x, fmt)
    assert fq.shape == x.shape and fq.dtype == dtype
    codes, scales, g = formats.quantize(x, fmt)
    assert torch.equal(fq, formats.dequantize(codes, scales, g, fmt, dtype=dtype))
    # low-precision inputs are quantized from their exact fp32 values
    check_against_oracle(x.float(), fmt)
    codes32, scales32, _ = formats.quantize(x.float(), fmt)
    assert torch.equal(codes, codes32) and torch.equal(scales, scales32)


@pytest.mark.parametrize("fmt", FMTS)
def test_three_dimensional_inputs(fmt):
    gs = GROUP[fmt]
    x = torch.randn(2, 3, 4 * gs, generator=torch.Generator().manual_seed(7))
    codes, scales, g = formats.quantize(x, fmt)
    assert codes.shape == (2, 3, 2 * gs) and scales.shape == (2, 3, 4)
    assert formats.dequantize(codes, scales, g, fmt).shape == x.shape
    flat_codes, flat_scales, flat_g = formats.quantize(x.reshape(6, 4 * gs), fmt)
    assert torch.equal(codes.reshape(6, -1), flat_codes) and torch.equal(scales.reshape(6, -1), flat_scales)
    assert torch.equal(g, flat_g)
    check_against_oracle(x, fmt)
    # 1-D works too
    check_against_oracle(x[0, 0], fmt)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("k", [8, 24, 33, 48 + 8])
def test_k_not_divisible_by_group_size(fmt, k):
    gs = GROUP[fmt]
    if k % gs == 0:
        pytest.skip("divisible")
    for fn in (formats.quantize, formats.fake_quantize, formats.compute_scales):
        with pytest.raises(ValueError) as err:
            fn(torch.randn(2, k), fmt)
        msg = str(err.value)
        assert f"K={k}" in msg and f"G={gs}" in msg and fmt in msg, msg


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_wrong_dtype_rejected(dtype):
    x = torch.zeros(2, 32, dtype=dtype)
    for fmt in FMTS:
        with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
            formats.quantize(x, fmt)
        with pytest.raises(TypeError):
            formats.fake_quantize(x, fmt)


def test_bad_format_and_global_scale():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="fp8"):
        formats.quantize(x, "fp8")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="global_scale"):
            formats.quantize(x, "nvfp4", torch.tensor(bad))
    with pytest.raises(ValueError, match="scalar"):
        formats.quantize(x, "nvfp4", torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="1/3"):
        formats.quantize(x, "mxfp4", torch.tensor(0.5))
    # MXFP4 accepts its own constant
    formats.quantize(x, "mxfp4", torch.tensor(formats.MXFP4_GLOBAL_SCALE))
    with pytest.raises(ValueError, match="dimension"):
        formats.quantize(torch.tensor(1.0), "mxfp4")


def test_dequantize_shape_and_dtype_errors():
    codes, scales, g = formats.quantize(torch.randn(2, 64), "nvfp4")
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        formats.dequantize(codes, scales[:, :2], g, "nvfp4")
    with pytest.raises(ValueError, match="scales"):
        formats.dequantize(codes, scales, g, "mxfp4")  # NVFP4 scales (G=16) read as MXFP4 (G=32)
    with pytest.raises(TypeError, match="uint8"):
        formats.dequantize(codes.to(torch.int32), scales, g, "nvfp4")


def test_format_enum_accepted():
    x = torch.randn(1, 32)
    a = formats.quantize(x, Format.NVFP4)
    b = formats.quantize(x, "NVFP4")
    assert all(torch.equal(p, q) for p, q in zip(a, b))
