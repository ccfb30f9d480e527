#!/usr/bin/env bash
# The runtime's GPU checks in one go (one device call): the GPU-marked runtime tests (Triton kernels through
# the dispatcher, compiled tiny Llama on CUDA, generate with a static cache, mode="reduce-overhead" through
# transformers' CompileConfig(backend="wush")), the CUDA-graph probe, then the per-call overhead benchmark.
# Usage (repo root): OUT=/some/dir bash tests/runtime/run_gpu_checks.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
  "transformers", transformers.__version__, torch.cuda.get_device_name(0))' 2>&1 | tee "$OUT/env.log"
# -n 1: a crashing test (segfault) takes down only its xdist worker, the others still run
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -rA -n 1 -p no:cacheprovider tests/runtime/test_gpu.py \
  2>&1 | tee "$OUT/test_gpu.log"
echo "tests exit: $?"
timeout "${PROBE_TIMEOUT:-60}" python3 tests/runtime/gpu_reduce_overhead_probe.py ${PROBE_ARGS:---device-keyed-scratch} \
  2>&1 | tee "$OUT/probe.log"
echo "probe exit: $?"
timeout "${BENCH_TIMEOUT:-60}" python3 benchmarks/bench_overhead.py --device cuda --iters 300 \
  --json "$OUT/overhead_cuda.json" 2>&1 | tee "$OUT/overhead_cuda.log"
echo "bench exit: $?"
