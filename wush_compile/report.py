"""The per-Linear table of the explain report (:mod:`wush_compile.explain`) and of the backend's trace artifact.

A leaf below both: the backend formats what its passes did without importing :mod:`.explain`, which imports the
backend to collect the compiled graphs.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .passes import LinearRecord

__all__ = ["format_rows"]

_SHORT_PATH = {
    "reference": "reference",
    "triton_decode": "decode",
    "cuda_decode": "decode/cuda",
    "triton_fp8": "prefill/fp8",
    "cublas_bf16": "prefill/bf16",
    "fp8core": "prefill/fp8core",
    "cutlass": "native-fp4",
    "auto": "per call",
}


def format_rows(rows: Sequence[Any], group_ids: Optional[dict[str, str]] = None) -> str:
    """A fixed-width table of LayerRows (or pass LinearRecords)."""
    group_ids = group_ids or {}
    header = ("layer", "N", "K", "fmt", "transform", "status", "kernel", "path", "M", "group", "why")
    table = [header]
    for r in rows:
        if isinstance(r, LinearRecord):
            name, status, transform = r.module or r.node, ("rewritten" if r.rewritten else "left alone"), None
            m, kernel, group = r.m_hint, r.kernel, r.group
        else:
            name, status, transform, m, kernel, group = r.name, r.status, r.transform, r.m, r.kernel, r.group
        table.append((
            name,
            str(r.n),
            str(r.k),
            r.fmt or "-",
            transform or "-",
            status,
            kernel or "-",
            _SHORT_PATH.get(kernel or "", "-"),
            "-" if m is None else f"{m}{'*' if r.m_dynamic else ''}",
            group_ids.get(group, group) if group else "-",
            r.reason or "",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    out = []
    for row in table:
        out.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])
    out.insert(1, "-" * min(160, sum(widths) + 2 * len(widths) + 3))
    if any(getattr(r, "m_dynamic", False) for r in rows):
        out.append("(M* = dynamic M; the number is the example call's)")
    return "\n".join(out)
