"""Time the cubin path against torch on the GPU at hand: ``python -m wush_compile.cuda.bench [--json FILE]``.

It times the CUDA transform+quantize kernel against the Triton one, and on Blackwell the FP4 linear (fused
quantize + block-scaled GEMM) against bf16 ``F.linear``. The quantize kernels are checked against the torch twin
on the same inputs. Prints where it ran and a table of
median microseconds and ratios.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F


logger = logging.getLogger(__name__)

#: (name, N, K): Llama-3.1-8B projections (KERNELS.md) and SmolLM2-135M's.
LAYERS = (
    ("llama8b.qkv", 6144, 4096),
    ("llama8b.o", 4096, 4096),
    ("llama8b.gate_up", 28672, 4096),
    ("llama8b.down", 4096, 14336),
    ("smollm2.gate_up", 3072, 576),
    ("smollm2.down", 576, 1536),
)
MS = (1, 16, 2048, 8192)


@dataclasses.dataclass
class Row:
    layer: str
    m: int
    n: int
    k: int
    impl: str
    us: float
    tflops: float
    graph_us: Optional[float] = None


def _bench(fn: Callable[[], object], graph: bool) -> tuple[float, Optional[float]]:
    import triton.testing as tt

    us = tt.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
    gus = None
    if graph:  # replayed from a CUDA graph: the GPU time without Python launch overhead
        gus = tt.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3
    return us, gus


def bench_quantize(ms=(16, 4096), k=4096) -> list[dict]:
    """CUDA transform+quantize (swizzled scales) vs the Triton kernel (row-major scales), bf16 activations."""
    from . import ops
    from ..ops import reference

    out = []
    dev = torch.device("cuda")
    try:
        from ..ops import kernels as tk
    except Exception as exc:  # the Triton launchers are optional here
        logger.info("Triton kernels not importable (%s): timing the CUDA kernel alone", exc)
        tk = None
    for fmt, g in (("mxfp4", 32), ("nvfp4", 16)):
        t = torch.randn(k // g, g, g, device=dev).to(torch.bfloat16)
        gs = torch.tensor(0.01, device=dev)
        for m in ms:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            codes, scales = ops.cutlass_transform_quantize(x, t, gs, fmt, False)
            rc, rs = reference.transform_quantize_ref(x.cpu(), t.cpu(), gs.cpu(), fmt)
            match = (codes.cpu() == rc).float().mean().item(), (scales.cpu() == rs).float().mean().item()
            moved = m * k * 2 + m * k // 2 + m * k // g  # bytes read + written
            impls = [("cuda_tq", lambda: ops.cutlass_transform_quantize(x, t, gs, fmt, True))]
            if tk is not None:
                impls.append(("triton_tq", lambda: tk.transform_quantize(x, t, gs, fmt)))
            for impl, fn in impls:
                us, gus = _bench(fn, graph=True)
                out.append({"fmt": fmt, "m": m, "k": k, "impl": impl, "us": us, "graph_us": gus,
                            "graph_gb_s": moved / gus * 1e-3, "codes_match": match[0], "scales_match": match[1]})
    return out


def bench_fp4(layers=LAYERS[:4], ms=MS) -> list[Row]:
    """Blackwell only: the FP4 linear (fused quantize + block-scaled GEMM) vs bf16 F.linear."""
    from . import ops
    from .. import formats

    rows = []
    dev = torch.device("cuda")
    for name, n, k in layers:
        w = torch.randn(n, k, device=dev)
        for fmt, g in (("mxfp4", 32), ("nvfp4", 16)):
            wc, ws, wg = formats.quantize(w, fmt)
            t = torch.eye(g, device=dev).expand(k // g, g, g).to(torch.bfloat16).contiguous()
            ag = torch.tensor(formats.MXFP4_GLOBAL_SCALE if fmt == "mxfp4" else 0.01, device=dev)
            wb = w.to(torch.bfloat16)
            for m in ms:
                x = torch.randn(m, k, device=dev).to(torch.bfloat16)
                fn = lambda: ops.linear(x, wc, ws, t, wg, ag, None, fmt)  # noqa: E731
                us, gus = _bench(fn, graph=m <= 16)
                rows.append(Row(name, m, n, k, f"cutlass_{fmt}_linear", us, 2.0 * m * n * k / us * 1e-6, gus))
                if fmt == "mxfp4":
                    us, gus = _bench(lambda: F.linear(x, wb), graph=m <= 16)
                    rows.append(Row(name, m, n, k, "bf16_linear", us, 2.0 * m * n * k / us * 1e-6, gus))
    return rows


def table(rows: list[Row]) -> str:
    """A markdown table of :func:`bench_fp4` rows."""
    lines = ["| layer | M | impl | us | graph us | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        g = f"{r.graph_us:.1f}" if r.graph_us is not None else ""
        lines.append(f"| {r.layer} {r.n}x{r.k} | {r.m} | {r.impl} | {r.us:.1f} | {g} | {r.tflops:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m wush_compile.cuda.bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write all measurements here")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        sys.stderr.write("no CUDA device\n")
        return 1
    from . import available
    from ..bench.common import environment

    env = environment()
    result: dict = {"environment": env}
    sys.stdout.write(json.dumps(env) + "\n")
    if available()[0]:
        rows = bench_fp4(layers=LAYERS[:2] if args.quick else LAYERS[:4])
        result["fp4_linear"] = [dataclasses.asdict(r) for r in rows]
        sys.stdout.write(table(rows) + "\n")
    result["quantize"] = bench_quantize()
    for q in result["quantize"]:
        sys.stdout.write(json.dumps(q) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
