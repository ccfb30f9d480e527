"""Tensor-parallel benchmark: a wush (FP4) model vs the bf16 model under the same tp plan, in one run.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/bench_tp.py [--shape llama8b] [--layers N]
        [--fmt mxfp4] [--prompt-len 2048] [--new-tokens 256] [--batches 1,16] [--out DIR]

Both models are the same random Llama (``--shape llama8b``: the Llama-3.1-8B shape; ``tiny``: a smoke run on the
CPU with gloo), sharded by :func:`wush_compile.parallel.parallelize` (q/k/v and gate/up column-parallel, o and
down row-parallel; nn.Linear layers of the bf16 model get the same styles, so both do the same collectives). The
wush model is RTN-calibrated with random Hessians (speed only). Each is compiled (``fullgraph=True``; wush:
``backend="wush"``, bf16: Inductor), on CUDA with ``mode="reduce-overhead"`` (CUDA graphs), and timed: prefill
tokens/s (batch 1, ``--prompt-len`` tokens, median of 5) and greedy decode tokens/s per batch size over a static KV
cache. NVLink multicast (NVLS) is kept off (NCCL_NVLS_ENABLE=0 is forced). Rank 0 prints a table and writes
``tp.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before NCCL starts: keep NVLink multicast off

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from wush_compile import parallel  # noqa: E402
from wush_compile.bench import common, e2e  # noqa: E402
from wush_compile.config import Format, Method, TransformKind, WushConfig  # noqa: E402

logger = logging.getLogger("bench_tp")


class TPRunner(e2e.Runner):
    """The e2e runner with a KV cache of the local heads (num_key_value_heads / tp)."""

    def __init__(self, *args, tp: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.tp = tp

    def cache(self, batch: int, max_len: int):
        from transformers import StaticCache

        cfg = self.model.config
        cache = StaticCache(config=cfg, max_cache_len=max_len)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache.early_initialization(batch_size=batch, num_heads=cfg.num_key_value_heads // self.tp,
                                   head_dim=head_dim, dtype=self.model.dtype, device=self.device)
        return cache


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, backend: str, args, device, tp: int, label: str) -> dict:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mode = e2e.MODE if device.type == "cuda" else None
    runner = TPRunner(model, backend, mode, device, tp=tp)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)  # same ids on every rank
    long = torch.randint(0, vocab, (1, args.prompt_len), generator=gen).to(device)
    first = {b: torch.randint(0, vocab, (b, 1), generator=gen).to(device) for b in args.batches}
    pre_cache = runner.cache(1, args.prompt_len)
    caches = {b: runner.cache(b, args.new_tokens) for b in args.batches}
    pos = torch.arange(args.prompt_len, device=device)
    t0 = time.perf_counter()
    for _ in range(3):  # compile + CUDA-graph recording of every timed shape
        pre_cache.reset()
        runner.prefill(long, pre_cache, pos)
        for b in args.batches:
            caches[b].reset()
            runner.decode_loop(first[b], caches[b], 0, 2)
    res = {"label": label, "compile_s": time.perf_counter() - t0}
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    times = []
    for _ in range(5):
        pre_cache.reset()
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        runner.prefill(long, pre_cache, pos)
        _sync(device)
        times.append(time.perf_counter() - t0)
    res["prefill_tok_s"] = args.prompt_len / sorted(times)[len(times) // 2]
    for b in args.batches:
        caches[b].reset()
        dist.barrier()
        _, td = runner.decode_loop(first[b], caches[b], 0, args.new_tokens)
        res[f"decode_b{b}_tok_s"] = b * args.new_tokens / td
    res["recompiles_while_timing"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) - graphs
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama8b", choices=[*e2e.SHAPES, "tiny"])
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--fmt", default="mxfp4", choices=[f.value for f in Format])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    cuda = torch.cuda.is_available()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    dtype = torch.bfloat16
    results = []
    try:
        for label in ("bf16", "wush"):
            torch.manual_seed(0)  # the same random model on every rank (each keeps its shards)
            model = e2e._random_llama(device, dtype, args.layers, args.shape)
            if label == "wush":
                cfg = WushConfig(format=args.fmt, method=Method.RTN, transform=TransformKind.WUSH)
                e2e.calibrate_random(model, cfg, seed=0)
            parallel.parallelize(model, mesh)
            results.append(measure(model, "wush" if label == "wush" else "inductor", args, device, world, label))
            del model
            torch._dynamo.reset()
            if cuda:
                torch.cuda.empty_cache()
    finally:
        dist.barrier()
    if rank == 0:
        env = common.environment()
        keys = ["prefill_tok_s"] + [f"decode_b{b}_tok_s" for b in args.batches]
        lines = [f"tp={world} {args.shape} layers={args.layers or 'all'} {args.fmt} prompt={args.prompt_len} "
                 f"new={args.new_tokens} device={device.type}", "| model | " + " | ".join(keys) + " |",
                 "|---" * (len(keys) + 1) + "|"]
        for r in results:
            lines.append(f"| {r['label']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
        lines.append("| wush / bf16 | " + " | ".join(f"{results[1][k] / results[0][k]:.2f}x" for k in keys) + " |")
        print("\n".join(lines))  # noqa: T201  (benchmark script output)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            common.save_json(args.out / "tp.json", {"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                                                     "world": world, "results": results})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
