"""The backend on the GPU: Triton kernels through the dispatcher, a compiled tiny Llama, generate with a static
cache under CUDA graphs (mode="reduce-overhead") with no Python on the per-token path. Skipped without CUDA."""

from __future__ import annotations

import time

import pytest
import torch
from torch._dynamo.utils import counters

import wush_compile
from wush_compile.config import KernelChoice
from wush_compile.ops import dispatch, reference

from ._models import calibrate_llama, count_wush_linears, tiny_llama, wush_linear_from

pytestmark = pytest.mark.gpu

# Kernel vs reference for one layer: the same codes, fp32 accumulation in another order.
LAYER_REL_TOL = 1e-5
# Whole model vs eager: one activation that lands on a rounding boundary in one path and not in the other
# changes an FP4 code and moves later values by a quantization step; the tolerance allows a few such flips.
MODEL_REL_TOL = 2e-2


def _ids(b, s, seed=0, vocab=128):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed)).cuda()


class _Calls:
    """Counts Python calls of the Triton launcher and of the reference fallback."""

    def __init__(self, monkeypatch):
        from wush_compile.ops import kernels

        self.kernel = self.reference = 0
        real_linear, real_ref = kernels.linear, reference.linear_ref

        def linear(*a, **k):
            self.kernel += 1
            return real_linear(*a, **k)

        def linear_ref(*a, **k):
            self.reference += 1
            return real_ref(*a, **k)

        monkeypatch.setattr(kernels, "linear", linear)
        monkeypatch.setattr(reference, "linear_ref", linear_ref)

    def reset(self):
        self.kernel = self.reference = 0


def test_dispatch_on_this_gpu():
    cap = torch.cuda.get_device_capability()
    choice, reason = dispatch.choose_kernel(1, 576, 576, "mxfp4", "cuda")
    print(f"capability {cap}: M=1 -> {choice.value} ({reason})")
    if cap[0] == 9:
        assert choice is KernelChoice.TRITON_DECODE, reason
        assert dispatch.choose_kernel(4096, 576, 576, "mxfp4", "cuda")[0] is KernelChoice.TRITON_FP8
        assert dispatch.choose_kernel(4096, 576, 576, "nvfp4", "cuda")[0] is KernelChoice.TRITON_BF16


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_kernels_match_reference(fmt, dtype, monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 1536).to(dtype)
    h = torch.randn(512, 576)
    layer = wush_linear_from(lin, fmt, "wush", hessian=h.T @ h / 512).cuda()
    calls = _Calls(monkeypatch)
    for m in (1, 7, 16, 17, 300):
        x = (torch.randn(m, 576, generator=torch.Generator().manual_seed(m)) * 2).to(dtype).cuda()
        ref = reference.linear_ref(x, layer.weight_codes, layer.weight_scales, layer.transform,
                                   layer.weight_global_scale, layer.act_global_scale, layer.bias, fmt).float()
        out = torch.ops.wush.fused_linear(x, layer.weight_codes, layer.weight_scales, layer.transform,
                                          layer.weight_global_scale, layer.act_global_scale, layer.bias, fmt,
                                          "auto").float()
        err = (out - ref).abs().max().item()
        bound = LAYER_REL_TOL * ref.abs().max().item() + (ref.abs().max().item() / 128 if dtype != torch.float32 else 0)
        assert err <= bound, f"M={m} {fmt} {dtype}: |kernel - reference| = {err:.3g} > {bound:.3g} " \
                             "(fp32-accumulation rounding, plus one output rounding for 16-bit outputs)"
    assert calls.kernel == 5, "every call must run a Triton launcher"


def test_tiny_llama_cuda_compiled_matches_eager(monkeypatch):
    model = calibrate_llama(tiny_llama(), "mxfp4", "wush").cuda()
    calls = _Calls(monkeypatch)
    compiled = torch.compile(model, backend="wush", fullgraph=True)
    with torch.no_grad():
        for i, (b, s) in enumerate([(2, 12), (3, 7), (4, 40)]):
            ids = _ids(b, s, seed=i)
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(ids, 1)
            out = compiled(ids).logits.float()
            calls.reset()
            ref = model(ids).logits.float()
            assert calls.kernel == 0  # eager runs the reference op
            err = (out - ref).abs().max().item()
            assert err <= MODEL_REL_TOL * ref.abs().max().item(), f"shape {(b, s)}: max err {err:.3g}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["wush"]["rewritten"] == count_wush_linears(model)


def test_generate_static_cache_compiled_forward():
    """model.forward compiled whole (prefill and decode graphs, no CUDA graphs): greedy tokens as eager."""
    model = calibrate_llama(tiny_llama(seed=2, vocab=256), "mxfp4", "hadamard").cuda()
    ids = _ids(1, 8, vocab=256)
    # disable_compile: transformers would otherwise wrap the forward in its own torch.compile (Inductor)
    kw = dict(max_new_tokens=12, do_sample=False, cache_implementation="static", pad_token_id=0,
              disable_compile=True)
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        model.forward = torch.compile(model.forward, backend="wush", fullgraph=True)
        out = model.generate(ids, **kw)
    agree = (out == eager).float().mean().item()
    print(f"compiled forward generate: tokens equal to eager wush: {agree:.2%}")
    assert torch.equal(out[:, : ids.shape[1] + 4], eager[:, : ids.shape[1] + 4]), (out, eager)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_explain_on_cuda():
    model = calibrate_llama(tiny_llama(layers=1), "nvfp4", "wush", shared_transform=True).cuda()
    report = wush_compile.explain(model, _ids(1, 1), fullgraph=True)
    print(report)
    assert report.rewritten == 7
    assert {r.kernel for r in report.rows if r.status == "rewritten"} <= {"triton_decode", "cutlass"}


def test_generate_reduce_overhead_no_python_per_token(monkeypatch):
    """transformers' route: generate(compile_config=CompileConfig(backend="wush", mode="reduce-overhead"))
    compiles the decode step (its prefill stays eager, by transformers' design: the static cache marks its
    buffers as static addresses only outside compiled code). After warm-up the decode steps replay CUDA graphs:
    no wush op runs in Python except the eager prefill's."""
    from transformers import CompileConfig

    model = calibrate_llama(tiny_llama(seed=4, vocab=256), "mxfp4", "hadamard").cuda()
    ids = _ids(1, 8, vocab=256)
    new = 16
    cfg = CompileConfig(backend="wush", mode="reduce-overhead", fullgraph=True)
    kw = dict(max_new_tokens=new, do_sample=False, cache_implementation="static", pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, disable_compile=True, **kw)
        first = model.generate(ids, compile_config=cfg, **kw)
        model.generate(ids, compile_config=cfg, **kw)
        graphs = counters["stats"]["unique_graphs"]
        calls = _Calls(monkeypatch)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, compile_config=cfg, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    n = count_wush_linears(model)
    print(f"CompileConfig(backend='wush', mode='reduce-overhead'): {new} tokens in {dt * 1e3:.1f} ms; python calls "
          f"after warm-up: kernel {calls.kernel}, reference {calls.reference} (eager prefill = {n}); "
          f"wush graphs {counters['wush']['graphs']}, unique graphs {graphs}")
    assert counters["wush"]["graphs"] >= 1, "transformers did not compile with backend='wush'"
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after warm-up"
    assert calls.kernel == 0 and calls.reference == n, "only the eager prefill may run the ops in Python"
    assert torch.equal(out, first)
    assert torch.equal(out[:, : ids.shape[1] + 4], eager[:, : ids.shape[1] + 4]), (out, eager)


def test_reduce_overhead_split_k_layer():
    """A decode-size layer that takes split-K (576 x 576: split_k=9) compiled with CUDA graphs."""
    torch.manual_seed(0)
    layer = wush_linear_from(torch.nn.Linear(576, 576, bias=False).to(torch.bfloat16), "mxfp4", "hadamard").cuda()
    x = torch.randn(1, 576, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(layer, backend="wush", fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        ref = layer(x).float()
        for _ in range(4):  # warm-up, record, replay
            out = compiled(x).float()
    err = (out - ref).abs().max().item()
    assert err <= ref.abs().max().item() / 128, f"|compiled - eager| = {err:.3g} (bf16 output rounding)"


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_reduce_overhead_cuda_decode_bf16_operands(fmt, monkeypatch):
    """A decode-size bf16 layer with a bias on the Hopper CUDA decode route (K % 256 == 0) under CUDA graphs: the
    fp32 copies of its bf16 transform and bias are made at compile time, not lazily inside the graph's memory
    pool (which cudagraph trees reject as untracked live allocations)."""
    from wush_compile.cuda import decode as cuda_decode

    if torch.cuda.get_device_capability() != (9, 0) or not cuda_decode.available()[0]:
        pytest.skip("needs sm_90 with the CUDA decode kernels")
    monkeypatch.setenv("WUSH_CUDA_DECODE", "1")  # opt-in route
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*(
        wush_linear_from(torch.nn.Linear(512, 512, bias=True).to(torch.bfloat16), fmt, "hadamard") for _ in range(3)
    )).cuda()
    assert layers[0].transform.dtype == torch.bfloat16 and layers[0].bias.dtype == torch.bfloat16
    x = torch.randn(1, 512, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(layers, backend="wush", fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        ref = layers(x).float()
        for _ in range(4):  # warm-up, record, replay
            out = compiled(x).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= 2e-2, f"|compiled - eager| / |eager| = {rel:.3g}"
