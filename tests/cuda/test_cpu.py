"""The cubin path's Python side without a GPU: availability reasons, artifact discovery, op schemas and fakes,
argument errors, and the ctypes ABI structs."""

import ctypes

import pytest
import torch

import wush_compile.cuda as wcuda
from wush_compile.cuda import builder as build, layout, loader


@pytest.fixture(autouse=True)
def _fresh_availability():
    wcuda.clear_availability_cache()
    yield
    wcuda.clear_availability_cache()


# ---------------------------------------------------------------- availability


def test_available_reasons_without_a_gpu(monkeypatch):
    ok, why = wcuda.available("cpu")
    assert not ok and "not a CUDA device" in why
    monkeypatch.setenv("WUSH_DISABLE_CUTLASS", "1")
    wcuda.clear_availability_cache()
    ok, why = wcuda.available("cuda:0")
    assert not ok and "WUSH_DISABLE_CUTLASS" in why


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)


def test_available_rejects_other_architectures(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0))
    ok, why = wcuda.available("cuda:0")
    assert not ok and "sm_100a" in why and "9.0" in why
    _fake_gpu(monkeypatch, (10, 3))  # B300: sm_100a cubins do not run there
    wcuda.clear_availability_cache()
    ok, why = wcuda.available("cuda:0")
    assert not ok and "10.3" in why


def test_available_needs_cuda_python_to_drive_the_gpu(monkeypatch):
    _fake_gpu(monkeypatch, (10, 0))

    def no_driver():
        raise loader.CudaUnavailable("cuda-python is not installed (needed to load the cubins): "
                                     "pip install cuda-python")

    monkeypatch.setattr(loader, "driver", no_driver)
    ok, why = wcuda.available("cuda:0")
    assert not ok and "pip install cuda-python" in why


def _touch(d, targets):
    d.mkdir(parents=True, exist_ok=True)
    for t in targets:
        (d / t.filename).write_bytes(b"")


def test_available_reports_where_cubins_come_from(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, (12, 0))
    monkeypatch.setattr(loader, "driver", lambda: object())
    monkeypatch.setenv("WUSH_CUDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WUSH_CUDA_CUBIN_DIR", raising=False)
    try:
        build.find_toolchain()
        has_toolchain = True
    except build.BuildError:
        has_toolchain = False
    ok, why = wcuda.available("cuda:0")
    if has_toolchain:
        assert ok and "built on first use" in why and "sm_120a" in why
    else:
        assert not ok and "cannot be built here" in why
    # A directory holding this build's host library and quantize cubin wins ...
    core = [t for t in build.targets("sm_120a") if t.kind in ("host", "quantize")]
    d = tmp_path / "prebuilt" / "sm_120a"
    _touch(d, core)
    monkeypatch.setenv("WUSH_CUDA_CUBIN_DIR", str(tmp_path / "prebuilt"))
    wcuda.clear_availability_cache()
    ok, why = wcuda.available("cuda:0")
    assert ok and str(d) in why
    # ... and artifacts of other sources (another hash in the name) are never picked up.
    for t in core:
        (d / t.filename).rename(d / t.filename.replace(t.content_hash, "0" * 16))
    wcuda.clear_availability_cache()
    ok, why = wcuda.available("cuda:0")
    assert not ok and "no sm_120a build of these kernel sources" in why


def test_artifacts_never_build_with_an_explicit_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("WUSH_CUDA_CUBIN_DIR", str(tmp_path))
    gemm = next(t for t in build.targets("sm_100a") if t.name == "fp4_sm100_mxfp4_bf16")
    with pytest.raises(loader.CudaUnavailable, match="rebuild with python -m wush_compile.cuda.build"):
        loader.artifacts("sm_100a", [gemm])


def test_host_library_and_cubins_come_from_one_directory(monkeypatch, tmp_path):
    ts = [t for t in build.targets("sm_100a") if t.name in ("fp4_sm100_mxfp4_bf16", "fp4_gemm_sm100")]
    _touch(tmp_path / "a", ts[:1])
    _touch(tmp_path / "b", ts)
    monkeypatch.setenv("WUSH_CUDA_CUBIN_DIR", str(tmp_path / "a"))
    assert loader.find_artifacts("sm_100a", ts)[0] is None
    monkeypatch.setenv("WUSH_CUDA_CUBIN_DIR", str(tmp_path / "b"))
    assert loader.find_artifacts("sm_100a", ts)[0] == tmp_path / "b"


def test_arch_for_capability():
    assert loader.arch_for_capability((10, 0)) == "sm_100a"
    assert loader.arch_for_capability((12, 0)) == "sm_120a"
    assert loader.arch_for_capability((9, 0)) == "sm_90a"
    assert loader.arch_for_capability((8, 9)) is None


# ---------------------------------------------------------------- ABI structs


def test_abi_struct_layouts():
    # Mirrors wush_gemm_abi.cuh / transform_quantize.cu (the host library and cuKernelGetParamInfo check them
    # again at load time against the compiled code).
    assert ctypes.sizeof(loader.WushGemmArgs) == 3 * 8 + 8 * 8 + 2 * 4
    assert loader.WushGemmArgs.d.offset == 80 and loader.WushGemmArgs.sm_count.offset == 88
    assert ctypes.sizeof(loader.WushKernelInfo) == 16 * 4
    assert ctypes.sizeof(loader.WushQuantArgs) == 5 * 8 + 3 * 8 + 2 * 4


# ---------------------------------------------------------------- targets


def test_targets_and_variant_names():
    names = {t.name for t in build.targets("sm_100a")}
    assert {"fp4_sm100_mxfp4_bf16", "fp4_sm100_nvfp4_fp32", "fp4_gemm_sm100", "transform_quantize"} <= names
    assert build.gemm_variant_name("sm_120a", "nvfp4", "fp16") == "fp4_sm120_nvfp4_fp16"
    host = [t for t in build.targets("sm_100a") if t.kind == "host"]
    assert len(host) == 1 and host[0].filename == f"libwush_fp4_gemm_sm100.sm_100a.{host[0].content_hash}.so"
    # sm_90a builds the quantize and decode kernels only (no CUTLASS GEMM is routed there)
    assert {t.kind for t in build.targets("sm_90a")} == {"quantize", "decode"}
    by = {t.name: t for t in build.targets("sm_100a")}
    gemm, quant = by["fp4_sm100_mxfp4_bf16"], by["transform_quantize"]
    assert gemm.filename == f"fp4_sm100_mxfp4_bf16.sm_100a.{gemm.content_hash}.cubin"
    assert gemm.ptx_filename.endswith(".ptx") and host[0].ptx_filename is None
    # Each artifact hashes exactly its inputs: variants differ, the quantize kernel ignores the GEMM headers.
    assert len({t.content_hash for t in build.targets("sm_100a")}) == len(build.targets("sm_100a"))
    assert quant.inputs == ("transform_quantize.cu",) and "wush_gemm_abi.cuh" in gemm.inputs
    with pytest.raises(build.BuildError, match="unknown architecture"):
        build.targets("sm_89")


def test_missing_toolkit_is_named(monkeypatch):
    monkeypatch.setenv("WUSH_NVCC", "/nonexistent/nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.setattr(build.Path, "is_file", lambda self: False)
    with pytest.raises(build.BuildError, match="nvcc was not found.*WUSH_NVCC"):
        build.find_nvcc()


def test_missing_cutlass_headers_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("WUSH_CUTLASS_INCLUDE", str(tmp_path))
    with pytest.raises(build.BuildError, match="cutlass/cutlass.h"):
        build.find_cutlass_include()


def test_old_nvcc_cannot_target_blackwell():
    tc = build.Toolchain(build.Path("/x/nvcc"), (12, 4), "12.4.1", build.Path("/x"), "4.2.0")
    assert tc.supports("sm_90a") and not tc.supports("sm_100a")
    with pytest.raises(build.BuildError, match="cannot target sm_100a; it needs CUDA 12.8"):
        build.build(["sm_100a"], toolchain=tc)


def test_source_hash_tracks_the_kernel_sources():
    h = build.source_hash()
    assert len(h) == 64 and h == build.source_hash()


# ---------------------------------------------------------------- ops: schemas, fakes, errors


def _meta_fp4(m=5, n=16, k=64, fmt="mxfp4"):
    g = 32 if fmt == "mxfp4" else 16
    dev = "meta"
    return dict(
        a_codes=torch.empty(m, k // 2, dtype=torch.uint8, device=dev),
        a_scales=torch.empty(layout.swizzled_scale_numel(m, k // g), dtype=torch.uint8, device=dev),
        a_global_scale=torch.empty((), dtype=torch.float32, device=dev),
        w_codes=torch.empty(n, k // 2, dtype=torch.uint8, device=dev),
        w_scales=torch.empty(layout.swizzled_scale_numel(n, k // g), dtype=torch.uint8, device=dev),
        w_global_scale=torch.empty((), dtype=torch.float32, device=dev),
        bias=None,
        fmt=fmt,
        out_dtype=torch.bfloat16,
    )


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_gemm_fake_shapes(fmt):
    out = torch.ops.wush.cutlass_fp4_gemm(**_meta_fp4(fmt=fmt))
    assert out.shape == (5, 16) and out.dtype == torch.bfloat16 and out.device.type == "meta"


def test_fp4_gemm_argument_errors():
    bad = _meta_fp4()
    bad["a_scales"] = torch.empty(7, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="swizzled uint8 buffer of 512 bytes"):
        torch.ops.wush.cutlass_fp4_gemm(**bad)
    bad = _meta_fp4(n=12)
    with pytest.raises(ValueError, match="N=12 is not a multiple of 8"):
        torch.ops.wush.cutlass_fp4_gemm(**bad)
    bad = _meta_fp4()
    bad["w_codes"] = torch.empty(16, 64, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="K=128"):
        torch.ops.wush.cutlass_fp4_gemm(**bad)
    bad = _meta_fp4()
    bad["a_global_scale"] = torch.empty(2, dtype=torch.float32, device="meta")
    with pytest.raises(TypeError, match="a_global_scale must be an fp32 scalar"):
        torch.ops.wush.cutlass_fp4_gemm(**bad)


def test_ops_refuse_cpu_tensors_with_a_pointer_to_the_reference():
    args = {k: (torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v)
            for k, v in _meta_fp4().items()}
    with pytest.raises(ValueError, match="CUDA tensors only.*reference"):
        torch.ops.wush.cutlass_fp4_gemm(**args)
    x = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        torch.ops.wush.cutlass_transform_quantize(x, None, torch.ones(()), "mxfp4", True)


@pytest.mark.parametrize("fmt,m,k", [("mxfp4", 5, 64), ("nvfp4", 130, 96), ("nvfp4", 1, 32)])
def test_transform_quantize_fake_shapes(fmt, m, k):
    g = 32 if fmt == "mxfp4" else 16
    x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
    t = torch.empty(k // g, g, g, dtype=torch.bfloat16, device="meta")
    gs = torch.empty((), dtype=torch.float32, device="meta")
    codes, scales = torch.ops.wush.cutlass_transform_quantize(x, t, gs, fmt, True)
    assert codes.shape == (m, k // 2) and scales.shape == (layout.swizzled_scale_numel(m, k // g),)
    codes, scales = torch.ops.wush.cutlass_transform_quantize(x, None, gs, fmt, False)
    assert scales.shape == (m, k // g)


def test_transform_quantize_errors():
    gs = torch.empty((), dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match="K=48 must be a multiple of 32"):
        torch.ops.wush.cutlass_transform_quantize(torch.empty(2, 48, device="meta"), None, gs, "nvfp4", True)
    with pytest.raises(ValueError, match=r"transform must be \(2, 32, 32\)"):
        torch.ops.wush.cutlass_transform_quantize(
            torch.empty(2, 64, device="meta"), torch.empty(2, 16, 16, device="meta"), gs, "mxfp4", True
        )
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        torch.ops.wush.cutlass_transform_quantize(torch.empty(2, 64, dtype=torch.float64, device="meta"), None, gs,
                                                  "mxfp4", True)
    with pytest.raises(ValueError, match="unknown value 'fp4'"):
        torch.ops.wush.cutlass_transform_quantize(torch.empty(2, 64, device="meta"), None, gs, "fp4", True)


def test_linear_fake_keeps_leading_dims():
    x = torch.empty(2, 3, 64, dtype=torch.bfloat16, device="meta")
    out = torch.ops.wush.cutlass_linear(
        x, torch.empty(16, 32, dtype=torch.uint8, device="meta"), torch.empty(16, 2, dtype=torch.uint8, device="meta"),
        torch.empty(2, 32, 32, dtype=torch.bfloat16, device="meta"), torch.empty((), device="meta"),
        torch.empty((), device="meta"), None, "mxfp4",
    )
    assert out.shape == (2, 3, 16) and out.dtype == torch.bfloat16


def test_ops_trace_under_torch_compile_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 64, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
        gs = torch.empty((), dtype=torch.float32, device=x.device)
        codes, scales = torch.ops.wush.cutlass_transform_quantize(x, None, gs, "mxfp4", True)
        assert codes.shape == (7, 32) and scales.shape == (512,)
