"""SPEC section 3 in code: the e2m1 code, MXFP4 and NVFP4 quantize / dequantize, nibble packing.

This is the torch reference every kernel is checked against bit for bit. All arithmetic is fp32 and
spelled out so that a kernel can repeat it exactly:

MXFP4 (G = 32), per group:
    E      = floor(log2(amax))            exactly, via frexp; amax == 0 -> E = -127; E clamped to [-127, 127]
    v      = (x * 2**-E) * 3              two fp32 multiplies (the first is exact)
    code   = rne_e2m1(v)                  see :func:`round_to_e2m1`
    scale  = E + 127                      e8m0 byte, value 2**(byte - 127)
    global = 1/3 (fp32)                   the constant factor, so decoded = e2m1(code) * 2**E * global

NVFP4 (G = 16), per group, with the fp32 per-tensor global scale g:
    s      = e4m3_rne(min(amax / (6 * g), 448))     fp32 ops: t = 6 * g; amax / t
    v      = x / (s * g)                            fp32 ops: d = s * g; x / d (IEEE division)
    code   = rne_e2m1(v)                            a group whose scale underflows to 0 keeps only signs
    decoded = e2m1(code) * s * g

A group holding NaN or +-Inf gets the NaN scale byte (0xFF e8m0, 0x7F e4m3) and zero codes; it
decodes to NaN.
"""

from __future__ import annotations

import torch

from .config import Format

__all__ = [
    "E2M1_VALUES",
    "E2M1_SIGNED_VALUES",
    "MXFP4_GLOBAL_SCALE",
    "E8M0_BIAS",
    "E8M0_NAN",
    "E4M3_NAN",
    "E4M3_MAX",
    "E2M1_MAX",
    "round_to_e2m1",
    "pack_fp4",
    "unpack_fp4",
    "e8m0_to_float",
    "mx_row_reference_exponent",
    "e4m3_to_float",
    "float_to_e4m3",
    "nvfp4_global_scale",
    "compute_scales",
    "quantize_with_scales",
    "quantize",
    "dequantize",
    "fake_quantize",
    "check_group_divisible",
]

#: Magnitudes of the e2m1 code's index (bits 0-2).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Value of each of the 16 codes (bit 3 = sign; code 8 is -0.0).
E2M1_SIGNED_VALUES = E2M1_VALUES + tuple(-v for v in E2M1_VALUES)
E2M1_MAX = 6.0
#: MXFP4's per-operand global scale: the paper's rule maps the group max into [3, 6), i.e. a factor 1/3
#: relative to the OCP e8m0 convention.
MXFP4_GLOBAL_SCALE = 1.0 / 3.0
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E4M3_NAN = 0x7F
E4M3_MAX = 448.0
_E_MIN, _E_MAX = -127, 127

# Rounding thresholds of |v| between neighbouring indices. Ties go to the even index, so a tie at a
# threshold whose lower neighbour is even stays down (strict >), otherwise it goes up (>=).
_E2M1_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def _fmt(fmt: Format | str) -> Format:
    return Format.parse(fmt)


def check_group_divisible(k: int, fmt: Format | str, what: str = "input") -> None:
    """Raise a ValueError naming K, G and the format when K is not a multiple of the group size."""
    fmt = _fmt(fmt)
    g = fmt.group_size
    if k % g != 0:
        raise ValueError(
            f"{what}: the last dimension K={k} is not a multiple of the {fmt.value} group size G={g}; "
            f"pad K to a multiple of {g} or leave this tensor in high precision"
        )


def _lut(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round already-scaled fp32 values to e2m1 codes (uint8, one code per element, not packed).

    Nearest value, ties to the even index, saturating at 6; the sign bit is copied from ``v`` (so -0.0 and
    small negatives give code 8). NaN gives code 0 (callers mark NaN groups through the scale).
    """
    mag = v.abs()
    idx = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for threshold, tie_up in _E2M1_THRESHOLDS:
        idx += (mag >= threshold) if tie_up else (mag > threshold)
    sign = torch.signbit(v) & ~torch.isnan(v)
    return idx | (sign.to(torch.uint8) << 3)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) uint8 codes -> (..., K/2) bytes; element 2i in the low nibble, 2i+1 in the high nibble."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_fp4 expects uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: the last dimension ({codes.shape[-1]}) must be even")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)  # (..., K/2, 2)
    return (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) bytes -> (..., K) uint8 codes (inverse of :func:`pack_fp4`)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_fp4 expects uint8, got {packed.dtype}")
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes -> fp32 2**(byte - 127); byte 0xFF -> NaN."""
    e = scales.to(torch.int32) - E8M0_BIAS
    out = torch.ldexp(torch.ones(scales.shape, dtype=torch.float32, device=scales.device), e)
    return torch.where(scales == E8M0_NAN, torch.full_like(out, float("nan")), out)


def mx_row_reference_exponent(scales: torch.Tensor) -> torch.Tensor:
    """Per-row reference exponent of MXFP4 block scales: the largest e8m0 byte of each row, NaN bytes (0xFF)
    excluded; -1 for a row with no finite scale (or no groups). ``scales`` (N, K/32) uint8 -> (N,) int16."""
    if scales.dtype != torch.uint8 or scales.dim() != 2:
        raise ValueError(
            f"mx_row_reference_exponent: expected (N, K/32) uint8 e8m0 scales, got {scales.dtype} {tuple(scales.shape)}"
        )
    s = scales.to(torch.int16)
    s = torch.where(scales == E8M0_NAN, torch.full_like(s, -1), s)
    if s.shape[1] == 0:
        return torch.full((s.shape[0],), -1, dtype=torch.int16, device=s.device)
    return s.amax(dim=1)


def e4m3_to_float(scales: torch.Tensor) -> torch.Tensor:
    """e4m3 (fn) bytes -> fp32; 0x7F and 0xFF are NaN."""
    return scales.contiguous().view(torch.float8_e4m3fn).to(torch.float32)


def float_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 -> e4m3 bytes, round to nearest even, saturating at 448; NaN -> 0x7F."""
    clamped = torch.clamp(x, max=E4M3_MAX)  # NaN propagates through clamp
    out = clamped.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(x), torch.full_like(out, E4M3_NAN), out)


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """Data-derived NVFP4 global scale amax(x) / (448 * 6) over the finite values (1.0 if all are 0)."""
    xf = x.detach().to(torch.float32)
    finite = torch.isfinite(xf)
    amax = torch.where(finite, xf.abs(), torch.zeros_like(xf)).amax() if xf.numel() else xf.new_zeros(())
    g = amax / (E4M3_MAX * E2M1_MAX)
    return torch.where(g > 0, g, torch.ones_like(g)).to(torch.float32)


def _as_global_scale(global_scale, fmt: Format, x: torch.Tensor) -> torch.Tensor:
    if fmt is Format.MXFP4:
        g = torch.tensor(MXFP4_GLOBAL_SCALE, dtype=torch.float32, device=x.device)
        if global_scale is not None:
            given = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
            if given.numel() != 1 or not torch.equal(given.reshape(()), g):
                raise ValueError(
                    f"mxfp4: the global scale is fixed at 1/3 by the format's rule; got {given.tolist()}. "
                    "Pass global_scale=None for MXFP4"
                )
        return g
    if global_scale is None:
        return nvfp4_global_scale(x)
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    if g.numel() != 1:
        raise ValueError(f"nvfp4: global_scale must be a scalar, got shape {tuple(g.shape)}")
    g = g.reshape(())
    if not bool(torch.isfinite(g)) or float(g) <= 0:
        raise ValueError(f"nvfp4: global_scale must be finite and > 0, got {float(g)}")
    return g


def _groups(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantize expects at least one dimension (..., K)")
    check_group_divisible(x.shape[-1], fmt)
    g = fmt.group_size
    return x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // g, g)  # (..., K/G, G)


def _mx_exponent(amax: torch.Tensor) -> torch.Tensor:
    """floor(log2(amax)) for fp32 amax >= 0, exactly; amax == 0 -> -127; clamped to [-127, 127]."""
    _, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1)
    e = e.to(torch.int32) - 1
    e = torch.where(amax > 0, e, torch.full_like(e, _E_MIN))
    return e.clamp(_E_MIN, _E_MAX)


def compute_scales(x: torch.Tensor, fmt: Format | str, global_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale bytes (..., K/G) uint8 and the fp32 global scale for ``x`` (..., K), per SPEC section 3."""
    fmt = _fmt(fmt)
    xg = _groups(x, fmt)  # (..., K/G, G)
    g = _as_global_scale(global_scale, fmt, x)
    bad = ~torch.isfinite(xg).all(dim=-1)  # (..., K/G)
    amax = torch.where(torch.isfinite(xg), xg.abs(), torch.zeros_like(xg)).amax(dim=-1)  # (..., K/G)
    if fmt is Format.MXFP4:
        scales = (_mx_exponent(amax) + E8M0_BIAS).to(torch.uint8)
        scales = torch.where(bad, torch.full_like(scales, E8M0_NAN), scales)
    else:
        scales = float_to_e4m3(amax / (E2M1_MAX * g))
        scales = torch.where(bad, torch.full_like(scales, E4M3_NAN), scales)
    return scales, g


def quantize_with_scales(
    x: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, fmt: Format | str
) -> torch.Tensor:
    """Codes (..., K) uint8 (NOT packed) for ``x`` under given scale bytes; values saturate at +-6.

    This is the quantizer with frozen scales (GPTQ keeps per-row scales fixed while it updates a block).
    """
    fmt = _fmt(fmt)
    xg = _groups(x, fmt)  # (..., K/G, G)
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device).reshape(())
    if fmt is Format.MXFP4:
        e = scales.to(torch.int32) - E8M0_BIAS  # (..., K/G)
        v = torch.ldexp(xg, (-e).unsqueeze(-1)) * 3.0  # (..., K/G, G)
        nan_group = scales == E8M0_NAN
    else:
        denom = (e4m3_to_float(scales) * g).unsqueeze(-1)  # (..., K/G, 1)
        v = xg / denom
        # A scale that underflowed to zero: the group decodes to (signed) zero.
        v = torch.where(denom == 0, torch.where(torch.signbit(xg), -0.0, 0.0), v)
        nan_group = (scales & 0x7F) == E4M3_NAN
    codes = round_to_e2m1(v)  # (..., K/G, G)
    codes = torch.where(nan_group.unsqueeze(-1), torch.zeros_like(codes), codes)
    return codes.reshape(x.shape)


def quantize(
    x: torch.Tensor, fmt: Format | str, global_scale=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (..., K) -> (codes (..., K/2) uint8 packed, scales (..., K/G) uint8, global scale).

    ``global_scale``: MXFP4 takes None (the fixed 1/3); NVFP4 takes None (amax(x) / 2688) or a positive
    fp32 scalar (e.g. a static activation scale from calibration).
    """
    fmt = _fmt(fmt)
    scales, g = compute_scales(x, fmt, global_scale)
    codes = quantize_with_scales(x, scales, g, fmt)
    return pack_fp4(codes), scales, g


def _scale_values(scales: torch.Tensor, fmt: Format) -> torch.Tensor:
    return e8m0_to_float(scales) if fmt is Format.MXFP4 else e4m3_to_float(scales)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale,
    fmt: Format | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed codes (..., K/2) + scales (..., K/G) + global scale -> values (..., K) in ``dtype``.

    decoded = e2m1(code) * scale * global_scale rounded once to fp32, then cast.
    """
    fmt = _fmt(fmt)
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"dequantize expects uint8 codes and scales, got {codes.dtype} and {scales.dtype}")
    k = codes.shape[-1] * 2
    gsz = fmt.group_size
    if scales.shape[:-1] != codes.shape[:-1] or scales.shape[-1] * gsz != k:
        raise ValueError(
            f"dequantize({fmt.value}): codes {tuple(codes.shape)} hold K={k} values per row, which needs scales "
            f"of shape {(*codes.shape[:-1], k // gsz)}, got {tuple(scales.shape)}"
        )
    vals = _lut(E2M1_SIGNED_VALUES, codes.device)[unpack_fp4(codes).long()]  # (..., K)
    vals = vals.reshape(*codes.shape[:-1], k // gsz, gsz)  # (..., K/G, G)
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=codes.device).reshape(())
    sv = _scale_values(scales, fmt).unsqueeze(-1)  # (..., K/G, 1)
    if fmt is Format.MXFP4 and bool(((scales >= E8M0_BIAS + _E_MAX - 1) & (scales != E8M0_NAN)).any()):
        # code * 2**E overflows fp32 for E >= 126 before the 1/3 is applied; the float64 product is exact and
        # rounded once, the same value the fp32 products give wherever they stay finite.
        out = ((vals.double() * sv.double()) * g.double()).to(torch.float32)
    else:
        out = (vals * sv) * g  # vals * scale is exact; one rounding
    return out.reshape(*codes.shape[:-1], k).to(dtype)


def fake_quantize(x: torch.Tensor, fmt: Format | str, global_scale=None) -> torch.Tensor:
    """dequantize(quantize(x)) in x's shape and dtype."""
    codes, scales, g = quantize(x, fmt, global_scale)
    return dequantize(codes, scales, g, fmt, dtype=x.dtype)
