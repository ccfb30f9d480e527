"""SPEC section 2 in code: per-block (G, G) transforms, computed in float64.

A layer ``y = x @ W.T`` with K inputs is cut into K/G blocks. Block b gets an invertible T_b:
activations go ``x_b -> x_b @ T_b.T`` and weights ``W_b -> W_b @ inv(T_b)``, so the product is unchanged
before quantization. :func:`block_transforms` returns all K/G matrices stacked as (K/G, G, G).
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from .config import TransformKind

logger = logging.getLogger(__name__)

__all__ = [
    "hadamard",
    "damp",
    "wush_block_transforms",
    "block_transforms",
    "transform_activations",
    "transform_weight",
    "round_transform",
    "proxy_loss",
    "wush_lower_bound",
]

_MAX_DAMP_RETRIES = 6


@functools.lru_cache(maxsize=None)
def _hadamard_cpu(g: int) -> torch.Tensor:
    if g < 1 or g & (g - 1):
        raise ValueError(f"hadamard: size {g} is not a power of two; group sizes are 16 or 32")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < g:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)  # Sylvester doubling
    return h / math.sqrt(g)


def hadamard(g: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The (g, g) Sylvester Hadamard matrix divided by sqrt(g) (orthogonal, symmetric)."""
    return _hadamard_cpu(g).to(dtype=dtype, device=device)


def damp(m: torch.Tensor, rel: float) -> torch.Tensor:
    """``M + rel * mean(diag(M)) * I`` per matrix of a (..., G, G) stack (each its own mean)."""
    g = m.shape[-1]
    mean_diag = torch.diagonal(m, dim1=-2, dim2=-1).mean(-1)  # (...,)
    scale = torch.where(mean_diag > 0, mean_diag, torch.ones_like(mean_diag))
    eye = torch.eye(g, dtype=m.dtype, device=m.device)
    return m + (rel * scale)[..., None, None] * eye


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor | None, group_size: int) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % group_size:
        raise ValueError(
            f"weight has K={k} input features, not a multiple of the group size G={group_size}; "
            "leave this layer in high precision or pad K"
        )
    if hessian is not None and tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be (K, K) = ({k}, {k}) for this weight, got {tuple(hessian.shape)}")
    for name, t in (("weight", weight), ("hessian", hessian)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf; calibrate from finite weights and activations")
    return n, k


def _diag_blocks(h: torch.Tensor, group_size: int) -> torch.Tensor:
    k = h.shape[0]
    nb = k // group_size
    blocks = h.reshape(nb, group_size, nb, group_size)  # (K/G, G, K/G, G)
    idx = torch.arange(nb, device=h.device)
    return blocks[idx, :, idx, :]  # (K/G, G, G)


def _cholesky_damped(m: torch.Tensor, rel: float, what: str) -> torch.Tensor:
    """Cholesky of ``damp(m, rel)``, raising the damping (x10 per try) for matrices where it fails."""
    cur = rel
    for attempt in range(_MAX_DAMP_RETRIES):
        l, info = torch.linalg.cholesky_ex(damp(m, cur))  # (B, G, G)
        if not bool((info != 0).any()) and bool(torch.isfinite(l).all()):
            if attempt:
                logger.warning("%s: Cholesky needed damping %.3g (raised from %.3g)", what, cur, rel)
            return l
        cur *= 10.0
    raise RuntimeError(f"{what}: Cholesky failed even with damping {cur / 10:.3g}; the input is not usable")


def wush_block_transforms(
    w_blocks: torch.Tensor, h_blocks: torch.Tensor, *, rel_damp: float = 0.01, hadamard_rotation: bool = True
) -> torch.Tensor:
    """WUSH transforms for a stack of blocks.

    Args:
        w_blocks: (B, N, G) weight columns of each block.
        h_blocks: (B, G, G) diagonal Hessian blocks (M_X).
    Returns:
        (B, G, G) float64 ``T = Had @ diag(lam**-1/4) @ U.T @ Wp.T`` (``wus``: without ``Had``).
    """
    w = w_blocks.to(torch.float64)  # (B, N, G)
    n = w.shape[1]
    g = w.shape[2]
    m_w = w.transpose(1, 2) @ w / n  # (B, G, G)
    m_x = h_blocks.to(torch.float64)  # (B, G, G)
    m_x = (m_x + m_x.transpose(1, 2)) / 2
    wp = _cholesky_damped(m_w, rel_damp, "wush: weight second moment")  # (B, G, G) lower, Wp Wp^T = M_W
    m_x_d = damp(m_x, rel_damp)
    p = wp.transpose(1, 2) @ m_x_d @ wp  # (B, G, G)
    p = (p + p.transpose(1, 2)) / 2
    lam, u = torch.linalg.eigh(p)  # (B, G), (B, G, G)
    floor = lam.amax(-1, keepdim=True).clamp_min(1e-300) * 1e-12
    if bool((lam <= floor).any()):
        logger.warning("wush: %d eigenvalues at or below 1e-12 of the block maximum were floored", int((lam <= floor).sum()))
    lam = torch.maximum(lam, floor)
    t = torch.diag_embed(lam.pow(-0.25)) @ u.transpose(1, 2) @ wp.transpose(1, 2)  # (B, G, G)
    if hadamard_rotation:
        t = hadamard(g, device=t.device) @ t
    if not bool(torch.isfinite(t).all()):
        raise RuntimeError("wush: transform is not finite after damping; the calibration data is unusable")
    return t


def block_transforms(
    kind: TransformKind | str,
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    group_size: int,
    *,
    seed: int = 0,
    rel_damp: float = 0.01,
) -> torch.Tensor:
    """Per-block transforms of one layer: (K/G, G, G) float64.

    Args:
        kind: identity | hadamard | random | wus | wush.
        weight: (N, K) weight (any float dtype; used in float64).
        hessian: (K, K) ``mean_t x_t x_t^T``; None means the identity (only the data-free kinds and WUS/WUSH
            with an isotropic activation model).
        group_size: G (32 for MXFP4, 16 for NVFP4).
        seed: seeds ``random``.
        rel_damp: SPEC's relative damping (0.01).
    """
    kind = TransformKind.parse(kind)
    n, k = _check_inputs(weight, hessian, group_size)
    nb, g = k // group_size, group_size
    dev = weight.device
    if kind is TransformKind.IDENTITY:
        return torch.eye(g, dtype=torch.float64, device=dev).expand(nb, g, g).clone()
    if kind is TransformKind.HADAMARD:
        return hadamard(g, device=dev).expand(nb, g, g).clone()
    if kind is TransformKind.RANDOM:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        a = torch.randn(nb, g, g, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar: fix the signs
        return q.to(dev)
    w_blocks = weight.to(torch.float64).reshape(n, nb, g).transpose(0, 1)  # (K/G, N, G)
    if hessian is None:
        h_blocks = torch.eye(g, dtype=torch.float64, device=dev).expand(nb, g, g)
    else:
        h_blocks = _diag_blocks(hessian.to(torch.float64), g)  # (K/G, G, G)
    return wush_block_transforms(w_blocks, h_blocks, rel_damp=rel_damp, hadamard_rotation=kind is TransformKind.WUSH)


def round_transform(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float64 transform to the model dtype; refuse a result that is not invertible."""
    tr = t.to(dtype)
    t64 = tr.to(torch.float64)
    cond = torch.linalg.cond(t64)  # (B,)
    if not bool(torch.isfinite(cond).all()) or float(cond.max()) > 1e12:
        raise RuntimeError(f"transform is not invertible after rounding to {dtype} (condition {float(cond.max()):.3g})")
    return tr


def transform_activations(x: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """Row-form blockwise transform ``x_b @ T_b.T`` with fp32 accumulation: (..., K) -> (..., K) fp32."""
    nb, g, _ = transform.shape
    xb = x.to(torch.float32).reshape(*x.shape[:-1], nb, g)  # (..., K/G, G)
    out = torch.einsum("...bg,bhg->...bh", xb, transform.to(torch.float32))  # (..., K/G, G)
    return out.reshape(x.shape)


def transform_weight(weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """``W_b @ inv(T_b)`` for every block, in float64: (N, K) -> (N, K)."""
    nb, g, _ = transform.shape
    n = weight.shape[0]
    t_inv = torch.linalg.inv(transform.to(torch.float64))  # (K/G, G, G)
    wb = weight.to(torch.float64).reshape(n, nb, g)  # (N, K/G, G)
    return torch.einsum("nbg,bgh->nbh", wb, t_inv).reshape(n, nb * g)


def proxy_loss(transform: torch.Tensor, m_x: torch.Tensor, m_w: torch.Tensor) -> torch.Tensor:
    """``sum_i (T M_X T^T)_ii * (inv(T)^T M_W inv(T))_ii`` per block: (B,) float64."""
    t = transform.to(torch.float64)
    t_inv = torch.linalg.inv(t)
    ax = torch.diagonal(t @ m_x.to(torch.float64) @ t.transpose(-1, -2), dim1=-2, dim2=-1)
    aw = torch.diagonal(t_inv.transpose(-1, -2) @ m_w.to(torch.float64) @ t_inv, dim1=-2, dim2=-1)
    return (ax * aw).sum(-1)


def wush_lower_bound(m_x: torch.Tensor, m_w: torch.Tensor) -> torch.Tensor:
    """``(sum sqrt(lam))**2 / G`` with lam the eigenvalues of ``Wp^T M_X Wp`` (no damping): (B,)."""
    wp = torch.linalg.cholesky(m_w.to(torch.float64))
    p = wp.transpose(-1, -2) @ m_x.to(torch.float64) @ wp
    lam = torch.linalg.eigvalsh((p + p.transpose(-1, -2)) / 2).clamp_min(0)
    return lam.sqrt().sum(-1) ** 2 / m_x.shape[-1]
