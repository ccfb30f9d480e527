"""Tile sweeps that set the kernels' defaults (H100): transform + quantize tiles at M=8192 and the decode
GEMM's pipelining depth. Prints one line per candidate; see benchmarks/NOTES_kernels.md.

    PYTHONPATH=. python benchmarks/sweep_kernels.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wush_compile.bench import common, layers  # noqa: E402
from wush_compile.config import Format  # noqa: E402
from wush_compile.ops import kernels  # noqa: E402

QUANT = ((64, 4, 4), (32, 4, 4), (128, 4, 8), (64, 8, 8), (128, 8, 8), (32, 8, 4), (16, 8, 4))
STAGES = (2, 3, 4, 5)


def main() -> int:
    print(common.header(common.environment()), flush=True)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    copy = common.copy_bandwidth_gbs()
    print(f"copy {copy:.0f} GB/s", flush=True)
    for fmt_name in ("mxfp4", "nvfp4"):
        fmt = Format.parse(fmt_name)
        L = layers.make_layer(4096, 4096, fmt, dev, gen)
        xs = [torch.randn(8192, 4096, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(2)]
        byts = 8192 * 4096 * (2 + 0.5 + 1 / fmt.group_size)
        for bm, ng, nw in QUANT:
            g = ng * fmt.group_size
            cfg = kernels.QuantTiles(block_m=bm, groups=ng if fmt is Format.MXFP4 else 2 * ng, num_warps=nw)
            us = common.bench_us([(lambda i=i: kernels.transform_quantize(xs[i], L.transform, L.a_gs, fmt_name, cfg))
                                  for i in range(2)], graph=True)
            print(f"quant {fmt_name} BM={bm} groups={cfg.groups} warps={nw}: {us:.1f} us "
                  f"{100 * byts / us / 1e3 / copy:.1f}% of copy", flush=True)
        del xs
        for name in ("qkv", "gate_up"):
            n, k = layers.LAYERS[name]
            nrot = common.rotations(int(n * k * 0.56), cap=8)
            Ls = [layers.make_layer(n, k, fmt, dev, gen) for _ in range(nrot)]
            for m in (1, 16):
                xs = [torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(nrot)]
                res = []
                for st in STAGES:
                    base = kernels.linear_tiles(m, n, k, fmt, kernels.sm_count(dev))
                    cfg = kernels.LinearTiles(base.block_n, base.block_m, base.block_k, base.split_k,
                                              base.steps_per_split, base.num_warps, st, False)
                    res.append(common.bench_us([(lambda i=i: kernels.decode_linear(
                        xs[i], Ls[i].w_codes, Ls[i].w_scales, Ls[i].transform, Ls[i].w_gs, Ls[i].a_gs, None, fmt,
                        torch.bfloat16, cfg)) for i in range(nrot)], graph=True))
                print(f"decode {name} {fmt_name} M={m}: " + "  ".join(f"stages {s}={u:.1f}" for s, u in zip(STAGES, res)),
                      flush=True)
            del Ls
    return 0


if __name__ == "__main__":
    sys.exit(main())
