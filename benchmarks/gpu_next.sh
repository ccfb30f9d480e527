#!/usr/bin/env bash
# The GPU work the open issues still need, in stages that fit one 10-minute device call each; everything is logged
# into $OUT. Stages (any order, several per call):
#   kernels  - fp8core GPU tests, then bench_fp8core (bf16 / fp8 / fp8 W8A8 / today's route / fp8core, all M)
#   vllm     - the ops as vLLM calls them (tests/vllm/test_ops_gpu.py)
#   layers   - `wush bench --layers` on this tree and on the tree before the runtime restructure, same machine
#              (needs .before/: git archive fb212ae | tar -x -C .before; carry it)
#   onload   - block-by-block GPTQ calibration of the 8B shape (15 GiB bf16) on a GPU capped at 8 GiB
#   e2e:V    - `wush bench --e2e --model llama8b --variants V` (V: bf16, fp8 or wush); merge the JSONs of one
#              machine with benchmarks/e2e_merge.py
#   bash benchmarks/gpu_next.sh kernels vllm
set -o pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the layers stage runs from .before/
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
for stage in "$@"; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    kernels)
      timeout 120 $PY -m pytest -q -rA -m gpu tests/ops/test_fp8core.py -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/fp8core_tests.log"
      timeout ${BENCH_S:-330} $PY benchmarks/bench_fp8core.py "$OUT/fp8core" $(( ${BENCH_S:-330} - 30 )) 2>&1 | tee "$OUT/fp8core_bench.log" | tail -60
      ;;
    vllm)
      timeout 150 $PY -m pytest -q -rA tests/vllm/test_ops_gpu.py -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/vllm_ops.log"
      ;;
    layers)
      [ -d .before/wush_compile ] || { echo "no .before/ tree (see the header)"; continue; }
      for tree in after before; do
        dir=$PWD; [ $tree = before ] && dir=$PWD/.before
        (cd "$dir" && PYTHONPATH=$dir timeout 280 $PY -m wush_compile.cli bench --layers --m 1 --m 16 --m 128 --m 2048 \
           --fmt mxfp4 --out "$OUT/layers_$tree") 2>&1 | tail -40 | tee "$OUT/layers_$tree.log"
      done
      ;;
    onload)
      timeout 560 $PY benchmarks/calibrate_block_by_block.py --gpu-limit-gib 8 2>&1 | tail -20 | tee "$OUT/onload.log"
      ;;
    e2e:*)
      v=${stage#e2e:}
      timeout 560 $PY -m wush_compile.cli bench --e2e --model llama8b --variants "$v" --out "$OUT/e2e_$v" 2>&1 \
        | tail -40 | tee "$OUT/e2e_$v.log"
      ;;
    *) echo "unknown stage $stage" ;;
  esac
done
