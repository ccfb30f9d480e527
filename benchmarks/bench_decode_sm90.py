"""Decode (M <= 16) on Hopper: the CUDA decode kernels (wush_compile.cuda.decode) against the Triton decode route,
bf16 ``F.linear`` and fp8 row-wise ``torch._scaled_mm``, all in one run, on the Llama-3.1-8B projections.

    python benchmarks/bench_decode_sm90.py [--out DIR] [--layers qkv o ...] [--m 1 16] [--configs 4x4 4x3] [--no-triton]
    python benchmarks/bench_decode_sm90.py --ncu-once --layers qkv --m 1   # one call per route, no timing (for ncu)

Every route's output is checked against the fp64 reference (dequantized operands) on the benchmark's own inputs
before it is timed; times are medians of ``triton.testing.do_bench_cudagraph`` (GPU time, both launches of a
route in one graph), operands rotated so that the working set exceeds L2, random data (never zeros).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from wush_compile.bench import common, layers  # noqa: E402
from wush_compile.config import Format, KernelChoice  # noqa: E402
from wush_compile.cuda import decode  # noqa: E402
from wush_compile.ops import kernels  # noqa: E402

LAYERS = {k: v for k, v in layers.LAYERS.items() if k in ("qkv", "o", "gate_up", "down")}
REP_MS = 25


def bench_us(fns) -> float:
    import triton.testing as tt

    def run():
        for f in fns:
            f()

    run()
    torch.cuda.synchronize()
    return tt.do_bench_cudagraph(run, rep=REP_MS, return_mode="median") * 1e3 / len(fns)


def check(fn, x, L, fmt) -> float:
    ref = layers._ref_rows(x, L, fmt, x.shape[0])
    y = fn(x, L)
    torch.cuda.synchronize()
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def ncu_once(args, configs, dev) -> int:
    """One call of every CUDA config (and of bf16 / fp8) per format on the first layer and M, the inputs built on
    the CPU so that the profiled process launches few other kernels."""
    name = args.layers[0]
    n, k = LAYERS[name]
    m = args.m[0]
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16).to(dev)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(dev)
    decode.prepare(dev)
    for fmt_name in args.fmt:
        L = layers.make_layer(n, k, Format.parse(fmt_name), "cpu", gen)
        L = layers.Layer(*(t.to(dev) for t in (L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs)))
        for c in configs:
            print(f"ncu: {name} {fmt_name} M={m} cuda_w{c.warps}s{c.stages}", flush=True)
            decode.linear(x, L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt_name, config=c)
            torch.cuda.synchronize()
    print(f"ncu: {name} M={m} bf16 F.linear", flush=True)
    F.linear(x, w)
    one = torch.ones((), device=dev)
    print(f"ncu: {name} M={m} fp8 _scaled_mm", flush=True)
    torch._scaled_mm(x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t(), scale_a=one.expand(m, 1).contiguous(),
                     scale_b=one.expand(1, n).contiguous(), out_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--layers", nargs="+", default=list(LAYERS))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--fmt", nargs="+", default=["mxfp4", "nvfp4"])
    ap.add_argument("--configs", nargs="+", default=["4x4", "4x3"], help="warps x stages of the CUDA GEMM")
    ap.add_argument("--no-pdl-row", action="store_true", help="skip timing the CUDA route without PDL")
    ap.add_argument("--no-triton", action="store_true", help="skip timing the Triton decode route")
    ap.add_argument("--ncu-once", action="store_true", help="one call of each CUDA config, no timing (for ncu)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dev = torch.device("cuda")
    if args.ncu_once:
        return ncu_once(args, [decode.DecodeConfig(*map(int, c.split("x"))) for c in args.configs], dev)
    env = common.environment()
    env["decode_cubin"] = decode.available(dev)[1]
    print(common.header(env), flush=True)
    copy_gbs = common.copy_bandwidth_gbs(2**30)
    print(f"device copy bandwidth {copy_gbs:.0f} GB/s (read + write)", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    configs = [decode.DecodeConfig(*map(int, c.split("x"))) for c in args.configs]
    rows = []
    for name in args.layers:
        n, k = LAYERS[name]
        w_bf16 = [torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02
                  for _ in range(common.rotations(2 * n * k, cap=4))]
        w_fp8 = [w.to(torch.float8_e4m3fn) for w in w_bf16]
        sb = torch.rand(1, n, device=dev, generator=gen) + 0.5
        for fmt_name in args.fmt:
            fmt = Format.parse(fmt_name)
            nrot = common.rotations(int(n * k * (0.5 + 1 / fmt.group_size)), cap=8)
            Ls = [layers.make_layer(n, k, fmt, dev, gen) for _ in range(nrot)]
            for m in args.m:
                xs = [torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(len(Ls))]
                nb = len(w_bf16)
                t_bf16 = bench_us([(lambda i=i: F.linear(xs[i % len(xs)], w_bf16[i % nb])) for i in range(max(nb, 2))])
                x8 = [x.to(torch.float8_e4m3fn) for x in xs[:2]]
                sa = torch.rand(m, 1, device=dev, generator=gen) + 0.5
                t_fp8 = bench_us([(lambda i=i: torch._scaled_mm(
                    x8[i % 2], w_fp8[i % nb].t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                    use_fast_accum=False)) for i in range(max(nb, 2))])
                routes = {}
                for c in configs:
                    routes[f"cuda_w{c.warps}s{c.stages}"] = (lambda c: lambda x, L: decode.linear(
                        x, L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt.value, config=c))(c)
                if not args.no_pdl_row:
                    c0 = configs[0]
                    routes[f"cuda_w{c0.warps}s{c0.stages}_nopdl"] = lambda x, L: decode.linear(
                        x, L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt.value, config=c0, pdl=False)

                def triton_route(x, L):  # the triton_decode route (never the CUDA kernels: that is cuda_decode)
                    return kernels.linear(x, L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt.value,
                                          KernelChoice.TRITON_DECODE)

                if not args.no_triton:
                    routes["triton"] = triton_route
                byts = layers._min_bytes(m, n, k, fmt)
                for route, fn in routes.items():
                    r = dict(layer=name, n=n, k=k, m=m, fmt=fmt_name, route=route, bf16_us=t_bf16, fp8_us=t_fp8)
                    try:
                        err = check(fn, xs[0], Ls[0], fmt)
                        r["err"] = err
                        if not (math.isfinite(err) and err < layers.CHECK_RTOL):
                            print(f"FAILED CHECK {name} {fmt_name} M={m} {route}: rel err {err:.3e}", flush=True)
                            rows.append(r)
                            continue
                        us = bench_us([(lambda i=i: fn(xs[i % len(xs)], Ls[i % len(Ls)])) for i in range(len(Ls))])
                    except Exception as e:  # keep going; the failure is in the log and the JSON
                        print(f"ERROR {name} {fmt_name} M={m} {route}: {type(e).__name__}: {e}", flush=True)
                        r["error"] = f"{type(e).__name__}: {e}"
                        rows.append(r)
                        torch.cuda.synchronize()
                        continue
                    r.update(us=us, gbs=byts / us / 1e3, x_bf16=t_bf16 / us, x_fp8=t_fp8 / us,
                             pct_limit=100 * byts / copy_gbs / 1e3 / us)
                    rows.append(r)
                    print(f"{name:>8} {fmt_name} M={m:>2} {route:>16}: {us:7.2f} us {r['gbs']:6.0f} GB/s "
                          f"x bf16 {r['x_bf16']:5.2f} x fp8 {r['x_fp8']:5.2f} {r['pct_limit']:5.1f}% of limit "
                          f"(bf16 {t_bf16:.1f} us, fp8 {t_fp8:.1f} us, err {err:.1e})", flush=True)
                del xs
            del Ls
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "bench_decode_sm90.json").write_text(
                    json.dumps({"env": env, "copy_gbs": copy_gbs, "rows": rows}, indent=1, default=str))
        del w_bf16, w_fp8
    print(table(rows), flush=True)
    print(fixed_cost_fit(rows), flush=True)
    return 0


def table(rows) -> str:
    lines = ["| layer | M | fmt | route | us | GB/s | x bf16 | x fp8 | % of limit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("us") is None:
            continue
        lines.append(f"| {r['layer']} {r['n']}x{r['k']} | {r['m']} | {r['fmt']} | {r['route']} | {r['us']:.2f} | "
                     f"{r['gbs']:.0f} | {r['x_bf16']:.2f} | {r['x_fp8']:.2f} | {r['pct_limit']:.0f} |")
    summ = []
    routes = sorted({r["route"] for r in rows if r.get("us")})
    for fmt in sorted({r["fmt"] for r in rows}):
        for route in routes:
            sel = [r for r in rows if r["fmt"] == fmt and r["route"] == route and r.get("us")]
            if sel:
                g = math.exp(sum(math.log(r["x_bf16"]) for r in sel) / len(sel))
                g8 = math.exp(sum(math.log(r["x_fp8"]) for r in sel) / len(sel))
                summ.append(f"{fmt} {route}: geomean x bf16 {g:.2f}, x fp8 {g8:.2f} over {len(sel)} rows")
        best = {}
        for r in rows:
            if r["fmt"] == fmt and r.get("us") and r["route"].startswith("cuda"):
                key = (r["layer"], r["m"])
                best[key] = max(best.get(key, 0.0), r["x_bf16"])
        if best:
            g = math.exp(sum(map(math.log, best.values())) / len(best))
            summ.append(f"{fmt} best CUDA config per row: geomean x bf16 {g:.2f} over {len(best)} rows")
    return "\n".join(lines + [""] + summ)


def fixed_cost_fit(rows) -> str:
    """Least squares time = fixed + bytes / bandwidth over the layers, per (route, fmt, M), and for bf16."""

    def fit(pts):
        if len(pts) < 2:
            return None
        n = len(pts)
        mx = sum(b for b, _ in pts) / n
        my = sum(t for _, t in pts) / n
        sxx = sum((b - mx) ** 2 for b, _ in pts)
        if sxx == 0:
            return None
        slope = sum((b - mx) * (t - my) for b, t in pts) / sxx
        return my - slope * mx, (1 / slope / 1e3 if slope > 0 else float("inf"))

    out = ["| route | fmt | M | fixed us | incremental GB/s |", "|---|---|---|---|---|"]
    for route, fmt, m in sorted({(r["route"], r["fmt"], r["m"]) for r in rows if r.get("us")}):
        pts = [(layers._min_bytes(r["m"], r["n"], r["k"], Format.parse(fmt)), r["us"]) for r in rows
               if r.get("us") and (r["route"], r["fmt"], r["m"]) == (route, fmt, m)]
        f = fit(pts)
        if f:
            out.append(f"| {route} | {fmt} | {m} | {f[0]:.1f} | {f[1]:.0f} |")
    for m in sorted({r["m"] for r in rows}):
        seen = {r["layer"]: (layers._min_bytes(m, r["n"], r["k"], None), r["bf16_us"]) for r in rows if r["m"] == m}
        f = fit(list(seen.values()))
        if f:
            out.append(f"| bf16 F.linear | - | {m} | {f[0]:.1f} | {f[1]:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
