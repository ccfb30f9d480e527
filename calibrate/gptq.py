"""GPTQ with per-block transforms (SPEC section 4), left to right over the K/G blocks of a layer.

For block b (columns ``b*G:(b+1)*G``):

1. take the current, error-updated ``W_b`` and compute ``T_b`` from it and the UNDAMPED ``H_b``; round it
   to the model dtype (data-free kinds use their fixed per-block matrices);
2. ``V = W_b @ inv(T_b)``; freeze the per-row scales of V;
3. quantize V column by column with GPTQ updates inside the block, using the block's effective Hessian in
   transformed space ``T Heff T^T`` with ``Heff = inv(L_bb L_bb^T)``, ``L = cholesky_lower(inv(H_damped))``;
4. map back ``Q_b = dequant(V_q) @ T_b`` and propagate the block error ``delta = W_b - Q_b`` to the later
   columns: ``W[:, later] -= delta @ inv(L_bb^T) @ L[later, b]^T`` (the OBS update for a fixed block).

The (G, G) algebra is float64; the weight and the column updates are float32.
"""

from __future__ import annotations

import logging

import torch

from wush_compile import formats, transforms
from wush_compile.config import Format, TransformKind, WushConfig

from .rtn import DATA_AWARE_KINDS, QuantizedWeight, layer_transforms, weight_global_scale

logger = logging.getLogger(__name__)

__all__ = ["gptq_quantize", "inverse_hessian_cholesky", "FrozenScaleQuantizer"]

_MAX_DAMP_RETRIES = 6


def inverse_hessian_cholesky(hessian: torch.Tensor, rel_damp: float, what: str = "hessian") -> torch.Tensor:
    """``L = cholesky_lower(inv(H + rel_damp * mean(diag(H)) * I))`` in float64, raising the damping (x10 per
    try, logged) if a factorization fails: (K, K)."""
    h = hessian.to(torch.float64)
    h = (h + h.T) / 2
    cur = rel_damp
    for attempt in range(_MAX_DAMP_RETRIES):
        hd = transforms.damp(h, cur)  # (K, K)
        c, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            h_inv = torch.cholesky_inverse(c)  # (K, K)
            h_inv = (h_inv + h_inv.T) / 2
            low, info = torch.linalg.cholesky_ex(h_inv)
            if int(info) == 0 and bool(torch.isfinite(low).all()):
                if attempt:
                    logger.warning("%s: GPTQ needed damping %.3g (raised from %.3g)", what, cur, rel_damp)
                return low
        cur *= 10.0
    raise RuntimeError(f"{what}: GPTQ Cholesky failed even with damping {cur / 10:.3g}; the Hessian is unusable")


def _cholesky_upper_spd(m: torch.Tensor, what: str) -> torch.Tensor:
    """Upper Cholesky factor of a small SPD matrix, adding a growing ridge if rounding broke definiteness."""
    m = (m + m.T) / 2
    ridge = 0.0
    mean_diag = float(torch.diagonal(m).mean())
    for attempt in range(_MAX_DAMP_RETRIES):
        c, info = torch.linalg.cholesky_ex(m + ridge * mean_diag * torch.eye(m.shape[0], dtype=m.dtype))
        if int(info) == 0:
            if attempt:
                logger.warning("%s: in-block Cholesky needed a ridge of %.3g", what, ridge)
            return c.T
        ridge = 1e-8 if ridge == 0.0 else ridge * 100.0
    raise RuntimeError(f"{what}: in-block inverse Hessian is not positive definite")


class FrozenScaleQuantizer:
    """Quantize one column at a time with fixed per-row scale bytes, exactly as
    :func:`wush_compile.formats.quantize_with_scales` does for the whole group.

    Args:
        scales: (N,) uint8 scale bytes of the block (one group per row).
        global_scale: () fp32.
        fmt: the format.
    """

    def __init__(self, scales: torch.Tensor, global_scale: torch.Tensor, fmt: Format | str) -> None:
        fmt = Format.parse(fmt)
        self.fmt = fmt
        g = global_scale.to(torch.float32).reshape(())
        if fmt is Format.MXFP4:
            e = scales.to(torch.int32) - formats.E8M0_BIAS  # (N,)
            self._mul = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), -e)  # (N,) 2^-E
            self._denom = None
            scale_val = formats.e8m0_to_float(scales)  # (N,)
        else:
            scale_val = formats.e4m3_to_float(scales)  # (N,)
            self._denom = scale_val * g  # (N,)
            self._mul = None
        self._step = scale_val  # decoded = (e2m1 * step) * g
        self._g = g
        self._lut = torch.tensor(formats.E2M1_SIGNED_VALUES, dtype=torch.float32, device=scales.device)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) fp32 -> (N,) uint8 unpacked codes."""
        if self._mul is not None:
            v = (x * self._mul) * 3.0  # == ldexp(x, -E) * 3, as formats does
        else:
            v = x / self._denom
            v = torch.where(self._denom == 0, torch.where(torch.signbit(x), -0.0, 0.0), v)
        return formats.round_to_e2m1(v)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N,) codes -> (N,) fp32 values, as formats.dequantize computes them."""
        return (self._lut[codes.long()] * self._step) * self._g


def _block_quantize(
    v: torch.Tensor, u: torch.Tensor, quantizer: FrozenScaleQuantizer
) -> torch.Tensor:
    """GPTQ inside one block: v (N, G) fp32 (modified in place), u (G, G) upper Cholesky factor of the
    block's inverse Hessian in transformed space. Returns (N, G) uint8 codes."""
    n, g = v.shape
    codes = torch.empty(n, g, dtype=torch.uint8, device=v.device)  # (N, G)
    for j in range(g):
        col = v[:, j]  # (N,)
        c = quantizer.codes(col)
        codes[:, j] = c
        if j + 1 < g:
            err = (col - quantizer.decode(c)) / u[j, j]  # (N,)
            v[:, j + 1 :].sub_(err.unsqueeze(1) * u[j, j + 1 :].unsqueeze(0))  # (N, G-j-1)
    return codes


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: WushConfig,
    *,
    dtype: torch.dtype,
    seed: int = 0,
    name: str | None = None,
) -> QuantizedWeight:
    """GPTQ with per-block transforms recomputed inside the loop (SPEC section 4).

    Args:
        weight: (N, K) full-precision weight.
        hessian: (K, K) ``mean x x^T`` (None: identity).
        config: format, transform kind and damping.
        dtype: the model dtype the transforms are rounded to.
        seed: seeds the ``random`` transform.
        name: the layer's name, for messages.
    """
    fmt = config.format
    gsz = config.group_size
    what = name or "layer"
    w = weight.detach().to(torch.float32).clone()  # (N, K)
    n, k = w.shape
    formats.check_group_divisible(k, fmt, what=f"GPTQ weight of {what}")
    nb = k // gsz
    dev = w.device
    h = torch.eye(k, dtype=torch.float64, device=dev) if hessian is None else hessian.to(torch.float64)  # (K, K)
    h = (h + h.T) / 2
    low = inverse_hessian_cholesky(h, config.damp, what)  # (K, K) lower
    h_blocks = h.reshape(nb, gsz, nb, gsz)[torch.arange(nb), :, torch.arange(nb), :]  # (K/G, G, G)

    data_aware = config.transform in DATA_AWARE_KINDS
    fixed_t = None if data_aware else layer_transforms(w, None, config, dtype, seed)  # (K/G, G, G)
    # Per-tensor weight scale (NVFP4) from the layer's RTN-style transforms of the initial weight.
    t0 = fixed_t if fixed_t is not None else layer_transforms(w, h, config, dtype, seed)
    g_w = weight_global_scale(transforms.transform_weight(w, t0), fmt)
    if g_w is None:
        g = torch.tensor(formats.MXFP4_GLOBAL_SCALE, dtype=torch.float32, device=dev)  # () the format constant
    else:
        g = g_w  # () fp32

    codes = torch.empty(n, k, dtype=torch.uint8, device=dev)  # (N, K)
    scales = torch.empty(n, nb, dtype=torch.uint8, device=dev)  # (N, K/G)
    t_out = torch.empty(nb, gsz, gsz, dtype=dtype, device=dev)  # (K/G, G, G)
    for b in range(nb):
        sl = slice(b * gsz, (b + 1) * gsz)
        w_b = w[:, sl].to(torch.float64)  # (N, G)
        if data_aware:
            t64 = transforms.wush_block_transforms(
                w_b.unsqueeze(0),
                h_blocks[b : b + 1],
                rel_damp=config.damp,
                hadamard_rotation=config.transform is TransformKind.WUSH,
            )  # (1, G, G)
            t = transforms.round_transform(t64, dtype)[0]  # (G, G)
        else:
            t = fixed_t[b]  # (G, G)
        t_out[b] = t
        t64 = t.to(torch.float64)
        t_inv = torch.linalg.inv(t64)  # (G, G)
        v = (w_b @ t_inv).to(torch.float32)  # (N, G)
        sc = formats.compute_scales(v, fmt, g_w)[0]  # (N, 1) frozen per-row scales
        l_bb = low[sl, sl]  # (G, G)
        hinv_t = t_inv.T @ (l_bb @ l_bb.T) @ t_inv  # (G, G) = inv(T Heff T^T)
        u = _cholesky_upper_spd(hinv_t, f"{what} block {b}").to(torch.float32)  # (G, G)
        c = _block_quantize(v, u, FrozenScaleQuantizer(sc[:, 0], g, fmt))  # (N, G)
        codes[:, sl] = c
        scales[:, sl.start // gsz] = sc[:, 0]
        if b + 1 < nb:
            vq = formats.dequantize(formats.pack_fp4(c), sc, g, fmt).to(torch.float64)  # (N, G)
            delta = w_b - vq @ t64  # (N, G) original-space block error
            err = torch.linalg.solve_triangular(l_bb.T, delta, upper=True, left=False)  # (N, G) delta @ inv(L_bb^T)
            w[:, sl.stop :] -= err.to(torch.float32) @ low[sl.stop :, sl].T.to(torch.float32)  # (N, K_later)
    return QuantizedWeight(codes=formats.pack_fp4(codes), scales=scales, transform=t_out, global_scale=g)
