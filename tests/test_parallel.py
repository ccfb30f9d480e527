"""Tensor parallel on the CPU: 2 processes, gloo, spawned by the test (wush_compile.parallel).

Each worker builds the same calibrated tiny Llama (deterministic), keeps a single-process copy as the reference,
shards the other with the transformers Llama plan, and checks: every shard's codes / scales / transform are the
exact slice of the whole layer's; eager and compiled (backend="wush", fullgraph) logits equal the single-process
model's to fp32-accumulation rounding. A failing assertion in a worker fails the test.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wush_compile.modules import WushLinear

from .runtime._models import calibrate_llama, tiny_llama, wush_linear_from

WORLD = 2
# Row-parallel layers sum tp partial GEMMs in another order than one GEMM: fp32-accumulation rounding, which the
# next FP4 quantizer may turn into an occasional code step; the bound is relative to the logits' max.
REL_TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    port = _free_port()
    mp.spawn(_entry, args=(port, fn, args), nprocs=WORLD, join=True)


def _entry(rank: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        fn(rank, mesh, *args)
    finally:
        dist.destroy_process_group()


def _ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(seed))


def _close(out: torch.Tensor, ref: torch.Tensor, what: str, rel: float = REL_TOL) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    bound = rel * ref.float().abs().max().item()
    assert err <= bound, f"{what}: max |tp - single| = {err:.3g} > {rel} * max|single| = {bound:.3g}"


def _check_shards(rank: int, full: torch.nn.Module, sharded: torch.nn.Module) -> int:
    checked = 0
    for name, whole in full.named_modules():
        if not isinstance(whole, WushLinear):
            continue
        part = sharded.get_submodule(name)
        colwise = name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
        g = whole.group_size
        if colwise:
            nl = whole.out_features // WORLD
            rows = slice(rank * nl, (rank + 1) * nl)
            assert torch.equal(part.weight_codes, whole.weight_codes[rows]), name
            assert torch.equal(part.weight_scales, whole.weight_scales[rows]), name
            assert torch.equal(part.transform, whole.transform), name
        else:
            kl = whole.in_features // WORLD
            assert torch.equal(part.weight_codes, whole.weight_codes[:, rank * kl // 2:(rank + 1) * kl // 2]), name
            assert torch.equal(part.weight_scales, whole.weight_scales[:, rank * kl // g:(rank + 1) * kl // g]), name
            assert torch.equal(part.transform, whole.transform[rank * kl // g:(rank + 1) * kl // g]), name
        assert torch.equal(part.weight_global_scale, whole.weight_global_scale), name
        assert torch.equal(part.act_global_scale, whole.act_global_scale), name
        checked += 1
    return checked


def _model_worker(rank, mesh, fmt, compiled):
    from wush_compile import parallel

    torch._dynamo.reset()
    full = calibrate_llama(tiny_llama(), fmt, "wush")
    sharded = parallel.parallelize(copy.deepcopy(full), mesh)
    assert _check_shards(rank, full, sharded) == 14
    shapes = [(2, 12)] if compiled else [(2, 12), (1, 5)]  # one shape compiled: each is a compile (< 60 s)
    with torch.no_grad():
        for i, (b, s) in enumerate(shapes):
            ids = _ids(b, s, seed=i)
            ref = full(ids).logits
            _close(sharded(ids).logits, ref, f"eager {fmt} {(b, s)}")
            if compiled:
                run = torch.compile(sharded, backend="wush", fullgraph=True, dynamic=False)
                _close(run(ids).logits, ref, f"compiled {fmt} {(b, s)}")
    if compiled:
        from torch._dynamo.utils import counters

        assert counters["wush"]["rewritten"] == 14 * len(shapes), dict(counters["wush"])


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_tiny_llama_tp2_eager_matches_single_process(fmt):
    _spawn(_model_worker, fmt, False)


def test_tiny_llama_tp2_compiled_wush_fullgraph_matches_single_process():
    _spawn(_model_worker, "mxfp4", True)
