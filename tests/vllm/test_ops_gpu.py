"""The ops the vLLM linear method calls, on the GPU, the way vLLM calls them (vLLM itself cannot run there): 2-D
activations, the members' rows as views of one fused weight, every batch size including 0, dynamic shapes, CUDA
graph capture at vLLM's capture sizes, no host synchronisation. Each mode of the fused-layer forward (one op over
all rows, the shared-transform group op, one op per member) against the reference kernel on the same inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wush_compile import transforms
from wush_compile.config import Format, TransformKind
from wush_compile.vllm import _core

from ..runtime._models import wush_linear_from

pytestmark = pytest.mark.gpu

K = 256
SIZES = (256, 128, 128)  # q, k, v rows (or gate, up, + one)
#: vLLM's CUDA-graph capture sizes for max_num_seqs 256 start 1, 2, 4, then every 8 up to 256 (here a subset).
CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 64, 128, 256)
DYNAMIC_SIZES = (0, 1, 3, 17, 64, 257, 1000)
#: bf16 outputs of different kernels (fp32 accumulation in other orders; an activation element on an FP4 rounding
#: boundary may round the other way): error relative to the output's max.
REL = 3e-2


def _layer(fmt: str, mode: str, seed: int = 0):
    torch.manual_seed(seed)
    lins = [nn.Linear(K, n, bias=True, dtype=torch.bfloat16) for n in SIZES]
    shared = mode in ("single", "group")
    t = None
    if shared:
        t = transforms.block_transforms(TransformKind.WUSH, torch.cat([lin.weight.detach().float() for lin in lins]),
                                        None, Format.parse(fmt).group_size)
    mods = [wush_linear_from(lin, fmt, "wush" if shared else "random", transform=t, seed=i)
            for i, lin in enumerate(lins)]
    codes = torch.cat([m.weight_codes for m in mods])
    scales = torch.cat([m.weight_scales for m in mods])
    tr = torch.stack([m.transform for m in mods])
    wgs = torch.stack([m.weight_global_scale for m in mods])
    if mode == "single":
        wgs = wgs.max().expand(len(mods)).clone()  # one weight scale for all rows: one op (codes kept: any values)
    elif mode == "group" and bool((wgs == wgs[0]).all()):
        wgs = wgs * torch.tensor([1.0, 2.0, 0.5])
    ags = torch.stack([m.act_global_scale for m in mods])
    bias = torch.cat([m.bias for m in mods])
    args = [a.cuda() for a in (codes, scales, tr, wgs, ags, bias)]
    plan = _core.plan_forward(args[2], args[4], args[3], SIZES)
    assert plan.mode == mode
    return plan, args


def _check(got, want, what):
    assert got.shape == want.shape, what
    if want.numel() == 0:
        return
    err = float((got.float() - want.float()).abs().max()) / max(float(want.float().abs().max()), 1e-6)
    assert err <= REL, f"{what}: rel err {err:.3g}"


@pytest.mark.parametrize("mode", ["single", "group", "members"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_vllm_calls_on_gpu(fmt, mode):
    plan, (codes, scales, tr, wgs, ags, bias) = _layer(fmt, mode)

    def run(x, kernel="auto"):
        return _core.forward(plan, x, codes, scales, tr, wgs, ags, bias, fmt, kernel)

    gen = torch.Generator(device="cuda").manual_seed(1)
    # dynamic batch sizes (0 included), 2-D, against the reference kernel on the same inputs
    for m in DYNAMIC_SIZES:
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        _check(run(x), run(x, "reference"), f"{fmt} {mode} M={m}")
    # a non-contiguous 2-D view (vLLM may hand a slice of a larger buffer)
    big = torch.randn(9, 2 * K, device="cuda", dtype=torch.bfloat16, generator=gen)
    _check(run(big[:, :K]), run(big[:, :K].contiguous(), "reference"), f"{fmt} {mode} strided x")
    # no host synchronisation once warm
    xs = [torch.randn(m, K, device="cuda", dtype=torch.bfloat16, generator=gen) for m in CAPTURE_SIZES]
    for x in xs:
        run(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in xs:
            run(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # CUDA-graph capture at the capture sizes, replayed on new inputs
    for m in CAPTURE_SIZES:
        static = torch.randn(m, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                run(static)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(static)
        new = torch.randn(m, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = run(new)
        assert torch.equal(out, want), f"{fmt} {mode} M={m}: graph replay differs from eager"
