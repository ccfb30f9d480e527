#!/usr/bin/env bash
# Hopper decode kernels on a CUDA machine: GPU tests, then the decode benchmark; logs and JSON into $OUT.
#   WUSH_CUDA_CUBIN_DIR=<prebuilt dir, optional> OUT=<dir> bash benchmarks/gpu_check_decode.sh
# (without WUSH_CUDA_CUBIN_DIR the cubin is built on first use with the machine's nvcc + CUTLASS headers)
set -u
OUT=${OUT:-out/decode_sm90}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"
T_TESTS=${T_TESTS:-300} T_BENCH=${T_BENCH:-400} T_KTESTS=${T_KTESTS:-200}
timeout "$T_TESTS" $PY -m pytest -q -p no:cacheprovider -m gpu tests/cuda/test_decode.py 2>&1 | tee "$OUT/tests_decode.log" | tail -25
timeout "$T_BENCH" $PY benchmarks/bench_decode_sm90.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
timeout "$T_KTESTS" $PY -m pytest -q -p no:cacheprovider tests/ops/test_kernels.py -k "test_linear_matches_reference and triton_decode" 2>&1 \
  | tee "$OUT/tests_kernels_decode.log" | tail -6
