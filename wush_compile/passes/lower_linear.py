"""Pass 1: rewrite every ``wush.linear`` (the reference op a calibrated module calls) into ``wush.fused_linear``
with the kernel the dispatcher chose; record plain torch linears that stay in high precision.

Counters (``torch._dynamo.utils.counters["wush"]``):
    calibrated_linears      wush.linear nodes seen
    rewritten               of those, rewritten into wush.fused_linear
    left_alone:<reason>     Linears not rewritten, by reason (plain torch linears: "not calibrated")
    kernel:<choice>         the dispatcher's choices (counted by dispatch.choose_kernel)
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx

from ..ops import dispatch
from ..ops.library import LINEAR_OPS
from ._common import META_KEY, LinearRecord, PassContext, bind_args, count, example_value, m_of, module_name

logger = logging.getLogger(__name__)

__all__ = ["rewrite_linears", "PLAIN_LINEAR_TARGETS", "NOT_CALIBRATED"]

PLAIN_LINEAR_TARGETS = (
    torch._C._nn.linear,
    torch.nn.functional.linear,
    torch.ops.aten.linear,
    torch.ops.aten.linear.default,
)

NOT_CALIBRATED = "not calibrated: a plain torch Linear stays in high precision (Inductor compiles it)"

_LINEAR_SCHEMA = torch.ops.wush.linear.default._schema
_FUSED = torch.ops.wush.fused_linear.default


def _plain_record(node: fx.Node, ctx: PassContext) -> Optional[LinearRecord]:
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    wv = example_value(weight)
    if not isinstance(wv, torch.Tensor) or wv.dim() != 2:
        return None
    n, k = (int(s) if isinstance(s, int) else -1 for s in wv.shape)
    rec = LinearRecord(node=node.name, module=module_name(node), kind="plain", n=n, k=k, reason=NOT_CALIBRATED,
                       graph_index=ctx.graph_index)
    real = ctx.real_input(weight)
    rec.weight_ptr = real.data_ptr() if real is not None else None
    return rec


def rewrite_linears(gm: fx.GraphModule, ctx: PassContext) -> list[LinearRecord]:
    """Rewrite ``wush.linear`` nodes of ``gm`` in place; return one record per Linear (calibrated or plain)."""
    records: list[LinearRecord] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in PLAIN_LINEAR_TARGETS:
            rec = _plain_record(node, ctx)
            if rec is not None:
                records.append(rec)
                count(f"left_alone:{NOT_CALIBRATED}")
            continue
        if node.target not in LINEAR_OPS:
            continue
        count("calibrated_linears")
        args = bind_args(node, _LINEAR_SCHEMA)
        x_val = example_value(args["x"])
        codes_val = example_value(args["weight_codes"])
        n, k = int(codes_val.shape[0]), int(codes_val.shape[1]) * 2
        fmt = str(args["fmt"])
        rec = LinearRecord(node=node.name, module=module_name(node), kind="calibrated", n=n, k=k, fmt=fmt,
                           graph_index=ctx.graph_index)
        real = ctx.real_input(args["weight_codes"])
        rec.weight_ptr = real.data_ptr() if real is not None else None
        records.append(rec)
        if not isinstance(x_val, torch.Tensor):
            rec.reason = "no example value for the activation (cannot size the call)"
            count(f"left_alone:{rec.reason}")
            logger.info("wush: left %s alone: %s", rec.module or node.name, rec.reason)
            continue
        rec.m_hint, static = m_of(x_val, fallback=dispatch.PREFILL_PROBE_M)
        rec.m_dynamic = not static
        decision = dispatch.decide(rec.m_hint, static, n, k, fmt, x_val.device, ctx.pinned)
        rec.kernel, rec.kernel_at_hint, rec.reason = decision.graph_kernel, decision.at_hint.value, decision.reason
        rec.path = dispatch.kernel_path(decision.graph_kernel)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                _FUSED,
                args=(args["x"], args["weight_codes"], args["weight_scales"], args["transform"],
                      args["weight_global_scale"], args["act_global_scale"], args["bias"], fmt, rec.kernel),
            )
        new.meta.update(node.meta)
        new.meta[META_KEY] = rec
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rec.node = new.name
        rec.rewritten = True
        count("rewritten")
        logger.debug(
            "wush: rewrote %s (N=%d, K=%d, %s, M=%s) -> wush.fused_linear[kernel=%s]: %s",
            rec.module or node.name, n, k, fmt, f"{rec.m_hint}{' (dynamic)' if rec.m_dynamic else ''}", rec.kernel,
            rec.reason,
        )
    gm.graph.lint()
    gm.recompile()
    return records
