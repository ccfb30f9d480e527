"""Block-by-block calibration on a GPU of a model kept on the CPU: peak GPU memory vs the model's bytes.

    python benchmarks/calibrate_block_by_block.py [--shape llama8b] [--layers N] [--method gptq] [--gpu-limit-gib G]

``--gpu-limit-gib`` caps what this process may allocate on the GPU (``torch.cuda.set_per_process_memory_fraction``)
below the model's own bytes, so the run shows a model that does not fit on the GPU calibrating on it.

The model is Llama-3.1-8B-shaped with random weights (bf16, built on the CPU); calibration data are random token
ids. Prints one JSON line: model bytes, peak GPU memory, seconds, layers quantized, mean layer error.
"""

import argparse
import json
import time

import torch


def main() -> None:
    import wush_compile
    from wush_compile import WushConfig, WushLinear
    from wush_compile.bench.e2e import SHAPES, _random_llama, model_bytes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--method", default="gptq")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--gpu-limit-gib", type=float, default=None, help="cap this process's GPU memory (GiB)")
    a = p.parse_args()
    if a.gpu_limit_gib is not None:
        if not a.gpu_limit_gib > 0:
            p.error(f"--gpu-limit-gib {a.gpu_limit_gib} must be above 0 (GiB of GPU memory this process may use)")
        total = torch.cuda.get_device_properties(0).total_memory
        if not a.gpu_limit_gib * 2**30 < total:
            p.error(f"--gpu-limit-gib {a.gpu_limit_gib} must be above 0 and below the GPU's {total / 2**30:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(a.gpu_limit_gib * 2**30 / total)
    t0 = time.perf_counter()
    model = _random_llama("cpu", torch.bfloat16, a.layers, a.shape)
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, model.config.vocab_size, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    cfg = WushConfig(method=a.method, transform="wush", nsamples=a.nsamples, seqlen=a.seqlen)
    before = model_bytes(model)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, report = wush_compile.quantize(model, cfg, dataset=ids, device="cuda", batch_size=1)
    torch.cuda.synchronize()
    print(json.dumps({
        "shape": a.shape, "layers": model.config.num_hidden_layers, "method": a.method,
        "tokens": report.tokens, "model_gib_bf16": before / 2**30,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30, "calibration_s": time.perf_counter() - t0,
        "build_s": build_s, "quantized": sum(isinstance(m, WushLinear) for m in model.modules()),
        "mean_layer_rel_err": report.mean_rel_err,
        "all_on_cpu_after": all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers())),
        "gpu_limit_gib": a.gpu_limit_gib, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
