"""Pass 2: group rewritten linears that read the same activation node with an identical transform (and the same
activation global scale, format and kernel) into one ``wush.fused_linear_group``: x is transformed and quantized
once, then each member's GEMM runs. Typical members: q/k/v and gate/up of a layer calibrated with a shared
transform (``WushConfig.shared_transform``), or any layers with a data-free transform (identity, Hadamard).

Transforms are compared by node identity or, for buffers, by value on the real example inputs the backend gets.
A decision taken from values must hold for every later call of the compiled graph, and dynamo reuses a graph
for ANOTHER model of the same architecture (buffers are graph inputs; their values are not guarded). It is
guarded through ``WushLinear.transform_key`` (a digest of transform and activation scale that forward branches
on, so dynamo guards its value and recompiles for a model whose transforms differ). This pass therefore groups
only layers whose key is current - computed from exactly the values it compares - so the guard covers the
decision (``wush_compile.modules.key_is_current``). After changing buffers in place, call
``WushLinear.refresh_transform_key()`` (or ``torch._dynamo.reset()``).

Counters (``torch._dynamo.utils.counters["wush"]``):
    groups                  grouped ops created
    grouped_linears         members in them
    not_grouped:<reason>    candidates (another fused linear reads the same x) left ungrouped, by reason
"""

from __future__ import annotations

import logging
import operator
import os
from collections import defaultdict
from typing import Optional

import torch
import torch.fx as fx

from ..modules import key_is_current
from ._common import META_KEY, LinearRecord, PassContext, count, example_value

logger = logging.getLogger(__name__)

__all__ = ["group_shared_inputs"]

_FUSED = torch.ops.wush.fused_linear.default
_GROUP = torch.ops.wush.fused_linear_group.default
# fused_linear argument positions
_X, _CODES, _SCALES, _T, _WGS, _AGS, _BIAS, _FMT, _KERNEL = range(9)


def _same_tensor(a, b, ctx: PassContext) -> Optional[bool]:
    """True / False when the two graph values are known to be equal / different; None when unknown."""
    if a is b:
        return True
    ta, tb = ctx.real_input(a), ctx.real_input(b)
    if ta is None or tb is None:
        return None
    if ta.shape != tb.shape or ta.dtype != tb.dtype or ta.device != tb.device:
        return False
    return bool(torch.equal(ta, tb))


def _compatible(a: fx.Node, b: fx.Node, ctx: PassContext) -> tuple[bool, str]:
    if a.args[_FMT] != b.args[_FMT]:
        return False, "formats differ"
    if a.args[_KERNEL] != b.args[_KERNEL]:
        return False, "members chose different kernels"
    same_t = _same_tensor(a.args[_T], b.args[_T], ctx)
    if same_t is None:
        return False, "transforms cannot be compared (no real example inputs)"
    if not same_t:
        return False, "transforms differ (calibrate with shared_transform=True to share one)"
    same_s = _same_tensor(a.args[_AGS], b.args[_AGS], ctx)
    if not same_s:
        return False, "activation global scales differ" if same_s is False else "activation scales cannot be compared"
    for n in (a, b):
        t, s = ctx.real_input(n.args[_T]), ctx.real_input(n.args[_AGS])
        if t is None or s is None or not key_is_current(t, s, n.args[_FMT]):
            return False, (
                "transform key is not current (buffers edited in place; call WushLinear.refresh_transform_key())"
            )
    return True, ""


def _group_name(recs: list[LinearRecord], x: fx.Node) -> str:
    names = [r.module for r in recs]
    if all(names):
        prefix = os.path.commonprefix([n.split(".") for n in names])  # type: ignore[union-attr]
        lead = ".".join(prefix)
        tails = [".".join(n.split(".")[len(prefix):]) for n in names]  # type: ignore[union-attr]
        return f"{lead}.{{{','.join(tails)}}}" if lead else "{" + ",".join(tails) + "}"
    return f"{{{','.join(r.node for r in recs)}}}@{x.name}"


def _record(node: fx.Node) -> LinearRecord:
    return node.meta[META_KEY]


def _note(node: fx.Node, why: str) -> None:
    rec = _record(node)
    if not rec.group_note:
        rec.group_note = why
        count(f"not_grouped:{why}")


def _fuse(gm: fx.GraphModule, members: list[fx.Node], order: dict) -> Optional[str]:
    first = min(members, key=order.__getitem__)
    for m in members:
        for a in m.all_input_nodes:
            if order[a] >= order[first]:
                return "a member's inputs are computed after the first member (cannot hoist)"
    recs = [_record(m) for m in members]
    name = _group_name(recs, members[0].args[_X])
    a0 = first.args
    with gm.graph.inserting_before(first):
        grp = gm.graph.call_function(
            _GROUP,
            args=(
                a0[_X],
                [m.args[_CODES] for m in members],
                [m.args[_SCALES] for m in members],
                a0[_T],
                [m.args[_WGS] for m in members],
                a0[_AGS],
                [m.args[_BIAS] for m in members],
                a0[_FMT],
                a0[_KERNEL],
            ),
        )
        grp.meta.update({k: v for k, v in first.meta.items() if k not in (META_KEY, "example_value", "val")})
        grp.meta["example_value"] = [example_value(m) for m in members]
        grp.meta["wush_group"] = {"name": name, "members": [r.module or r.node for r in recs]}
        for i, m in enumerate(members):
            item = gm.graph.call_function(operator.getitem, (grp, i))
            item.meta.update(m.meta)
            m.replace_all_uses_with(item)
    for m in members:
        gm.graph.erase_node(m)
    for r in recs:
        r.group = name
        r.node = f"{grp.name}[{recs.index(r)}]"
    count("groups")
    count("grouped_linears", len(members))
    logger.debug("wush: grouped %s -> wush.fused_linear_group (x quantized once, kernel=%s)", name, a0[_KERNEL])
    return None


def group_shared_inputs(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Group fused linears sharing an input and a transform, in place. Returns the number of groups made."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    readers: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _FUSED and META_KEY in node.meta:
            readers[node.args[_X]].append(node)
    made = 0
    for x, nodes in readers.items():
        if len(nodes) < 2:
            continue
        if not ctx.group:
            for n in nodes:
                _note(n, "grouping disabled (options group=False)")
            continue
        classes: list[list[fx.Node]] = []
        why_not: dict[fx.Node, str] = {}
        for n in nodes:
            for cls in classes:
                ok, why = _compatible(cls[0], n, ctx)
                if ok:
                    cls.append(n)
                    break
                why_not.setdefault(n, why)
            else:
                classes.append([n])
        for cls in classes:
            if len(cls) == 1:
                other = [why_not[n] for n in nodes if n in why_not]
                _note(cls[0], why_not.get(cls[0]) or (other[0] if other else "no compatible reader of the same input"))
                continue
            failed = _fuse(gm, cls, order)
            if failed:
                for n in cls:
                    _note(n, failed)
            else:
                made += 1
    gm.graph.lint()
    gm.recompile()
    return made
