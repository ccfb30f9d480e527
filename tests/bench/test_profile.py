"""The profile summary: kernel names map to the right category, busy time is the union of kernel intervals, and
idle time is what the wall clock has beyond it."""

from __future__ import annotations

import pytest

from wush_compile.bench import profile


@pytest.mark.parametrize("name, cat", [
    ("_fp4_gemv_kernel", "wush fp4 GEMM"),
    ("wush_dec_mxfp4_n128", "wush fp4 GEMM"),
    ("wush_dec_act_mxfp4", "wush act transform+quantize"),
    ("_transform_quantize_kernel", "wush act transform+quantize"),
    ("_expand_fp8_kernel", "wush fp4->fp8 expand"),
    ("wush::fused_linear", "wush fp4 GEMM"),
    ("nvjet_tst_128x64_64x4_1x2_h_bz_coopA_TNT", "GEMM (cuBLAS / CUTLASS)"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", "GEMM (cuBLAS / CUTLASS)"),
    ("aten::mm", "GEMM (cuBLAS / CUTLASS)"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "attention"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "Inductor fused (norm, rope, residual, ...)"),
    ("Memcpy DtoD (Device -> Device)", "copy / memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_categorize(name, cat):
    assert profile.categorize(name) == cat


def test_summary_per_step():
    # two steps; the GEMM overlaps the norm by 1 us, so busy = union, not the sum
    kernels = [("_fp4_gemv_kernel", 0.0, 10.0), ("triton_poi_fused_add_0", 9.0, 3.0),
               ("_fp4_gemv_kernel", 20.0, 10.0), ("triton_poi_fused_add_0", 30.0, 2.0)]
    s = profile.summarize(kernels, steps=2, wall_s=50e-6)
    assert s["busy_ms"] == pytest.approx(24e-3 / 2)
    assert s["wall_ms"] == pytest.approx(25e-3)
    assert s["idle_ms"] == pytest.approx(25e-3 - 12e-3)
    assert s["gemm_ms"] == pytest.approx(10e-3)
    assert s["outside_gemm_ms"] == pytest.approx(2.5e-3)
    assert s["top"][0] == {"name": "_fp4_gemv_kernel", "ms": pytest.approx(10e-3), "calls": 1.0}
    assert "outside GEMMs" in profile.format_profile("x", s | {"source": "CUDA kernels"})
    with pytest.raises(ValueError, match="steps"):
        profile.summarize(kernels, steps=0, wall_s=1.0)
