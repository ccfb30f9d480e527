"""Merge `wush bench --e2e --variants ...` runs of one model made on the same GPU (one machine, one
session: several runs because each variant's compile is long) into one result with ratios, table and plot.

Usage: python benchmarks/e2e_merge.py OUT_DIR RUN1/e2e.json RUN2/e2e.json ...
Refuses runs whose GPU, torch, triton or settings other than the variants differ."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from wush_compile.bench import e2e


def merge(paths: list[Path]) -> dict:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("gpu", "torch", "triton")
    env0 = runs[0]["environment"]
    for p, r in zip(paths, runs):
        env = r["environment"]
        diff = [k for k in keys if env.get(k) != env0.get(k)]
        if diff:
            raise SystemExit(f"{p}: {diff} differ from {paths[0]} ({[env.get(k) for k in diff]} vs "
                             f"{[env0.get(k) for k in diff]}); merge only runs of one machine")
        s = {k: v for k, v in r["settings"].items() if k != "variants"}
        s0 = {k: v for k, v in runs[0]["settings"].items() if k != "variants"}
        if s != s0:
            raise SystemExit(f"{p}: settings differ from {paths[0]}: "
                             f"{ {k: (s.get(k), s0.get(k)) for k in set(s) | set(s0) if s.get(k) != s0.get(k)} }")
    merged: dict = {}
    for r in runs:
        for res in r["results"]:
            m = merged.setdefault(res["model"], {})
            for k, v in res.items():
                if k in ("bf16", "fp8", "wush") or k.startswith("wush["):
                    if k in m:
                        raise SystemExit(f"variant {k} of {res['model']} measured twice; pass one run per variant")
                    m[k] = {**v, "run_date": r["environment"].get("date"), "run_git_sha": r["environment"].get("git_sha")}
                elif k not in m:
                    m[k] = v
    results = []
    for m in merged.values():
        if "bf16" in m and "wush" in m:
            e2e._ratios(m)
        results.append(m)
    return {"environment": {**env0, "date": [r["environment"].get("date") for r in runs],
                            "git_sha": [r["environment"].get("git_sha") for r in runs]},
            "settings": runs[0]["settings"], "results": results, "merged_from": [str(p) for p in paths]}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    m = merge([Path(p) for p in sys.argv[2:]])
    (out / "e2e_merged.json").write_text(json.dumps(m, indent=1))
    table = e2e.format_table(m["results"])
    (out / "e2e_merged.md").write_text(table + "\n")
    e2e.plot(m["results"], out / "e2e_merged.png")
    print(table)


if __name__ == "__main__":
    main()
