"""The vLLM plugin's logic that needs no vLLM (wush_compile.vllm._core): which checkpoint modules a vLLM layer
holds, the tensor-parallel shape rules, the tensors kept out of vLLM's weight stream, the checkpoint checks, and the
fused-layer forward against the WushLinears it stands for. Runs in the main environment."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from wush_compile import hf
from wush_compile.config import Format, TransformKind
from wush_compile.hf import CheckpointError
from wush_compile.parallel import ShardError
from wush_compile.vllm import _core

from ..runtime._models import wush_linear_from
from ..test_checkpoint import _tensor_byte_range, quantize_model, tiny_llama

REPO = Path(__file__).resolve().parents[2]


def _entry(name, fmt="mxfp4", k=64, n=32, share=None, bias=False):
    return {"fmt": fmt, "transform_kind": "wush", "share_group": share, "bias": bias, "in_features": k,
            "out_features": n, "dtype": "float32"}


def _qc(modules):
    return hf.WushQuantizationConfig(modules=modules)


def test_fused_layer_spec_lists_its_members():
    p = "model.layers.0.self_attn"
    qc = _qc({f"{p}.q_proj": _entry("q", n=64), f"{p}.k_proj": _entry("k"), f"{p}.v_proj": _entry("v"),
              f"{p}.o_proj": _entry("o", n=64)})
    spec = _core.layer_spec(qc, f"{p}.qkv_proj")
    assert spec.members == (f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj")
    assert spec.out_features == (64, 32, 32) and spec.fmt is Format.MXFP4 and spec.dtype == torch.float32
    assert _core.layer_spec(qc, f"{p}.o_proj").members == (f"{p}.o_proj",)
    assert _core.layer_spec(qc, "model.layers.0.mlp.gate_up_proj") is None  # not quantized: vLLM's own method
    with pytest.raises(CheckpointError, match="config does not match the model"):
        _core.check_layer_sizes(spec, 64, [64, 32, 16])


def test_format3_entries_without_sizes_take_the_model_layers_sizes():
    """Compact (format 3) entries carry no sizes: the spec takes vLLM's layer sizes; recorded sizes still check."""
    p = "model.layers.0.mlp"
    e = {k: v for k, v in _entry("g").items() if k not in ("in_features", "out_features")}
    qc = _qc({f"{p}.gate_proj": dict(e, in_features=None, out_features=None),
              f"{p}.up_proj": dict(e, in_features=None, out_features=None)})
    spec = _core.layer_spec(qc, f"{p}.gate_up_proj")
    assert spec.in_features is None and spec.out_features == (None, None)
    _core.check_layer_sizes(spec, 64, [128, 128])
    with pytest.raises(CheckpointError, match="config does not match the model"):
        _core.check_layer_sizes(spec, 64, [128])


def test_partly_quantized_or_mixed_fused_layer_is_refused():
    p = "model.layers.0.mlp"
    with pytest.raises(CheckpointError, match=r"only \['model.layers.0.mlp.gate_proj'\] are quantized"):
        _core.layer_spec(_qc({f"{p}.gate_proj": _entry("g")}), f"{p}.gate_up_proj")
    mixed = _qc({f"{p}.gate_proj": _entry("g"), f"{p}.up_proj": _entry("u", fmt="nvfp4")})
    with pytest.raises(CheckpointError, match="differ in fmt"):
        _core.layer_spec(mixed, f"{p}.gate_up_proj")


@pytest.mark.parametrize("fmt,k,tp,ok", [("mxfp4", 128, 2, True), ("mxfp4", 96, 2, False), ("nvfp4", 96, 2, True),
                                         ("nvfp4", 96, 4, False), ("mxfp4", 96, 1, True)])
def test_row_parallel_shards_hold_whole_blocks(fmt, k, tp, ok):
    spec = _core.layer_spec(_qc({"model.layers.0.mlp.down_proj": _entry("d", fmt=fmt, k=k)}),
                            "model.layers.0.mlp.down_proj")
    if ok:
        assert _core.local_k(spec, k, k // tp) == k // tp
    else:
        g = Format.parse(fmt).group_size
        with pytest.raises(ShardError, match=rf"K={k} over tp={tp} .* block size G={g}.*multiple of tp\*G={tp * g}"):
            _core.local_k(spec, k, k // tp)


def test_member_index():
    assert [_core.member_index(s, 3, "x") for s in ("q", "k", "v")] == [0, 1, 2]
    assert _core.member_index(1, 2, "x") == 1 and _core.member_index(None, 1, "x") == 0
    for bad, n in (("w", 3), (2, 2), (None, 2)):
        with pytest.raises(CheckpointError):
            _core.member_index(bad, n, "x")


def test_dropped_tensors_are_exactly_guards_row_exponents_and_integrity():
    qc = _qc({"model.layers.0.self_attn.q_proj": _entry("q")})
    pat = _core.dropped_tensor_pattern(qc)
    for name in ("wush_integrity", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.q_proj.weight_row_exponent"):
        assert pat.search(name), name
    for name in ("model.layers.0.self_attn.q_proj.weight_codes", "model.layers.0.self_attn.k_proj.weight",
                 "lm_head.weight", "model.layers.10.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert not pat.search(name), name


def _members(fmt, shared, bias, seed=0):
    torch.manual_seed(seed)
    lins = [nn.Linear(64, n, bias=bias) for n in (64, 32, 32)]
    t = None
    if shared:
        from wush_compile import transforms

        t = transforms.block_transforms(TransformKind.WUSH, torch.cat([lin.weight.detach() for lin in lins]),
                                        None, Format.parse(fmt).group_size)
    return [wush_linear_from(lin, fmt, "wush" if shared else "random", transform=t, seed=i)
            for i, lin in enumerate(lins)]


def _stack(mods):
    return (torch.cat([m.weight_codes for m in mods]), torch.cat([m.weight_scales for m in mods]),
            torch.stack([m.transform for m in mods]), torch.stack([m.weight_global_scale for m in mods]),
            torch.stack([m.act_global_scale for m in mods]),
            None if mods[0].bias is None else torch.cat([m.bias for m in mods]))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("shared", [False, True])
def test_fused_forward_equals_the_members(fmt, shared):
    mods = _members(fmt, shared, bias=True)
    codes, scales, t, wgs, ags, bias = _stack(mods)
    plan = _core.plan_forward(t, ags, wgs, [m.out_features for m in mods])
    if not shared:
        assert plan.mode == "members"
    else:
        assert plan.mode == ("single" if bool((wgs == wgs[0]).all()) else "group")
    x = torch.randn(5, 64)
    want = torch.cat([m(x) for m in mods], dim=-1)
    got = _core.forward(plan, x, codes, scales, t, wgs, ags, bias, fmt)
    assert torch.equal(got, want)
    assert _core.forward(plan, x[:0], codes, scales, t, wgs, ags, bias, fmt).shape == (0, 128)


def test_shared_group_with_distinct_weight_scales_quantizes_x_once():
    mods = _members("nvfp4", True, bias=False)
    codes, scales, t, wgs, ags, bias = _stack(mods)
    wgs = wgs * torch.tensor([1.0, 2.0, 0.5])  # per-member weight global scales: the group op
    plan = _core.plan_forward(t, ags, wgs, [64, 32, 32])
    assert plan.mode == "group"
    x = torch.randn(3, 64)
    ref = [torch.ops.wush.linear(x, m.weight_codes, m.weight_scales, m.transform, g, m.act_global_scale, None,
                                 "nvfp4") for m, g in zip(mods, wgs)]
    assert torch.equal(_core.forward(plan, x, codes, scales, t, wgs, ags, bias, "nvfp4"), torch.cat(ref, -1))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_row_parallel_shards_sum_to_the_whole_layer(fmt):
    """What vLLM's row-parallel layer computes: rank r's K slice (whole blocks) and partial output, all-reduced."""
    torch.manual_seed(3)
    m = wush_linear_from(nn.Linear(128, 48, bias=False), fmt, "random")
    x = torch.randn(4, 128)
    g = m.group_size
    parts = []
    for r in range(2):
        cols = slice(r * 64, (r + 1) * 64)
        codes = m.weight_codes[:, r * 32:(r + 1) * 32]
        scales = m.weight_scales[:, r * 64 // g:(r + 1) * 64 // g]
        t = m.transform[r * 64 // g:(r + 1) * 64 // g][None]
        plan = _core.plan_forward(t, m.act_global_scale[None], m.weight_global_scale[None], [48])
        parts.append(_core.forward(plan, x[:, cols], codes, scales, t, m.weight_global_scale[None],
                                   m.act_global_scale[None], None, fmt))
    want = m(x)
    torch.testing.assert_close(parts[0] + parts[1], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from wush_compile import WushConfig

    model = tiny_llama(seed=4)
    quantize_model(model, WushConfig(format="mxfp4", method="rtn", transform="wush"))
    d = tmp_path_factory.mktemp("vllm_core")
    model.save_pretrained(d)
    return d


def _qc_of(d):
    return _core.load_config_dict(json.loads((d / "config.json").read_text())["quantization_config"])


def test_checkpoint_checks_on_the_files(saved, tmp_path):
    index = _core.verify_checkpoint_dir(str(saved), _qc_of(saved))
    assert "model.layers.0.self_attn.q_proj.weight_codes" in index
    d = Path(shutil.copytree(saved, tmp_path / "c"))
    f = d / "model.safetensors"
    tensor = "model.layers.0.mlp.up_proj.weight_scales"
    lo, hi = _tensor_byte_range(f, tensor)
    data = bytearray(f.read_bytes())
    data[(lo + hi) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{f}: tensor '{tensor}' does not match the CRC-32"):
        _core.verify_checkpoint_dir(str(d), _qc_of(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors file"):
        _core.verify_checkpoint_dir(str(empty), _qc_of(saved))


def test_unknown_config_keys_are_refused():
    with pytest.raises(CheckpointError, match="unknown keys"):
        _core.load_config_dict({"quant_method": "wush", "format_version": 2, "modules": {}, "extra": 1})


def test_plugin_is_declared_and_importing_it_does_not_import_vllm():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    assert entry == {"wush": "wush_compile.vllm:register"}
    import wush_compile.vllm  # noqa: F401

    assert "vllm" not in sys.modules or "vllm.plugins" in sys.modules  # the main env has no vLLM at all
    assert "wush_compile.vllm.plugin" not in sys.modules
