"""GPU probe: decode under CUDA graphs with backend="wush" (transformers' CompileConfig route, static cache).

Reports decode time per token in default mode and in mode="reduce-overhead", and how many wush ops run in
Python per generate call after warm-up (0 expected for the decode steps under CUDA graphs).

``--device-keyed-scratch`` replaces the Triton launchers' lazily allocated split-K counters
(``kernels._locks``, one buffer per device and stream, allocated on first use) by one buffer allocated here,
before compiling. Inductor's CUDA-graph trees warm a graph up with allocations routed to their memory pool, so a
buffer first allocated there and kept in a module-level cache trips "tensor in the cudagraph pool not tracked as
outputs"; this flag showed the runtime works once that allocation happens outside the pool (H100, 2026-11-23).
Since commit 00766db the counters are per device and the backend allocates them at compile time
(``kernels.prepare``), so the flag should make no difference.

    PYTHONPATH=. python tests/runtime/gpu_reduce_overhead_probe.py [--device-keyed-scratch]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.runtime._models import calibrate_llama, count_wush_linears, tiny_llama  # noqa: E402
from wush_compile.ops import kernels, reference  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-keyed-scratch", action="store_true")
    p.add_argument("--new", type=int, default=32)
    args = p.parse_args(argv)
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    if args.device_keyed_scratch:
        locks = torch.zeros(kernels._MAX_LOCKS, dtype=torch.int32, device="cuda")
        kernels._locks = lambda device, n: locks
    calls = {"kernel": 0, "reference": 0}
    real_linear, real_ref = kernels.linear, reference.linear_ref

    def linear(*a, **k):
        calls["kernel"] += 1
        return real_linear(*a, **k)

    def linear_ref(*a, **k):
        calls["reference"] += 1
        return real_ref(*a, **k)

    kernels.linear, reference.linear_ref = linear, linear_ref
    model = calibrate_llama(tiny_llama(seed=4, vocab=256), "mxfp4", "hadamard").cuda()
    n = count_wush_linears(model)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0)).cuda()
    kw = dict(max_new_tokens=args.new, do_sample=False, cache_implementation="static", pad_token_id=0)
    results = {}
    with torch.no_grad():
        eager = model.generate(ids, disable_compile=True, **kw)
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            model._compiled_call = None  # transformers caches the compiled call on the model
            cfg = CompileConfig(backend="wush", mode=mode, fullgraph=True)
            try:
                for _ in range(2):
                    model.generate(ids, compile_config=cfg, **kw)
                for k in calls:
                    calls[k] = 0
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model.generate(ids, compile_config=cfg, **kw)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            except Exception as exc:  # report and go on to the next mode
                print(f"{mode}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            same = (out == eager).float().mean().item()
            results[mode] = dt
            print(f"{mode}: generate {args.new} tokens {dt * 1e3:.1f} ms ({dt / args.new * 1e3:.2f} ms/token incl. "
                  f"eager prefill); python calls after warm-up: kernel {calls['kernel']}, reference "
                  f"{calls['reference']} (eager prefill = {n} reference); tokens equal to eager {same:.0%}; "
                  f"wush graphs {counters['wush']['graphs']}")
    print(f"scratch: {'device-keyed, allocated before compile' if args.device_keyed_scratch else 'as shipped'}")
    return 0 if len(results) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
