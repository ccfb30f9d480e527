"""Where the time of a compiled step goes: kernels by category, GPU busy time, and the idle gaps between them.

``profile_steps(fn, steps, device)`` runs ``fn`` (which does ``steps`` steps, e.g. a decode loop) once under
``torch.profiler``, after one unprofiled call, and returns per-step figures:

    wall_ms        wall-clock time per step (synchronized at the end)
    busy_ms        time the GPU ran at least one kernel (union of kernel intervals); on a CPU-only machine the
                   summed self time of the operators instead
    idle_ms        wall - busy: launch gaps, host work, synchronization
    categories     busy time split by what ran (``CATEGORIES``), and ``outside_gemm_ms``, everything but GEMMs
    top            the heaviest kernels (name, ms per step, calls per step)

CUDA-graph replays are profiled kernel by kernel (CUPTI reports the kernels of a replayed graph).
"""

from __future__ import annotations

import re
import time
from typing import Callable

import torch

#: (category, regular expression over a kernel or operator name), first match wins. The wush kernels come first:
#: their cubins and Triton kernels are named after what they do.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("wush act transform+quantize", r"transform_quantize|quantize_act|wush_tq|wush_dec_act|wush::transform"),
    ("wush fp4 GEMM", r"fp4_linear|fp4_gemv|wush_dec|wush_gemm|wush::(fused_linear|linear|fp4_gemm)"),
    ("wush fp4->fp8 expand", r"expand_fp8|dequant|wush::dequantize"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product"),
    ("GEMM (cuBLAS / CUTLASS)", r"gemm|gemv|nvjet|xmma|cutlass|cublas|^sm\d+_|aten::(mm|addmm|bmm|_scaled_mm|matmul)$"),
    ("Inductor fused (norm, rope, residual, ...)", r"^triton_|^Torch-Compiled|aten::(add|mul|rsqrt|pow|mean|cat)"),
    ("copy / memset", r"[Mm]emcpy|[Mm]emset|copy_|aten::(copy_|clone|index_copy_|index_put_)"),
)
GEMM_CATEGORIES = ("wush fp4 GEMM", "GEMM (cuBLAS / CUTLASS)")
OTHER = "other"


def categorize(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return OTHER


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(kernels: list[tuple[str, float, float]], steps: int, wall_s: float, busy_us: float | None = None,
              top: int = 12) -> dict:
    """Per-step summary of ``kernels`` = [(name, start_us, duration_us)] recorded over ``steps`` steps."""
    if steps < 1:
        raise ValueError(f"profile: steps must be >= 1, got {steps}")
    cats: dict[str, float] = {}
    per_name: dict[str, list[float]] = {}
    for name, _, dur in kernels:
        cat = categorize(name)
        cats[cat] = cats.get(cat, 0.0) + dur
        per_name.setdefault(name, [0.0, 0])
        per_name[name][0] += dur
        per_name[name][1] += 1
    if busy_us is None:
        busy_us = _union_us([(s, s + d) for _, s, d in kernels])
    wall_ms = wall_s * 1e3 / steps
    busy_ms = busy_us / 1e3 / steps
    ms = {c: v / 1e3 / steps for c, v in sorted(cats.items(), key=lambda kv: -kv[1])}
    heavy = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "steps": steps,
        "wall_ms": wall_ms,
        "busy_ms": busy_ms,
        "idle_ms": max(0.0, wall_ms - busy_ms),
        "categories_ms": ms,
        "gemm_ms": sum(v for c, v in ms.items() if c in GEMM_CATEGORIES),
        "outside_gemm_ms": sum(v for c, v in ms.items() if c not in GEMM_CATEGORIES),
        "kernels_per_step": len(kernels) / steps,
        "top": [{"name": n[:120], "ms": v[0] / 1e3 / steps, "calls": v[1] / steps} for n, v in heavy],
    }


def profile_steps(fn: Callable[[], object], steps: int, device: torch.device,
                  setup: Callable[[], object] | None = None) -> dict:
    """Profile one call of ``fn`` (``steps`` steps; one unprofiled call first) and summarize per step.
    ``setup`` (e.g. resetting a KV cache) runs before each call, outside the profiled region."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    setup = setup or (lambda: None)
    setup()
    fn()
    setup()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    kernels: list[tuple[str, float, float]] = []
    busy = None
    if cuda:
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                kernels.append((e.name, float(e.time_range.start), float(e.time_range.elapsed_us())))
    if not kernels:  # CPU only (or no kernel records): operators' self time; busy is their sum
        for e in prof.events():
            if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0 and "::" in e.name:
                kernels.append((e.name, float(e.time_range.start), float(e.self_cpu_time_total)))
        busy = sum(d for _, _, d in kernels)
    out = summarize(kernels, steps, wall, busy_us=busy)
    out["source"] = "CUDA kernels" if cuda and busy is None else "CPU operators (self time)"
    return out


def format_profile(label: str, p: dict) -> str:
    lines = [f"{label}: wall {p['wall_ms']:.3f} ms/step, busy {p['busy_ms']:.3f}, idle {p['idle_ms']:.3f}, "
             f"GEMMs {p['gemm_ms']:.3f}, outside GEMMs {p['outside_gemm_ms']:.3f} ({p['kernels_per_step']:.0f} "
             f"kernels/step, {p['source']})"]
    for cat, ms in p["categories_ms"].items():
        lines.append(f"    {ms:8.3f} ms  {cat}")
    lines.append("  heaviest:")
    for k in p["top"][:8]:
        lines.append(f"    {k['ms']:8.3f} ms  x{k['calls']:.0f}  {k['name'][:90]}")
    return "\n".join(lines)
