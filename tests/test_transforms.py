"""SPEC section 2, pinned: identity / hadamard / random / wus / wush block transforms.

The WUSH checks are written from SPEC's algebra, not from the implementation: with the damped moments
M_X' and M_W' of a block, ``A = T M_X' T^T`` and ``B = inv(T)^T M_W' inv(T)`` are equal, WUSH's diagonal is
constant, and the proxy loss ``sum_i A_ii B_ii`` equals ``(sum_i sqrt(lam_i))^2 / G`` (lam: eigenvalues of
M_W' M_X'), the minimum over all invertible T, which identity, Hadamard and random transforms exceed.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from wush_compile import transforms
from wush_compile.config import TransformKind

KINDS = [k.value for k in TransformKind]
DATA_KINDS = ("wus", "wush")
REL_DAMP = 0.01  # SPEC section 2, step 1


# --------------------------------------------------------------------------------------------------------------
# Helpers written from SPEC
# --------------------------------------------------------------------------------------------------------------


def spec_damp(m: torch.Tensor) -> torch.Tensor:
    """SPEC step 1: ``M + 0.01 * mean(diag(M)) * I``."""
    return m + REL_DAMP * torch.diagonal(m).mean() * torch.eye(m.shape[0], dtype=m.dtype)


def block_moments(weight: torch.Tensor, hessian: torch.Tensor, g: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Undamped (M_X, M_W) of block b: the diagonal Hessian block and W_b^T W_b / N, float64."""
    sl = slice(b * g, (b + 1) * g)
    w_b = weight[:, sl].double()  # (N, G)
    return hessian[sl, sl].double(), w_b.T @ w_b / weight.shape[0]


def my_proxy(t: torch.Tensor, m_x: torch.Tensor, m_w: torch.Tensor) -> float:
    t_inv = torch.linalg.inv(t)
    a = torch.diagonal(t @ m_x @ t.T)
    b = torch.diagonal(t_inv.T @ m_w @ t_inv)
    return float((a * b).sum())


def my_bound(m_x: torch.Tensor, m_w: torch.Tensor) -> float:
    """(sum sqrt(lam))^2 / G with lam the eigenvalues of M_W M_X (similar to Wp^T M_X Wp)."""
    lam = torch.linalg.eigvals(m_w @ m_x).real.clamp_min(0)
    return float(lam.sqrt().sum() ** 2 / m_x.shape[0])


def anisotropic_layer(n: int, k: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (N, K), H (K, K)) with correlated, unevenly scaled channels and a few outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen, dtype=torch.float64) / math.sqrt(k)
    scale = torch.exp(torch.randn(k, generator=gen, dtype=torch.float64) * 1.2)
    scale[torch.randperm(k, generator=gen)[:3]] *= 30.0  # outlier channels
    x = (torch.randn(tokens, k, generator=gen, dtype=torch.float64) @ (torch.eye(k, dtype=torch.float64) + mix)) * scale
    col_scale = torch.exp(torch.randn(k, generator=gen, dtype=torch.float64))
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * col_scale
    h = x.T @ x / tokens
    return w.float(), h


def spec_invariant(m_x: torch.Tensor, m_w: torch.Tensor) -> torch.Tensor:
    """``T^T T`` for any T from SPEC's steps 2-4: ``Wp (Wp^T M_X Wp)^(-1/2) Wp^T`` (independent of U's sign and
    the Hadamard). Inputs are the damped moments."""
    wp = torch.linalg.cholesky(m_w)
    lam, u = torch.linalg.eigh(wp.T @ m_x @ wp)
    return wp @ u @ torch.diag(lam.rsqrt()) @ u.T @ wp.T


def assert_usable(t: torch.Tensor, what: str) -> None:
    assert t.dtype == torch.float64, what
    assert torch.isfinite(t).all(), f"{what}: non-finite transform"
    cond = torch.linalg.cond(t)
    assert torch.isfinite(cond).all() and float(cond.max()) < 1e8, f"{what}: condition numbers {cond.tolist()}"
    assert torch.isfinite(torch.linalg.inv(t)).all(), what


# --------------------------------------------------------------------------------------------------------------
# Hadamard
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("g", [1, 2, 4, 8, 16, 32, 64])
def test_hadamard_orthogonal_symmetric_sylvester(g):
    h = transforms.hadamard(g)
    assert h.shape == (g, g) and h.dtype == torch.float64
    torch.testing.assert_close(h @ h.T, torch.eye(g, dtype=torch.float64), rtol=0, atol=1e-14)
    assert torch.equal(h, h.T)
    assert torch.all(h.abs() == 1 / math.sqrt(g))
    assert torch.all(h[0] > 0) and torch.all(h[:, 0] > 0)
    if g > 1:  # Sylvester doubling: [[H, H], [H, -H]] / sqrt(2)
        half = transforms.hadamard(g // 2) / math.sqrt(2)
        torch.testing.assert_close(h, torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0))
    assert transforms.hadamard(g, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("g", [0, 3, 12, 24])
def test_hadamard_rejects_non_power_of_two(g):
    with pytest.raises(ValueError, match=str(g)):
        transforms.hadamard(g)


# --------------------------------------------------------------------------------------------------------------
# Data-free kinds
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("g", [16, 32])
def test_identity_hadamard_random(g):
    w = torch.randn(8, 4 * g)
    ident = transforms.block_transforms("identity", w, None, g)
    assert ident.shape == (4, g, g) and ident.dtype == torch.float64
    assert torch.equal(ident, torch.eye(g, dtype=torch.float64).expand(4, g, g))
    had = transforms.block_transforms(TransformKind.HADAMARD, w, None, g)
    assert torch.equal(had, transforms.hadamard(g).expand(4, g, g))
    rnd = transforms.block_transforms("random", w, None, g, seed=3)
    assert rnd.shape == (4, g, g) and rnd.dtype == torch.float64
    eye = torch.eye(g, dtype=torch.float64).expand(4, g, g)
    torch.testing.assert_close(rnd @ rnd.transpose(1, 2), eye, rtol=0, atol=1e-12)
    assert_usable(rnd, "random")
    for i in range(4):  # per-block, not one matrix repeated
        for j in range(i):
            assert not torch.allclose(rnd[i], rnd[j])
    # seed-deterministic
    assert torch.equal(rnd, transforms.block_transforms("random", w, None, g, seed=3))
    assert not torch.allclose(rnd, transforms.block_transforms("random", w, None, g, seed=4))
    # the data do not change the data-free kinds
    h = torch.randn(4 * g, 4 * g, dtype=torch.float64)
    h = h @ h.T
    for kind in ("identity", "hadamard", "random"):
        assert torch.equal(
            transforms.block_transforms(kind, w, None, g, seed=3),
            transforms.block_transforms(kind, w * 7, h, g, seed=3),
        )


def test_random_is_haar_like():
    """Haar orthogonal: determinants of both signs occur, and the entries have variance 1/G."""
    g = 16
    rnd = transforms.block_transforms("random", torch.zeros(1, 256 * g), None, g, seed=0)  # (256, G, G)
    dets = torch.linalg.det(rnd)
    assert (dets > 0).any() and (dets < 0).any()
    var = float(rnd.var())
    assert abs(var - 1 / g) < 0.1 / g, var


# --------------------------------------------------------------------------------------------------------------
# WUSH / WUS on random anisotropic data
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("g", [16, 32])
@pytest.mark.parametrize("seed", [0, 1])
def test_wush_balances_moments_and_reaches_the_bound(g, seed):
    k, n = 3 * g, 40
    w, h = anisotropic_layer(n, k, tokens=400, seed=seed)
    t_wush = transforms.block_transforms("wush", w, h, g)
    t_wus = transforms.block_transforms("wus", w, h, g)
    rnd = transforms.block_transforms("random", w, h, g, seed=seed)
    assert t_wush.shape == (k // g, g, g) and t_wush.dtype == torch.float64
    gen = torch.Generator().manual_seed(seed)
    for b in range(k // g):
        m_x0, m_w0 = block_moments(w, h, g, b)
        m_x, m_w = spec_damp(m_x0), spec_damp(m_w0)
        for name, t in (("wush", t_wush[b]), ("wus", t_wus[b])):
            t_inv = torch.linalg.inv(t)
            a = t @ m_x @ t.T
            bb = t_inv.T @ m_w @ t_inv
            torch.testing.assert_close(a, bb, rtol=1e-8, atol=1e-10 * float(a.abs().max()), msg=f"{name} block {b}")
            torch.testing.assert_close(t.T @ t, spec_invariant(m_x, m_w), rtol=1e-7, atol=0, msg=name)
        a = t_wush[b] @ m_x @ t_wush[b].T
        d = torch.diagonal(a)
        assert float((d.max() - d.min()) / d.mean()) < 1e-9, f"WUSH diagonal not constant: {d}"
        bound = my_bound(m_x, m_w)
        p_wush = my_proxy(t_wush[b], m_x, m_w)
        assert p_wush == pytest.approx(bound, rel=1e-9)
        # the bound is (sum sqrt(lam))^2 / G, sqrt(lam) being the diagonal of the balanced moment's spectrum
        assert float(torch.diagonal(a).sum()) ** 2 / g == pytest.approx(bound, rel=1e-9)
        # everything else is above it, clearly so on anisotropic data
        p_wus = my_proxy(t_wus[b], m_x, m_w)
        assert p_wus >= bound * (1 - 1e-12)
        others = {
            "identity": torch.eye(g, dtype=torch.float64),
            "hadamard": transforms.hadamard(g),
            "random": rnd[b],
            "random invertible": torch.randn(g, g, generator=gen, dtype=torch.float64),
        }
        for name, t in others.items():
            p = my_proxy(t, m_x, m_w)
            assert p > bound * 1.05, f"{name}: proxy {p:.6g} not above the WUSH bound {bound:.6g}"
        # the library's helpers agree with the SPEC formulas
        assert float(transforms.proxy_loss(t_wush[b : b + 1], m_x, m_w)[0]) == pytest.approx(p_wush, rel=1e-12)
        assert float(transforms.proxy_loss(torch.eye(g, dtype=torch.float64)[None], m_x, m_w)[0]) == pytest.approx(
            my_proxy(torch.eye(g, dtype=torch.float64), m_x, m_w), rel=1e-12
        )
        assert float(transforms.wush_lower_bound(m_x0[None], m_w0[None])[0]) == pytest.approx(
            my_bound(m_x0, m_w0), rel=1e-8
        )
    # WUSH = Hadamard @ WUS (SPEC step 4)
    torch.testing.assert_close(t_wush, transforms.hadamard(g) @ t_wus, rtol=0, atol=1e-12 * float(t_wus.abs().max()))


def test_wush_bound_holds_for_many_random_transforms():
    """No random invertible T beats WUSH's proxy loss (a brute-force check of the optimality claim)."""
    g = 16
    w, h = anisotropic_layer(24, g, tokens=200, seed=5)
    t = transforms.block_transforms("wush", w, h, g)[0]
    m_x0, m_w0 = block_moments(w, h, g, 0)
    m_x, m_w = spec_damp(m_x0), spec_damp(m_w0)
    best = my_proxy(t, m_x, m_w)
    gen = torch.Generator().manual_seed(0)
    for i in range(300):
        cand = t + 0.05 * (1 + i % 5) * torch.randn(g, g, generator=gen, dtype=torch.float64) * t.abs().mean()
        assert my_proxy(cand, m_x, m_w) >= best * (1 - 1e-12)


def test_wush_with_identity_hessian():
    g = 32
    w, _ = anisotropic_layer(16, 2 * g, tokens=10, seed=2)
    t_none = transforms.block_transforms("wush", w, None, g)
    t_eye = transforms.block_transforms("wush", w, torch.eye(2 * g, dtype=torch.float64), g)
    torch.testing.assert_close(t_none, t_eye, rtol=1e-12, atol=1e-12)


def test_wush_deterministic_and_dtype_independent():
    g = 16
    w, h = anisotropic_layer(32, 4 * g, tokens=300, seed=7)
    a = transforms.block_transforms("wush", w, h, g)
    assert torch.equal(a, transforms.block_transforms("wush", w.clone(), h.clone(), g))
    # an fp32 Hessian and a bf16 weight work the same way (used in float64 inside)
    b = transforms.block_transforms("wush", w.bfloat16(), h.float(), g)
    assert b.dtype == torch.float64 and torch.isfinite(b).all()
    c = transforms.block_transforms("wush", w.bfloat16().double(), h.float().double(), g)
    assert torch.equal(b, c)


def test_transform_leaves_the_product_unchanged():
    """Without quantization ``(x T^T) (W inv(T))^T == x W^T`` for every kind."""
    g = 32
    w, h = anisotropic_layer(24, 2 * g, tokens=300, seed=8)
    x = torch.randn(5, 2 * g, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ w.double().T
    for kind in KINDS:
        t = transforms.block_transforms(kind, w, h, g)
        xt = transforms.transform_activations(x, t)  # (5, K) fp32
        assert xt.dtype == torch.float32 and xt.shape == x.shape
        # row form: block b of x times T_b^T
        want_xt = torch.cat([x[:, b * g : (b + 1) * g].double() @ t[b].T for b in range(2)], 1)
        torch.testing.assert_close(xt.double(), want_xt, rtol=1e-5, atol=1e-5 * float(want_xt.abs().max()))
        wt = transforms.transform_weight(w, t)
        assert wt.dtype == torch.float64
        want_wt = torch.cat([w[:, b * g : (b + 1) * g].double() @ torch.linalg.inv(t[b]) for b in range(2)], 1)
        torch.testing.assert_close(wt, want_wt, rtol=1e-12, atol=1e-12 * float(want_wt.abs().max()))
        y = want_xt @ wt.T
        torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()), msg=kind)


# --------------------------------------------------------------------------------------------------------------
# Degenerate calibration data: finite, invertible, never NaN
# --------------------------------------------------------------------------------------------------------------


def _degenerate_cases(g: int):
    k, n = 3 * g, 32
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(500, k, generator=gen, dtype=torch.float64)
    dead_block = x.clone()
    dead_block[:, g : 2 * g] = 0  # a whole block of dead channels
    dead_some = x.clone()
    dead_some[:, 3 : g + 5] = 0  # dead channels across a block boundary
    low_rank = torch.randn(500, 2, generator=gen, dtype=torch.float64)
    low_rank = low_rank @ torch.randn(2, k, generator=gen, dtype=torch.float64)
    three = x[:3]
    cases = {
        "dead block": (w, dead_block.T @ dead_block / 500),
        "dead channels": (w, dead_some.T @ dead_some / 500),
        "rank 2": (w, low_rank.T @ low_rank / 500),
        "3 tokens": (w, three.T @ three / 3),
        "3 tokens fp32": (w, (three.float().T @ three.float() / 3)),
        "zero hessian": (w, torch.zeros(k, k, dtype=torch.float64)),
        "huge dynamic range": (w, torch.diag(torch.logspace(-12, 12, k, dtype=torch.float64))),
    }
    w_zero_block = w.clone()
    w_zero_block[:, :g] = 0
    cases["zero weight block"] = (w_zero_block, x.T @ x / 500)
    w_rank1 = torch.randn(n, 1, generator=gen) @ torch.randn(1, k, generator=gen)
    cases["rank-1 weight"] = (w_rank1, x.T @ x / 500)
    cases["zero weight and hessian"] = (torch.zeros(n, k), torch.zeros(k, k, dtype=torch.float64))
    cases["single output row"] = (w[:1], three.T @ three / 3)
    return cases


@pytest.mark.parametrize("g", [16, 32])
@pytest.mark.parametrize("kind", DATA_KINDS)
def test_degenerate_hessians_give_finite_invertible_transforms(g, kind):
    for name, (w, h) in _degenerate_cases(g).items():
        t = transforms.block_transforms(kind, w, h, g)
        assert_usable(t, f"{kind} / {name}")
        wt = transforms.transform_weight(w, t)
        assert torch.isfinite(wt).all(), name
        tb = transforms.round_transform(t, torch.bfloat16)
        assert torch.isfinite(tb.float()).all(), name
        # balanced moments still hold for the damped moments where they are well defined
        for b in range(3):
            m_x0, m_w0 = block_moments(w, h, g, b)
            m_x, m_w = transforms.damp(m_x0[None], REL_DAMP)[0], transforms.damp(m_w0[None], REL_DAMP)[0]
            ti = torch.linalg.inv(t[b])
            a, bb = t[b] @ m_x @ t[b].T, ti.T @ m_w @ ti
            torch.testing.assert_close(a, bb, rtol=1e-6, atol=1e-8 * float(a.abs().max()), msg=f"{name} block {b}")


def test_damping_matches_spec():
    m = torch.randn(3, 8, 8, dtype=torch.float64)
    m = m @ m.transpose(1, 2)
    d = transforms.damp(m, REL_DAMP)
    for i in range(3):
        torch.testing.assert_close(d[i], spec_damp(m[i]), rtol=0, atol=1e-15)


def test_failed_factorization_raises_damping_and_logs(monkeypatch, caplog):
    """If Cholesky fails at SPEC's damping the damping is raised, the retry is logged, and T is still finite."""
    real = torch.linalg.cholesky_ex
    calls = []

    def flaky(a, *args, **kwargs):
        calls.append(1)
        l, info = real(a, *args, **kwargs)
        if len(calls) == 1:
            info = torch.ones_like(info)  # pretend the first attempt was not positive definite
        return l, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    w, h = anisotropic_layer(16, 32, tokens=100, seed=3)
    with caplog.at_level(logging.WARNING, logger="wush_compile.transforms"):
        t = transforms.block_transforms("wush", w, h, 16)
    assert len(calls) >= 2
    assert any("damping" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert_usable(t, "retried")


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["weight", "hessian"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_inputs_rejected(kind, where, bad):
    w = torch.randn(8, 32)
    h = torch.eye(32, dtype=torch.float64)
    if where == "weight":
        w[3, 7] = bad
    else:
        h[5, 5] = bad
    with pytest.raises(ValueError, match=f"{where}.*(NaN|Inf)"):
        transforms.block_transforms(kind, w, h, 16)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(32,\)"):
        transforms.block_transforms("wush", torch.randn(32), None, 16)
    with pytest.raises(ValueError, match=r"\(2, 4, 32\)"):
        transforms.block_transforms("wush", torch.randn(2, 4, 32), None, 16)
    with pytest.raises(ValueError, match=r"\(33, 33\)") as err:
        transforms.block_transforms("wush", torch.randn(4, 32), torch.eye(33), 16)
    assert "(32, 32)" in str(err.value)
    with pytest.raises(ValueError, match=r"\(32, 16\)"):
        transforms.block_transforms("wus", torch.randn(4, 32), torch.randn(32, 16), 16)
    with pytest.raises(ValueError, match=r"K=40.*G=16"):
        transforms.block_transforms("identity", torch.randn(4, 40), None, 16)
    with pytest.raises(ValueError, match="haar"):
        transforms.block_transforms("haar", torch.randn(4, 32), None, 16)


def test_round_transform():
    g = 32
    w, h = anisotropic_layer(16, 2 * g, tokens=200, seed=9)
    t = transforms.block_transforms("wush", w, h, g)
    tb = transforms.round_transform(t, torch.bfloat16)
    assert tb.dtype == torch.bfloat16 and tb.shape == t.shape
    assert torch.equal(tb, t.to(torch.bfloat16))
    assert torch.isfinite(torch.linalg.inv(tb.double())).all()
    assert transforms.round_transform(t, torch.float32).dtype == torch.float32
    # a transform that becomes singular once rounded is refused
    near = torch.tensor([[[1.0, 1.0 + 1e-5], [1.0, 1.0]]], dtype=torch.float64)
    assert torch.linalg.cond(near).item() < 1e12
    with pytest.raises(RuntimeError, match="bfloat16"):
        transforms.round_transform(near, torch.bfloat16)
