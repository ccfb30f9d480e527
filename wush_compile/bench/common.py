"""Shared benchmark helpers: the environment header, timing with L2 rotation, ceilings, plotting."""

from __future__ import annotations

import datetime
import json
import logging
import math
import platform
import subprocess
from pathlib import Path
from typing import Callable

import torch

from .. import settings

logger = logging.getLogger(__name__)

#: Bytes of working set a timed loop cycles through so that repeated calls do not run out of L2.
ROTATE_BYTES = 3 * 50 * 2**20


def git_sha(repo: Path | None = None) -> str:
    """The repository's short sha (+ "-dirty"); WUSH_GIT_SHA overrides it where no .git travels."""
    if settings.value("WUSH_GIT_SHA"):
        return settings.value("WUSH_GIT_SHA")
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=repo or Path(__file__).resolve().parents[2], timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=repo or Path(__file__).resolve().parents[2], timeout=10)
        sha = out.stdout.strip() or "unknown"
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Where the numbers come from: GPU, versions, git sha, date."""
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env.update(gpu="none")
    try:  # the driver binding the CUDA routes launch through
        import cuda.bindings as cb

        env["cuda_python"] = getattr(cb, "__version__", "?")
    except ImportError:
        env["cuda_python"] = None
    return env


def header(env: dict) -> str:
    return " | ".join(f"{k}: {v}" for k, v in env.items())


def rotations(bytes_per_copy: int, cap: int = 16) -> int:
    """How many copies of the operands to cycle through so that the loop's working set exceeds L2."""
    return max(1, min(cap, math.ceil(ROTATE_BYTES / max(1, bytes_per_copy))))


def bench_us(fns: list[Callable[[], object]], graph: bool) -> float:
    """Median microseconds of one call, cycling through ``fns`` (one per operand copy) in each timed rep."""
    import triton.testing as tt

    def run():
        for f in fns:
            f()

    run()  # warm-up outside any capture: compiles kernels, caches host scalars, allocates counters
    torch.cuda.synchronize()
    if graph:
        ms = tt.do_bench_cudagraph(run, rep=100, return_mode="median")
    else:
        ms = tt.do_bench(run, warmup=25, rep=100, return_mode="median")
    return ms * 1e3 / len(fns)


def copy_bandwidth_gbs(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth (read + write bytes), GB/s."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    us = bench_us([lambda: dst.copy_(src)], graph=False)
    return 2 * src.numel() * 4 / us / 1e3


def save_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))


def plot_speedups(rows: list[dict], path: Path, title: str) -> None:
    """Speed-up over bf16 vs M, one line per (layer, format), one panel per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmts = sorted({r["fmt"] for r in rows if r.get("fmt")})
    fig, axes = plt.subplots(1, len(fmts) or 1, figsize=(6 * max(1, len(fmts)), 4.5), squeeze=False)
    for ax, fmt in zip(axes[0], fmts):
        for layer in sorted({r["layer"] for r in rows}):
            pts = sorted((r["m"], r["x_bf16"]) for r in rows if r["fmt"] == fmt and r["layer"] == layer)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=layer)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speed-up over bf16 F.linear")
        ax.set_title(f"{fmt}: full WUSH linear")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
