"""Two models of one architecture compiled in one process: dynamo reuses a compiled graph for the second model
(buffers are graph inputs), so a decision the passes took from buffer VALUES (which layers share a transform and
get one grouped op) must be guarded. Every order of grouped / ungrouped models, compiled vs eager, no
``torch._dynamo.reset()`` between them."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch._dynamo.utils import counters

import wush_compile  # noqa: F401
from wush_compile.modules import WushLinear, content_key, key_is_current

from ._models import calibrate_llama, tiny_llama

# Compiled (passes run, graph run eagerly) vs eager: the same FP4 ops, fp32 rounding only.
REL_TOL = 1e-5

#: name -> (seed, transform kind, shared_transform): two grouped models with different transforms, a second
#: Hadamard model (same transforms, different weights) and an ungrouped one.
MODELS = {
    "hadamard": (1, "hadamard", False),  # data-free: every layer reading one input has the same T -> grouped
    "hadamard_b": (2, "hadamard", False),
    "shared_wush": (3, "wush", True),  # one calibrated T per q/k/v and gate/up group -> grouped
    "wush": (4, "wush", False),  # one T per layer -> not grouped
}


def _model(name: str):
    seed, kind, shared = MODELS[name]
    return calibrate_llama(tiny_llama(seed=seed), "mxfp4", kind, shared_transform=shared)


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _rel(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def _compiled_vs_eager(model, **opts) -> float:
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="wush", options={"inductor": False, **opts})(ids).logits
    return _rel(out, ref)


@pytest.mark.parametrize("first,second", list(itertools.permutations(["hadamard", "shared_wush", "wush"], 2)))
def test_second_model_of_same_architecture_gets_its_own_transforms(first, second):
    a, b = _model(first), _model(second)
    errs = {first: _compiled_vs_eager(a), second: _compiled_vs_eager(b)}
    assert all(e <= REL_TOL for e in errs.values()), f"compiled vs eager relative error {errs} (order {first}, {second})"
    # the second model's different transforms failed the guard: a graph of its own
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_models_with_equal_transforms_share_the_compiled_graph():
    a, b = _model("hadamard"), _model("hadamard_b")
    assert _compiled_vs_eager(a) <= REL_TOL and _compiled_vs_eager(b) <= REL_TOL
    assert counters["stats"]["unique_graphs"] == 1, "equal transforms (equal keys) must not recompile"
    assert counters["wush"]["groups"] == 4  # grouped once, for both models


def test_grouping_follows_each_model_through_the_full_compiler():
    """With Inductor: grouped model first, then the ungrouped one, then the first again (cached graph)."""
    a, b = _model("hadamard"), _model("wush")
    ids = _ids()
    with torch.no_grad():
        for m in (a, b, a):
            out = torch.compile(m, backend="wush")(ids).logits
            assert _rel(out, m(ids).logits) <= REL_TOL


def test_key_tracks_in_place_edits_and_the_pass_refuses_stale_keys():
    a = _model("hadamard")
    lin: WushLinear = a.model.layers[0].self_attn.k_proj
    key = lin.transform_key
    with torch.no_grad():
        lin.transform.mul_(-1.0)  # an in-place edit: the key is stale until refreshed
    assert not key_is_current(lin.transform, lin.act_global_scale, "mxfp4")
    torch._dynamo.reset()
    assert _compiled_vs_eager(a) <= REL_TOL  # the eager reference call refreshed the key first
    assert lin.transform_key != key and key_is_current(lin.transform, lin.act_global_scale, "mxfp4")
    # a stale key seen by the pass itself: that layer is not grouped (logged reason), the result still right
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        lin.transform.mul_(-1.0)
    ids = _ids()
    with torch.no_grad():
        out = torch.compile(a, backend="wush", options={"inductor": False})(ids).logits
    assert any("transform key is not current" in k for k in counters["wush"]), dict(counters["wush"])
    assert _rel(out, a(ids).logits) <= REL_TOL


def test_key_is_refreshed_by_assignment_load_and_conversion(tmp_path):
    a = _model("shared_wush")
    lin = a.model.layers[1].mlp.up_proj
    key = lin.transform_key
    assert key == content_key(lin.transform, lin.act_global_scale, "mxfp4")
    lin.transform = lin.transform.clone() * 2  # assignment (how transformers loads buffers)
    assert lin.transform_key != key and key_is_current(lin.transform, lin.act_global_scale, "mxfp4")
    lin.transform = lin.transform / 2
    assert lin.transform_key == key
    lin.to(torch.bfloat16)
    assert key_is_current(lin.transform, lin.act_global_scale, "mxfp4") and lin.transform_key != key
    fresh = WushLinear(lin.in_features, lin.out_features, fmt="mxfp4", dtype=torch.bfloat16)
    fresh.load_state_dict(lin.state_dict())
    assert fresh.transform_key == lin.transform_key

    from transformers import AutoModelForCausalLM

    from wush_compile import hf

    b = _model("wush")
    hf.attach(b)  # layers assembled by hand (what calibrate() does itself)
    b.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, m in b.named_modules():
        if isinstance(m, WushLinear):
            assert loaded.get_submodule(name).transform_key == m.transform_key, name
