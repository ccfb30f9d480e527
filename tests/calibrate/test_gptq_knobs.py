"""The GPTQ knobs of WushConfig (block order, damping scope, in-block schedule) on tiny layers."""

from __future__ import annotations

import pytest
import torch

from calibrate.gptq import block_order, gptq_quantize, inverse_hessian_cholesky
from wush_compile import formats
from wush_compile.config import WushConfig

K = 128
G = 32


def _dequant(q, fmt="mxfp4"):
    v = formats.dequantize(q.codes, q.scales, q.global_scale, fmt)  # (N, K) transformed space
    t = q.transform.to(torch.float32)
    return torch.cat([v[:, b * G : (b + 1) * G] @ t[b] for b in range(v.shape[1] // G)], 1)


def _loss(q, w, h):
    d = (w - _dequant(q)).double()
    return float(torch.trace(d @ h @ d.T))


def _heavy_last_block():
    """Block 0 is correlated with a last block of 8x the scale: GPTQ should quantize the heavy block first
    so that block 0 can absorb its error."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, K, generator=gen)
    z = torch.randn(2048, K, generator=gen)
    x = z.clone()
    x[:, :G] += 0.9 * z[:, K - G :]
    s = torch.ones(K)
    s[K - G :] = 8.0
    x = x * s
    return w, (x.T @ x / x.shape[0]).double()


def test_block_order_values():
    h = torch.diag(torch.tensor([1.0] * G + [3.0] * G + [2.0] * G, dtype=torch.float64))
    assert block_order(h, 3, "forward").tolist() == [0, 1, 2]
    assert block_order(h, 3, "reverse").tolist() == [2, 1, 0]
    assert block_order(h, 3, "act").tolist() == [1, 2, 0]
    assert block_order(None, 3, "act").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="sideways"):
        block_order(h, 3, "sideways")


@pytest.mark.parametrize("kind", ["identity", "wush"])
def test_act_order_helps_when_the_heavy_block_is_last(kind):
    w, h = _heavy_last_block()
    fwd = _loss(gptq_quantize(w, h, WushConfig(transform=kind), dtype=torch.float32), w, h)
    act = _loss(gptq_quantize(w, h, WushConfig(transform=kind, gptq_order="act"), dtype=torch.float32), w, h)
    assert act < 0.8 * fwd


@pytest.mark.parametrize(
    "knobs",
    [
        {"gptq_order": "reverse"},
        {"gptq_order": "act"},
        {"gptq_damp_scope": "block"},
        {"gptq_inblock": "act"},
        {"gptq_inblock": "none"},
        {"gptq_order": "reverse", "gptq_inblock": "act", "format": "nvfp4"},
    ],
)
def test_knobs_give_a_valid_bit_identical_quantization(knobs):
    w, h = _heavy_last_block()
    cfg = WushConfig(**knobs)
    a = gptq_quantize(w, h, cfg, dtype=torch.float32)
    b = gptq_quantize(w, h, cfg, dtype=torch.float32)
    for x, y in ((a.codes, b.codes), (a.scales, b.scales), (a.transform, b.transform)):
        assert torch.equal(x, y)
    assert a.codes.shape == (w.shape[0], K // 2) and a.transform.shape == (K // cfg.group_size, cfg.group_size, cfg.group_size)
    wq = formats.dequantize(a.codes, a.scales, a.global_scale, cfg.format)
    assert bool(torch.isfinite(wq).all())
    # Every setting is still a real quantizer: the H-weighted error is well below the weight's own energy.
    t = a.transform.to(torch.float32)
    g = cfg.group_size
    rec = torch.cat([wq[:, i * g : (i + 1) * g] @ t[i] for i in range(K // g)], 1)
    d = (w - rec).double()
    assert float(torch.trace(d @ h @ d.T)) < 0.05 * float(torch.trace(w.double() @ h @ w.double().T))


def test_reverse_order_equals_forward_on_the_flipped_layer():
    """Walking the blocks last to first is forward GPTQ on the layer with its blocks reversed."""
    w, h = _heavy_last_block()
    cfg = WushConfig(transform="identity")
    rev = gptq_quantize(w, h, cfg.replace(gptq_order="reverse"), dtype=torch.float32)
    nb = K // G
    cols = (torch.arange(nb - 1, -1, -1)[:, None] * G + torch.arange(G)).reshape(-1)
    fwd = gptq_quantize(w[:, cols], h[cols][:, cols], cfg, dtype=torch.float32)
    codes_rev = formats.unpack_fp4(rev.codes).reshape(-1, nb, G).flip(1).reshape(-1, K)
    assert torch.equal(formats.pack_fp4(codes_rev), fwd.codes)
    assert torch.equal(rev.scales.flip(1), fwd.scales)


def test_inblock_updates_beat_none():
    w, h = _heavy_last_block()
    seq = _loss(gptq_quantize(w, h, WushConfig(transform="identity"), dtype=torch.float32), w, h)
    none = _loss(gptq_quantize(w, h, WushConfig(transform="identity", gptq_inblock="none"), dtype=torch.float32), w, h)
    assert seq < none


def test_block_damp_scope_uses_each_blocks_diagonal():
    h = torch.diag(torch.tensor([1.0] * G + [100.0] * G, dtype=torch.float64))
    full = inverse_hessian_cholesky(h, 0.1)
    block = inverse_hessian_cholesky(h, 0.1, block_size=G)
    # inv(L L^T) is the damped H: full adds 0.1 * 50.5 everywhere, block 0.1 * 1 and 0.1 * 100.
    hd_full = torch.linalg.inv(full @ full.T).diagonal()
    hd_block = torch.linalg.inv(block @ block.T).diagonal()
    assert torch.allclose(hd_full, torch.tensor([1 + 5.05] * G + [105.05] * G, dtype=torch.float64))
    assert torch.allclose(hd_block, torch.tensor([1.1] * G + [110.0] * G, dtype=torch.float64))


def test_unknown_knob_values_are_named():
    with pytest.raises(ValueError, match="gptq_order.*'forward', 'reverse', 'act'"):
        WushConfig(gptq_order="backward")
    with pytest.raises(ValueError, match="gptq_inblock"):
        WushConfig(gptq_inblock="lazy")
    with pytest.raises(ValueError, match="sequential"):
        WushConfig(sequential="yes")
    assert WushConfig.from_dict(WushConfig(gptq_order="act").to_dict()).gptq_order == "act"
