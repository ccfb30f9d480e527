"""Tile / expansion / accumulation / split-K sweep of the fp8core MXFP4 W4A4 linear on the GPU, plus the
activation kernels alone (both paths) against a copy of the same bytes. Every config is checked against the
fp64 reference on the benchmark's own inputs before timing; each op is timed inside one CUDA graph walking
several layer copies (working set above L2). Usage: python benchmarks/sweep_fp8core.py OUT_DIR [budget_s]"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).parent))
from bench_fp8core import DEV, LAYERS, make, time_graph  # noqa: E402

from wush_compile import formats  # noqa: E402
from wush_compile.ops import fp8core, reference  # noqa: E402

T = fp8core.Fp8Tiles
CFGS = {
    16: [T(64, 16, split_k=4), T(64, 16, split_k=8)],
    32: [T(64, 32, split_k=4), T(64, 32, split_k=2)],
    64: [T(64, 64, split_k=2), T(64, 64, split_k=4)],
    128: [T(64, 64, split_k=2), T(64, 128, split_k=2), T(64, 128, num_stages=4)],
    256: [T(64, 128), T(64, 128, split_k=2), T(128, 128, num_warps=8)],
    512: [T(64, 128), T(128, 128, num_warps=8), T(64, 128, num_stages=4)],
    1024: [T(64, 128), T(128, 128, num_warps=8)],
    2048: [T(128, 128), T(128, 128, num_warps=8), T(128, 64, num_warps=4)],
    8192: [T(128, 128), T(128, 128, num_warps=8), T(128, 256, num_warps=8)],
}


def stress_precision(gen):
    """Rows whose group exponents spread as wide as still folds (weights 11, activations 14 binades): the
    accumulation modes against fp64 and against an fp32 matmul of the same dequantized operands."""
    n, k, m = 512, 4096, 64
    w = torch.randn(n, k, generator=gen, device=DEV)
    w = w * torch.pow(2.0, torch.randint(-12, 1, (n, k // 32, 1), generator=gen, device=DEV).float()).repeat_interleave(32, 1).reshape(n, k)
    codes, scales, gs = formats.quantize(w, "mxfp4")
    packed = fp8core.pack_weights(codes)
    x = torch.randn(m, k, generator=gen, device=DEV)
    x = x * torch.pow(2.0, torch.randint(-10, 1, (m, k // 32, 1), generator=gen, device=DEV).float()).repeat_interleave(32, 1).reshape(m, k)
    t = torch.eye(32, device=DEV).expand(k // 32, 32, 32).contiguous()
    ags = torch.tensor(formats.MXFP4_GLOBAL_SCALE, device=DEV)
    a_c, a_s = reference.transform_quantize_ref(x, t, ags, "mxfp4")
    one = torch.ones((), device=DEV)
    aq = formats.dequantize(a_c, a_s, one, "mxfp4")
    wq = formats.dequantize(codes, scales, one, "mxfp4")
    gsc = ags.double() * gs.double()
    ref = (aq.double() @ wq.double().t()) * gsc
    torch.backends.cuda.matmul.allow_tf32 = False
    rn = ref.norm(dim=1)
    out = {"fp32_matmul": float((((aq.float() @ wq.float().t()).double() * gsc - ref).norm(dim=1) / rn).max())}
    q, rs, sc, st = fp8core.quantize_act_fp8(x, t)
    out["fallback_a_rows"] = int(st[0])
    for c in (T(64, 64), T(128, 128, num_warps=8), T(64, 16, split_k=4)):
        y = fp8core.gemm(q, rs, sc, st, packed, scales, gs.float().reshape(()), None, torch.float32, c)
        out[tag(c)] = float(((y.double() - ref).norm(dim=1) / rn).max())
    return out


def ptx_stats(out):
    """Instruction counts of the compiled GEMM per config (wgmma, waits, shared loads/stores, prmt)."""
    from wush_compile.ops import _fp8core as K
    res = {}
    for c in (T(128, 128), T(128, 128, num_warps=8), T(64, 64, split_k=2)):
        try:
            m, n, k = 256, 1024, 1024
            q = torch.zeros(m, k, dtype=torch.float8_e4m3fn, device=DEV)
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            L = make(n, k, torch.Generator(device=DEV).manual_seed(1))
            qq, rs, sc, st = fp8core.quantize_act_fp8(x, L["t"])
            fp8core.gemm(qq, rs, sc, st, L["packed"], L["scales"], L["gs"], None, torch.bfloat16, c)
            ker = list(K._gemm_kernel.device_caches[0][0].values())[-1]
            ptx = ker.asm["ptx"]
            (out / f"gemm_{tag(c)}.ptx").write_text(ptx)
            (out / f"gemm_{tag(c)}.ttgir").write_text(ker.asm["ttgir"])
            res[tag(c)] = {w: ptx.count(w) for w in ("wgmma.mma_async", "wgmma.wait_group", "ld.shared", "st.shared",
                                                     "prmt", "cp.async", "cp.async.bulk", "bar.sync", "ld.global")}
            res[tag(c)]["regs"] = getattr(ker, "n_regs", None)
            res[tag(c)]["spills"] = getattr(ker, "n_spills", None)
        except Exception as ex:  # noqa: BLE001
            res[tag(c)] = repr(ex)[:300]
    return res


def tag(c):
    return (f"w{c.block_w}t{c.block_t}n{c.num_warps}s{c.num_stages}k{c.split_k}"
            + ("a" if c.use_asm else "p"))


def main(out: Path, budget: float):
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(info, flush=True)
    gen = torch.Generator(device=DEV).manual_seed(0)
    ags = torch.tensor(formats.MXFP4_GLOBAL_SCALE, device=DEV)
    rows, act_rows = [], []
    ms = [int(v) for v in sys.argv[3].split(",")] if len(sys.argv) > 3 and not sys.argv[3].startswith("--") else list(CFGS)
    st = stress_precision(gen)
    print("stress precision (max row rel err vs fp64)", st, flush=True)
    ps = ptx_stats(out)
    print("ptx", json.dumps(ps), flush=True)
    (out / "sweep_meta.json").write_text(json.dumps({**info, "stress": st, "ptx": ps}, indent=1))
    # activation side alone
    for k in ((4096, 14336) if "--act" in sys.argv else ()):
        t = torch.linalg.qr(torch.randn(k // 32, 32, 32, generator=gen, device=DEV))[0].to(torch.bfloat16).contiguous()
        for m in (16, 128, 512, 2048, 8192):
            copies = max(2, min(8, math.ceil(120e6 / (m * k * 2))))
            xs = [torch.randn(m, k, generator=gen, device=DEV).to(torch.bfloat16) for _ in range(copies)]
            r = {"k": k, "m": m, "copy_us": time_graph(lambda i: xs[i].clone(), copies)}
            ref = fp8core.quantize_act_fp8(xs[0], t, split=False)
            for sp in (False, True):
                got = fp8core.quantize_act_fp8(xs[0], t, split=sp)
                same = torch.equal(got[0].view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(got[2], ref[2])
                r[f"split{int(sp)}_same"] = bool(same)
                r[f"split{int(sp)}_us"] = time_graph(lambda i, sp=sp: fp8core.quantize_act_fp8(xs[i], t, split=sp), copies)
            # bytes: x in (2 B) + e4m3 out (1 B) + scales (1/32 B); copy moves 2 B in + 2 B out
            r["bw_frac_best"] = (r["copy_us"] * 3.03 / 4) / min(r["split0_us"], r["split1_us"])
            act_rows.append(r)
            print("act", r, flush=True)
            del xs
    (out / "sweep_act.json").write_text(json.dumps({**info, "rows": act_rows}, indent=1))
    for name, (n, k) in LAYERS.items():
        if name == "70b_down" or "--no-tiles" in sys.argv:
            continue
        copies = max(2, min(6, math.ceil(240e6 / (n * k * 2))))
        Ls = [make(n, k, gen) for _ in range(copies)]
        for m in ms:
            if time.time() - t0 > budget:
                print("time budget reached", flush=True)
                break
            x = torch.randn(m, k, generator=gen, device=DEV).to(torch.bfloat16)
            L0 = Ls[0]
            cm = min(m, 64)
            a_c, a_s = reference.transform_quantize_ref(x[:cm], L0["t"], ags, "mxfp4")
            one = torch.ones((), device=DEV)
            aq = formats.dequantize(a_c, a_s, one, "mxfp4")
            wq = formats.dequantize(L0["codes"], L0["scales"], one, "mxfp4")
            gsc = ags.double() * L0["gs"].double()
            ref = (aq.double() @ wq.double().t()) * gsc
            torch.backends.cuda.matmul.allow_tf32 = False
            ref32 = (aq.float() @ wq.float().t()).double() * gsc
            rnorm = ref.norm(dim=1).clamp(min=1e-30)
            err32 = float(((ref32 - ref).norm(dim=1) / rnorm).max())
            row = {"layer": name, "n": n, "k": k, "m": m, "fp32_matmul_row_err": err32}
            row["bf16"] = time_graph(lambda i: F.linear(x, Ls[i]["wb"]), copies)

            def r_fp8q(i):
                xf = x.float()
                s = xf.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
                return torch._scaled_mm((xf / s).to(torch.float8_e4m3fn), Ls[i]["w8"].t(), scale_a=s,
                                        scale_b=Ls[i]["s8"], out_dtype=torch.bfloat16)
            row["fp8_w8a8"] = time_graph(r_fp8q, copies)
            q, rs, sc, st = fp8core.quantize_act_fp8(x, L0["t"])
            for c in CFGS[m]:
                tg = tag(c)
                try:
                    y = fp8core.gemm(q, rs, sc, st, L0["packed"], L0["scales"], L0["gs"], None, torch.float32, c)
                    e = float(((y[:cm].double() - ref).norm(dim=1) / rnorm).max())
                    row[tg + "_err"] = e
                    if not e < 1e-3:
                        print(name, m, tg, "CHECK FAILED", e, flush=True)
                        continue
                    row[tg] = time_graph(lambda i, c=c: fp8core.linear(x, Ls[i]["packed"], Ls[i]["scales"],
                                                                        Ls[i]["t"], Ls[i]["gs"], None, tiles=c), copies)
                    row[tg + "_gemm"] = time_graph(lambda i, c=c: fp8core.gemm(q, rs, sc, st, Ls[i]["packed"], Ls[i]["scales"],
                                                                               Ls[i]["gs"], None, torch.bfloat16, c), copies)
                except Exception as ex:  # noqa: BLE001
                    row[tg + "_fail"] = repr(ex)[:300]
                    print(name, m, tg, "FAILED", repr(ex)[:300], flush=True)
            timed = {tag(c): row[tag(c)] for c in CFGS[m] if tag(c) in row}
            best = min(timed, key=timed.get) if timed else None
            row["best"] = best
            rows.append(row)
            print(f"{name:8s} M={m:5d} bf16 {row['bf16']:8.1f} w8a8 {row['fp8_w8a8']:8.1f} fp32err {err32:.1e} | "
                  + " ".join(f"{tg} {v:.1f}/{row[tg + '_gemm']:.1f} e{row[tg + '_err']:.0e}" for tg, v in timed.items())
                  + (f" | best {best} x bf16 {row['bf16'] / timed[best]:.2f} x w8a8 {row['fp8_w8a8'] / timed[best]:.2f}" if best else ""),
                  flush=True)
            (out / "sweep_fp8core.json").write_text(json.dumps({**info, "rows": rows}, indent=1))
        del Ls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 400)
