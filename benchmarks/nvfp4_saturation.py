"""NVFP4 static vs dynamic activation global scale on real SmolLM2-135M layers, inputs scaled past the calibration
range: layer-wise relative output error and the fraction of saturated activations (wush_compile.saturation).

    python benchmarks/nvfp4_saturation.py [--layers model.layers.10.mlp.down_proj,...] [--scales 1,4,16,64]

Each layer is quantized once per scale policy (RTN + WUSH, NVFP4) from its inputs on 4 x 256 calibration tokens;
the errors are measured on 2 x 256 held-out tokens' inputs of that layer, multiplied by each scale (what an input
far above the calibration range does to the static scale).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess

import torch

from calibrate import data, models
from calibrate.hessian import HessianAccumulator
from calibrate.layer import quantize_linear
from wush_compile import WushConfig
from wush_compile.saturation import SaturationCounter


def layer_inputs(model, names, ids, seqlen):
    got = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: got[n].append(a[0].detach()))
             for n in names]
    with torch.no_grad():
        for chunk in ids[: ids.numel() // seqlen * seqlen].reshape(-1, seqlen):
            model(input_ids=chunk[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]) for n, v in got.items()}


def rel_err(layer, linear, x):
    with torch.no_grad():
        y = torch.nn.functional.linear(x, linear.weight, linear.bias)
        return float(torch.linalg.vector_norm(layer(x) - y) / torch.linalg.vector_norm(y))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", default="model.layers.2.self_attn.q_proj,model.layers.10.mlp.down_proj,"
                   "model.layers.20.mlp.gate_proj")
    p.add_argument("--scales", default="1,4,16,64")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    names = args.layers.split(",")
    scales = [float(s) for s in args.scales.split(",")]
    model, tok = models.load_model()
    calib_text, eval_text = data.default_texts()
    calib = layer_inputs(model, names, data.tokenize(tok, calib_text)[: 4 * 256], 256)
    held = layer_inputs(model, names, data.tokenize(tok, eval_text)[: 2 * 256], 256)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    print(f"git {sha}; torch {torch.__version__}; NVFP4 RTN + WUSH; errors on held-out inputs x scale")
    print(f"{'layer':<34} {'scale':>5} {'static_err':>10} {'dynamic_err':>11} {'saturated':>10}")
    for name in names:
        lin = model.get_submodule(name)
        acc = HessianAccumulator(lin.in_features)
        acc.add(calib[name])
        layers = {
            policy: quantize_linear(lin, acc.mean(), WushConfig(format="nvfp4", method="rtn", transform="wush",
                                                                act_scale=policy), name=name, inputs=calib[name])
            for policy in ("static", "dynamic")
        }
        for s in scales:
            x = held[name] * s
            with SaturationCounter(layers["static"]) as counter:
                e_static = rel_err(layers["static"], lin, x)
            sat = counter.report()
            e_dyn = rel_err(layers["dynamic"], lin, x)
            rows.append({"layer": name, "scale": s, "static_err": e_static, "dynamic_err": e_dyn,
                         "saturated_fraction": sat.fraction})
            print(f"{name:<34} {s:>5g} {e_static:>10.4f} {e_dyn:>11.4f} {100 * sat.fraction:>9.3f}%")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"git": sha, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
