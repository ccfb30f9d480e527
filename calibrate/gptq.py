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

Knobs (``WushConfig.gptq_*``; the defaults are the algorithm above): the block order (``gptq_order``:
forward, reverse, or act-order by the trace of each block's Hessian diagonal; the weight and H are permuted
by whole blocks, so every transform block stays contiguous, and the outputs are permuted back), the damping
scale (``gptq_damp_scope``: the mean diagonal of all of H or of each block's own diagonal) and the in-block
schedule (``gptq_inblock``: columns left to right, by descending diagonal of the transformed-space Hessian,
or no in-block updates at all).
"""

from __future__ import annotations

import logging

import torch

from wush_compile import formats, transforms
from wush_compile.config import Format, TransformKind, WushConfig

from ._threads import single_thread
from .rtn import DATA_AWARE_KINDS, QuantizedWeight, layer_transforms, weight_global_scale

logger = logging.getLogger(__name__)

__all__ = [
    "gptq_quantize",
    "gptq_quantize_group",
    "inverse_hessian_cholesky",
    "block_order",
    "FrozenScaleQuantizer",
    "round_e2m1_magnitude",
]

_MAX_DAMP_RETRIES = 6
#: GPTQ's lazy-batch width: updates inside a window of this many columns are applied at once per block;
#: the rest of the weight gets one GEMM per window.
_LAZY_COLUMNS = 128


def _damped(h: torch.Tensor, rel: float, block_size: int | None) -> torch.Tensor:
    """``H + rel * mean(diag H) * I`` (``block_size`` None), or with each block's own mean diagonal."""
    if block_size is None:
        return transforms.damp(h, rel)
    k = h.shape[0]
    d = torch.diagonal(h).reshape(k // block_size, block_size).mean(1)  # (K/G,)
    d = torch.where(d > 0, d, torch.ones_like(d))
    return h + torch.diag((rel * d).repeat_interleave(block_size))


def block_order(hessian: torch.Tensor | None, nblocks: int, order: str) -> torch.Tensor:
    """The order GPTQ visits the ``nblocks`` column blocks in: (K/G,) int64.

    "forward": 0, 1, ...; "reverse": last to first; "act": descending trace of each block's Hessian
    diagonal (ties by index; None hessian: forward).
    """
    if order == "forward" or (order == "act" and hessian is None):
        return torch.arange(nblocks)
    if order == "reverse":
        return torch.arange(nblocks - 1, -1, -1)
    if order == "act":
        tr = torch.diagonal(hessian).to(torch.float64).reshape(nblocks, -1).sum(1)  # (K/G,)
        return torch.argsort(-tr.cpu(), stable=True)
    raise ValueError(f"GPTQ block order {order!r} is unknown; choose 'forward', 'reverse' or 'act'")


def inverse_hessian_cholesky(
    hessian: torch.Tensor, rel_damp: float, what: str = "hessian", *, block_size: int | None = None
) -> torch.Tensor:
    """``L = cholesky_lower(inv(H + rel_damp * mean(diag(H)) * I))`` in float64: (K, K).

    With ``block_size`` the damping of each block of ``block_size`` columns is scaled by that block's own
    mean diagonal instead of the whole diagonal's.

    Computed without forming the inverse: with J the exchange matrix and ``M = cholesky_lower(J Hd J)``,
    ``Hd = R R^T`` for the upper-triangular ``R = J M J``, so ``inv(Hd) = R^-T R^-1`` and
    ``L = R^-T = J inv(M)^T J`` (one Cholesky and one triangular solve). If the factorization fails the
    damping is raised x10 per try (logged).
    """
    h = hessian.to(torch.float64)
    h = (h + h.T) / 2
    k = h.shape[0]
    eye = torch.eye(k, dtype=torch.float64, device=h.device)
    cur = rel_damp
    for attempt in range(_MAX_DAMP_RETRIES):
        hd = _damped(h, cur, block_size).flip(0, 1)  # (K, K) J Hd J
        m, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            m_inv = torch.linalg.solve_triangular(m, eye, upper=False)  # (K, K) lower
            low = m_inv.T.flip(0, 1)  # (K, K) lower: J inv(M)^T J
            if bool(torch.isfinite(low).all()):
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
        c, info = torch.linalg.cholesky_ex(m + ridge * mean_diag * torch.eye(m.shape[0], dtype=m.dtype, device=m.device))
        if int(info) == 0:
            if attempt:
                logger.warning("%s: in-block Cholesky needed a ridge of %.3g", what, ridge)
            return c.T
        ridge = 1e-8 if ridge == 0.0 else ridge * 100.0
    raise RuntimeError(f"{what}: in-block inverse Hessian is not positive definite")


def round_e2m1_magnitude(a: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 magnitude of ``a >= 0`` (fp32), ties to the even code index, saturating at 6.

    The same rule as :func:`wush_compile.formats.round_to_e2m1`, as arithmetic: the grid has spacing 1/2 below
    2, 1 in [2, 4) and 2 from 4 up, and ``torch.round`` ties to even, which is the even index in every range.
    """
    fine = torch.round(a * 2.0) * 0.5  # [0, 2): 0, 0.5, ..., 2
    mid = torch.round(a)  # [2, 4): 2, 3, 4
    coarse = torch.round(a * 0.5) * 2.0  # [4, inf): 4, 6, 8, ...
    return torch.where(a < 2.0, fine, torch.where(a < 4.0, mid, coarse)).clamp_max(formats.E2M1_MAX)


class FrozenScaleQuantizer:
    """Quantize one column at a time with fixed per-row scale bytes, as
    :func:`wush_compile.formats.quantize_with_scales` / :func:`~wush_compile.formats.dequantize` do.

    Args:
        scales: (N,) uint8 scale bytes of the block (one group per row).
        global_scale: () or (N,) fp32 (rows of several layers may have their own).
        fmt: the format.
    """

    def __init__(self, scales: torch.Tensor, global_scale: torch.Tensor, fmt: Format | str) -> None:
        fmt = Format.parse(fmt)
        self.fmt = fmt
        g = global_scale.to(torch.float32)
        if fmt is Format.MXFP4:
            e = scales.to(torch.int32) - formats.E8M0_BIAS  # (N,)
            self._mul = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), -e)  # (N,) 2^-E
            self._denom = None
            self._step = formats.e8m0_to_float(scales)  # (N,) 2^E
        else:
            self._step = formats.e4m3_to_float(scales)  # (N,)
            self._denom = self._step * g  # (N,)
            self._zero = self._denom == 0  # (N,) underflowed scales decode to (signed) zero
            self._mul = None
        self._g = g

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) fp32 -> the value the e2m1 rounding sees (``x * 3 / 2^E`` or ``x / (s * g)``)."""
        if self._mul is not None:
            return (x * self._mul) * 3.0  # == ldexp(x, -E) * 3, as formats does
        v = x / self._denom
        return torch.where(self._zero, torch.where(torch.signbit(x), -0.0, 0.0), v)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) fp32 -> (N,) uint8 unpacked codes."""
        return formats.round_to_e2m1(self.scaled(x))

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) fp32 -> the decoded quantized values, ``dequantize(codes(x))``."""
        v = self.scaled(x)
        return (torch.copysign(round_e2m1_magnitude(v.abs()), v) * self._step) * self._g


def _block_quantize(
    v: torch.Tensor, u_cols: torch.Tensor, quantizer: FrozenScaleQuantizer, updates: bool = True
) -> torch.Tensor:
    """GPTQ inside one block, in transformed space, for rows that may belong to several layers.

    Args:
        v: (G, N) fp32, the block's transformed weights TRANSPOSED (one contiguous row per column); updated
            in place.
        u_cols: (G, G, N) fp32: ``u_cols[j, l, r]`` is entry (j, l) of the upper Cholesky factor of the
            in-block inverse Hessian (transformed space) of the layer that row r belongs to.
    Returns:
        (G, N) fp32: each column's value right before it was quantized (its codes are those of these values
        under the frozen scales). ``updates=False``: no in-block updates (``v`` itself).
    """
    if not updates:
        return v.clone()
    g = v.shape[0]
    pre = torch.empty_like(v)  # (G, N)
    for j in range(g):
        col = v[j]  # (N,)
        pre[j] = col
        if j + 1 < g:
            err = (col - quantizer.values(col)) / u_cols[j, j]  # (N,)
            v[j + 1 :].addcmul_(u_cols[j, j + 1 :], err, value=-1.0)  # (G-j-1, N)
    return pre


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: WushConfig,
    *,
    dtype: torch.dtype,
    seed: int = 0,
    name: str | None = None,
    inverse_cholesky: torch.Tensor | None = None,
) -> QuantizedWeight:
    """GPTQ with per-block transforms recomputed inside the loop (SPEC section 4).

    Args:
        weight: (N, K) full-precision weight.
        hessian: (K, K) ``mean x x^T`` (None: identity).
        config: format, transform kind and damping.
        dtype: the model dtype the transforms are rounded to.
        seed: seeds the ``random`` transform.
        name: the layer's name, for messages.
        inverse_cholesky: ``inverse_hessian_cholesky(hessian, config.damp)`` if already computed.
    """
    return gptq_quantize_group(
        [weight], hessian, config, dtype=dtype, seeds=[seed], names=[name], inverse_cholesky=inverse_cholesky
    )[0]


def gptq_quantize_group(
    weights: list[torch.Tensor],
    hessian: torch.Tensor | None,
    config: WushConfig,
    *,
    dtype: torch.dtype,
    seeds: list[int] | None = None,
    names: list[str | None] | None = None,
    inverse_cholesky: torch.Tensor | None = None,
) -> list[QuantizedWeight]:
    """GPTQ of several layers that read the same input (one Hessian), each with its own transforms and
    scales, run as one set of rows: GPTQ treats rows independently, so this is the per-layer algorithm with
    the Python loop shared.

    Args:
        weights: (N_i, K) weights of the layers.
        hessian: (K, K) ``mean x x^T`` of their common input (None: identity).
        config: format, transform kind and damping.
        dtype: the model dtype the transforms are rounded to.
        seeds: per layer, seeds the ``random`` transform.
        names: per layer, for messages.
        inverse_cholesky: ``inverse_hessian_cholesky(hessian, config.damp)`` if already computed.
    """
    fmt = config.format
    gsz = config.group_size
    m = len(weights)
    seeds = [0] * m if seeds is None else list(seeds)
    names = [None] * m if names is None else list(names)
    what = "+".join(n or "layer" for n in names)
    k = weights[0].shape[1]
    for wt, nm in zip(weights, names):
        if wt.dim() != 2 or wt.shape[1] != k:
            raise ValueError(f"GPTQ group {what}: every weight must be (N, {k}), got {tuple(wt.shape)} for {nm}")
    formats.check_group_divisible(k, fmt, what=f"GPTQ weight of {what}")
    nb = k // gsz
    dev = weights[0].device
    rows = [wt.shape[0] for wt in weights]
    bounds = [0]
    for r in rows:
        bounds.append(bounds[-1] + r)
    segs = [slice(bounds[i], bounds[i + 1]) for i in range(m)]
    w = torch.cat([wt.detach().to(torch.float32) for wt in weights], 0)  # (sum N, K) rows of all layers
    n = w.shape[0]
    h = torch.eye(k, dtype=torch.float64, device=dev) if hessian is None else hessian.to(torch.float64)  # (K, K)
    h = (h + h.T) / 2
    if inverse_cholesky is not None and tuple(inverse_cholesky.shape) != (k, k):
        raise ValueError(f"{what}: inverse_cholesky must be ({k}, {k}), got {tuple(inverse_cholesky.shape)}")

    data_aware = config.transform in DATA_AWARE_KINDS
    fixed_t = [None if data_aware else layer_transforms(w[sg], None, config, dtype, sd) for sg, sd in zip(segs, seeds)]
    g_layers = []  # per layer: () fp32 global scale
    for i in range(m):
        if fmt is Format.NVFP4:  # per-tensor weight scale from the RTN-style transforms of the initial W
            t0 = fixed_t[i] if fixed_t[i] is not None else layer_transforms(w[segs[i]], h, config, dtype, seeds[i])
            with single_thread():
                g_layers.append(weight_global_scale(transforms.transform_weight(w[segs[i]], t0), fmt))
        else:
            g_layers.append(torch.tensor(formats.MXFP4_GLOBAL_SCALE, dtype=torch.float32, device=dev))
    g_rows = torch.cat([g.reshape(1).expand(r) for g, r in zip(g_layers, rows)])  # (sum N,)

    # Block order: permute whole blocks of W and H (every transform block stays contiguous); undone at the end.
    perm = block_order(h, nb, config.gptq_order)  # (K/G,)
    permuted = not bool(torch.equal(perm, torch.arange(nb)))
    if permuted:
        cols = (perm.to(dev)[:, None] * gsz + torch.arange(gsz, device=dev)).reshape(-1)  # (K,) new -> old column
        w = w[:, cols].contiguous()
        h = h[cols][:, cols]
        fixed_t = [None if t is None else t[perm.to(t.device)] for t in fixed_t]
    if inverse_cholesky is None or permuted:  # a given factor belongs to the unpermuted H
        damp_block = gsz if config.gptq_damp_scope == "block" else None
        low = inverse_hessian_cholesky(h, config.damp, what, block_size=damp_block)  # (K, K) lower
    else:
        low = inverse_cholesky.to(torch.float64)
    h_blocks = h.reshape(nb, gsz, nb, gsz)[torch.arange(nb), :, torch.arange(nb), :]  # (K/G, G, G)
    act_inblock = config.gptq_inblock == "act"
    codes = torch.empty(n, k, dtype=torch.uint8, device=dev)  # (sum N, K)
    scales = torch.empty(n, nb, dtype=torch.uint8, device=dev)  # (sum N, K/G)
    t_out = torch.empty(m, nb, gsz, gsz, dtype=dtype, device=dev)  # (layers, K/G, G, G)
    low_t = low.T.contiguous().to(torch.float32)  # (K, K) upper: row b holds L[:, b]
    eye = torch.eye(gsz, dtype=torch.float64, device=dev)
    with single_thread():
        l_blocks = low.reshape(nb, gsz, nb, gsz)[torch.arange(nb), :, torch.arange(nb), :]  # (K/G, G, G) L_bb
        hinv_blocks = l_blocks @ l_blocks.transpose(1, 2)  # (K/G, G, G) inv(Heff_b) = L_bb L_bb^T
        l_t_inv_blocks = torch.linalg.solve_triangular(
            l_blocks.transpose(1, 2), eye.expand(nb, gsz, gsz), upper=True
        )  # (K/G, G, G) inv(L_bb^T)
    window = max(gsz, (_LAZY_COLUMNS // gsz) * gsz)  # columns whose updates are applied eagerly
    pending: list[torch.Tensor] = []  # scaled block errors (sum N, G) not yet pushed past the window
    for b in range(nb):
        sl = slice(b * gsz, (b + 1) * gsz)
        w_b = w[:, sl].to(torch.float64)  # (sum N, G): the error-updated block
        with single_thread():
            hinv = hinv_blocks[b]  # (G, G) = inv(Heff)
            t64s, vs, us, inv_perms = [], [], [], []
            for i, sg in enumerate(segs):
                if data_aware:
                    t64 = transforms.wush_block_transforms(
                        w_b[sg].unsqueeze(0),
                        h_blocks[b : b + 1],
                        rel_damp=config.damp,
                        hadamard_rotation=config.transform is TransformKind.WUSH,
                    )  # (1, G, G)
                    t = transforms.round_transform(t64, dtype)[0]  # (G, G)
                else:
                    t = fixed_t[i][b]  # (G, G)
                t_out[i, b] = t
                t64 = t.to(torch.float64)
                t_inv = torch.linalg.inv(t64)  # (G, G)
                vi = (w_b[sg] @ t_inv).to(torch.float32)  # (N_i, G)
                hinv_t = t_inv.T @ hinv @ t_inv  # (G, G) inverse transformed-space Hessian
                if act_inblock:  # columns by descending diagonal of the transformed Hessian T Heff T^T
                    cperm = torch.argsort(-torch.diagonal(torch.linalg.inv(hinv_t)).cpu(), stable=True).to(dev)  # (G,)
                    vi = vi[:, cperm]
                    hinv_t = hinv_t[cperm][:, cperm]
                    inv_perms.append(torch.argsort(cperm))
                vs.append(vi)
                u = _cholesky_upper_spd(hinv_t, f"{names[i] or 'layer'} block {b}")  # (G, G)
                us.append(u.to(torch.float32))
                t64s.append(t64)
            v = torch.cat(vs, 0)  # (sum N, G)
            sc = torch.cat(
                [formats.compute_scales(vi, fmt, None if fmt is Format.MXFP4 else gi)[0] for vi, gi in zip(vs, g_layers)]
            )  # (sum N, 1) frozen per-row scales
            u_cols = torch.cat([u.unsqueeze(-1).expand(-1, -1, r) for u, r in zip(us, rows)], 2)  # (G, G, sum N)
            pre = _block_quantize(
                v.T.contiguous(), u_cols, FrozenScaleQuantizer(sc[:, 0], g_rows, fmt), config.gptq_inblock != "none"
            ).T  # (sum N, G)
            if act_inblock:  # back to the block's own column order
                pre = torch.cat([pre[sg][:, ip] for sg, ip in zip(segs, inv_perms)], 0)
            deltas = []
            for i, sg in enumerate(segs):
                c = formats.quantize_with_scales(pre[sg], sc[sg], g_layers[i], fmt)  # (N_i, G) codes
                codes[sg, sl] = c
                if b + 1 < nb:
                    vq = formats.dequantize(formats.pack_fp4(c), sc[sg], g_layers[i], fmt).to(torch.float64)  # (N_i, G)
                    deltas.append(w_b[sg] - vq @ t64s[i])  # (N_i, G) original-space block error
            scales[:, b] = sc[:, 0]
            if b + 1 == nb:
                break
            err = (torch.cat(deltas, 0) @ l_t_inv_blocks[b]).to(torch.float32)  # (sum N, G) delta @ inv(L_bb^T)
        # Eager updates inside the current window, one deferred GEMM for everything after it.
        win_end = min(k, (sl.start // window + 1) * window)
        if sl.stop < win_end:
            w[:, sl.stop : win_end] -= err @ low_t[sl, sl.stop : win_end]  # (sum N, cols left in window)
        pending.append(err)
        if sl.stop == win_end and win_end < k:
            first = win_end - len(pending) * gsz
            w[:, win_end:] -= torch.cat(pending, 1) @ low_t[first:win_end, win_end:]  # (sum N, K - win_end)
            pending.clear()
    if permuted:  # back to the original column and block order
        inv = torch.argsort(perm).to(dev)  # (K/G,)
        codes = codes.reshape(n, nb, gsz)[:, inv].reshape(n, k)
        scales = scales[:, inv]
        t_out = t_out[:, inv]
    packed = formats.pack_fp4(codes)  # (sum N, K/2)
    return [
        QuantizedWeight(codes=packed[sg].clone(), scales=scales[sg].clone(), transform=t_out[i], global_scale=g_layers[i])
        for i, sg in enumerate(segs)
    ]
