"""Tests that compile start from a clean dynamo state (the runtime tests' fixture)."""

from ..runtime.conftest import _fresh_dynamo  # noqa: F401  (autouse)
