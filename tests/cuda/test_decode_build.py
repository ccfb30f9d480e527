"""The Hopper decode cubin built on the CPU machine (nvcc, no GPU): registers and no local memory, the instructions
the design relies on, and the instruction count per weight of the GEMM's main loop, read back with cuobjdump.

Measured here (nvcc 13.0, 2026-11-23): the cubin builds in about 11 s (one nvcc on one core); the main loop of
one 256-column unit (256 weights per thread) is 692 / 881 instructions for MXFP4 with 1 / 2 token tiles and
690 / 749 for NVFP4, i.e. 2.7-3.4 per weight (unpack 10 per 8 weights: 6 integer ops + 4 e4m3x2 -> f16x2
conversions; MXFP4 promotion 2 per accumulator element per group; NVFP4 scale fold 0.5).
"""

from __future__ import annotations

import collections
import re
import subprocess
from pathlib import Path

import pytest

from wush_compile.cuda import builder, decode

GEMMS = [decode.gemm_kernel_name(f, t, decode.DecodeConfig(w, s))
         for f in ("mxfp4", "nvfp4") for t in (1, 2) for (w, s) in sorted(decode.COMPILED_CONFIGS)]
ACTS = [f"wush_dec_act_{f}_{x}" for f in ("mxfp4", "nvfp4") for x in ("fp32", "bf16", "fp16")]
#: Upper bound on main-loop instructions per weight (measured 2.7-3.4, see the module doc); a regression above it
#: means the unpack or the promotion lost its shape.
MAX_INSTR_PER_WEIGHT = 3.6


@pytest.fixture(scope="module")
def cubin(toolchain, request) -> Path:
    root = Path(request.config.cache.mkdir("wush_cuda_build"))
    d = builder.build(["sm_90a"], out=root, only=["decode_sm90"], toolchain=toolchain)["sm_90a"]
    target = next(t for t in builder.targets("sm_90a") if t.kind == "decode")
    assert target.inputs == ("decode_sm90.cu",)
    return d / target.filename


def _sass(cuobjdump, cubin: Path, fn: str) -> list[str]:
    text = subprocess.run([str(cuobjdump), "-sass", "-fun", fn, str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    ops = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops.append(m.group(1))
    return ops


def test_resources_no_local_memory(cubin, cuobjdump):
    text = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    usage = dict(re.findall(r"Function (\w+):\s*\n\s*(REG:.*)", text))
    assert set(GEMMS + ACTS) <= set(usage), sorted(usage)
    for fn in GEMMS + ACTS:
        fields = dict(re.findall(r"(\w+):(\d+)", usage[fn]))
        assert fields["STACK"] == "0" and fields["LOCAL"] == "0", (fn, usage[fn])
        assert int(fields["REG"]) <= 128, (fn, usage[fn])  # 2+ CTAs of 128 threads per SM


def test_gemm_uses_the_intended_instructions(cubin, cuobjdump):
    for fn in GEMMS:
        ops = collections.Counter(_sass(cuobjdump, cubin, fn))
        assert ops["HMMA.16816.F32"] > 0 and ops["LDSM.16.M88.4"] > 0, fn  # mma.sync m16n8k16, ldmatrix.x4
        assert ops["LDGSTS.E.BYPASS.128"] > 0, fn  # 16-byte cp.async
        assert ops["F2FP.F16.E4M3.UNPACK_B"] > 0, fn  # e4m3x2 -> f16x2, two weights per instruction
        assert ops["ACQBULK"] == 1, fn  # griddepcontrol.wait (programmatic dependent launch)
        assert ("HMUL2" in ops) == ("nvfp4" in fn), fn  # NVFP4 folds its scales into fp16, MXFP4 promotes in fp32
    for fn in ACTS:
        ops = _sass(cuobjdump, cubin, fn)
        assert "PREEXIT" in ops[:8], fn  # griddepcontrol.launch_dependents first thing


def test_main_loop_instructions_per_weight(toolchain, cuobjdump, tmp_path):
    """Build with the epilogue compiled out (WUSH_DEC_SASS_COUNT) and count the loop over one 256-column unit."""
    src = builder.KERNEL_DIR / builder.DECODE_SOURCE
    out = tmp_path / "count.cubin"
    subprocess.run([str(toolchain.nvcc), "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DNDEBUG",
                    "-DWUSH_DEC_SASS_COUNT", "-gencode", "arch=compute_90a,code=sm_90a", "-cubin", "-o", str(out),
                    str(src)], check=True, capture_output=True)
    per_weight = {}
    for fn in GEMMS:
        ops = _sass(cuobjdump, out, fn)
        top = max(i for i, op in enumerate(ops[: ops.index("LDSM.16.M88.4")]) if op.startswith("DEPBAR"))
        end = max(i for i, op in enumerate(ops) if op.startswith("HMMA"))
        end = next(i for i in range(end, len(ops)) if ops[i] == "BRA")  # the loop's back edge
        body = ops[top:end + 1]
        c = collections.Counter(op.split(".")[0] for op in body)
        tiles = 2 if "_t2_" in fn else 1
        assert c["HMMA"] == 8 * 2 * 2 * tiles and c["LDSM"] == 8, (fn, c)  # one unit: 8 chunks, 2 fragments, 2 k16
        assert c["F2FP"] >= 128 and c["BAR"] == 1, (fn, c)
        per_weight[fn] = len(body) / 256
    assert max(per_weight.values()) <= MAX_INSTR_PER_WEIGHT, per_weight
