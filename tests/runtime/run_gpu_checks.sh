#!/usr/bin/env bash
# The runtime's GPU checks in one go (one device call): the GPU-marked runtime tests (Triton kernels through
# the dispatcher, compiled tiny Llama on CUDA, generate with a static cache under mode="reduce-overhead",
# transformers' CompileConfig(backend="wush")), then the per-call overhead benchmark on CUDA.
# Usage (repo root): OUT=/some/dir bash tests/runtime/run_gpu_checks.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
  "transformers", transformers.__version__, torch.cuda.get_device_name(0))' 2>&1 | tee "$OUT/env.log"
timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -s -rA -p no:cacheprovider tests/runtime/test_gpu.py \
  2>&1 | tee "$OUT/test_gpu.log"
echo "tests exit: $?"
timeout "${BENCH_TIMEOUT:-120}" python3 benchmarks/bench_overhead.py --device cuda --iters 500 \
  --json "$OUT/overhead_cuda.json" 2>&1 | tee "$OUT/overhead_cuda.log"
echo "bench exit: $?"
