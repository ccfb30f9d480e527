"""Kernel-choice policy (ops/dispatch.py): the table of INTERFACES.md, pinning, fallbacks with reasons, counters."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import wush_compile
from wush_compile.config import KernelChoice as KC
from wush_compile.ops import dispatch

HOPPER = dict(capability=(9, 0), triton_ok=True, cutlass_ok=False)
BLACKWELL = dict(capability=(10, 0), triton_ok=True, cutlass_ok=True)


@pytest.mark.parametrize(
    "m, fmt, machine, device, expected",
    [
        (1, "mxfp4", {}, "cpu", KC.REFERENCE),
        (4096, "nvfp4", {}, "cpu", KC.REFERENCE),
        (1, "mxfp4", HOPPER, "cuda", KC.TRITON_DECODE),
        (dispatch.DECODE_MAX_M, "nvfp4", HOPPER, "cuda", KC.TRITON_DECODE),
        (dispatch.DECODE_MAX_M + 1, "mxfp4", HOPPER, "cuda", KC.TRITON_FP8),
        (2048, "nvfp4", HOPPER, "cuda", KC.TRITON_BF16),
        (2048, "mxfp4", dict(capability=(8, 0), triton_ok=True, cutlass_ok=False), "cuda", KC.TRITON_BF16),
        (1, "mxfp4", dict(capability=(7, 5), triton_ok=True, cutlass_ok=False), "cuda", KC.REFERENCE),
        (1, "mxfp4", BLACKWELL, "cuda", KC.CUTLASS),
        (8192, "nvfp4", dict(capability=(12, 0), triton_ok=True, cutlass_ok=True), "cuda", KC.CUTLASS),
        (8192, "nvfp4", dict(capability=(10, 0), triton_ok=True, cutlass_ok=False), "cuda", KC.TRITON_BF16),
        (1, "mxfp4", dict(capability=(9, 0), triton_ok=False, cutlass_ok=False), "cuda", KC.REFERENCE),
    ],
)
def test_policy_table(m, fmt, machine, device, expected):
    choice, reason = dispatch.choose_kernel(m, 4096, 4096, fmt, device, **machine)
    assert choice is expected, f"M={m} {fmt} {machine}: got {choice} ({reason})"
    assert reason


def test_reasons_name_the_rule():
    _, r = dispatch.choose_kernel(1, 64, 64, "mxfp4", "cuda", **HOPPER)
    assert f"M=1 <= DECODE_MAX_M={dispatch.DECODE_MAX_M}" in r
    _, r = dispatch.choose_kernel(4096, 64, 64, "mxfp4", "cuda", **dict(HOPPER, capability=(10, 0)))
    assert "no cutlass" in r and "fp8" in r


def test_pin_used_when_it_can_run():
    choice, reason = dispatch.choose_kernel(4096, 64, 64, "nvfp4", "cuda", KC.TRITON_DECODE, **HOPPER)
    assert choice is KC.TRITON_DECODE and reason == "pinned to triton_decode"


def test_pin_that_cannot_run_falls_back_with_reason_and_counter(caplog, monkeypatch):
    counters.clear()
    choice, reason = dispatch.choose_kernel(4096, 64, 64, "nvfp4", "cuda", "triton_fp8", **HOPPER)
    assert choice is KC.TRITON_BF16
    assert "pinned triton_fp8 cannot run" in reason and "nvfp4 scales do not fold" in reason
    assert counters["wush"]["fallback:pinned triton_fp8 unsupported"] == 1
    assert "pinned triton_fp8 cannot run" in caplog.text
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    choice, reason = dispatch.choose_kernel(1, 64, 64, "mxfp4", "cpu", "triton_decode", triton_ok=True)
    assert choice is KC.REFERENCE and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs Triton kernels on CPU tensors
    choice, reason = dispatch.choose_kernel(1, 64, 64, "mxfp4", "cpu", "triton_decode", triton_ok=True)
    assert choice is KC.TRITON_DECODE


def test_counters_for_every_choice():
    counters.clear()
    dispatch.choose_kernel(1, 64, 64, "mxfp4", "cuda", **HOPPER)
    dispatch.choose_kernel(1, 64, 64, "mxfp4", "cuda", **HOPPER)
    dispatch.choose_kernel(999, 64, 64, "mxfp4", "cuda", **HOPPER)
    dispatch.choose_kernel(1, 64, 64, "mxfp4", "cuda", capability=(9, 0), triton_ok=False, cutlass_ok=False)
    assert counters["wush"]["kernel:triton_decode"] == 2
    assert counters["wush"]["kernel:triton_fp8"] == 1
    assert counters["wush"]["kernel:reference"] == 1
    assert any(k.startswith("fallback:reference on cuda") for k in counters["wush"])


def test_pin_kernel_context_manager():
    assert dispatch.current_pin() is KC.AUTO
    with wush_compile.pin_kernel("reference") as pinned:
        assert pinned is KC.REFERENCE and dispatch.current_pin() is KC.REFERENCE
        with wush_compile.pin_kernel(KC.TRITON_BF16):
            assert dispatch.current_pin() is KC.TRITON_BF16
        assert dispatch.current_pin() is KC.REFERENCE
    assert dispatch.current_pin() is KC.AUTO
    with pytest.raises(ValueError, match=r"KernelChoice: unknown value 'fast'; choose one of"):
        with wush_compile.pin_kernel("fast"):
            pass


def test_decide_with_dynamic_m():
    d = dispatch.decide(8, False, 64, 64, "mxfp4", "cuda", **HOPPER)
    assert d.graph_kernel == "auto" and d.at_hint is KC.TRITON_DECODE and d.dynamic_m
    assert "chosen per call" in d.reason and "triton_fp8" in d.reason
    d = dispatch.decide(8, True, 64, 64, "mxfp4", "cuda", **HOPPER)
    assert d.graph_kernel == "triton_decode" and not d.dynamic_m
    d = dispatch.decide(8, False, 64, 64, "mxfp4", "cpu")
    assert d.graph_kernel == "reference" and "for every M" in d.reason


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"m must be a non-negative int, got -1"):
        dispatch.choose_kernel(-1, 64, 64, "mxfp4", "cpu")
    with pytest.raises(ValueError, match=r"Format: unknown value 'int4'"):
        dispatch.choose_kernel(1, 64, 64, "int4", "cpu")


def test_runtime_choice_resolves_auto_per_call():
    assert dispatch.runtime_choice("triton_bf16", 1, 8, 8, "mxfp4", torch.device("cpu")) is KC.TRITON_BF16
    assert dispatch.runtime_choice("auto", 1, 8, 8, "mxfp4", torch.device("cpu")) is KC.REFERENCE
