"""Small calibrated models for the runtime tests.

WushLinear layers are built straight from the SPEC reference (transforms.block_transforms +
formats.quantize, RTN), so these tests do not depend on the calibration pipeline; one test also goes
through calibrate.quantize_linear when it is importable.
"""

from __future__ import annotations

import torch
from torch import nn

from wush_compile import formats, transforms
from wush_compile.config import Format, TransformKind
from wush_compile.modules import WushLinear

#: NVFP4 static activation amax the helper assumes (activations of the tiny models stay well below it).
NVFP4_ACT_AMAX = 16.0


def wush_linear_from(
    linear: nn.Linear,
    fmt: Format | str = Format.MXFP4,
    kind: TransformKind | str = TransformKind.WUSH,
    *,
    hessian: torch.Tensor | None = None,
    transform: torch.Tensor | None = None,
    seed: int = 0,
    share_group: str | None = None,
) -> WushLinear:
    """RTN-quantize one Linear with per-block transforms (SPEC sections 2, 3 and 5)."""
    fmt, kind = Format.parse(fmt), TransformKind.parse(kind)
    w = linear.weight.detach()
    n, k = w.shape
    dtype = w.dtype
    if transform is None:
        transform = transforms.block_transforms(kind, w, hessian, fmt.group_size, seed=seed)
    t = transforms.round_transform(transform, dtype)  # (K/G, G, G) model dtype
    wt = transforms.transform_weight(w, t).to(torch.float32)  # (N, K)
    g_w = None if fmt is Format.MXFP4 else formats.nvfp4_global_scale(wt)
    codes, scales, g = formats.quantize(wt, fmt, g_w)
    m = WushLinear(k, n, bias=linear.bias is not None, fmt=fmt, dtype=dtype, transform_kind=kind,
                   share_group=share_group)
    with torch.no_grad():
        m.weight_codes.copy_(codes)
        m.weight_scales.copy_(scales)
        m.transform.copy_(t)
        m.weight_global_scale.copy_(g.reshape(()))
        if fmt is Format.MXFP4:
            m.act_global_scale.fill_(formats.MXFP4_GLOBAL_SCALE)
        else:
            m.act_global_scale.copy_(formats.nvfp4_global_scale(torch.tensor(NVFP4_ACT_AMAX)))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
    m.refresh_transform_key()
    return m.to(w.device)


def random_hessian(k: int, seed: int, tokens: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen) * (1 + torch.rand(k, generator=gen) * 4)  # anisotropic channels
    return x.T @ x / tokens  # (K, K)


# Layers of a Llama block that read the same input.
_SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def calibrate_llama(
    model: nn.Module,
    fmt: Format | str = Format.MXFP4,
    kind: TransformKind | str = TransformKind.WUSH,
    *,
    shared_transform: bool = False,
) -> nn.Module:
    """Replace every Linear of the decoder layers (not lm_head) with a WushLinear, in place.

    ``shared_transform``: q/k/v and gate/up get one transform (from their concatenated weights), so the
    runtime can quantize their input once.
    """
    fmt, kind = Format.parse(fmt), TransformKind.parse(kind)
    for li, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            names = [n for n, c in parent.named_children() if isinstance(c, nn.Linear)]
            groups = {}
            if shared_transform:
                for grp in _SHARED_INPUT_GROUPS:
                    if all(g in names for g in grp):
                        w = torch.cat([getattr(parent, g).weight.detach() for g in grp])
                        k = w.shape[1]
                        h = random_hessian(k, li) if kind in (TransformKind.WUS, TransformKind.WUSH) else None
                        t = transforms.block_transforms(kind, w, h, fmt.group_size)
                        for g in grp:
                            groups[g] = (t, f"layers.{li}.{'+'.join(grp)}")
            for j, name in enumerate(names):
                lin = getattr(parent, name)
                t, share = groups.get(name, (None, None))
                data_aware = kind in (TransformKind.WUS, TransformKind.WUSH) and t is None
                h = random_hessian(lin.in_features, 100 * li + j) if data_aware else None
                setattr(parent, name, wush_linear_from(lin, fmt, kind, hessian=h, transform=t, seed=j,
                                                       share_group=share))
    return model


def tiny_llama(layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, vocab: int = 128):
    """A random LlamaForCausalLM: hidden 64, intermediate 128, 4 heads / 2 kv heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def count_wush_linears(model: nn.Module) -> int:
    return sum(isinstance(m, WushLinear) for m in model.modules())


class TinyAttention(nn.Module):
    """q/k/v on one input (a shared-transform group), o on their product, a plain Linear head."""

    def __init__(self, fmt: Format | str = Format.MXFP4, kind: TransformKind | str = TransformKind.HADAMARD,
                 d: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        fmt = Format.parse(fmt)
        self.q = wush_linear_from(nn.Linear(d, d), fmt, kind, seed=1)
        self.k = wush_linear_from(nn.Linear(d, d // 2, bias=False), fmt, kind, seed=2)
        self.v = wush_linear_from(nn.Linear(d, d // 2, bias=False), fmt, kind, seed=3)
        self.o = wush_linear_from(nn.Linear(d, d, bias=False), fmt, kind, seed=4)
        self.head = nn.Linear(d, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        kv = torch.cat([self.k(x), self.v(x)], dim=-1)
        return self.head(self.o(torch.relu(q) * kv))
