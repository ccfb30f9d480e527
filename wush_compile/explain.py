"""``wush_compile.explain(model, *args, **kwargs)``: compile with the wush backend and report what happened to
every Linear - rewritten into which kernel and path and why, fused into which group, or left alone and why.

    report = wush_compile.explain(model, input_ids)
    print(report)              # a table, one row per Linear
    report.rewritten           # calibrated Linears rewritten into the fast ops
    report.graph               # the rewritten FX graph (before Inductor)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .backend import GraphResult, collect_results
from .modules import WushLinear
from .ops import dispatch
from .passes import NOT_CALIBRATED, LinearRecord
from .report import format_rows
from .saturation import SaturationCounter, SaturationReport, counted_layers

logger = logging.getLogger(__name__)

__all__ = ["explain", "ExplainReport", "LayerRow", "format_rows"]

ARTIFACT_NAME = "wush_explain_report"
NOT_TRACED = "not called by the compiled forward"



@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One Linear of the model in the report."""

    name: str
    calibrated: bool
    n: int
    k: int
    fmt: Optional[str]
    transform: Optional[str]
    status: str  # "rewritten" | "left alone" | "not traced"
    kernel: Optional[str] = None  # in the graph: a KernelChoice value or "auto" (per call from M)
    path: Optional[str] = None  # short label of the kernel's path (decode / prefill/fp8 / ...)
    reason: str = ""  # why this kernel, or why left alone
    group: Optional[str] = None  # the share_group it was fused into
    m: Optional[int] = None  # tokens in the example call
    m_dynamic: bool = False


@dataclasses.dataclass
class ExplainReport:
    """What the wush backend did to a model (see module docstring)."""

    rows: list[LayerRow]
    graphs: list[GraphResult]
    #: NVFP4 static-scale layers: activation values clipped at their scale's limit on the example input (counted on
    #: an eager run of the same input); None when the model has no such layer or ``explain(saturation=False)``.
    saturation: Optional[SaturationReport] = None

    @property
    def rewritten(self) -> int:
        """Calibrated Linears (modules) rewritten into wush.fused_linear / wush.fused_linear_group."""
        return sum(r.status == "rewritten" for r in self.rows)

    @property
    def calibrated(self) -> int:
        return sum(r.calibrated for r in self.rows)

    @property
    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self.rows:
            if r.group:
                out.setdefault(r.group, []).append(r.name)
        return out

    @property
    def graph(self) -> Optional[torch.fx.GraphModule]:
        """The rewritten FX graph (the first one when dynamo made several)."""
        return self.graphs[0].graph_module if self.graphs else None

    @property
    def graph_code(self) -> str:
        return "\n".join(g.code for g in self.graphs)

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"explain report: no Linear named {name!r}; names are {[r.name for r in self.rows]}")

    def __str__(self) -> str:
        left = [r for r in self.rows if r.calibrated and r.status != "rewritten"]
        head = (
            f"wush explain: {self.rewritten} of {self.calibrated} calibrated Linears rewritten, "
            f"{len(self.groups)} shared-input groups, {sum(not r.calibrated for r in self.rows)} plain Linears left "
            f"in high precision, {len(self.graphs)} graph(s)"
        )
        lines = [head, format_rows(self.rows, group_ids=self._group_ids())]
        if self.groups:
            lines.append("groups (x transformed and quantized once):")
            for gid, (name, members) in zip(self._group_ids().values(), self.groups.items()):
                lines.append(f"  {gid} = {name} ({len(members)} members)")
        if left:
            lines.append(f"{len(left)} calibrated Linear(s) not rewritten: see the 'why' column")
        if self.saturation is not None:
            lines.append(self.saturation.summary() + " (example input, eager run)")
        return "\n".join(lines)

    def _group_ids(self) -> dict[str, str]:
        return {name: f"g{i}" for i, name in enumerate(self.groups)}


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (WushLinear, nn.Linear))]


def _weight_ptr(m: nn.Module) -> int:
    return (m.weight_codes if isinstance(m, WushLinear) else m.weight).data_ptr()


def build_report(model: nn.Module, graphs: list[GraphResult]) -> ExplainReport:
    """Join the pass records of ``graphs`` with the model's Linear modules."""
    by_ptr: dict[int, LinearRecord] = {}
    by_name: dict[str, LinearRecord] = {}
    for g in graphs:
        for rec in g.records:
            if rec.weight_ptr is not None:
                by_ptr.setdefault(rec.weight_ptr, rec)
            if rec.module:
                by_name.setdefault(rec.module, rec)
    used: set[int] = set()
    rows: list[LayerRow] = []
    for name, mod in _linear_modules(model):
        calibrated = isinstance(mod, WushLinear)
        rec = by_ptr.get(_weight_ptr(mod)) or by_name.get(name)
        n, k = mod.out_features, mod.in_features
        fmt = mod.fmt.value if calibrated else None
        tkind = mod.transform_kind.value if calibrated else None
        if rec is None:
            rows.append(LayerRow(name, calibrated, n, k, fmt, tkind, "not traced", reason=NOT_TRACED))
            continue
        used.add(id(rec))
        if not calibrated:
            rows.append(LayerRow(name, False, n, k, None, None, "left alone", reason=rec.reason or NOT_CALIBRATED))
            continue
        reason = rec.reason + (f"; not grouped: {rec.group_note}" if rec.group_note and not rec.group else "")
        rows.append(LayerRow(
            name, True, n, k, fmt, tkind, "rewritten" if rec.rewritten else "left alone", kernel=rec.kernel,
            path=dispatch.kernel_path(rec.kernel) if rec.kernel else None, reason=reason, group=rec.group,
            m=rec.m_hint, m_dynamic=rec.m_dynamic,
        ))
    for g in graphs:  # linears that are not modules of the model (functional calls)
        for rec in g.records:
            if id(rec) in used or (rec.module and any(r.name == rec.module for r in rows)):
                continue
            rows.append(LayerRow(
                rec.module or rec.node, rec.kind == "calibrated", rec.n, rec.k, rec.fmt, None,
                "rewritten" if rec.rewritten else "left alone", kernel=rec.kernel, reason=rec.reason,
                group=rec.group, m=rec.m_hint, m_dynamic=rec.m_dynamic,
            ))
    return ExplainReport(rows, graphs)


def explain(
    model: nn.Module,
    *example_args: Any,
    compile_mode: Optional[str] = None,
    compile_options: Optional[dict[str, Any]] = None,
    fullgraph: bool = False,
    dynamic: Optional[bool] = None,
    reset: bool = True,
    saturation: bool = True,
    **example_kwargs: Any,
) -> ExplainReport:
    """Compile ``model`` with ``backend="wush"``, run it once on the example inputs (no grad), and report.

    Like ``torch._dynamo.explain``, this starts with ``torch._dynamo.reset()`` so that dynamo compiles afresh
    instead of reusing a cached graph (other compiled functions recompile on their next call); pass
    ``reset=False`` to keep the caches (the report is then empty when the graph was cached).

    Args:
        model: the (calibrated) model.
        example_args, example_kwargs: what ``model(...)`` is called with.
        compile_mode, compile_options: ``mode=`` / ``options=`` of torch.compile (ours and Inductor's;
            ``{"inductor": False}`` skips Inductor's code generation and runs the rewritten graph eagerly).
        fullgraph, dynamic: as in torch.compile.
        reset: ``torch._dynamo.reset()`` first (see above).
        saturation: for NVFP4 layers with a static activation scale, also run the model eagerly on the example
            inputs and count the activation values their scale clips (``report.saturation``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain expects an nn.Module, got {type(model).__name__}")
    if reset:
        torch._dynamo.reset()
    compiled = torch.compile(model, backend="wush", mode=compile_mode, options=compile_options,
                             fullgraph=fullgraph, dynamic=dynamic)
    with collect_results() as graphs, torch.no_grad():
        compiled(*example_args, **example_kwargs)
    if not graphs:
        logger.warning(
            "explain: the backend compiled no graph (dynamo reused a cached graph or skipped the frame); "
            "call torch._dynamo.reset() first for a full report"
        )
    report = build_report(model, graphs)
    if saturation and counted_layers(model):
        with SaturationCounter(model) as counter, torch.no_grad():
            model(*example_args, **example_kwargs)
        report.saturation = counter.report()
    text = str(report)
    logger.debug("%s", text)
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": ARTIFACT_NAME, "encoding": "string"},
        payload_fn=lambda: text,
    )
    return report
