"""The ahead-of-time build on a CPU-only machine (nvcc + the nvidia-cutlass headers; no GPU needed), and what the
cubins contain, read back with cuobjdump:

- sm_100a FP4 GEMMs issue the block-scaled tcgen05 MMA: PTX ``tcgen05.mma.cta_group::1.kind::mxf4.block_scale
  .block32`` (MXFP4) / ``kind::mxf4nvf4.block_scale.block16`` (NVFP4), SASS ``UTCOMMA`` / ``UTCOMMA.4X`` fed by
  ``UTCCP`` (scale factors copied into tensor memory) and TMA loads ``UTMALDG``;
- sm_120a FP4 GEMMs issue the warp-level block-scaled MMA: PTX ``mma.sync ... kind::mxf4*.block_scale``, SASS
  ``OMMA.SF ... E2M1.E2M1``;
- the host library evaluates CUTLASS's scale-factor layout, which must equal wush_compile.cuda.layout.

Artifacts are cached under pytest's cache directory (file names carry the sources' hash), so only the first
run after a kernel edit compiles.
Measured on the 2-core CI-like machine (2026-11-23, other jobs running): one CUTLASS GEMM cubin takes about
45 s of CPU, the quantize cubins about 5 s each; the FP4 checks are marked slow.
"""

import ctypes
import ctypes.util
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from wush_compile.cuda import builder, layout


@pytest.fixture(scope="module")
def build_root(request):
    # WUSH_CUDA_TEST_BUILD_ROOT reuses a `python -m wush_compile.cuda.build --out DIR` tree (checked by hash).
    env = os.environ.get("WUSH_CUDA_TEST_BUILD_ROOT")
    return Path(env) if env else Path(request.config.cache.mkdir("wush_cuda_build"))


_FP4_TARGETS = ["fp4_sm100_mxfp4_bf16", "fp4_sm100_nvfp4_bf16", "fp4_gemm_sm100",
                "fp4_sm120_mxfp4_bf16", "fp4_sm120_nvfp4_bf16"]


@pytest.fixture(scope="module")
def fp4_root(toolchain, build_root):
    """The FP4 artifacts the slow checks read, built in one parallel nvcc batch (all CPU cores)."""
    builder.build(["sm_100a", "sm_120a"], out=build_root, only=_FP4_TARGETS, toolchain=toolchain)
    return build_root


def _target(arch, name):
    return next(t for t in builder.targets(arch) if t.name == name)


def _sass(cuobjdump, cubin: Path) -> str:
    return subprocess.run([str(cuobjdump), "--dump-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout


def _opcodes(sass: str) -> list[str]:
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)


def test_quantize_kernels_compile_for_every_architecture(toolchain, cuobjdump, build_root):
    builder.build(["sm_90a", "sm_100a", "sm_120a"], out=build_root, only=["transform_quantize"], toolchain=toolchain)
    for arch in ("sm_90a", "sm_100a", "sm_120a"):
        d = build_root / arch
        cubin = d / _target(arch, "transform_quantize").filename
        sass = _sass(cuobjdump, cubin)
        assert f"code for {arch}" in sass
        names = set(re.findall(r"Function : (\w+)", sass))
        assert names == {f"wush_tq_{f}_{t}" for f in ("mxfp4", "nvfp4") for t in ("fp32", "bf16", "fp16")}
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        assert usage.count("LOCAL:0") == 6, f"register spills in {arch}:\n{usage}"
        ops = _opcodes(sass)
        assert "STL" not in ops and "LDL" not in ops
        manifest = (d / "manifest.json").read_text()
        assert cubin.name in manifest and toolchain.version_text in manifest


@pytest.mark.slow
@pytest.mark.parametrize("fmt,ptx_kind,sass_mma", [
    ("mxfp4", "tcgen05.mma.cta_group::1.kind::mxf4.block_scale.block32", "UTCOMMA"),
    ("nvfp4", "tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16", "UTCOMMA.4X"),
])
def test_sm100_gemm_uses_block_scaled_tcgen05_mma(toolchain, cuobjdump, fp4_root, fmt, ptx_kind, sass_mma):
    name = f"fp4_sm100_{fmt}_bf16"
    d = fp4_root / "sm_100a"
    t = _target("sm_100a", name)
    ptx = (d / t.ptx_filename).read_text()
    assert ptx_kind in ptx
    assert "tcgen05.cp.cta_group::1" in ptx  # scale factors into tensor memory
    sass = _sass(cuobjdump, d / t.filename)
    assert "code for sm_100a" in sass and f"Function : wush_{name}_kernel" in sass
    ops = _opcodes(sass)
    assert sass_mma in ops, f"no block-scaled FP4 tcgen05 MMA ({sass_mma}) in the SASS"
    assert any(op.startswith("UTCCP") for op in ops), "no scale-factor copy into tensor memory (UTCCP)"
    assert any(op.startswith("UTMALDG") for op in ops), "no TMA loads"
    assert not any(op.startswith(("HMMA", "HGMMA", "QGMMA")) for op in ops), "fell back to an older MMA"


@pytest.mark.slow
@pytest.mark.parametrize("fmt,ptx_re,sass_re", [
    ("mxfp4", r"mma\.sync\.aligned\.kind::mxf4nvf4\.block_scale\.scale_vec::2X\.m16n8k64\.row\.col"
              r"\.f32\.e2m1\.e2m1\.f32\.ue8m0",
     r"OMMA\.SF\.16864\.F32\.E2M1\.E2M1\.E8"),
    ("nvfp4", r"mma\.sync\.aligned\.kind::mxf4nvf4\.block_scale\.scale_vec::4X\.m16n8k64\.row\.col"
              r"\.f32\.e2m1\.e2m1\.f32\.ue4m3",
     r"OMMA\.SF\.16864\.F32\.E2M1\.E2M1\.UE4M3"),
])
def test_sm120_gemm_uses_block_scaled_mma(toolchain, cuobjdump, fp4_root, fmt, ptx_re, sass_re):
    name = f"fp4_sm120_{fmt}_bf16"
    d = fp4_root / "sm_120a"
    t = _target("sm_120a", name)
    assert re.search(ptx_re, (d / t.ptx_filename).read_text())
    sass = _sass(cuobjdump, d / t.filename)
    assert "code for sm_120a" in sass and f"Function : wush_{name}_kernel" in sass
    assert any(re.match(sass_re, op) for op in _opcodes(sass)), sorted({o for o in _opcodes(sass) if "MMA" in o})


@pytest.fixture(scope="module")
def sm100_host(toolchain, fp4_root):
    d = fp4_root / "sm_100a"
    lib = ctypes.CDLL(str(d / _target("sm_100a", "fp4_gemm_sm100").filename))
    lib.wush_fp4_sm100_sf_offset.restype = ctypes.c_int64
    lib.wush_fp4_sm100_sf_offset.argtypes = [ctypes.c_int32] + [ctypes.c_int64] * 4
    lib.wush_fp4_sm100_sf_size.restype = ctypes.c_int64
    lib.wush_fp4_sm100_sf_size.argtypes = [ctypes.c_int32, ctypes.c_int64, ctypes.c_int64]
    lib.wush_last_error.restype = ctypes.c_char_p
    return lib


@pytest.mark.slow
@pytest.mark.parametrize("fmt,g", [(0, 32), (1, 16)])
@pytest.mark.parametrize("rows,kgroups", [(1, 1), (128, 4), (200, 12), (300, 11), (513, 3)])
def test_cutlass_scale_layout_equals_ours(sm100_host, fmt, g, rows, kgroups):
    k = kgroups * g
    ours = layout.swizzled_offsets(rows, kgroups)
    theirs = torch.tensor([[sm100_host.wush_fp4_sm100_sf_offset(fmt, rows, k, r, c) for c in range(kgroups)]
                           for r in range(rows)], dtype=torch.int64)
    assert torch.equal(ours, theirs)
    assert sm100_host.wush_fp4_sm100_sf_size(fmt, rows, k) == layout.swizzled_scale_numel(rows, kgroups)


@pytest.mark.slow
def test_host_library_reports_the_launch(sm100_host):
    from wush_compile.cuda import loader

    assert sm100_host.wush_abi_version() == loader.ABI_VERSION
    assert sm100_host.wush_gemm_args_bytes() == ctypes.sizeof(loader.WushGemmArgs)
    for fmt, vec in (("mxfp4", 32), ("nvfp4", 16)):
        for out, align in (("bf16", 8), ("fp16", 8), ("fp32", 4)):
            info = loader.WushKernelInfo()
            assert getattr(sm100_host, f"wush_fp4_sm100_{fmt}_{out}_info")(ctypes.byref(info)) == 0
            assert info.min_cc == 100 and info.sf_vec == vec and info.align_k == 32 and info.align_n == align
            assert tuple(info.tile) == (128, 128, 256) and tuple(info.cluster) == (1, 1, 1)
            assert info.block[0] % 128 == 0 and 0 < info.params_bytes <= 4096
            assert 100_000 < info.smem_bytes <= 232_448  # a deep TMA pipeline within sm_100's 227 KB


@pytest.mark.slow
def test_prepare_reports_errors(sm100_host):
    from wush_compile.cuda import loader

    info = loader.WushKernelInfo()
    sm100_host.wush_fp4_sm100_mxfp4_bf16_info(ctypes.byref(info))
    params = ctypes.create_string_buffer(info.params_bytes)
    grid = (ctypes.c_int32 * 3)()
    ws = ctypes.c_int64(-1)
    prepare = sm100_host.wush_fp4_sm100_mxfp4_bf16_prepare
    args = loader.WushGemmArgs(m=64, n=256, k=48, sm_count=148)
    assert prepare(ctypes.byref(args), params, info.params_bytes, grid, ctypes.byref(ws)) == 2
    assert b"K=48 must be a multiple of 32" in sm100_host.wush_last_error()
    assert prepare(ctypes.byref(args), params, 8, grid, ctypes.byref(ws)) == 1
    if ctypes.util.find_library("cuda") is None:
        # No driver: the Params cannot get their TMA descriptors. Reaching that step also shows the variant
        # needs no workspace and CUTLASS accepts the shape.
        args = loader.WushGemmArgs(m=64, n=256, k=512, a=256, b=512, a_scale=1024, b_scale=2048, d=4096,
                                   sm_count=148)
        assert prepare(ctypes.byref(args), params, info.params_bytes, grid, ctypes.byref(ws)) == 5
        assert ws.value == 0
        assert b"cuTensorMapEncodeTiled failed" in sm100_host.wush_last_error()
