"""Per-call overhead of the wush runtime ops at decode sizes (default M=1, K=N=576: a SmolLM2 projection).

What one call of a calibrated linear costs on the host, split into its parts:
    dispatch            dispatch.choose_kernel (the compile-time policy) and runtime_choice ("auto" per call)
    checks              library.check_linear_args (what every op and fake validates)
    math                the torch twin (reference.linear_ref) called directly; on CUDA the Triton launcher
    op call             torch.ops.wush.linear / fused_linear through the torch dispatcher
    compiled module     a WushLinear under torch.compile(backend="wush") (Inductor wrapper + extern call)
    cuda graph replay   (CUDA) the same op captured in a CUDA graph: per-call time with no Python per call

    PYTHONPATH=. python benchmarks/bench_overhead.py                 # CPU
    PYTHONPATH=. python benchmarks/bench_overhead.py --device cuda   # GPU (adds kernels and CUDA graphs)

Prints the environment header and a table (median over repeats of the mean per call); --json writes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wush_compile  # noqa: E402
from wush_compile import formats, transforms  # noqa: E402
from wush_compile.config import Format, KernelChoice  # noqa: E402
from wush_compile.modules import WushLinear  # noqa: E402
from wush_compile.ops import dispatch, library, reference  # noqa: E402

logger = logging.getLogger("bench_overhead")


def make_layer(n: int, k: int, fmt: Format, device: str, dtype: torch.dtype) -> WushLinear:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    t = transforms.round_transform(transforms.block_transforms("hadamard", w, None, fmt.group_size), dtype)
    wt = transforms.transform_weight(w, t).float()
    codes, scales, g = formats.quantize(wt, fmt, None if fmt is Format.MXFP4 else formats.nvfp4_global_scale(wt))
    m = WushLinear(k, n, fmt=fmt, dtype=dtype)
    with torch.no_grad():
        m.weight_codes.copy_(codes)
        m.weight_scales.copy_(scales)
        m.transform.copy_(t)
        m.weight_global_scale.copy_(g.reshape(()))
        m.act_global_scale.fill_(formats.MXFP4_GLOBAL_SCALE if fmt is Format.MXFP4 else 16.0 / 2688)
    return m.to(device).eval()


def per_call_us(fn, iters: int, repeats: int, sync=None) -> float:
    """Median over ``repeats`` of the mean wall time per call over ``iters`` calls, in microseconds."""
    for _ in range(max(3, iters // 10)):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(samples)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--n", type=int, default=576)
    p.add_argument("--fmt", default="mxfp4", choices=[f.value for f in Format])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="activation/transform dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    device, fmt = args.device, Format.parse(args.fmt)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    layer = make_layer(args.n, args.k, fmt, device, dtype)
    x = torch.randn(args.m, args.k, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    bufs = (layer.weight_codes, layer.weight_scales, layer.transform, layer.weight_global_scale,
            layer.act_global_scale, None, fmt.value)
    sync = torch.cuda.synchronize if device == "cuda" else None
    dev = torch.device(device)
    rows: list[tuple[str, float]] = []

    from wush_compile.bench.common import environment, header

    env = environment()
    env["cpu"] = platform.processor() or platform.machine()
    env["cpu_count"] = os.cpu_count()
    env["torch_threads"] = torch.get_num_threads()
    env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(header(env))
    print(f"wush op overhead: M={args.m} K={args.k} N={args.n} {fmt.value} {dtype} on {device}; "
          f"median of {args.repeats} x mean per call", flush=True)
    width = 66

    def add(name, fn, sync_=sync, iters=args.iters):
        try:
            us = per_call_us(fn, iters, args.repeats, sync_)
        except Exception as exc:  # one failing row must not hide the others
            print(f"  {name.ljust(width)}  FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            return
        rows.append((name, us))
        print(f"  {name.ljust(width)}  {us:10.2f} us", flush=True)

    torch.set_grad_enabled(False)
    add("dispatch.choose_kernel (compile-time policy)",
        lambda: dispatch.choose_kernel(args.m, args.n, args.k, fmt, dev, count=False), None)
    add("dispatch.runtime_choice('auto') (per call)",
        lambda: dispatch.runtime_choice("auto", args.m, args.n, args.k, fmt.value, dev), None)
    add("library.check_linear_args", lambda: library.check_linear_args(x, *bufs), None)
    add("reference.linear_ref (math, direct)", lambda: reference.linear_ref(x, *bufs))
    add("torch.ops.wush.linear (op call, reference)", lambda: torch.ops.wush.linear(x, *bufs))
    add("torch.ops.wush.fused_linear kernel=reference", lambda: torch.ops.wush.fused_linear(x, *bufs, "reference"))
    add("torch.ops.wush.fused_linear kernel=auto", lambda: torch.ops.wush.fused_linear(x, *bufs, "auto"))
    # The op's own cost (torch dispatcher + checks + dispatch + reshapes): the same call with the math stubbed
    # out (the twin replaced by a function returning a preallocated output) for the duration of one row.
    out_stub = torch.empty(args.m, args.n, dtype=dtype, device=device)
    real_ref = reference.linear_ref
    reference.linear_ref = lambda *a, **k: out_stub
    try:
        add("op machinery only: torch.ops.wush.fused_linear kernel=reference, math stubbed",
            lambda: torch.ops.wush.fused_linear(x, *bufs, "reference"))
        add("op machinery only: torch.ops.wush.linear, math stubbed", lambda: torch.ops.wush.linear(x, *bufs))
    finally:
        reference.linear_ref = real_ref
    # ... and on a layer whose math is small.
    g = fmt.group_size
    tiny = make_layer(g, 2 * g, fmt, device, dtype)
    xt = x[:, : 2 * g].contiguous()
    tbufs = (tiny.weight_codes, tiny.weight_scales, tiny.transform, tiny.weight_global_scale, tiny.act_global_scale,
             None, fmt.value)
    add(f"tiny layer K={2 * g} N={g}: reference.linear_ref (direct)", lambda: reference.linear_ref(xt, *tbufs))
    add(f"tiny layer K={2 * g} N={g}: torch.ops.wush.fused_linear kernel=auto",
        lambda: torch.ops.wush.fused_linear(xt, *tbufs, "auto"))
    if device == "cuda":
        from wush_compile.ops import kernels

        choice, _ = dispatch.choose_kernel(args.m, args.n, args.k, fmt, dev, count=False)
        if choice in dispatch.TRITON_CHOICES:
            add(f"kernels.linear {choice.value} (launcher, direct)", lambda: kernels.linear(x, *bufs, choice))
            add(f"torch.ops.wush.fused_linear kernel={choice.value}",
                lambda: torch.ops.wush.fused_linear(x, *bufs, choice.value))
            reps = 50
            try:
                graph = torch.cuda.CUDAGraph()
                torch.cuda.synchronize()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        torch.ops.wush.fused_linear(x, *bufs, choice.value)
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    for _ in range(reps):
                        torch.ops.wush.fused_linear(x, *bufs, choice.value)
            except Exception as exc:
                print(f"  CUDA graph capture FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            else:
                add(f"CUDA graph replay, {reps} fused_linear calls (per replay)", graph.replay,
                    iters=max(10, args.iters // reps))
                if rows and rows[-1][0].startswith("CUDA graph replay"):
                    per = rows[-1][1] / reps
                    rows.append((f"  -> per fused_linear call inside the CUDA graph", per))
                    print(f"  {rows[-1][0].ljust(width)}  {per:10.2f} us", flush=True)
    if not args.no_compile:
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="wush", fullgraph=True)
        add("compiled WushLinear, backend=wush (per call)", lambda: compiled(x), iters=max(100, args.iters // 4))
        if device == "cuda":
            torch._dynamo.reset()
            ro = torch.compile(layer, backend="wush", fullgraph=True, mode="reduce-overhead")
            add("compiled WushLinear, backend=wush mode=reduce-overhead", lambda: ro(x).clone(),
                iters=max(100, args.iters // 4))

    if args.json:
        args.json.write_text(json.dumps({"env": env, "m": args.m, "k": args.k, "n": args.n, "fmt": fmt.value,
                                         "device": device, "rows_us": dict(rows)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
