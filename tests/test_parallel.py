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


def _layer_worker(rank, mesh):
    from wush_compile import parallel

    torch.manual_seed(0)
    x = torch.randn(3, 5, 128)
    for fmt in ("mxfp4", "nvfp4"):
        lin = torch.nn.Linear(128, 96, bias=True)
        whole = wush_linear_from(lin, fmt, "hadamard")
        ref = whole(x)
        # row-parallel on the whole x (takes its slice), bias added once after the reduce
        row = parallel.parallelize(copy.deepcopy(whole), mesh,
                                   {"": parallel.WushRowwiseParallel(input_is_sharded=False)})
        assert row.bias is None and torch.equal(row.tp_bias, whole.bias)
        _close(row(x), ref, f"row-parallel {fmt}", rel=1e-5)
        col = parallel.parallelize(copy.deepcopy(whole), mesh,
                                   {"": parallel.WushColwiseParallel(gather_output=True)})
        assert col.bias.shape == (48,)
        _close(col(x), ref, f"column-parallel {fmt}", rel=1e-6)
    # K / tp not a multiple of G: K=96, tp=2 -> 48 columns per rank, not whole MXFP4 blocks of 32
    bad = wush_linear_from(torch.nn.Linear(96, 32), "mxfp4", "hadamard")
    with pytest.raises(parallel.ShardError, match=r"K=96 over tp=2.*G=32"):
        parallel.parallelize(bad, mesh, {"": parallel.WushRowwiseParallel()})
    with pytest.raises(parallel.ShardError, match="num_key_value_heads=1 is not a multiple of tp=2"):
        m = tiny_llama()
        m.config.num_key_value_heads = 1
        parallel.parallelize(m, mesh)


def test_layer_row_and_column_parallel_with_bias_and_k_not_whole_blocks_error():
    _spawn(_layer_worker)


def _load_worker(rank, mesh, path):
    from wush_compile import parallel

    reads = {}
    read = parallel._read

    def spy(f, name, dim, start, stop):
        out = read(f, name, dim, start, stop)
        reads[name] = tuple(out.shape)
        return out

    parallel._read = spy
    full = calibrate_llama(tiny_llama(), "nvfp4", "wush")
    model = parallel.load_sharded(path, mesh)
    assert _check_shards(rank, full, model) == 14
    # each rank read only its slice of every sharded tensor
    for name, mod in full.named_modules():
        if isinstance(mod, WushLinear):
            whole, got = tuple(mod.weight_codes.shape), reads[f"{name}.weight_codes"]
            assert got[0] * got[1] * WORLD == whole[0] * whole[1], (name, got, whole)
    ids = _ids(2, 9)
    with torch.no_grad():
        _close(model(ids).logits, full(ids).logits, "checkpoint-to-shards eager")


def test_checkpoint_loads_straight_into_shards(tmp_path):
    from wush_compile import hf

    full = calibrate_llama(tiny_llama(), "nvfp4", "wush")
    hf.attach(full)  # layers assembled by hand: mark the model so save_pretrained writes a wush checkpoint
    full.save_pretrained(tmp_path)
    _spawn(_load_worker, str(tmp_path))
