"""Per-layer benchmark: the full WUSH linear (transform + quantize + GEMM) on Llama projection shapes against
bf16 ``F.linear`` and fp8 row-wise ``torch._scaled_mm`` in the same run.

Every route is checked against the reference (dequantized operands, fp64 matmul) on the benchmark's own
inputs before it is timed. Operands are rotated so that a timed loop's working set exceeds L2; small M
is timed through CUDA graphs. Results: a printed table, JSON and a PNG of speed-up vs M.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import formats, settings
from ..config import Format, KernelChoice
from ..ops import dispatch, kernels, reference
from ..ops.operands import LinearOperands
from . import common

logger = logging.getLogger(__name__)

#: (N, K) of the projections: Llama-3.1-8B and one Llama-3.1-70B layer.
LAYERS = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "70b_down": (8192, 28672),
}
MS = (1, 16, 128, 2048, 8192)
FORMATS = ("mxfp4", "nvfp4")
#: Tokens whose outputs are checked against the fp64 reference before timing.
CHECK_ROWS = 64
#: Largest relative (Frobenius) error of a route's bf16 output against the fp64 reference.
CHECK_RTOL = 1e-2
#: Decode routes are timed up to this M; the prefill routes from PREFILL_BENCH_MIN_M on.
DECODE_BENCH_MAX_M = 128
PREFILL_BENCH_MIN_M = 16
#: Also time the one-launch decode kernel with the fused prologue (slower than two launches, see NOTES).
FUSED_DECODE_BENCH = True
#: Realistic NVFP4 activation global scale headroom (as calibration's static scale).
NV_ACT_HEADROOM = 2.0


@dataclasses.dataclass
class Layer:
    w_codes: torch.Tensor
    w_scales: torch.Tensor
    transform: torch.Tensor
    w_gs: torch.Tensor
    a_gs: torch.Tensor


def make_layer(n: int, k: int, fmt: Format, device, gen: torch.Generator) -> Layer:
    """Random transformed weights quantized by the reference quantizer, a random orthogonal bf16 transform."""
    g = fmt.group_size
    w = torch.randn(n, k, device=device, generator=gen) * 0.02  # (N, K)
    codes, scales, w_gs = formats.quantize(w, fmt)
    del w
    q, _ = torch.linalg.qr(torch.randn(k // g, g, g, device=device, generator=gen))  # (K/G, G, G)
    t = q.to(torch.bfloat16)
    if fmt is Format.MXFP4:
        a_gs = torch.tensor(formats.MXFP4_GLOBAL_SCALE, dtype=torch.float32, device=device)
    else:
        x = torch.randn(256, k, device=device, generator=gen)
        from ..transforms import transform_activations

        a_gs = formats.nvfp4_global_scale(transform_activations(x, t)) * NV_ACT_HEADROOM
    return Layer(codes, scales, t, w_gs.to(torch.float32).reshape(()), a_gs.to(torch.float32).reshape(()))


def _ref_rows(x: torch.Tensor, L: Layer, fmt: Format, rows: int) -> torch.Tensor:
    xr = x[:rows]
    ac, asc = reference.transform_quantize_ref(xr, L.transform, L.a_gs, fmt.value)
    one = torch.ones((), device=x.device)
    a = formats.dequantize(ac, asc, one, fmt).double()
    w = formats.dequantize(L.w_codes, L.w_scales, one, fmt).double()
    return (a @ w.t()) * (L.a_gs.double() * L.w_gs.double())


def routes_for(m: int, fmt: Format) -> dict:
    """Route name -> callable(x, layer) for this M and format."""
    out = {}
    if m <= DECODE_BENCH_MAX_M:
        out["decode"] = lambda x, L: kernels.linear(
            x, L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt.value, KernelChoice.TRITON_DECODE)
        if settings.cuda_decode() and dispatch.supports(KernelChoice.CUDA_DECODE, fmt, "cuda", m=m)[0]:
            # the Hopper CUDA decode kernels (opt-in, WUSH_CUDA_DECODE=1), through the router's cuda_decode route
            out["cuda_decode"] = lambda x, L: dispatch.run_linear(KernelChoice.CUDA_DECODE, x, LinearOperands(
                L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt))
        if fmt is Format.MXFP4 and m == 1 and FUSED_DECODE_BENCH:
            out["decode_fused"] = lambda x, L: kernels.decode_linear(
                x, L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt, x.dtype,
                kernels.linear_tiles(x.shape[0], L.w_codes.shape[0], x.shape[1], fmt,
                                     kernels.sm_count(x.device), fused_act=True))
    if m >= PREFILL_BENCH_MIN_M:
        if fmt is Format.MXFP4:
            out["fp8"] = lambda x, L: kernels.linear(
                x, L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt.value, KernelChoice.TRITON_FP8)
        out["bf16"] = lambda x, L: kernels.linear(
            x, L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt.value, KernelChoice.CUBLAS_BF16)
    return out


def _min_bytes(m, n, k, fmt: Format | None) -> float:
    """Fewest bytes a linear must move: bf16 x in and y out, weights in their storage format."""
    w_bytes = n * k * (2 if fmt is None else 0.5 + 1 / fmt.group_size)
    return 2 * m * k + 2 * m * n + w_bytes


def run(layers=None, ms=MS, fmts=FORMATS, out_dir: Path | None = None, seed: int = 0, do_sweep: bool = False) -> dict:
    """Run the benchmark; returns {env, ceilings, rows, quant}; writes JSON + PNG into out_dir."""
    if not torch.cuda.is_available():
        raise RuntimeError("wush bench --layers needs a CUDA GPU (none is visible)")
    dev = torch.device("cuda")
    env = common.environment()
    print(common.header(env), flush=True)
    gen = torch.Generator(device=dev).manual_seed(seed)
    ceil = _ceilings()
    print(f"ceilings: copy {ceil['copy_gbs']:.0f} GB/s, bf16 8192^3 {ceil['bf16_tflops']:.0f} TFLOP/s, "
          f"fp8 row-wise 8192^3 {ceil['fp8_tflops']:.0f} TFLOP/s", flush=True)
    rows = []
    quant = []
    sweep = sweep_decode() if do_sweep else []
    names = layers or list(LAYERS)
    for name in names:
        n, k = LAYERS[name]
        w_bf16 = [torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02
                  for _ in range(common.rotations(2 * n * k, cap=4))]
        w_fp8 = [w.to(torch.float8_e4m3fn) for w in w_bf16[: common.rotations(n * k, cap=4)]]
        sb = torch.rand(1, n, device=dev, generator=gen) + 0.5
        for fmt_name in fmts:
            fmt = Format.parse(fmt_name)
            nrot = common.rotations(int(n * k * (0.5 + 1 / fmt.group_size)), cap=8)
            Ls = [make_layer(n, k, fmt, dev, gen) for _ in range(nrot)]
            for m in ms:
                xs = [torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16)
                      for _ in range(max(len(Ls), common.rotations(2 * m * k, cap=8)))]
                graph = True  # every timing through CUDA graphs (GPU time); eager times too for M > 16
                flops = 2.0 * m * n * k
                # baselines (timed once per format row set; cheap enough to repeat)
                nb = max(len(w_bf16), 1)
                t_bf16 = common.bench_us([(lambda i=i: F.linear(xs[i % len(xs)], w_bf16[i % nb]))
                                          for i in range(max(nb, 2))], graph)
                t_bf16_eager = common.bench_us([(lambda i=i: F.linear(xs[i % len(xs)], w_bf16[i % nb]))
                                                for i in range(max(nb, 2))], False) if m > 16 else None
                x8 = [x.to(torch.float8_e4m3fn) for x in xs[:2]]
                sa = torch.rand(m, 1, device=dev, generator=gen) + 0.5
                t_fp8 = common.bench_us([(lambda i=i: torch._scaled_mm(
                    x8[i % 2], w_fp8[i % len(w_fp8)].t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                    use_fast_accum=False)) for i in range(max(len(w_fp8), 2))], graph)
                best = None
                for route, fn in routes_for(m, fmt).items():
                    try:
                        ref = _ref_rows(xs[0], Ls[0], fmt, min(m, CHECK_ROWS))
                        y = fn(xs[0], Ls[0])
                        torch.cuda.synchronize()
                        err = float((y[: ref.shape[0]].double() - ref).norm() / ref.norm().clamp_min(1e-30))
                        del y, ref
                        if not (math.isfinite(err) and err < CHECK_RTOL):
                            print(f"FAILED CHECK {name} {fmt_name} M={m} {route}: rel err {err:.3e}", flush=True)
                            rows.append(dict(layer=name, n=n, k=k, m=m, fmt=fmt_name, route=route, us=None, err=err))
                            continue
                        us = common.bench_us([(lambda i=i: fn(xs[i % len(xs)], Ls[i % len(Ls)]))
                                              for i in range(max(len(Ls), len(xs)))], graph)
                    except Exception as e:  # keep the run going; the failure is in the log and the JSON
                        print(f"ERROR {name} {fmt_name} M={m} {route}: {type(e).__name__}: {e}", flush=True)
                        rows.append(dict(layer=name, n=n, k=k, m=m, fmt=fmt_name, route=route, us=None, err=str(e)))
                        torch.cuda.synchronize()
                        continue
                    us_eager = common.bench_us([(lambda i=i: fn(xs[i % len(xs)], Ls[i % len(Ls)]))
                                                for i in range(max(len(Ls), len(xs)))], False) if m > 16 else None
                    byts = _min_bytes(m, n, k, fmt)
                    limit_us = max(byts / ceil["copy_gbs"] / 1e3, flops / ceil["fp8_tflops"] / 1e6)
                    r = dict(layer=name, n=n, k=k, m=m, fmt=fmt_name, route=route, us=us, err=err,
                             tflops=flops / us / 1e6, gbs=byts / us / 1e3, bf16_us=t_bf16, fp8_us=t_fp8,
                             x_bf16=t_bf16 / us, x_fp8=t_fp8 / us, pct_limit=100 * limit_us / us,
                             us_eager=us_eager, bf16_us_eager=t_bf16_eager,
                             x_bf16_eager=(t_bf16_eager / us_eager) if us_eager else None)
                    rows.append(r)
                    if best is None or us < best["us"]:
                        best = r
                    print(f"{name:>8} {fmt_name} M={m:>5} {route:>12}: {us:9.1f} us  {r['tflops']:7.1f} TFLOP/s "
                          f"{r['gbs']:7.0f} GB/s  x bf16 {r['x_bf16']:5.2f}  x fp8 {r['x_fp8']:5.2f}  "
                          f"{r['pct_limit']:5.1f}% of limit  (bf16 {t_bf16:.1f} us, fp8 {t_fp8:.1f} us, err {err:.1e})"
                          + (f"  eager {us_eager:.1f} us vs bf16 {t_bf16_eager:.1f} us" if us_eager else ""),
                          flush=True)
                if best is not None:
                    best = dict(best, route_best=best["route"], route="best")
                    rows.append(best)
                del xs
            if k in (4096, 14336) and 8192 in ms and name in ("qkv", "down"):
                quant.extend(_bench_quant(k, fmt, Ls[0], ceil, gen))
            del Ls
            if out_dir is not None:  # partial results survive a time limit
                out_dir.mkdir(parents=True, exist_ok=True)
                common.save_json(out_dir / "bench_layers.json",
                                 {"env": env, "ceilings": ceil, "rows": rows, "quant": quant, "sweep": sweep})
    result = {"env": env, "ceilings": ceil, "rows": rows, "quant": quant, "sweep": sweep}
    print(format_table(result), flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        common.save_json(out_dir / "bench_layers.json", result)
        best_rows = [r for r in rows if r.get("route") == "best"]
        common.plot_speedups(best_rows, out_dir / "bench_layers.png", common.header(env))
    return result


#: Decode tile candidates swept at the start of a run: (block_n, block_k, programs per SM, warps).
SWEEP = ((64, 256, 4, 4), (64, 128, 4, 4), (64, 256, 8, 4), (64, 128, 8, 4), (128, 128, 8, 8))


def sweep_decode(names=("qkv", "o", "gate_up", "down"), ms=(1, 16), seed: int = 1) -> list[dict]:
    """Time the decode GEMM over SWEEP's tile candidates (input to linear_tiles' defaults)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for name in names:
        n, k = LAYERS[name]
        for fmt_name in FORMATS:
            fmt = Format.parse(fmt_name)
            nrot = common.rotations(int(n * k * 0.56), cap=8)
            Ls = [make_layer(n, k, fmt, dev, gen) for _ in range(nrot)]
            for m in ms:
                xs = [torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(nrot)]
                res = []
                for bn, bk, pps, nw in SWEEP:
                    cfg = kernels.linear_tiles(m, n, k, fmt, kernels.sm_count(dev), block_n=bn, block_k=bk,
                                               programs_per_sm=pps, num_warps=nw)
                    fns = [(lambda i=i: kernels.decode_linear(xs[i], Ls[i].w_codes, Ls[i].w_scales, Ls[i].transform,
                                                              Ls[i].w_gs, Ls[i].a_gs, None, fmt, torch.bfloat16, cfg))
                           for i in range(nrot)]
                    us = common.bench_us(fns, graph=True)
                    res.append(us)
                    out.append(dict(layer=name, fmt=fmt_name, m=m, block_n=bn, block_k=bk, programs_per_sm=pps,
                                    num_warps=nw, split_k=cfg.split_k, us=us))
                # where the time goes: the activation quantize launch alone, the GEMM alone
                cfg = kernels.linear_tiles(m, n, k, fmt, kernels.sm_count(dev))
                t_q = common.bench_us([(lambda i=i: kernels.quantize_act_f16(xs[i], Ls[i].transform, Ls[i].a_gs,
                                                                             fmt_name, cfg.block_k)) for i in range(nrot)],
                                      graph=True)
                pre = [kernels.quantize_act_f16(xs[i], Ls[i].transform, Ls[i].a_gs, fmt_name, cfg.block_k)
                       for i in range(nrot)]
                t_g = common.bench_us([(lambda i=i: kernels.decode_gemm(pre[i], Ls[i].w_codes, Ls[i].w_scales,
                                                                      Ls[i].w_gs, Ls[i].a_gs, fmt, cfg))
                                       for i in range(nrot)], graph=True)
                t_e = common.bench_us([(lambda: torch.empty(1, device=dev))], graph=True)
                print(f"sweep {name:>8} {fmt_name} M={m:>2}: " + "  ".join(
                    f"{c[0]}/{c[1]}/{c[2]}/{c[3]}={u:.1f}" for c, u in zip(SWEEP, res))
                    + f" | default: quantize {t_q:.1f} us, gemm {t_g:.1f} us, empty graph {t_e:.1f} us", flush=True)
            del Ls
    return out


def _ceilings() -> dict:
    copy = common.copy_bandwidth_gbs()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    us = common.bench_us([lambda: a @ b.t()], graph=False)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    s1 = torch.ones(8192, 1, device="cuda")
    s2 = torch.ones(1, 8192, device="cuda")
    us8 = common.bench_us([lambda: torch._scaled_mm(a8, b8.t(), scale_a=s1, scale_b=s2, out_dtype=torch.bfloat16,
                                                    use_fast_accum=False)], graph=False)
    fl = 2.0 * 8192**3
    return {"copy_gbs": copy, "bf16_tflops": fl / us / 1e6, "fp8_tflops": fl / us8 / 1e6}


def _bench_quant(k: int, fmt: Format, L: Layer, ceil: dict, gen) -> list[dict]:
    """Transform + quantize alone at M=8192 (codes + scales)."""
    m = 8192
    out = []
    xs = [torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2)]
    ca, sa = kernels.transform_quantize(xs[0], L.transform, L.a_gs, fmt.value)
    cr, sr = reference.transform_quantize_ref(xs[0][:256], L.transform, L.a_gs, fmt.value)
    mism = float((ca[:256] != cr).float().mean())
    us = common.bench_us([(lambda i=i: kernels.transform_quantize(xs[i], L.transform, L.a_gs, fmt.value))
                          for i in range(2)], graph=False)
    byts = m * k * (2 + 0.5 + 1 / fmt.group_size)
    out.append(dict(kind="fp4", k=k, fmt=fmt.value, us=us, gbs=byts / us / 1e3,
                    pct_copy=100 * byts / us / 1e3 / ceil["copy_gbs"], code_bytes_differing=mism))
    for r in out:
        print(f"transform+quantize {r['kind']} {fmt.value} M=8192 K={k}: {r['us']:.1f} us, {r['gbs']:.0f} GB/s, "
              f"{r['pct_copy']:.1f}% of copy", flush=True)
    return out


def format_table(result: dict) -> str:
    rows = [r for r in result["rows"] if r.get("route") == "best"]
    lines = [
        "| layer (N x K) | M | fmt | route | us | TFLOP/s | GB/s | x bf16 | x fp8 | % of limit | bf16 us | fp8 us | eager us (x bf16 eager) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} {r['n']}x{r['k']} | {r['m']} | {r['fmt']} | {r['route_best']} | {r['us']:.1f} | "
            f"{r['tflops']:.1f} | {r['gbs']:.0f} | {r['x_bf16']:.2f} | {r['x_fp8']:.2f} | {r['pct_limit']:.0f} | "
            f"{r['bf16_us']:.1f} | {r['fp8_us']:.1f} | "
            + (f"{r['us_eager']:.1f} ({r['x_bf16_eager']:.2f}) |" if r.get("us_eager") else "- |"))
    summ = summarize(result)
    lines.append("")
    for key, v in summ.items():
        lines.append(f"{key}: {v:.2f}")
    for q in result.get("quant", []):
        lines.append(f"transform+quantize {q['kind']} {q['fmt']} M=8192 K={q['k']}: {q['us']:.1f} us "
                     f"{q['gbs']:.0f} GB/s = {q['pct_copy']:.1f}% of copy")
    return "\n".join(lines)


def summarize(result: dict) -> dict:
    """The goal metrics: geomean speed-ups over the four 8B shapes."""
    rows = [r for r in result["rows"] if r.get("route") == "best"]
    out = {}

    def gm(vals):
        return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")

    eight_b = ("qkv", "o", "gate_up", "down")
    for fmt in FORMATS:
        for label, mset in (("decode M in {1,16}", (1, 16)), ("prefill M in {2048,8192}", (2048, 8192))):
            vals = [r["x_bf16"] for r in rows if r["fmt"] == fmt and r["layer"] in eight_b and r["m"] in mset]
            if vals:
                out[f"{fmt} {label} geomean x bf16"] = gm(vals)
        vals = [r["x_bf16"] for r in rows if r["fmt"] == fmt]
        if vals:
            out[f"{fmt} worst x bf16 (any shape, M)"] = min(vals)
    return out
