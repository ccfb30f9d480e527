"""Comparison column: the `humming-kernels` package (vllm-project/humming, read at 0.1.20) on OUR MXFP4 weights.

* ``w4a8``:  MXFP4 weights x e4m3 activations. humming quantizes the bf16 activations itself (its
  ``process_input`` kernel: dynamic per-token fp32 scale amax/448 by default, or per 128 columns), then runs
  its GEMM, which on sm_89/sm_90 uses the "fused E8M0" path: each e2m1 value is expanded to e4m3 with its
  block scale folded into the exponent (scales within 11 binades of a reference per tensor, or per row when a
  tensor spans more), and the reference scale is applied per row / per tensor in the epilogue.
* ``w4a16``: MXFP4 weights x bf16 activations (e2m1 -> bf16 times the e8m0 scale in the main loop).

Weights: our codes (N, K/2) uint8 (low nibble = even column, sign in bit 3) ARE humming's packed layout
(element i of an int32 at bits 4i..4i+3, little endian), and our scale bytes ARE its float8_e8m0fnu, so both
are passed as views, no re-encoding; humming then repacks them once on the GPU for its kernels
(``transform_humming_tensors``). ``w_global_scale`` becomes humming's fp32 per-tensor ``weight_scale_2``.
Where this is exact and where not (see ``HummingWeights.notes``):
  - w4a16: exact on the weights (e2m1 * 2**e is exact in bf16 for every scale byte but 0, whose 2**-127 is
    a bf16 subnormal the kernel may flush; our quantizer gives byte 0 only to all-zero blocks).
  - w4a8: exact on the weights while, in every row, the scale bytes of its nonzero blocks span <= 11;
    a block further below its reference is requantized to e2m1 at the raised scale (lossy, humming's
    ``process_mxfp4_w4a8``). When the tensor spans > 11 but its rows don't, humming switches to a per-row
    secondary scale which it stores in bf16: w_global_scale * 2**e is then rounded to bf16 (exact for a
    power-of-two global scale; 1/3 is off by <= 2**-9 relative).
  - scale byte 255 (NaN) has no meaning for humming: prepare() refuses it.
Activations in w4a8 are quantized by humming (fp8 e4m3), so its error vs the exact product is fp8's.

Run-time compilation: humming ships no GEMM binaries. The first call per layer shape compiles its kernels
(its heuristic's choice for every M range, 25-40 distinct ones per path and shape, all on that first call,
in parallel; ``prepare(ms=...)`` cuts that to the ranges of the M one will run) with NVRTC, through its own
precompiled ``nvrtc_compile`` helper (``HUMMING_COMPILER=nvcc`` switches to nvcc), and caches cubins under
``HUMMING_CACHE_DIR`` (default ~/.humming/cache). It needs a CUDA toolkit of torch's CUDA major (headers
incl. CCCL + libnvrtc) under /usr/local/cuda*, ``CUDA_HOME``/``CUDA_PATH`` or pip's ``nvidia/cu13``; no
network. prepare() therefore runs each path once on one row so that compile time stays out of timings
(and out of CUDA-graph capture).

Usage: ``PYTHONPATH=.:/tmp/site python3 benchmarks/humming_col.py`` (from the repo root) runs :func:`selfcheck`.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from wush_compile import formats

__all__ = ["available", "prepare", "w4a8", "w4a16", "selfcheck", "HummingWeights"]

_INSTALL = "pip install --no-deps --target /tmp/site humming_kernels-*.whl and PYTHONPATH=/tmp/site"
#: Largest scale-byte spread in a row that humming's fused-E8M0 fp8 path keeps exact (transform.py: 11 for e4m3).
_W4A8_SPREAD = 11
_A8_GROUPS = (0, 128)  # 0 = per-token scale (humming's default); 128 = its sm_90 per-128-column case


@dataclasses.dataclass(frozen=True)
class _Path:
    config: object  # humming.config.LayerConfig
    tensors: dict  # humming's repacked weight, weight_scale, weight_scale_2
    locks: torch.Tensor  # stream-K scratch, zeroed, one per layer as humming's HummingLayer keeps it
    tuning: str | None  # humming's own heuristic configs cut to the M ranges asked for; None = all of them
    m_ranges: tuple[tuple[int, int], ...] | None  # (lo, hi]: the M that tuning covers


@dataclasses.dataclass(frozen=True)
class HummingWeights:
    n: int
    k: int
    w4a8: _Path | None
    w4a16: _Path | None
    notes: tuple[str, ...]  # where humming's copy of the weights is not exactly ours


def available() -> tuple[bool, str]:
    """(True, what runs) when humming imports, a GPU of sm_89+ is there and humming finds its CUDA compiler."""
    try:
        import humming
        from humming.jit.runtime import KernelRuntime
    except Exception as e:  # ImportError, or a missing dependency (cuda-bindings, filelock, triton, ...)
        return False, f"humming-kernels does not import ({type(e).__name__}: {e}); {_INSTALL}"
    if not torch.cuda.is_available():
        return False, "humming needs a CUDA GPU; torch sees none"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, f"humming's fp8 (W4A8) kernels need sm_89 or newer; this GPU is sm_{major}{minor}"
    try:
        compiler = KernelRuntime._get_compiler()
        signature = compiler.signature()  # locates the toolkit (NVRTC library + headers, or nvcc)
    except Exception as e:
        return False, (f"humming compiles its kernels at run time and found no CUDA {torch.version.cuda} compiler "
                       f"({type(e).__name__}: {e}); install the CUDA toolkit (nvrtc + headers) under /usr/local/cuda "
                       f"or set CUDA_HOME")
    return True, f"humming {humming.__version__}, {signature}, {torch.cuda.get_device_name()} (sm_{major}{minor})"


def _check_weights(codes, scales, w_global_scale, n, k) -> None:
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"codes and scales must be uint8, got {codes.dtype} and {scales.dtype}")
    if tuple(codes.shape) != (n, k // 2) or tuple(scales.shape) != (n, k // 32):
        raise ValueError(f"for n={n}, k={k} expected codes {(n, k // 2)} and scales {(n, k // 32)}, got "
                         f"{tuple(codes.shape)} and {tuple(scales.shape)}")
    if n % 64 or k % 64:
        raise ValueError(f"humming's weight repack needs N % 64 == 0 and K % 64 == 0, got N={n}, K={k}; pad the layer")
    if not (codes.is_cuda and scales.device == codes.device):
        raise ValueError(f"codes and scales must be on one CUDA device, got {codes.device} and {scales.device}")
    gs_shape = tuple(torch.as_tensor(w_global_scale).shape)
    if torch.as_tensor(w_global_scale).numel() != 1:
        raise ValueError(f"w_global_scale must hold one value, got shape {gs_shape}")
    if bool((scales == formats.E8M0_NAN).any()):
        raise ValueError("scale byte 255 (NaN) has no humming encoding; such groups cannot be benchmarked")


def _w4a8_notes(codes, scales, gs) -> list[str]:
    nonzero = ((codes & 0x77) != 0).reshape(*scales.shape, 16).any(-1)  # (N, K/32): block holds a nonzero value
    s = scales.short()
    hi = torch.where(nonzero, s, torch.full_like(s, -1)).amax(1)
    lo = torch.where(nonzero, s, torch.full_like(s, 999)).amin(1)
    wide_rows = int(((hi - lo) > _W4A8_SPREAD).sum())
    notes = []
    if wide_rows:
        notes.append(f"w4a8: {wide_rows} rows span > {_W4A8_SPREAD} scale binades; their low blocks are requantized")
    tensor_wide = bool((nonzero & (s < s.amax() - _W4A8_SPREAD)).any())
    if tensor_wide and float(gs.to(torch.bfloat16).float()) != float(gs):
        notes.append(f"w4a8: per-row secondary scale in bf16 rounds w_global_scale={float(gs)!r}")
    return notes


def _heuristic_subset(config, ms, device) -> tuple[str, tuple[tuple[int, int], ...]]:
    """humming's default per-M-range kernel choice, kept only for the ranges holding M = 1 (its launcher reads
    that one for every call) or an M of ``ms``: the same kernels it would run, far fewer to compile."""
    from humming.tune import get_heuristics_config

    intervals = get_heuristics_config(config, device=device)  # [[lo, hi, tuning], ...], M in (lo, hi]
    keep = [iv for iv in intervals if any(iv[0] < m <= iv[1] for m in (1, *ms))]
    return json.dumps(keep), tuple((int(lo), int(hi)) for lo, hi, _ in keep)


def _make_path(codes, scales, gs, n, k, a8: bool, a8_group: int, ms) -> _Path:
    from humming import dtypes
    from humming.config import WeightScale2Type
    from humming.schema import HummingInputSchema, HummingWeightSchema, is_humming_schema_compatible
    from humming.transform import prepare_layer_config, transform_humming_tensors

    weight_schema = HummingWeightSchema(b_dtype=dtypes.float4e2m1, bs_dtype=dtypes.float8e8m0,
                                        weight_scale_group_size=32, weight_scale_2_type="tensor")
    input_schema = HummingInputSchema(a_dtype=dtypes.float8e4m3 if a8 else dtypes.bfloat16,
                                      input_scale_group_size=a8_group if a8 else 0)
    tensors = {"weight": codes.contiguous().view(torch.int32),  # (N, K/8): 8 e2m1 codes per int32, same bits
               "weight_scale": scales.contiguous().view(torch.float8_e8m0fnu),  # (N, K/32)
               "weight_scale_2": gs.reshape(1).to(device=codes.device, dtype=torch.float32)}
    with torch.cuda.device(codes.device):
        if not is_humming_schema_compatible(input_schema, weight_schema, torch.bfloat16):
            cap = "".join(map(str, torch.cuda.get_device_capability(codes.device)))
            raise RuntimeError(f"humming has no kernel for MXFP4 weights x {input_schema.a_dtype} activations "
                               f"(input scale group {a8_group if a8 else 0}) on sm_{cap}")
        config = prepare_layer_config(shape_n=n, shape_k=k, weight_schema=weight_schema, input_schema=input_schema,
                                      torch_dtype=torch.bfloat16, device=codes.device, tensors=tensors)
        if config.weight_scale_2_type == WeightScale2Type.CHANNEL:  # humming wants a per-row scale in bf16 here
            tensors["weight_scale_2"] = tensors["weight_scale_2"].to(torch.bfloat16)
        out = transform_humming_tensors(config, tensors)
        tuning, m_ranges = _heuristic_subset(config, ms, codes.device) if ms else (None, None)
    locks = torch.zeros(2048, dtype=torch.int32, device=codes.device)
    return _Path(config=config, tensors=out, locks=locks, tuning=tuning, m_ranges=m_ranges)


def prepare(codes: torch.Tensor, scales: torch.Tensor, w_global_scale: torch.Tensor, n: int, k: int, *,
            paths: tuple[str, ...] = ("w4a8", "w4a16"), a8_group: int = 0, ms: tuple[int, ...] | None = None,
            warm: bool = True) -> HummingWeights:
    """humming's repacked copies of our MXFP4 weight (see the module docstring for what is exact).

    ``a8_group``: humming's activation-scale granularity for w4a8 (0 = per token, 128 = per 128 columns).
    ``ms``: the M values that will be run; humming then compiles only the kernels its heuristic picks for
    them (default None: all of its M ranges, some 25-40 kernels per path and layer shape).
    ``warm``: run each path once on one row, which compiles all those kernels now."""
    _check_weights(codes, scales, w_global_scale, n, k)
    if a8_group not in _A8_GROUPS:
        raise ValueError(f"a8_group must be one of {_A8_GROUPS} (0 = per token), got {a8_group}")
    if a8_group and k % a8_group:
        raise ValueError(f"a8_group={a8_group} needs K % {a8_group} == 0, got K={k}; use a8_group=0 (per token)")
    bad = set(paths) - {"w4a8", "w4a16"}
    if bad:
        raise ValueError(f"unknown paths {sorted(bad)}; choose from ('w4a8', 'w4a16')")
    if ms is not None and not all(isinstance(m, int) and m >= 1 for m in ms):
        raise ValueError(f"ms must be positive ints, got {ms}")
    gs = torch.as_tensor(w_global_scale, dtype=torch.float32).reshape(())
    prep = HummingWeights(
        n=n, k=k,
        w4a8=_make_path(codes, scales, gs, n, k, True, a8_group, ms) if "w4a8" in paths else None,
        w4a16=_make_path(codes, scales, gs, n, k, False, 0, ms) if "w4a16" in paths else None,
        notes=tuple(_w4a8_notes(codes, scales, gs)) if "w4a8" in paths else ())
    if warm:
        x = torch.ones(1, k, dtype=torch.bfloat16, device=codes.device)
        for name, fn in (("w4a8", w4a8), ("w4a16", w4a16)):
            if name in paths:
                fn(prep, x)
        torch.cuda.synchronize(codes.device)
    return prep


def _run(path: _Path | None, name: str, prep: HummingWeights, x: torch.Tensor) -> torch.Tensor:
    from humming.forward import humming_forward

    if path is None:
        raise ValueError(f"prepare() was called without '{name}' in paths")
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != prep.k or not x.is_cuda:
        raise ValueError(f"{name}: x must be a (M, {prep.k}) bf16 CUDA tensor, got {tuple(x.shape)} {x.dtype} "
                         f"on {x.device}")
    m = x.shape[0]
    if path.m_ranges is not None and not any(lo < m <= hi for lo, hi in path.m_ranges):
        raise ValueError(f"{name}: M={m} is outside the M ranges compiled by prepare(ms=...) {path.m_ranges}; "
                         f"add {m} to ms")
    t = path.tensors
    return humming_forward(path.config, inputs=x.contiguous(), weight=t["weight"], weight_scale=t["weight_scale"],
                           weight_scale_2=t.get("weight_scale_2"), locks=path.locks,
                           tuning_config=path.tuning)  # (M, N) bf16


def w4a8(prep: HummingWeights, x: torch.Tensor) -> torch.Tensor:
    """(M, K) bf16 -> (M, N) bf16: humming's fp8 activation quantization + its MXFP4 x e4m3 GEMM."""
    return _run(prep.w4a8, "w4a8", prep, x)


def w4a16(prep: HummingWeights, x: torch.Tensor) -> torch.Tensor:
    """(M, K) bf16 -> (M, N) bf16: humming's MXFP4 x bf16 GEMM."""
    return _run(prep.w4a16, "w4a16", prep, x)


def _fp8_token_emulation(x: torch.Tensor) -> torch.Tensor:
    """Per-token e4m3 quantize-dequantize (scale amax/448), the activation error humming's w4a8 should show."""
    s = x.float().abs().amax(1, keepdim=True).clamp(min=1e-30) / formats.E4M3_MAX  # (M, 1)
    return (x.float() / s).to(torch.float8_e4m3fn).double() * s.double()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def selfcheck(n: int = 256, k: int = 1024, m: int = 37, seed: int = 0) -> dict[str, float]:
    """Both paths on random weights (plain, and rows 2**-(i%16) apart, which takes humming's per-row scale path)
    vs x.double() @ W.double().t(); w4a8 also vs per-token-fp8 x, which isolates its weight handling."""
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    print(why)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=dev).to(torch.bfloat16)
    rows = torch.exp2(-(torch.arange(n, device=dev) % 16).float())[:, None]  # (N, 1)
    tol = {"w4a16": 1e-2, "w4a8": 6e-2, "w4a8_vs_fp8x": 1e-2}
    res, failed = {}, []
    for case, scale in (("plain", 1.0), ("wide_rows", rows)):
        w = torch.randn(n, k, generator=gen, device=dev) * 0.02 * scale
        codes, scales, gs = formats.quantize(w, "mxfp4")
        wq = formats.dequantize(codes, scales, gs, "mxfp4").double()  # (N, K)
        prep = prepare(codes, scales, gs, n, k, ms=(m,))
        ref = x.double() @ wq.t()
        got = {"w4a16": _rel(w4a16(prep, x), ref), "w4a8": _rel(w4a8(prep, x), ref),
               "w4a8_vs_fp8x": _rel(w4a8(prep, x), _fp8_token_emulation(x) @ wq.t())}
        for key, v in got.items():
            res[f"{case}/{key}"] = v
            flag = "ok" if v < tol[key] else f"FAIL (tol {tol[key]})"
            failed += [] if v < tol[key] else [f"{case}/{key}"]
            print(f"{case:9s} {key:13s} rel err {v:.3e}  {flag}")
        for note in prep.notes:
            print(f"{case:9s} note: {note}")
    if failed:
        raise AssertionError(f"humming column self-check failed for {failed}: {res}")
    return res


if __name__ == "__main__":
    selfcheck()
