"""End-to-end benchmark: compiled generation of a calibrated model against the same model in bf16.

For each model: prefill tokens/s (one prompt of ``prompt_len``) and decode tokens/s (batch 1 and 16,
``new_tokens`` greedy steps on a static KV cache) for

    bf16:  torch.compile(forward, backend="inductor", mode=MODE)
    fp8:   the same model with fp8 W8A8 Linears (dynamic per-row activation scales, per-row weight scales,
           ``torch._scaled_mm``; bench/fp8_baseline.py), torch.compile(..., backend="inductor", mode=MODE)
    wush:  torch.compile(forward, backend="wush",     mode=MODE)

in the same run, plus compile time, peak GPU memory, the model's bytes, and the dynamo counters after
warm-up (no recompiles may happen while timing). Models:

    smollm2        the real SmolLM2-135M-Instruct, calibrated with WUSH + GPTQ on installed text: the greedy text
                   of full precision, eager wush and compiled wush (and its speed on a GPU)
    smollm2_shape  SmolLM2-135M's shapes with RANDOM weights (RTN, random Hessians): speed only, no weights needed
    llama8b   a Llama-3.1-8B-shaped model built from its config with RANDOM weights, calibrated with RTN and
              random Hessians: for speed only, its outputs mean nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import Format, Method, TransformKind, WushConfig
from ..modules import WushLinear
from . import common

logger = logging.getLogger(__name__)

MODE = "reduce-overhead"
LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
SHAPES = {"smollm2_shape": SMOLLM2_135M, "llama8b": LLAMA_8B}
PROMPT = "The three most important ideas in computer science are"


@dataclasses.dataclass(frozen=True)
class E2ESettings:
    models: tuple[str, ...] = ("smollm2_shape", "llama8b")
    fmt: Format = Format.MXFP4
    prompt_len: int = 2048
    new_tokens: int = 256
    batches: tuple[int, ...] = (1, 16, 64)
    mode: str | None = MODE
    layers: int | None = None  # override the number of decoder layers (smoke tests)
    text_tokens: int = 48  # greedy tokens shown for the real model
    profile: bool = False  # after timing: where the time of a prefill and of decode steps goes (bench/profile.py)
    profile_steps: int = 16
    # one transform per group of Linears sharing an input (q/k/v, gate/up): the backend groups them (random models)
    shared_transform: bool = False
    # also measure the wush model with the Hopper CUDA decode kernels (opt-in: settings.cuda_decode)
    also_cuda_decode: bool = False
    # the fp8 W8A8 baseline (what a user would pick instead), measured in the same run (GPU: needs sm_89+)
    fp8: bool = True
    # which variants the random models measure (a subset splits one model over several runs)
    variants: tuple[str, ...] = ("bf16", "fp8", "wush")

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", Format.parse(self.fmt))
        bad = [v for v in self.variants if v not in ("bf16", "fp8", "wush")] or ([] if self.variants else ["(none)"])
        if bad:
            raise ValueError(f"e2e: unknown variant(s) {bad}; choose a non-empty subset of bf16, fp8, wush")
        unknown = [m for m in self.models if m not in (*SHAPES, "smollm2", "tiny") and not _is_checkpoint(m)]
        if unknown:
            raise ValueError(
                f"e2e: unknown model(s) {unknown}; choose from {sorted(SHAPES)}, smollm2, tiny, or a checkpoint "
                "directory (model.save_pretrained output with config.json)"
            )
        if self.prompt_len < 1 or self.new_tokens < 1 or not self.batches or min(self.batches) < 1:
            raise ValueError(f"e2e: prompt_len, new_tokens and batches must be positive, got {self}")


# ----------------------------------------------------------------------------------------------- models


def _is_checkpoint(name: str) -> bool:
    import os

    return os.path.isfile(os.path.join(name, "config.json"))


def run_checkpoint(path: str, s: "E2ESettings", device, out: dict) -> nn.Module:
    """A user's saved checkpoint (wush or not): compiled wush speed on a GPU, greedy text eager vs compiled."""
    from calibrate.models import load_model

    on_gpu = device.type == "cuda"
    model, tok = load_model(path, dtype=torch.float32)
    model = model.to(device=device, dtype=torch.bfloat16 if on_gpu else torch.float32).eval().requires_grad_(False)
    out["note"] = f"checkpoint {path}"
    if on_gpu:
        out["wush"] = measure(model, "wush", s, model.config.vocab_size, device, f"wush ({path})")
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
    eager_tokens, _, _ = Runner(model, "", None, device).generate(ids, s.text_tokens)
    torch._dynamo.reset()
    out["text"] = _text_check(model, tok, Runner(model, "wush", s.mode if on_gpu else None, device), eager_tokens, s,
                              device)
    return model


def _random_llama(device, dtype, layers: int | None, shape: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = shape == "tiny"
    cfg = dict(SHAPES["smollm2_shape" if tiny else shape])
    if tiny:
        cfg.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=512, num_hidden_layers=2)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(config)
    model.eval().requires_grad_(False)
    return model.to(dtype)


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _random_hessian(k: int, device, gen: torch.Generator) -> torch.Tensor:
    """A random SPD (K, K) Hessian with an anisotropic spectrum (speed benchmarks only)."""
    a = torch.randn(k, 256, device=device, generator=gen) * torch.rand(k, 1, device=device, generator=gen)
    return a @ a.t() / 256 + 1e-3 * torch.eye(k, device=device)  # (K, K)


def calibrate_random(model: nn.Module, config: WushConfig, seed: int = 0) -> int:
    """RTN with random Hessians for every decoder Linear (lm_head stays high precision), one Hessian per group of
    Linears reading the same input (and one transform for the group with ``config.shared_transform``, so the
    backend can group them). Returns the count."""
    from calibrate.architectures import decoder_layers, get_architecture
    from calibrate.pipeline import group_name, quantize_linear_group
    from tqdm.auto import tqdm

    arch = get_architecture(model)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    count = 0
    for i, block in enumerate(tqdm(decoder_layers(model, arch), desc="RTN (random Hessians)", unit="block")):
        for group in arch.groups:
            members = [(f"{arch.layers_path}.{i}.{path}", path, block.get_submodule(path)) for path in group]
            h = _random_hessian(members[0][2].in_features, device, gen)
            modules = quantize_linear_group(members, h, config, members[0][2].weight.dtype, device,
                                            group_name(f"{arch.layers_path}.{i}", group))
            for (_, path, _), wl in zip(members, modules):
                parent, _, child = path.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, wl)
            count += len(members)
            del h
    return count


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------- generation


class Runner:
    """Compiled prefill and decode steps over a static KV cache (one compiled callable per phase)."""

    def __init__(self, model: nn.Module, backend: str, mode: str | None, device, options: dict | None = None) -> None:
        self.model = model
        self.device = device
        kw = dict(backend=backend, fullgraph=True, dynamic=False)
        if options is not None:
            # torch.compile takes mode= or options=, not both: fold the mode's settings into the options
            kw["options"] = (torch._inductor.list_mode_options(mode) if mode is not None else {}) | options
        elif mode is not None:
            kw["mode"] = mode

        def prefill(ids, cache, pos):
            out = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)
            return out.logits[:, -1, :].argmax(-1, keepdim=True)  # (B, 1)

        def decode(ids, cache, pos):
            out = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)
            return out.logits[:, -1, :].argmax(-1, keepdim=True)  # (B, 1)

        self.prefill = torch.compile(prefill, **kw) if backend else prefill
        self.decode = torch.compile(decode, **kw) if backend else decode

    def cache(self, batch: int, max_len: int):
        from transformers import StaticCache

        cfg = self.model.config
        cache = StaticCache(config=cfg, max_cache_len=max_len)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache.early_initialization(batch_size=batch, num_heads=cfg.num_key_value_heads, head_dim=head_dim,
                                   dtype=self.model.dtype, device=self.device)
        return cache

    def _sync(self, t: torch.Tensor) -> None:
        if t.is_cuda:
            torch.cuda.synchronize(t.device)

    def decode_loop(self, tok: torch.Tensor, cache, start: int, steps: int) -> tuple[list[torch.Tensor], float]:
        """``steps`` greedy decode steps from ``tok`` (B, 1) at position ``start``: (tokens, seconds)."""
        self._sync(tok)
        t0 = time.perf_counter()
        out = []
        pos = torch.full((1,), start, dtype=torch.long, device=tok.device)
        for _ in range(steps):
            # Outputs of a CUDA-graph replay are overwritten by the next replay: keep a copy.
            tok = self.decode(tok, cache, pos).clone()
            out.append(tok)
            pos = pos + 1
        self._sync(tok)
        return out, time.perf_counter() - t0

    def generate(self, ids: torch.Tensor, new_tokens: int, cache=None):
        """Greedy: returns (tokens (B, new_tokens), prefill seconds, decode seconds)."""
        b, t = ids.shape
        cache = cache if cache is not None else self.cache(b, t + new_tokens)
        self._sync(ids)
        t0 = time.perf_counter()
        tok = self.prefill(ids, cache, torch.arange(t, device=ids.device)).clone()  # (B, 1)
        self._sync(tok)
        t1 = time.perf_counter()
        out, td = self.decode_loop(tok, cache, t, new_tokens - 1)
        return torch.cat([tok] + out, 1), t1 - t0, td


def _counters() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
            # > 0 means Inductor fell back from CUDA graphs for some graph (mode="reduce-overhead")
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def measure(model: nn.Module, backend: str, s: E2ESettings, vocab: int, device, label: str) -> dict:
    """Compile, warm up every shape, then time prefill and decode; report counters before/after timing."""
    torch._dynamo.reset()
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    runner = Runner(model, backend, s.mode if torch.cuda.is_available() else None, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    res: dict = {"label": label, "backend": backend, "model_bytes": model_bytes(model)}
    long = torch.randint(0, vocab, (1, s.prompt_len), generator=gen).to(device)
    first = {b: torch.randint(0, vocab, (b, 1), generator=gen).to(device) for b in s.batches}
    # One cache per shape, reused (reset) for every run: a new cache would be new static addresses. Decode is
    # timed from an empty cache (position 0 on), so only three graphs exist: prefill (1, prompt_len) and one
    # decode step per batch size.
    pre_cache = runner.cache(1, s.prompt_len)
    caches = {b: runner.cache(b, s.new_tokens) for b in s.batches}
    # Warm-up (= compilation and CUDA-graph recording) of every shape that is timed later.
    t0 = time.perf_counter()
    for _ in range(3):
        pre_cache.reset()
        runner.prefill(long, pre_cache, torch.arange(s.prompt_len, device=device))
        for b in s.batches:
            caches[b].reset()
            runner.decode_loop(first[b], caches[b], 0, 2)
    res["compile_s"] = time.perf_counter() - t0
    before = _counters()
    # Prefill: batch 1, prompt_len tokens, median of 5.
    pre = []
    for _ in range(5):
        pre_cache.reset()
        runner._sync(long)
        t0 = time.perf_counter()
        runner.prefill(long, pre_cache, torch.arange(s.prompt_len, device=device))
        runner._sync(long)
        pre.append(time.perf_counter() - t0)
    res["prefill_tok_s"] = s.prompt_len / sorted(pre)[len(pre) // 2]
    # Decode: new_tokens greedy steps per batch size.
    for b in s.batches:
        caches[b].reset()
        _, td = runner.decode_loop(first[b], caches[b], 0, s.new_tokens)
        res[f"decode_b{b}_tok_s"] = b * s.new_tokens / td
    if s.profile:
        res["profile"] = _profile(runner, long, pre_cache, first, caches, s, device)
    after = _counters()
    res["counters_after_warmup"] = before
    res["recompiles_while_timing"] = after["unique_graphs"] - before["unique_graphs"]
    if torch.cuda.is_available():
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def _profile(runner: Runner, long, pre_cache, first: dict, caches: dict, s: E2ESettings, device) -> dict:
    """Kernels by category for one prefill and ``profile_steps`` decode steps per batch size (compiled shapes
    only, so nothing recompiles)."""
    from .profile import profile_steps

    pos = torch.arange(s.prompt_len, device=device)
    out = {"prefill": profile_steps(lambda: runner.prefill(long, pre_cache, pos), 1, device, setup=pre_cache.reset)}
    for b in s.batches:
        out[f"decode_b{b}"] = profile_steps(lambda: runner.decode_loop(first[b], caches[b], 0, s.profile_steps),
                                            s.profile_steps, device, setup=caches[b].reset)
    return out


# -------------------------------------------------------------------------------------------- the bench


def _text_check(model, tok, runner_wush: Runner, fp_tokens: torch.Tensor, s: E2ESettings, device) -> dict:
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
    eager = Runner(model, "", None, device)
    eager_tokens, _, _ = eager.generate(ids, s.text_tokens)
    comp_tokens, _, _ = runner_wush.generate(ids, s.text_tokens)
    same = (eager_tokens == comp_tokens)[0]
    first_diff = int((~same).nonzero()[0]) if not bool(same.all()) else None
    out = {
        "prompt": PROMPT,
        "fp": tok.decode(fp_tokens[0]),
        "wush_eager": tok.decode(eager_tokens[0]),
        "wush_compiled": tok.decode(comp_tokens[0]),
        "compiled_equals_eager": first_diff is None,
        "first_difference_at": first_diff,
    }
    # The rewritten graph alone (wush ops, everything else run as traced, no Inductor): must equal eager exactly;
    # a difference with Inductor then comes from Inductor's fused fp32 arithmetic around the quantizers.
    torch._dynamo.reset()
    rewrite_tokens, _, _ = Runner(model, "wush", None, device, options={"inductor": False}).generate(ids, s.text_tokens)
    out["rewrite_only_equals_eager"] = bool(torch.equal(rewrite_tokens, eager_tokens))
    if first_diff is not None:
        # How close the eager model's choice was where the two part: its top-2 logits on the common prefix.
        prefix = torch.cat([ids, eager_tokens[:, :first_diff]], 1)
        with torch.no_grad():
            logits = model(prefix).logits[0, -1].float()
        top = logits.topk(2)
        out["eager_top2_at_difference"] = {
            "tokens": [tok.decode([int(i)]) for i in top.indices],
            "logits": [float(v) for v in top.values],
            "gap": float(top.values[0] - top.values[1]),
            "eager_token": tok.decode([int(eager_tokens[0, first_diff])]),
            "compiled_token": tok.decode([int(comp_tokens[0, first_diff])]),
        }
    return out


def _release_compiled() -> None:
    """Drop compiled graphs and recorded CUDA graphs (their memory pools) before the next phase."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_model(name: str, s: E2ESettings, device, out: dict | None = None,
              checkpoint: Callable[[], None] = lambda: None) -> dict:
    """Measure one model; results go into ``out`` as they come and ``checkpoint()`` runs after each variant (a
    failure or a time limit late in the run keeps the rest)."""
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    out = {} if out is None else out
    out["model"] = name
    if _is_checkpoint(name) and name not in SHAPES and name not in ("smollm2", "tiny"):
        model = run_checkpoint(name, s, device, out)
    elif name == "smollm2":
        # The real model: greedy text of full precision, eager wush and compiled wush (speed too on a GPU).
        from calibrate import calibrate
        from calibrate.data import calibration_batches, default_texts, tokenize
        from calibrate.models import load_model

        model, tok = load_model(None, dtype=torch.float32)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # inference, as the random models
        vocab = model.config.vocab_size
        ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
        fp_tokens, _, _ = Runner(model, "", None, device).generate(ids, s.text_tokens)
        if on_gpu:
            out["bf16"] = measure(model, "inductor", s, vocab, device, "bf16")
            _measure_fp8(model, s, vocab, device, out)
        # the calibration of `wush quantize`'s default (8 x 512 tokens of the installed text)
        cfg = WushConfig(format=s.fmt, method=Method.GPTQ, transform=TransformKind.WUSH, nsamples=8, seqlen=512)
        calib_text, _ = default_texts()
        t0 = time.perf_counter()
        calibrate(model, calibration_batches(tokenize(tok, calib_text), cfg.nsamples, cfg.seqlen, seed=0), cfg)
        out["calibration_s"] = time.perf_counter() - t0
        out["calibration"] = f"{cfg.format.value} {cfg.method.value} {cfg.transform.value}, pydoc_data text"
        if on_gpu:
            out["wush"] = measure(model, "wush", s, vocab, device, f"wush {s.fmt.value}")
        torch._dynamo.reset()
        runner = Runner(model, "wush", s.mode if on_gpu else None, device)
        out["text"] = _text_check(model, tok, runner, fp_tokens, s, device)
    else:
        model = _random_llama(device, dtype, s.layers, name)
        vocab = model.config.vocab_size
        out["note"] = "random weights, RTN with random Hessians: speed only, outputs are meaningless"
        if "bf16" in s.variants:
            out["bf16"] = measure(model, "inductor", s, vocab, device, "bf16")
            checkpoint()
            _release_compiled()
        if "fp8" in s.variants:
            _measure_fp8(model, s, vocab, device, out)
            checkpoint()
        if "wush" not in s.variants:
            del model
            gc.collect()
            torch.cuda.empty_cache() if on_gpu else None
            return out
        cfg = WushConfig(format=s.fmt, method=Method.RTN, transform=TransformKind.WUSH,
                         shared_transform=s.shared_transform)
        t0 = time.perf_counter()
        out["quantized_layers"] = calibrate_random(model, cfg)
        out["calibration_s"] = time.perf_counter() - t0
        gc.collect()
        torch.cuda.empty_cache() if on_gpu else None
        out["wush"] = measure(model, "wush", s, vocab, device, f"wush {s.fmt.value}")
        if s.also_cuda_decode:
            checkpoint()
            _release_compiled()
            from .. import settings

            with settings.overridden(cuda_decode=True):  # the automatic choice takes the cuda_decode route
                out["wush[cuda decode]"] = measure(model, "wush", s, vocab, device, f"wush {s.fmt.value}, CUDA decode")
    if "bf16" in out and "wush" in out:
        _ratios(out)
    out["wush_linears"] = sum(isinstance(m, WushLinear) for m in model.modules())
    del model
    gc.collect()
    torch.cuda.empty_cache() if on_gpu else None
    return out


def _fp8_supported(device) -> tuple[bool, str]:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False, f"capability {torch.cuda.get_device_capability(device)} has no fp8 tensor cores"
    return True, ""


def _measure_fp8(model: nn.Module, s: E2ESettings, vocab: int, device, out: dict) -> None:
    """The fp8 W8A8 variant of the still full-precision ``model`` (a converted copy; the original is kept)."""
    import copy

    from .fp8_baseline import to_fp8

    ok, why = _fp8_supported(device)
    if not s.fp8 or not ok:
        if s.fp8:
            out["fp8_skipped"] = why
        return
    fp8_model = copy.deepcopy(model)
    impl = to_fp8(fp8_model, prefer_torchao=True)
    try:
        out["fp8"] = measure(fp8_model, "inductor", s, vocab, device, f"fp8 w8a8 ({impl})")
    finally:
        del fp8_model
        _release_compiled()


def _ratios(out: dict) -> None:
    b, w = out["bf16"], out["wush"]
    out["ratios"] = {k: w[k] / b[k] for k in b if k.endswith("tok_s")}
    out["ratios"]["model_bytes"] = w["model_bytes"] / b["model_bytes"]
    if "fp8" in out:
        f = out["fp8"]
        out["ratios_vs_fp8"] = {k: w[k] / f[k] for k in f if k.endswith("tok_s")}
        out["ratios_vs_fp8"]["model_bytes"] = w["model_bytes"] / f["model_bytes"]


def _variants(result: dict) -> list[str]:
    """bf16, fp8 (when measured), wush, then the extra wush variants (``wush[...]``) of one model's result."""
    return ["bf16"] + (["fp8"] if "fp8" in result else []) + ["wush"] + [k for k in result if k.startswith("wush[")]


def format_table(results: list[dict]) -> str:
    results = [r for r in results if "ratios" in r]
    if not results:
        return "(no speed measurements)"
    cols = ["prefill_tok_s"] + [k for k in results[0]["bf16"] if k.startswith("decode_")] + [
        "compile_s", "peak_mem_gib", "model_bytes"]
    lines = ["| model | variant | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in results:
        for variant in _variants(r):
            row = r[variant]
            cells = []
            for c in cols:
                v = row.get(c)
                cells.append("-" if v is None else f"{v / 2**30:.2f} GiB" if c == "model_bytes" else f"{v:.1f}")
            lines.append(f"| {r['model']} | {row['label']} | " + " | ".join(cells) + " |")
        ratio = " | ".join(f"{r['ratios'].get(c, float('nan')):.2f}x" if c in r["ratios"] else "" for c in cols)
        lines.append(f"| {r['model']} | wush / bf16 | {ratio} |")
        if "ratios_vs_fp8" in r:
            rf = r["ratios_vs_fp8"]
            ratio = " | ".join(f"{rf[c]:.2f}x" if c in rf else "" for c in cols)
            lines.append(f"| {r['model']} | wush / fp8 | {ratio} |")
    return "\n".join(lines)


def format_profiles(result: dict) -> str:
    """The profiles of one model's variants (empty without ``profile``)."""
    from .profile import format_profile

    lines = []
    for variant in _variants(result):
        for phase, p in result.get(variant, {}).get("profile", {}).items():
            lines.append(format_profile(f"{result['model']} {result[variant]['label']} {phase}", p))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """One panel per model: tokens/s of every variant relative to compiled bf16, per phase (bars side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if "ratios" in r]
    if not results:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        keys = [k for k in r["bf16"] if k.endswith("tok_s")]
        variants = _variants(r)
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            vals = [r[v][k] / r["bf16"][k] for k in keys]
            bars = ax.bar([j + i * width for j in range(len(keys))], vals, width, label=r[v]["label"])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(keys))])
        ax.set_xticklabels([k.replace("_tok_s", "") for k in keys])
        ax.set_ylabel("tokens/s relative to compiled bf16")
        ax.set_title(r["model"])
        ax.legend(fontsize=8)
    fig.suptitle("End to end, same run, same GPU (higher is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(s: E2ESettings, out_dir: Path | None = None, log: Callable[[str], None] = logger.info) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = common.environment()
    log(common.header(env))
    results = []
    out = {"environment": env, "settings": dataclasses.asdict(s) | {"fmt": s.fmt.value}, "results": results}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    def save() -> None:
        if out_dir is not None:
            common.save_json(out_dir / "e2e.json", out)

    failed = []
    for name in s.models:
        results.append({})
        try:
            run_model(name, s, device, out=results[-1], checkpoint=save)
        except Exception as e:  # keep what this model measured and go on with the next; fail at the end
            logger.exception("e2e: %s failed", name)
            results[-1]["error"] = f"{type(e).__name__}: {e}"
            failed.append(name)
            _release_compiled()
        log(format_table(results[-1:]))
        log(format_profiles(results[-1]))
        if "text" in results[-1]:
            log("greedy text:\n" + "\n".join(f"  {k}: {v}" for k, v in results[-1]["text"].items()))
        save()  # after every model (and every variant), so a cut-off run keeps what it measured
    log("\n" + format_table(results))
    if out_dir is not None:
        plot(results, out_dir / "e2e.png")
    if failed:
        raise RuntimeError(f"e2e: {failed} failed (partial results kept{' in ' + str(out_dir) if out_dir else ''}): "
                           + "; ".join(r["error"] for r in results if "error" in r))
    return out
