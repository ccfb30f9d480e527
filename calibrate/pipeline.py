"""``calibrate(model, batches, config)``: a whole decoder LM, block by block (SPEC section 4).

For block i, whose inputs are the outputs of the already quantized blocks 0..i-1:

1. run the block once over all batches and accumulate, for every group of Linears that read the same input
   (q/k/v, o, gate/up, down), ``H = mean x x^T`` in float64 (the standard GPTQ sequential scheme: within the
   block the Hessians see the full-precision layers before them);
2. RTN or GPTQ with per-block transforms for each member of each group (with ``shared_transform``, once for
   the group's concatenated weights: one T in every member), replacing it in place by a :class:`WushLinear`;
   for NVFP4 with a static activation scale, the amax of the transformed inputs (times the headroom) sets it;
3. run the QUANTIZED block (W4A4, through ``WushLinear.forward``) over all batches: its outputs are the next
   block's inputs, and each layer's relative output error ``||y_q - y|| / ||y||`` against the full-precision
   layer is measured on the inputs the quantized block feeds it. (``config.sequential`` False: the next
   block gets the full-precision block's outputs instead, the non-sequential scheme.)

Only one block's activations are alive at a time (on the CPU between uses with ``offload_activations``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from wush_compile.config import ActScale, Format, Method, WushConfig
from wush_compile.errors import WushUserError
from wush_compile.modules import WushLinear

from . import capture
from .architectures import decoder_layers, get_architecture
from .hessian import HessianAccumulator
from .rtn import DATA_AWARE_KINDS
from .layer import (
    MODEL_DTYPES,
    build_wush_linear,
    quantize_weight,
    quantize_weights,
    static_act_global_scale,
    transformed_amax,
)

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "CalibrationReport", "LayerRecord", "get_report", "REPORT_ATTR"]

#: Attribute of the calibrated model holding its :class:`CalibrationReport`.
REPORT_ATTR = "wush_calibration_report"


@dataclasses.dataclass
class LayerRecord:
    """One quantized Linear."""

    name: str
    in_features: int
    out_features: int
    rel_err: float  # ||y_q - y|| / ||y|| of the W4A4 layer vs full precision on its calibration inputs
    share_group: str | None = None


@dataclasses.dataclass
class CalibrationReport:
    """What :func:`calibrate` did: per-layer output errors and the Linears left in high precision."""

    config: WushConfig
    layers: list[LayerRecord] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)
    tokens: int = 0
    seconds: float = 0.0
    warnings: list[str] = dataclasses.field(default_factory=list)  # also logged

    @property
    def mean_rel_err(self) -> float:
        """Mean of the per-layer relative output errors (NaN when no layer was quantized)."""
        return sum(r.rel_err for r in self.layers) / len(self.layers) if self.layers else math.nan

    def rel_errs(self) -> dict[str, float]:
        return {r.name: r.rel_err for r in self.layers}

    def summary(self) -> str:
        c = self.config
        lines = [
            f"calibrated {len(self.layers)} Linears ({c.format.value}, {c.method.value}, {c.transform.value}) on "
            f"{self.tokens} tokens in {self.seconds:.1f} s; mean layer relative output error {self.mean_rel_err:.4f}"
        ]
        lines.extend(f"warning: {w}" for w in self.warnings)
        if self.skipped:
            lines.append(f"{len(self.skipped)} Linears left in high precision:")
            lines.extend(f"  {name}: {reason}" for name, reason in self.skipped)
        return "\n".join(lines)


def get_report(model: nn.Module) -> CalibrationReport:
    """The :class:`CalibrationReport` of a model returned by :func:`calibrate`."""
    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        raise ValueError("this model has no calibration report; it was not produced by calibrate.calibrate")
    return report


def _split_mask(i: int, item):
    """``(ids, mask or None)`` of one batch: a tensor, or a mapping with ``input_ids`` and ``attention_mask``."""
    if isinstance(item, torch.Tensor) or not hasattr(item, "keys"):
        return item, None
    if "input_ids" not in item:
        raise TypeError(f"calibrate: batch {i} is a mapping without 'input_ids' (keys {sorted(item.keys())})")
    ids, mask = item["input_ids"], item.get("attention_mask")
    if mask is None:
        return ids, None
    mask = torch.as_tensor(mask)
    if ids.dim() == 1:
        ids, mask = ids.unsqueeze(0), mask.reshape(1, -1)
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"calibrate: batch {i} has attention_mask of shape {tuple(mask.shape)} but input_ids of shape "
            f"{tuple(ids.shape)}; they must match"
        )
    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError(f"calibrate: batch {i} has an attention_mask with no real token")
    return ids, (None if bool(mask.all()) else mask)


def _prepare_batches(batches: Iterable[torch.Tensor], vocab_size: int | None) -> list[torch.Tensor]:
    """Token-id batches as (B, L) int64; see :func:`_prepare_masked_batches` for batches with masks."""
    return _prepare_masked_batches(batches, vocab_size)[0]


def _prepare_masked_batches(batches, vocab_size: int | None) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    if isinstance(batches, torch.Tensor):
        batches = [batches] if batches.dim() <= 2 and batches.numel() else list(batches)
    out = []
    masks = []
    for i, item in enumerate(batches):
        ids, mask = _split_mask(i, item)
        masks.append(mask)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"calibrate: batch {i} is a {type(ids).__name__}; pass token-id tensors (B, L) or (L,)")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(
                f"calibrate: batch {i} has dtype {ids.dtype}; token ids must be an integer tensor "
                "(e.g. tokenizer(text, return_tensors='pt').input_ids)"
            )
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"calibrate: batch {i} must be a non-empty (B, L) or (L,) tensor, got shape {tuple(ids.shape)}")
        if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(
                f"calibrate: batch {i} holds token ids in [{int(ids.min())}, {int(ids.max())}] outside the model's "
                f"vocabulary [0, {vocab_size}); tokenize with the model's own tokenizer"
            )
        out.append(ids.long())
    if not out:
        raise ValueError(
            "calibrate: no calibration batches; pass a non-empty iterable of token-id tensors, e.g. "
            "calibrate.data.calibration_batches(tokenizer, nsamples=..., seqlen=...)"
        )
    return out, masks


def _skip_reason(name: str, linear: nn.Linear, config: WushConfig) -> str | None:
    for pattern in config.skip_layers:
        if name == pattern or name.endswith("." + pattern):
            return f"in skip_layers ({pattern!r})"
    g = config.group_size
    if linear.in_features % g:
        return f"in_features={linear.in_features} is not a multiple of the {config.format.value} group size G={g}"
    return None


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)


class _ErrorMeter:
    """Forward hook on a quantized layer: accumulates ``||y_q - y||^2`` and ``||y||^2`` against the
    full-precision layer on the inputs the quantized block actually feeds it."""

    def __init__(self, linear: nn.Linear) -> None:
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.num = 0.0
        self.den = 0.0

    def __call__(self, _module, args, output) -> None:
        y = torch.nn.functional.linear(args[0], self.weight, self.bias).float()  # (..., N) full precision
        self.num += float(torch.linalg.vector_norm(output.float() - y)) ** 2
        self.den += float(torch.linalg.vector_norm(y)) ** 2

    @property
    def rel_err(self) -> float:
        if self.den > 0:
            return math.sqrt(self.num / self.den)
        return 0.0 if self.num == 0 else math.inf


def _onload(block: nn.Module, device) -> None:
    """Move one decoder block to the compute device (block-by-block calibration)."""
    block.to(device)


def _offload(block: nn.Module, home) -> None:
    """Move a calibrated block back where the model lives."""
    block.to(home)


def _move_inputs(inputs: "capture.BlockInputs", device) -> "capture.BlockInputs":
    memo: dict = {}
    return dataclasses.replace(
        inputs,
        hidden=[capture.to_device(h, device, memo) for h in inputs.hidden],
        kwargs=[[capture.to_device(kw, device, memo) for kw in per_block] for per_block in inputs.kwargs],
        masks=None if inputs.masks is None else [capture.to_device(m, device, memo) for m in inputs.masks],
        storage=torch.device(device),
    )


def group_name(prefix: str, paths) -> str:
    """The share-group name of a block's Linears: ``model.layers.3.q_proj+k_proj+v_proj``."""
    return f"{prefix}.{'+'.join(p.rpartition('.')[2] for p in paths)}"


def _quantize_group(
    members: list[tuple[str, str, nn.Linear]],
    hessian: torch.Tensor | None,
    chunks: list[torch.Tensor] | None,
    config: WushConfig,
    dtype: torch.dtype,
    device,
    group_name: str,
) -> list[WushLinear]:
    """WushLinears for the Linears of one input-sharing group (one shared T with ``shared_transform``)."""
    if config.shared_transform and len(members) > 1:
        weight = torch.cat([lin.weight.detach() for _, _, lin in members], 0)  # (sum N, K)
        q = quantize_weight(weight, hessian, config, dtype=dtype, name=group_name)
        modules, row = [], 0
        for _, _, lin in members:
            n = lin.out_features
            part = dataclasses.replace(
                q, codes=q.codes[row : row + n].clone(), scales=q.scales[row : row + n].clone(), transform=q.transform.clone()
            )
            modules.append(build_wush_linear(part, config, bias=lin.bias, dtype=dtype, device=device, share_group=group_name))
            row += n
    else:
        qs = quantize_weights(
            [lin.weight.detach() for _, _, lin in members], hessian, config, dtype=dtype, names=[f for f, _, _ in members]
        )
        modules = [
            build_wush_linear(q, config, bias=lin.bias, dtype=dtype, device=device) for q, (_, _, lin) in zip(qs, members)
        ]
    if chunks is not None:  # NVFP4 static activation scale
        for wl in modules:
            amax = transformed_amax(chunks, wl.transform.to(device))
            wl.act_global_scale.copy_(static_act_global_scale(amax, config.act_headroom))
            wl.refresh_transform_key()
    return modules


def _block_groups(block: nn.Module, prefix: str, groups, config: WushConfig, report: CalibrationReport):
    """The groups of (full name, path, Linear) to quantize in one block; records what stays high precision."""
    covered: set[str] = set()
    out = []
    for group in groups:
        members = []
        for path in group:
            covered.add(path)
            try:
                lin = block.get_submodule(path)
            except AttributeError:
                continue  # this block lacks the Linear
            if not isinstance(lin, nn.Linear):
                continue
            full = f"{prefix}.{path}"
            reason = _skip_reason(full, lin, config)
            if reason is not None:
                report.skipped.append((full, reason))
                logger.info("%s stays in high precision: %s", full, reason)
                continue
            members.append((full, path, lin))
        if members:
            out.append(members)
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and name not in covered:
            report.skipped.append((f"{prefix}.{name}", "not in the architecture table's Linear groups"))
            logger.info("%s.%s stays in high precision: not in the architecture table", prefix, name)
    return out


def _record_config(model: nn.Module, config: WushConfig) -> None:
    """Record the calibration settings in the model's quantization config (what ``save_pretrained`` writes)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not any(isinstance(m, WushLinear) for m in model.modules()):
        return
    from wush_compile import hf

    hf.attach(model, config)


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[torch.Tensor], config: WushConfig, *, device=None, checkpoint_dir=None
) -> nn.Module:
    """Calibrate ``model`` in place into WUSH-transformed FP4 Linears (SPEC section 4) and return it.

    Args:
        model: a Hugging Face ``*ForCausalLM`` of a supported architecture (:mod:`calibrate.architectures`),
            float32 / bfloat16 / float16, on one device.
        batches: an iterable of token-id tensors, each (B, L) or (L,), or of mappings with ``input_ids`` and
            ``attention_mask`` (ragged samples padded: padded tokens enter no Hessian and no token count).
        config: the :class:`~wush_compile.WushConfig`.
        device: where the blocks are calibrated (default: the model's device). When it is not the model's
            device, the model stays where it is and one decoder block at a time is moved to ``device``,
            calibrated and moved back (a model larger than the GPU calibrates on it block by block).
        checkpoint_dir: a directory where every finished block is saved (its WushLinears and the next block's
            inputs, :mod:`calibrate.resume`). When it holds the checkpoint of an interrupted run with the same
            model, batches and config, the finished blocks are restored and calibration continues after them,
            bit-identical to an uninterrupted run; a checkpoint of another run is refused. The directory is
            left in place when the run completes (delete it once the model is saved).

    Every Linear of the decoder blocks listed in the architecture table becomes a :class:`WushLinear`
    except those in ``config.skip_layers`` and those whose in_features is not a multiple of G (reported).
    Embeddings and the LM head stay in high precision. The model gets a :class:`CalibrationReport`
    (``calibrate.get_report(model)``).
    """
    if not isinstance(config, WushConfig):
        raise TypeError(f"calibrate: config must be a wush_compile.WushConfig, got {type(config).__name__}")
    start = time.perf_counter()
    arch = get_architecture(model)
    layers = decoder_layers(model, arch)
    _check_not_calibrated_and_skips(layers, arch, config)
    params = list(model.parameters())
    if not params:
        raise ValueError("calibrate: the model has no parameters")
    _check_no_meta(model)
    dtype = next((p.dtype for p in layers.parameters()), params[0].dtype)
    if dtype not in MODEL_DTYPES:
        raise TypeError(
            f"calibrate: model dtype {dtype} is not supported; convert it to one of "
            f"{', '.join(str(d) for d in MODEL_DTYPES)} (e.g. model.to(torch.float32))"
        )
    home = params[0].device
    device = home if device is None else torch.device(device)
    onload = device != home
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    batch_list, masks = _prepare_masked_batches(batches, vocab)
    tokens = sum(int(b.numel()) if m is None else int(m.sum()) for b, m in zip(batch_list, masks))
    report = CalibrationReport(config=config, tokens=tokens)
    _warn_rank_deficient(layers, config, report)
    was_training = model.training
    model.eval()
    logger.info(
        "calibrating %d blocks of %s (%s) on %d batches, %d tokens: %s",
        len(layers), type(model).__name__, model.config.model_type, len(batch_list), report.tokens, config,
    )
    inputs = capture.capture_block_inputs(
        model, layers, batch_list, device=home, offload=config.offload_activations or onload, masks=masks
    )
    if onload and not config.offload_activations:
        inputs = _move_inputs(inputs, device)
    keep_chunks = config.format is Format.NVFP4 and config.act_scale is ActScale.STATIC
    # RTN with a data-free transform (identity, hadamard, random) needs no Hessian: skip the capture pass.
    needs_capture = keep_chunks or config.method is Method.GPTQ or config.transform in DATA_AWARE_KINDS
    desc = f"calibrate {config.format.value}/{config.method.value}/{config.transform.value}"
    swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (block, path, original Linear), to undo on error
    ckpt = None
    if checkpoint_dir is not None:
        from .resume import CalibrationCheckpoint, fingerprint

        fp = fingerprint(model, config, batch_list, masks, len(layers), dtype, device)
        ckpt = CalibrationCheckpoint(checkpoint_dir, fp)
    try:
        first = 0 if ckpt is None else ckpt.restore(layers, arch, report, inputs, swapped, home)
        _calibrate_blocks(layers, arch, config, report, inputs, keep_chunks, needs_capture, dtype, device, desc, swapped,
                          home if onload else None, first=first, ckpt=ckpt)
    except BaseException as exc:
        for block, path, original in reversed(swapped):  # the caller's model is left as it was
            _set_submodule(block, path, original.to(home) if onload else original)
        model.train(was_training)
        exc.add_note(f"calibrate: no layer was replaced ({len(swapped)} swaps undone); the model is unchanged")
        raise
    report.seconds = time.perf_counter() - start
    setattr(model, REPORT_ATTR, report)
    _record_config(model, config)
    model.train(was_training)
    logger.info("%s", report.summary())
    return model


def _check_no_meta(model: nn.Module) -> None:
    """Weights on the meta device (no data: e.g. device_map offload) cannot be calibrated: say which, before the
    first forward fails far from the cause."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            module = name.rpartition(".")[0] or name
            raise WushUserError(
                f"calibrate: {module} ({name}) is on the meta device (it holds no weights); load the model's weights "
                "onto one real device before calibrating (from_pretrained without a device_map that offloads to "
                "'meta' or disk, or model.to_empty() followed by loading the state dict)"
            )


def _check_not_calibrated_and_skips(layers: nn.Module, arch, config: WushConfig) -> None:
    """An already calibrated model is an error (never a silent no-op); unknown ``skip_layers`` names too."""
    import difflib

    done = [n for n, m in layers.named_modules() if isinstance(m, WushLinear)]
    if done:
        raise ValueError(
            f"calibrate: the model is already calibrated ({len(done)} WushLinear layers, e.g. "
            f"{arch.layers_path}.{done[0]}); calibrate the full-precision model again (load it anew)"
        )
    names = [f"{arch.layers_path}.{n}" for n, m in layers.named_modules() if isinstance(m, nn.Linear)]
    leaves = sorted({n.split(".")[-1] for n in names})
    unknown = [p for p in config.skip_layers if not any(n == p or n.endswith("." + p) for n in names)]
    if unknown:
        hints = {p: difflib.get_close_matches(p.split(".")[-1], leaves, n=3) for p in unknown}
        raise ValueError(
            "calibrate: skip_layers names no Linear of the decoder blocks: "
            + "; ".join(f"{p!r} (close: {', '.join(h) or 'none'})" for p, h in hints.items())
            + f"; the Linears are named {', '.join(leaves)} (or full names such as {names[0]})"
        )


def _warn_rank_deficient(layers: nn.Module, config: WushConfig, report: CalibrationReport) -> None:
    """Fewer calibration tokens than a layer's K: its Hessian is rank-deficient (data-aware transforms and GPTQ
    then fit the sample, often worse than data-free RTN)."""
    if config.method is not Method.GPTQ and config.transform not in DATA_AWARE_KINDS:
        return
    ks = sorted({m.in_features for m in layers.modules() if isinstance(m, nn.Linear)})
    short = [k for k in ks if report.tokens < k]
    if short:
        msg = (
            f"{report.tokens} calibration tokens are fewer than K={', '.join(map(str, short))} of some Linears: their "
            f"Hessians are rank-deficient (rank <= {report.tokens}); use at least {short[-1]} tokens (nsamples x "
            "seqlen), or a data-free transform with RTN"
        )
        report.warnings.append(msg)
        logger.warning("calibrate: %s", msg)


def _calibrate_blocks(layers, arch, config, report, inputs, keep_chunks, needs_capture, dtype, device, desc, swapped,
                      home=None, first=0, ckpt=None):
    """Every block from ``first`` on, in order; with ``home`` (block-by-block onload) each block is moved to
    ``device`` for its calibration and back to ``home`` afterwards, also when it fails. With ``ckpt``
    (a :class:`calibrate.resume.CalibrationCheckpoint`) each finished block is saved."""
    for i in tqdm(range(first, len(layers)), desc=desc, unit="block", initial=first, total=len(layers)):
        marks = (len(swapped), len(report.layers), len(report.skipped))
        if home is not None:
            _onload(layers[i], device)
        try:
            _calibrate_block(i, layers, arch, config, report, inputs, keep_chunks, needs_capture, dtype, device, swapped)
        except Exception as exc:
            exc.add_note(f"calibrate: failed in block {arch.layers_path}.{i}")
            raise
        finally:
            if home is not None:
                _offload(layers[i], home)
        if ckpt is not None:
            ckpt.save_block(i, swapped[marks[0]:], report.layers[marks[1]:], report.skipped[marks[2]:], inputs.hidden,
                            last=i == len(layers) - 1)


def _calibrate_block(i, layers, arch, config, report, inputs, keep_chunks, needs_capture, dtype, device, swapped):
    """Steps 1-3 of the module docstring for block ``i``; every swap is appended to ``swapped``."""
    block = layers[i]
    prefix = f"{arch.layers_path}.{i}"
    groups = _block_groups(block, prefix, arch.groups, config, report)
    # 1. Hessians (and, for the NVFP4 static scale, the inputs) of each group's shared input.
    leaders = {members[0][0]: members[0][2] for members in groups}
    accs = {name: HessianAccumulator(lin.in_features, device=device) for name, lin in leaders.items()}
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in leaders}

    def on_input(name: str, x: torch.Tensor) -> None:
        accs[name].add(x)
        if keep_chunks:
            chunks[name].append(x.to(inputs.storage))

    if needs_capture:
        capture.capture_group_inputs(block, i, leaders, inputs, device=device, on_input=on_input)
    # config.sequential False: the next block is calibrated on this block's full-precision outputs.
    fp_next = None if config.sequential else capture.run_block(block, i, inputs, device=device)
    # 2. Quantize every group and swap the WushLinears in.
    meters: list[tuple[str, nn.Module, _ErrorMeter]] = []
    for members in groups:
        leader = members[0][0]
        gname = group_name(prefix, [p for _, p, _ in members])
        modules = _quantize_group(
            members,
            accs[leader].mean() if needs_capture else None,
            chunks[leader] if keep_chunks else None,
            config,
            dtype,
            device,
            gname,
        )
        for (full, path, lin), wl in zip(members, modules):
            meters.append((full, wl, _ErrorMeter(lin)))
            _set_submodule(block, path, wl)
            swapped.append((block, path, lin))
    del accs, chunks
    # 3. The quantized block gives the next block's inputs; each layer's W4A4 error is measured on the way.
    handles = [wl.register_forward_hook(meter) for _, wl, meter in meters]
    try:
        quantized_next = capture.run_block(block, i, inputs, device=device)
        inputs.hidden = quantized_next if fp_next is None else fp_next
    finally:
        for h in handles:
            h.remove()
    for full, wl, meter in meters:
        report.layers.append(LayerRecord(full, wl.in_features, wl.out_features, meter.rel_err, wl.share_group))


def quantize_linear_group(
    members: list[tuple[str, str, nn.Linear]],
    hessian: torch.Tensor | None,
    config: WushConfig,
    dtype: torch.dtype,
    device,
    group_name: str,
) -> list[WushLinear]:
    """WushLinears for one group of Linears reading the same input, from a given Hessian (K, K) of that input
    (None: RTN without data). ``members`` are (full name, path in the block, Linear); the caller swaps the
    returned modules in. The NVFP4 static activation scale needs calibration inputs: without them it is the
    format's fixed scale, as :func:`calibrate` gives with no captured chunks. Used by benchmarks that calibrate
    random models (``wush bench --e2e --model smollm2_shape``)."""
    return _quantize_group(members, hessian, None, config, dtype, device, group_name)
