#!/usr/bin/env bash
# One GPU session: environment + API checks, the kernel tests on the GPU (incl. real SmolLM2 data from
# .carry/), then the per-layer benchmark. Everything is logged into $OUT (default out/gpu).
#   bash benchmarks/gpu_check.sh [bench args, e.g. --layer o --m 1]
set -o pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  $PY - <<'PYEOF'
import torch, triton, triton.language as tl
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("tl.math.div_rn", hasattr(tl.math, "div_rn"), "tl.float8e4nv", hasattr(tl, "float8e4nv"))
a = torch.randn(64, 128, device="cuda").to(torch.float8_e4m3fn); b = torch.randn(96, 128, device="cuda").to(torch.float8_e4m3fn)
y = torch._scaled_mm(a, b.t(), scale_a=torch.ones(64, 1, device="cuda"), scale_b=torch.ones(1, 96, device="cuda"),
                     out_dtype=torch.bfloat16, use_fast_accum=False)
print("_scaled_mm row-wise (M,1)x(1,N) ->", tuple(y.shape), y.dtype)
PYEOF
} 2>&1 | tee "$OUT/env.txt"
timeout 150 $PY -m pytest -q -rA tests/ops -s -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -60
timeout ${BENCH_TIMEOUT:-400} $PY benchmarks/bench_layers.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
