"""The router's table (ops/dispatch.py): the cuda_decode route, the fp8core slot, the fp4_gemm route, the renamed
cublas_bf16 route, settings read per decision (never frozen), device state behind prepare / clear."""

from __future__ import annotations

import warnings

import pytest
import torch

from wush_compile import settings
from wush_compile.config import Format, KernelChoice as KC
from wush_compile.ops import dispatch

HOPPER = dict(capability=(9, 0), triton_ok=True, cutlass_ok=False, cuda_decode_ok=True)
ON = settings.Settings(cuda_decode=True)
OFF = settings.Settings()


@pytest.mark.parametrize(
    "m, k, fmt, switches, machine, expected",
    [
        (1, 4096, "mxfp4", OFF, HOPPER, KC.TRITON_DECODE),  # off by default
        (1, 4096, "mxfp4", ON, HOPPER, KC.CUDA_DECODE),
        (16, 4096, "nvfp4", ON, HOPPER, KC.CUDA_DECODE),
        (17, 4096, "mxfp4", ON, HOPPER, KC.TRITON_FP8),  # decode bucket only
        (1, 4096 + 128, "mxfp4", ON, HOPPER, KC.TRITON_DECODE),  # K % 256 != 0
        (1, 4096, "mxfp4", ON, dict(HOPPER, cuda_decode_ok=False), KC.TRITON_DECODE),  # cubin missing
        (1, 4096, "mxfp4", settings.Settings(cuda_decode=True, cuda_decode_disabled=True), HOPPER, KC.TRITON_DECODE),
        (4096, 4096, "mxfp4", ON, HOPPER, KC.TRITON_FP8),  # the fp8core slot is off
    ],
)
def test_cuda_decode_row_of_the_table(m, k, fmt, switches, machine, expected):
    choice, reason = dispatch.choose_kernel(m, 4096, k, fmt, "cuda", switches=switches, count=False, **machine)
    assert choice is expected, reason


def test_reasons_say_why_cuda_decode_was_skipped():
    _, reason = dispatch.choose_kernel(1, 64, 4096 + 128, "mxfp4", "cuda", switches=ON, count=False, **HOPPER)
    assert "no cuda_decode" in reason and "K=4224" in reason and "decode kernel" in reason
    _, reason = dispatch.choose_kernel(1, 64, 4096, "mxfp4", "cuda", switches=settings.Settings(
        cuda_decode=True, cuda_decode_disabled=True), count=False, **HOPPER)
    assert "WUSH_DISABLE_CUDA_DECODE" in reason


def test_pinned_cuda_decode_runs_where_it_can_and_falls_back_with_a_reason():
    choice, reason = dispatch.choose_kernel(8, 64, 512, "nvfp4", "cuda", "cuda_decode", count=False, **HOPPER)
    assert choice is KC.CUDA_DECODE and reason == "pinned to cuda_decode"
    choice, reason = dispatch.choose_kernel(64, 64, 512, "nvfp4", "cuda", "cuda_decode", count=False, **HOPPER)
    assert choice is KC.CUBLAS_BF16 and "pinned cuda_decode cannot run" in reason and "M=64" in reason
    choice, reason = dispatch.choose_kernel(1, 64, 512, "mxfp4", "cpu", "cuda_decode", count=False)
    assert choice is KC.REFERENCE and "needs CUDA tensors" in reason


def test_fp8core_is_off_in_auto_but_runs_when_pinned():
    rows = [r for r in dispatch.AUTO_ROUTES if r.route is KC.FP8CORE]
    assert len(rows) == 1 and rows[0].on == "never" and rows[0].off_reason == "not measured faster"
    choice, reason = dispatch.choose_kernel(4096, 64, 512, "mxfp4", "cuda", "auto", count=False, **HOPPER)
    assert choice is KC.TRITON_FP8
    choice, reason = dispatch.choose_kernel(4096, 64, 512, "mxfp4", "cuda", "fp8core", count=False, **HOPPER)
    assert choice is KC.FP8CORE
    choice, reason = dispatch.choose_kernel(4096, 64, 512, "nvfp4", "cuda", "fp8core", count=False, **HOPPER)
    assert choice is not KC.FP8CORE and "pinned fp8core cannot run" in reason and "nvfp4" in reason


def test_every_concrete_route_has_a_path_and_a_table_row_or_a_reason():
    table = {r.route for r in dispatch.AUTO_ROUTES}
    for choice in KC:
        assert dispatch.kernel_path(choice)
        if choice not in (KC.AUTO, KC.REFERENCE):
            assert choice in table, f"{choice.value} is not in dispatch.AUTO_ROUTES"


def test_cublas_bf16_is_the_new_name_of_triton_bf16():
    assert KC.TRITON_BF16 is KC.CUBLAS_BF16 and KC.CUBLAS_BF16.value == "cublas_bf16"
    with pytest.warns(DeprecationWarning, match="'triton_bf16' is deprecated; it is called 'cublas_bf16'"):
        assert KC.parse("triton_bf16") is KC.CUBLAS_BF16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KC.parse("cublas_bf16") is KC.CUBLAS_BF16
    assert "triton_bf16" not in [c.value for c in KC]
    choice, reason = dispatch.choose_kernel(2048, 64, 512, "nvfp4", "cuda", count=False, **HOPPER)
    assert choice is KC.CUBLAS_BF16 and "bf16" in reason


def test_gemm_route_owns_the_fp4_gemm_m_rule():
    assert dispatch.gemm_route(1, "mxfp4") is KC.TRITON_DECODE
    assert dispatch.gemm_route(dispatch.FP4_GEMM_TRITON_MAX_M, Format.MXFP4) is KC.TRITON_DECODE
    assert dispatch.gemm_route(dispatch.FP4_GEMM_TRITON_MAX_M + 1, "mxfp4") is KC.CUBLAS_BF16
    assert dispatch.gemm_route(1, "nvfp4") is KC.CUBLAS_BF16


def test_runtime_auto_follows_the_settings_now(monkeypatch):
    """Settings are read per decision: turning a switch on later takes effect (no cache freezes it)."""
    monkeypatch.setattr(dispatch, "_cuda_decode_status", lambda device: (True, "given"))
    monkeypatch.setattr(dispatch, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(dispatch, "triton_kernels_status", lambda: (True, "given"))
    dev = torch.device("cuda", 0)
    assert dispatch.runtime_choice("auto", 1, 64, 512, "mxfp4", dev) is KC.TRITON_DECODE
    with settings.overridden(cuda_decode=True):
        assert dispatch.runtime_choice("auto", 1, 64, 512, "mxfp4", dev) is KC.CUDA_DECODE
        assert dispatch.runtime_choice("auto", 1, 64, 512 + 128, "mxfp4", dev) is KC.TRITON_DECODE  # K rule
    monkeypatch.setenv("WUSH_CUDA_DECODE", "1")
    assert dispatch.runtime_choice("auto", 1, 64, 512, "mxfp4", dev) is KC.CUDA_DECODE
    monkeypatch.setenv("WUSH_CUDA_DECODE", "0")
    assert dispatch.runtime_choice("auto", 1, 64, 512, "mxfp4", dev) is KC.TRITON_DECODE
    dispatch.clear()


def test_cutlass_switch_is_read_per_decision(monkeypatch):
    blackwell = dict(capability=(10, 0), triton_ok=True)
    monkeypatch.setattr(dispatch, "_cutlass_status", lambda device: (True, "cubins given"))
    assert dispatch.choose_kernel(1, 64, 512, "mxfp4", "cuda", count=False, **blackwell)[0] is KC.CUTLASS
    monkeypatch.setenv("WUSH_DISABLE_CUTLASS", "1")
    choice, reason = dispatch.choose_kernel(1, 64, 512, "mxfp4", "cuda", count=False, **blackwell)
    assert choice is KC.TRITON_DECODE and "WUSH_DISABLE_CUTLASS" in reason
    monkeypatch.setenv("WUSH_DISABLE_CUTLASS", "0")
    assert dispatch.choose_kernel(1, 64, 512, "mxfp4", "cuda", count=False, **blackwell)[0] is KC.CUTLASS


def test_settings_overridden_checks_its_fields():
    with settings.overridden(portable_unpack=True) as s:
        assert s.portable_unpack and settings.portable_unpack()
    assert settings.current() == settings.current()
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['cuda_decod'\]"):
        with settings.overridden(cuda_decod=True):
            pass
    with pytest.raises(ValueError, match="must be True or False, got 1"):
        with settings.overridden(cuda_decode=1):
            pass


def test_clear_drops_the_backend_state():
    from wush_compile.ops import kernels

    kernels.mx_global_scale("cpu")
    kernels._STATS["cpu"] = torch.zeros(4, dtype=torch.int32)
    dispatch._kernels()  # the router has used the Triton launchers
    dispatch.clear()
    assert not kernels._MX_GLOBAL and not kernels._STATS and not kernels._LOCKS


def test_prepare_ignores_cpu_devices():
    dispatch.prepare("cpu", routes=["auto", "cuda_decode"])  # nothing to allocate, no CUDA touched
