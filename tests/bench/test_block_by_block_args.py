"""The block-by-block calibration benchmark refuses a GPU memory cap it cannot use, before any work."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_non_positive_gpu_limit_is_a_clear_error():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate_block_by_block.py"), "--gpu-limit-gib", "-1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "--gpu-limit-gib -1.0 must be above 0" in res.stderr, res.stderr[-2000:]
