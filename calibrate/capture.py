"""Block-by-block activation plumbing for calibration.

- :func:`capture_block_inputs`: run the model's embedding part once per calibration batch and record what
  every decoder block is called with (the first block's hidden states; every block's keyword arguments:
  position embeddings, masks, position ids). Blocks are replaced by pass-through catchers, and the forward
  stops after the last one, so no block and no LM head runs.
- :func:`capture_group_inputs`: run one block on all batches and hand the inputs of given Linears to a
  callback (the block stops after the last of them).
- :func:`run_block`: run one block on all batches (the next block's inputs).

Activations live on the CPU between uses when ``offload`` is set, and are moved to the compute device one
batch at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = [
    "BlockInputs",
    "NonFiniteActivationError",
    "capture_block_inputs",
    "capture_group_inputs",
    "run_block",
    "to_device",
]


class NonFiniteActivationError(ValueError):
    """Calibration activations hold NaN or Inf."""


class _Stop(Exception):
    """Raised by a hook to end a forward early (nothing after the hooked module is needed)."""


def to_device(obj: Any, device, memo: dict | None = None) -> Any:
    """Move the tensors of a nested tuple/list/dict to ``device``; tensors shared by identity stay shared."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = obj.to(device)
        return memo[key]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


def check_finite(x: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteActivationError(
            f"calibration activations at {where} contain {bad} NaN/Inf values out of {x.numel()}; check the "
            "model weights and dtype (float16 overflows: load the model in float32 or bfloat16)"
        )


@dataclasses.dataclass
class BlockInputs:
    """What the blocks are called with, per calibration batch."""

    hidden: list[torch.Tensor]  # per batch (B, L, D): the current block's input hidden states
    kwargs: list[list[dict[str, Any]]]  # [block][batch] keyword arguments of that block's call
    storage: torch.device  # where the tensors are kept between uses
    masks: list[torch.Tensor | None] | None = None  # per batch (B, L) bool: real tokens (None: all are)


class _Catcher(nn.Module):
    """Stands in for a decoder block: records its call and passes the hidden states through."""

    def __init__(self, block: nn.Module, index: int, last: bool, sink: dict) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.last = last
        self.sink = sink

    def __getattr__(self, name: str):  # block attributes the model's loop reads (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError(
                f"calibrate: block {self.index} was called with {len(args)} extra positional arguments; "
                "only (hidden_states, **kwargs) calls are supported"
            )
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        if self.last:
            raise _Stop
        return hidden_states


def capture_block_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: Sequence[torch.Tensor],
    *,
    device,
    offload: bool,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> BlockInputs:
    """Run the model up to its blocks for every batch; record block 0's hidden states and every block's kwargs."""
    storage = torch.device("cpu") if offload else torch.device(device)
    originals = list(layers)
    sink: dict = {}
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in originals]
    n = len(originals)
    masks = [None] * len(batches) if masks is None else list(masks)
    try:
        for i, block in enumerate(originals):
            layers[i] = _Catcher(block, i, i == n - 1, sink)
        for ids, mask in zip(batches, masks):
            sink.clear()
            extra = {} if mask is None else {"attention_mask": mask.to(device=device, dtype=torch.long)}
            try:
                model(input_ids=ids.to(device), use_cache=False, **extra)
            except _Stop:
                pass
            if "hidden" not in sink or len(sink.get("kwargs", {})) != n:
                raise RuntimeError(
                    f"calibrate: the model's forward did not call all {n} decoder blocks "
                    f"(saw {len(sink.get('kwargs', {}))}); this model layout is not supported"
                )
            check_finite(sink["hidden"], "the input of block 0 (the embeddings)")
            memo: dict = {}
            hidden.append(sink["hidden"].detach().to(storage))
            for i in range(n):
                kw = {k: v for k, v in sink["kwargs"][i].items() if k not in ("past_key_values", "past_key_value")}
                kw["use_cache"] = False
                kwargs[i].append(to_device(kw, storage, memo))
    finally:
        for i, block in enumerate(originals):
            layers[i] = block
    kept = [None if m is None else m.to(device=storage, dtype=torch.bool) for m in masks]
    return BlockInputs(hidden=hidden, kwargs=kwargs, storage=storage, masks=kept)


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, index: int, inputs: BlockInputs, *, device) -> list[torch.Tensor]:
    """Outputs of block ``index`` for every batch (kept where the inputs are kept)."""
    outs = []
    for hidden, kw in zip(inputs.hidden, inputs.kwargs[index]):
        out = _block_output(block(hidden.to(device), **to_device(kw, device)))
        check_finite(out, f"the output of block {index}")
        outs.append(out.detach().to(inputs.storage))
    return outs


def capture_group_inputs(
    block: nn.Module,
    index: int,
    leaders: dict[str, nn.Module],
    inputs: BlockInputs,
    *,
    device,
    on_input: Callable[[str, torch.Tensor], None],
) -> None:
    """Run block ``index`` on every batch and hand each leader Linear's input to ``on_input(name, x)``.

    ``x`` is (tokens, K) on the compute device. The block stops once the last leader (in call order) has
    been seen, so nothing after it runs.
    """
    if not leaders:
        return
    seen: list[str] = []
    order: list[str] = []
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(name: str):
        def hook(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x2 = x.detach().reshape(-1, x.shape[-1])  # (B*L, K)
            if current["mask"] is not None:  # padding never enters a Hessian
                x2 = x2[current["mask"].reshape(-1).to(x2.device)]
            check_finite(x2, f"the input of {name}")
            on_input(name, x2)
            seen.append(name)
            if order and name == order[-1]:
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in leaders.items()]
    try:
        masks = inputs.masks or [None] * len(inputs.hidden)
        for hidden, kw, mask in zip(inputs.hidden, inputs.kwargs[index], masks):
            seen.clear()
            current["mask"] = mask
            try:
                block(hidden.to(device), **to_device(kw, device))
            except _Stop:
                pass
            if len(seen) != len(leaders) or set(seen) != set(leaders):
                missing = sorted(set(leaders) - set(seen))
                raise RuntimeError(f"calibrate: {', '.join(missing)} did not run in the forward of block {index}")
            if not order:
                order.extend(seen)  # the call order, learned on the first batch
    finally:
        for h in handles:
            h.remove()
