"""fp8core vs bf16 F.linear, fp8 row-wise _scaled_mm (alone and with its activation quant) and today's
route, each timed inside one CUDA graph that walks several layer copies. Usage: python benchmarks/bench_fp8core.py OUT_DIR"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from wush_compile import formats
from wush_compile.ops import fp8core, kernels, reference

LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "70b_down": (8192, 28672)}
MS = (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 8192)
DEV = "cuda"


def make(n, k, gen):
    w = torch.randn(n, k, generator=gen, device=DEV) * 0.02
    codes, scales, gs = formats.quantize(w, "mxfp4")
    t = torch.linalg.qr(torch.randn(k // 32, 32, 32, generator=gen, device=DEV))[0].to(torch.bfloat16).contiguous()
    wq_val = formats.dequantize(codes, scales, gs, "mxfp4")
    wb = wq_val.to(torch.bfloat16)
    s8 = wb.float().abs().amax(1).clamp(min=1e-12) / 448
    w8 = (wb.float() / s8[:, None]).to(torch.float8_e4m3fn)
    return dict(codes=codes, scales=scales, gs=gs.float().reshape(()), t=t, wb=wb, w8=w8, s8=s8[None, :].contiguous(),
                packed=fp8core.pack_weights(codes))


def time_graph(fn, n_copies, reps=10):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_copies):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / n_copies)
    del g
    return statistics.median(ts)


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    budget = float(sys.argv[2]) if len(sys.argv) > 2 else 330
    print("gpu", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    ags = torch.tensor(formats.MXFP4_GLOBAL_SCALE, device=DEV)
    ms = tuple(int(v) for v in sys.argv[3].split(",")) if len(sys.argv) > 3 else MS
    for name, (n, k) in LAYERS.items():
        copies = max(2, min(6, math.ceil(240e6 / (n * k * 2))))
        Ls = [make(n, k, gen) for _ in range(copies)]
        for m in ms:
            if time.time() - t0 > budget:
                print("time budget reached", flush=True)
                break
            x = torch.randn(m, k, generator=gen, device=DEV).to(torch.bfloat16)
            L0 = Ls[0]
            ref = None
            cm = min(m, 64)
            a_c, a_s = reference.transform_quantize_ref(x[:cm], L0["t"], ags, "mxfp4")
            one = torch.ones((), device=DEV)
            ref = (formats.dequantize(a_c, a_s, one, "mxfp4").double()
                   @ formats.dequantize(L0["codes"], L0["scales"], one, "mxfp4").double().t()) * (ags.double() * L0["gs"].double())
            today = "triton_decode" if m <= 16 else "triton_fp8"

            def r_bf16(i):
                return F.linear(x, Ls[i]["wb"])

            x8 = (x.float() / (x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 448)).to(torch.float8_e4m3fn)
            sx = (x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 448).contiguous()

            def r_fp8(i):
                return torch._scaled_mm(x8, Ls[i]["w8"].t(), scale_a=sx, scale_b=Ls[i]["s8"], out_dtype=torch.bfloat16)

            def r_fp8q(i):
                xf = x.float()
                s = xf.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
                return torch._scaled_mm((xf / s).to(torch.float8_e4m3fn), Ls[i]["w8"].t(), scale_a=s,
                                        scale_b=Ls[i]["s8"], out_dtype=torch.bfloat16)

            def r_today(i):
                L = Ls[i]
                return kernels.linear(x, L["codes"], L["scales"], L["t"], L["gs"], ags, None, "mxfp4", today)

            base = fp8core.tiles_for(m, n, k)
            # the heuristic's tiles and one neighbour (4 warps instead of 8 at large M, else twice the split-K)
            alt = ({**base.__dict__, "num_warps": 4} if m >= 2048 else
                   {**base.__dict__, "split_k": base.split_k * 2} if base.split_k > 1 else
                   {**base.__dict__, "block_w": 128})
            cfgs = {"ours": base, "ours_alt": fp8core.Fp8Tiles(**alt)}
            routes = {"bf16": r_bf16, "fp8_gemm": r_fp8, "fp8_w8a8": r_fp8q, "today": r_today}
            for cn, cfg in cfgs.items():
                routes[cn] = (lambda c: (lambda i: fp8core.linear(x, Ls[i]["packed"], Ls[i]["scales"],
                                                                   Ls[i]["t"], Ls[i]["gs"], None, tiles=c)))(cfg)
            row = {"layer": name, "n": n, "k": k, "m": m}
            for rn, fn in routes.items():
                try:
                    y = fn(0)
                    torch.cuda.synchronize()
                    err = float((y[:cm].double() - ref).norm() / ref.norm())
                    if rn not in ("bf16", "fp8_gemm", "fp8_w8a8") and not err < 1e-2:
                        row[rn + "_err"] = err
                        print(name, m, rn, "CHECK FAILED", err, flush=True)
                        continue
                    row[rn + "_err"] = err
                    row[rn] = time_graph(fn, copies)
                except Exception as e:  # noqa: BLE001 - report and go on
                    row[rn + "_fail"] = repr(e)[:300]
                    print(name, m, rn, "FAILED", repr(e)[:300], flush=True)
            best = min((row[c] for c in cfgs if c in row), default=float("nan"))
            row["ours_best"] = best
            rows.append(row)
            print(f"{name:9s} M={m:5d} bf16 {row.get('bf16', float('nan')):8.1f} fp8 {row.get('fp8_gemm', float('nan')):8.1f} "
                  f"w8a8 {row.get('fp8_w8a8', float('nan')):8.1f} today {row.get('today', float('nan')):8.1f} "
                  + " ".join(f"{c} {row.get(c, float('nan')):8.1f}" for c in cfgs)
                  + f" | x bf16 {row.get('bf16', 0) / best:5.2f} x w8a8 {row.get('fp8_w8a8', 0) / best:5.2f}", flush=True)
            (out / "bench_fp8core.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                                 "triton": triton.__version__, "rows": rows}, indent=1))
        del Ls
        torch.cuda.empty_cache()
    # summary
    print("\nM | geomean ours x bf16 | x fp8_w8a8 | today x bf16 (8B shapes)")
    for m in MS:
        rs = [r for r in rows if r["m"] == m and r["layer"] != "70b_down" and "bf16" in r and r["ours_best"] == r["ours_best"]]
        if not rs:
            continue
        gm = lambda v: math.exp(sum(map(math.log, v)) / len(v))  # noqa: E731
        print(m, "|", round(gm([r["bf16"] / r["ours_best"] for r in rs]), 3), "|",
              round(gm([r["fp8_w8a8"] / r["ours_best"] for r in rs if "fp8_w8a8" in r]), 3), "|",
              round(gm([r["bf16"] / r["today"] for r in rs if "today" in r]), 3))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(9, 5))
        for col in ("fp8_gemm", "fp8_w8a8", "today", "ours_best"):
            xs, ys = [], []
            for m in MS:
                rs = [r for r in rows if r["m"] == m and r["layer"] != "70b_down" and col in r and "bf16" in r]
                if rs:
                    xs.append(m)
                    ys.append(math.exp(sum(math.log(r["bf16"] / r[col]) for r in rs) / len(rs)))
            ax.plot(xs, ys, marker="o", label=col)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speed-up vs bf16 F.linear (geomean, 4 Llama-3.1-8B shapes)")
        ax.legend()
        fig.savefig(out / "bench_fp8core.png", dpi=120)
    except Exception as e:  # noqa: BLE001
        print("plot failed", e)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
