"""Serving wush checkpoints in vLLM: the ``wush`` quantization method as a vLLM plugin.

vLLM finds it through the ``vllm.general_plugins`` entry point (pyproject.toml) and calls :func:`register` in
every process it starts; nothing else is needed: ``vllm serve <checkpoint dir>`` / ``vllm.LLM(<dir>)`` read
``quant_method: "wush"`` from config.json. Importing :mod:`wush_compile` never imports vLLM; only
:func:`register` (and :mod:`wush_compile.vllm.plugin`) do.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Register quant_method ``wush`` with vLLM; safe to call any number of times, in any process."""
    from .plugin import register as _register

    _register()
