#!/usr/bin/env bash
# Hopper decode kernels on a CUDA machine: GPU tests, one ncu pass over single calls (per-kernel duration, achieved
# occupancy, DRAM throughput; cold L2), then the decode benchmark; logs and JSON into $OUT.
#   WUSH_CUDA_CUBIN_DIR=<prebuilt dir, optional> OUT=<dir> bash benchmarks/gpu_check_decode.sh
# (without WUSH_CUDA_CUBIN_DIR the cubin is built on first use with the machine's nvcc)
set -u
OUT=${OUT:-out/decode_sm90}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"
T_TESTS=${T_TESTS:-300} T_NCU=${T_NCU:-90} T_BENCH=${T_BENCH:-400} T_KTESTS=${T_KTESTS:-200}
timeout "$T_TESTS" $PY -m pytest -q -p no:cacheprovider -m gpu tests/cuda/test_decode.py 2>&1 | tee "$OUT/tests_decode.log" | tail -25
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ] && [ "$T_NCU" != 0 ]; then
  timeout "$T_NCU" "$NCU" --clock-control none --csv --metrics \
    gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,launch__grid_size \
    $PY benchmarks/bench_decode_sm90.py --ncu-once --layers qkv --m 1 --configs 4x4 > "$OUT/ncu.log" 2>&1
  echo "ncu exit $?"
fi
timeout "$T_BENCH" $PY benchmarks/bench_decode_sm90.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -60
[ "$T_KTESTS" != 0 ] && timeout "$T_KTESTS" $PY -m pytest -q -p no:cacheprovider tests/ops/test_kernels.py \
  -k "test_linear_matches_reference and triton_decode" 2>&1 | tee "$OUT/tests_kernels_decode.log" | tail -6
