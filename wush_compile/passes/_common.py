"""What the FX passes share: the per-linear record, the pass context, argument binding and name mapping."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from ..config import KernelChoice

__all__ = ["LinearRecord", "PassContext", "bind_args", "module_name", "example_value", "m_of", "count"]

#: Key of a rewritten node's record in ``node.meta``.
META_KEY = "wush"


@dataclasses.dataclass
class LinearRecord:
    """One Linear the passes saw, and what they did with it (the explain report's row)."""

    node: str  # FX node name in the dynamo graph
    module: Optional[str]  # fully qualified module name ("model.layers.0.self_attn.q_proj"), when known
    kind: str  # "calibrated" (wush.linear) or "plain" (torch linear)
    n: int
    k: int
    fmt: Optional[str] = None
    m_hint: Optional[int] = None  # tokens in the example call
    m_dynamic: bool = False
    rewritten: bool = False
    kernel: Optional[str] = None  # what the graph says: a concrete KernelChoice value or "auto"
    kernel_at_hint: Optional[str] = None  # the concrete choice at the example M
    path: Optional[str] = None
    reason: str = ""  # why this kernel / why left alone
    group: Optional[str] = None  # share_group name when fused into a grouped op
    group_note: str = ""  # why it was not grouped (when it was a candidate)
    weight_ptr: Optional[int] = None  # data_ptr of the weight (codes) example input, to map back to modules
    graph_index: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PassContext:
    """Inputs every pass sees: the example inputs dynamo handed the backend and our options."""

    example_inputs: Sequence[Any]
    pinned: KernelChoice = KernelChoice.AUTO
    group: bool = True
    graph_index: int = 0
    _placeholder_index: dict = dataclasses.field(default_factory=dict)

    def bind(self, gm: fx.GraphModule) -> "PassContext":
        self._placeholder_index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        return self

    def real_input(self, node: Any) -> Optional[torch.Tensor]:
        """The real (not fake) example tensor behind a placeholder node, or None."""
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        i = self._placeholder_index.get(node)
        if i is None or i >= len(self.example_inputs):
            return None
        t = self.example_inputs[i]
        if not isinstance(t, torch.Tensor) or isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
            return None
        return t


def count(key: str, n: int = 1) -> None:
    from torch._dynamo.utils import counters

    counters["wush"][key] += n


def bind_args(node: fx.Node, schema: torch.FunctionSchema) -> dict[str, Any]:
    """Map a call's positional and keyword arguments to the schema's argument names (defaults filled)."""
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            raise ValueError(f"wush pass: {node.format_node()} lacks argument {arg.name!r}")
    return out


def example_value(arg: Any) -> Any:
    """The (fake) example value dynamo recorded for a node (None when absent)."""
    if isinstance(arg, fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def _hint(s: Any, fallback: int) -> int:
    if isinstance(s, int):
        return s
    node = getattr(s, "node", None)
    hint = getattr(node, "hint", None) if node is not None else None
    return int(hint) if hint is not None else fallback


def m_of(x_val: torch.Tensor, fallback: int) -> tuple[int, bool]:
    """(M hint, M is static) for activations (..., K): M = prod of the leading dims."""
    m: Any = 1
    for d in x_val.shape[:-1]:
        m = m * d
    if isinstance(m, int):
        return m, True
    return _hint(m, fallback), False


#: The graph input a module path starts from: ``L['self']`` (a bound method), or ``L['args'][0]`` /
#: ``L['kwargs']['model']`` / ``G['model']`` (a module passed to or found by the compiled function), which
#: name the input, not a part of the module's own qualified name.
_ROOT = re.compile(r"^(?:[LG]\['(?:args|kwargs)'\]\[[^\]]*\]|[LG]\['[^']*'\])\.?")
_MODULES = re.compile(r"(?:^|\.)_modules\['([^']*)'\]")
_INDEX = re.compile(r"\[(\d+)\]")
_KEY = re.compile(r"\['([^']*)'\]")


def normalize_module_path(path: str) -> str:
    """``L['self'].model.layers[0].self_attn.q_proj`` (or the ``_modules['x']`` spelling) -> ``model.layers.0...``."""
    p = _ROOT.sub("", path)
    p = _MODULES.sub(r".\1", p)
    p = _INDEX.sub(r".\1", p)
    p = _KEY.sub(r".\1", p)
    return p.strip(".")


def module_name(node: fx.Node) -> Optional[str]:
    """The innermost module a node was traced in (``nn_module_stack``), normalized; None when unknown."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return normalize_module_path(str(path)) or None
