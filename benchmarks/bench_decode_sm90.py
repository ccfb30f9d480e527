"""Decode (M <= 16) on Hopper: the CUDA decode kernels (wush_compile.cuda.decode) in their variants against bf16
``F.linear`` and fp8 row-wise ``torch._scaled_mm``, all in one run, on the Llama-3.1-8B projections.

    python benchmarks/bench_decode_sm90.py [--out DIR] [--layers qkv o ...] [--m 1 16] [--routes f f3 t ...]
        [--baseline-cubin PATH] [--triton]
    python benchmarks/bench_decode_sm90.py --ncu-once ...   # one call of each route, no timing (run under ncu)

Routes: ``f`` fused (one launch), ``t`` two launches, each with the default stage count for M or a given one
(``f4``, ``t3``, ...); ``fpdl`` the fused kernel launched as a programmatic dependent; ``v3`` the previous kernels
(act kernel + GEMM of commit 33cc6ac) from a cubin built from that source (``--baseline-cubin``).

Every route's output is checked against the fp64 reference (dequantized operands) on the benchmark's own inputs
before it is timed; times are medians of ``triton.testing.do_bench_cudagraph`` (GPU time, all launches of a
route in one graph), operands rotated so that the working set exceeds L2, random data (never zeros).
"""

from __future__ import annotations

import argparse
import ctypes
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
REP_MS = 20


def bench_us(fns) -> float:
    import triton.testing as tt

    def run():
        for f in fns:
            f()

    run()
    torch.cuda.synchronize()
    return tt.do_bench_cudagraph(run, rep=REP_MS, return_mode="median") * 1e3 / len(fns)


# ---------------------------------------------------------------- the previous kernels (baseline)


class _V3Act(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("t", ctypes.c_void_p), ("gs", ctypes.c_void_p), ("b", ctypes.c_void_p),
                ("sa", ctypes.c_void_p), ("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("m", ctypes.c_int64), ("k", ctypes.c_int64), ("x_row_stride", ctypes.c_int64),
                ("tiles", ctypes.c_int32), ("reserved", ctypes.c_int32)]


class _V3Gemm(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("ws", ctypes.c_void_p), ("b", ctypes.c_void_p), ("sa", ctypes.c_void_p),
                ("ga", ctypes.c_void_p), ("gw", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("part", ctypes.c_void_p), ("counters", ctypes.c_void_p), ("m", ctypes.c_int64), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("units", ctypes.c_int64), ("stages_per_rb", ctypes.c_int32),
                ("ctas", ctypes.c_int32), ("out_dtype", ctypes.c_int32), ("reserved", ctypes.c_int32)]


class V3:
    """The decode kernels of commit 33cc6ac (act kernel reading an fp32 transform, then the stream-K GEMM with
    per-segment split-K announcements), launched as that commit's ``decode.linear`` did: same plan, PDL GEMM."""

    def __init__(self, cubin: Path, device):
        from wush_compile.cuda import loader

        self.cubin = loader._cubin(Path(cubin))
        self.counters = torch.zeros(1 << 16, dtype=torch.int32, device=device)
        self.t32 = {}

    def linear(self, x, L, fmt: Format):
        m, k = x.shape
        n = L.w_codes.shape[0]
        idx = x.device.index or 0
        tiles = 1 if m <= 8 else 2
        cfg = decode.DecodeConfig(4, 4 if m <= 8 else 3, False)
        smem = decode.smem_bytes(fmt, tiles, cfg)
        name = f"wush_dec_gemm_{fmt.value}_t{tiles}_w4_s{cfg.stages}"
        gemm = self.cubin.function(name, idx, smem, ctypes.sizeof(_V3Gemm))
        act = self.cubin.function(f"wush_dec_act_{fmt.value}_{decode._X_NAMES[x.dtype]}", idx, 0,
                                  ctypes.sizeof(_V3Act))
        p = decode._plan_cached(m, n, k, fmt, decode._sm_count(idx),
                                decode._ctas_per_sm(gemm, "v3:" + name, idx, 128, smem), cfg)
        t = self.t32.get(id(L.transform))
        if t is None:
            t = self.t32[id(L.transform)] = L.transform.float().contiguous()
        _, mx_gs = decode._state(x.device)
        ga = mx_gs if fmt is Format.MXFP4 else L.a_gs
        kc = k // decode.CHUNK_K
        b = torch.empty(tiles * kc * 256, dtype=torch.float16, device=x.device)
        sa = torch.empty(kc * tiles * 8, dtype=torch.float32, device=x.device) if fmt is Format.MXFP4 else None
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        part = torch.empty(p.part_numel, dtype=torch.float32, device=x.device)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        sa_ptr = sa.data_ptr() if sa is not None else None
        a_args = _V3Act(x=x.data_ptr(), t=t.data_ptr(), gs=ga.data_ptr(), b=b.data_ptr(), sa=sa_ptr, codes=None,
                        scales=None, m=m, k=k, x_row_stride=x.stride(0), tiles=tiles, reserved=0)
        decode._launch(act, kc, 128, 0, stream, a_args, False)
        g_args = _V3Gemm(w=L.w_codes.data_ptr(), ws=L.w_scales.data_ptr(), b=b.data_ptr(), sa=sa_ptr,
                         ga=ga.data_ptr(), gw=L.w_gs.data_ptr(), bias=None, out=out.data_ptr(), part=part.data_ptr(),
                         counters=self.counters.data_ptr(), m=m, n=n, k=k, units=p.units,
                         stages_per_rb=p.stages_per_rb, ctas=p.ctas, out_dtype=decode._OUT_CODES[x.dtype], reserved=0)
        decode._launch(gemm, p.ctas, 128, smem, stream, g_args, True)
        return out


# ---------------------------------------------------------------- routes


def make_routes(names, fmt: Format, m: int, v3: V3 | None) -> dict:
    out = {}
    for r in names:
        if r == "v3":
            if v3 is not None:
                out["v3"] = lambda x, L: v3.linear(x, L, fmt)
            continue
        pdl = True if r == "fpdl" else None
        kind = r[0]
        if kind not in "ft" or (len(r) > 1 and r[1:] not in ("3", "4", "pdl")):
            raise ValueError(f"unknown route {r!r}; use v3, f, t, f3, f4, t3, t4 or fpdl")
        stages = int(r[1]) if r[1:] in ("3", "4") else decode.default_config(m).stages
        cfg = decode.DecodeConfig(4, stages, kind == "f")
        label = f"{cfg.label}{'_pdl' if pdl else ''}"
        out[label] = (lambda cfg, pdl: lambda x, L: decode.linear(
            x, L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt.value, config=cfg, pdl=pdl))(cfg, pdl)
    return out


def triton_route(fmt: Format):
    def run(x, L):
        kernels.CUDA_DECODE = False
        try:
            return kernels.linear(x, L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs, None, fmt.value,
                                  KernelChoice.TRITON_DECODE)
        finally:
            kernels.CUDA_DECODE = True

    return run


def ncu_once(args, dev, v3) -> int:
    """One call of every route (and bf16 / fp8) per format on the first layer and M, inputs built on the CPU so
    that the profiled process launches few other kernels."""
    name = args.layers[0]
    n, k = LAYERS[name]
    m = args.m[0]
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16).to(dev)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(dev)
    decode.prepare(dev)
    for fmt_name in args.fmt:
        fmt = Format.parse(fmt_name)
        L = layers.make_layer(n, k, fmt, "cpu", gen)
        L = layers.Layer(*(t.to(dev) for t in (L.w_codes, L.w_scales, L.transform, L.w_gs, L.a_gs)))
        for route, fn in make_routes(args.routes, fmt, m, v3).items():
            print(f"ncu: {name} {fmt_name} M={m} {route}", flush=True)
            fn(x, L)
            torch.cuda.synchronize()
    print(f"ncu: {name} M={m} bf16 F.linear", flush=True)
    F.linear(x, w)
    w8 = w.to(torch.float8_e4m3fn)
    x8 = x.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    print(f"ncu: {name} M={m} fp8 _scaled_mm", flush=True)
    torch._scaled_mm(x8, w8.t(), scale_a=one.expand(m, 1).contiguous(), scale_b=one.expand(1, n).contiguous(),
                     out_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--layers", nargs="+", default=list(LAYERS))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--fmt", nargs="+", default=["mxfp4", "nvfp4"])
    ap.add_argument("--routes", nargs="+", default=["v3", "f", "t", "f3", "f4", "fpdl"],
                    help="CUDA variants (see the module doc); a stage-less name takes the default for M")
    ap.add_argument("--baseline-cubin", type=Path, default=None, help="cubin of the v3 kernels (route v3)")
    ap.add_argument("--triton", action="store_true", help="also time the Triton decode route")
    ap.add_argument("--ncu-once", action="store_true", help="one call of each route, no timing (for ncu)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dev = torch.device("cuda")
    v3 = V3(args.baseline_cubin, dev) if args.baseline_cubin else None
    if args.ncu_once:
        return ncu_once(args, dev, v3)
    env = common.environment()
    env["decode_cubin"] = decode.available(dev)[1]
    env["baseline_cubin"] = str(args.baseline_cubin)
    print(common.header(env), flush=True)
    copy_gbs = common.copy_bandwidth_gbs(2**30)
    print(f"device copy bandwidth {copy_gbs:.0f} GB/s (read + write)", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
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
                routes = make_routes(args.routes, fmt, m, v3)
                if args.triton:
                    routes["triton"] = triton_route(fmt)
                byts = layers._min_bytes(m, n, k, fmt)
                ref = layers._ref_rows(xs[0], Ls[0], fmt, m)
                for route, fn in routes.items():
                    r = dict(layer=name, n=n, k=k, m=m, fmt=fmt_name, route=route, bf16_us=t_bf16, fp8_us=t_fp8)
                    try:
                        y = fn(xs[0], Ls[0])
                        torch.cuda.synchronize()
                        err = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))
                        r["err"] = err
                        if not (math.isfinite(err) and err < layers.CHECK_RTOL):
                            print(f"FAILED CHECK {name} {fmt_name} M={m} {route}: rel err {err:.3e}", flush=True)
                            rows.append(r)
                            continue
                        if route == "triton":
                            kernels.CUDA_DECODE = False
                        try:
                            us = bench_us([(lambda i=i: fn(xs[i % len(xs)], Ls[i % len(Ls)])) for i in range(len(Ls))])
                        finally:
                            kernels.CUDA_DECODE = True
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
    keys = sorted({(r["route"], r["fmt"], r["m"]) for r in rows if r.get("us")})
    for route, fmt, m in keys:
        pts = [(layers._min_bytes(r["m"], r["n"], r["k"], Format.parse(fmt)), r["us"]) for r in rows
               if r.get("us") and (r["route"], r["fmt"], r["m"]) == (route, fmt, m)]
        f = fit(pts)
        if f:
            out.append(f"| {route} | {fmt} | {m} | {f[0]:.1f} | {f[1]:.0f} |")
    for m in sorted({r["m"] for r in rows}):
        seen = {}
        for r in rows:
            if r["m"] == m:
                seen[r["layer"]] = (layers._min_bytes(m, r["n"], r["k"], None), r["bf16_us"])
        f = fit(list(seen.values()))
        if f:
            out.append(f"| bf16 F.linear | - | {m} | {f[0]:.1f} | {f[1]:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
