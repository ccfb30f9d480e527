"""Benchmarks: per-layer (``wush bench --layers``) and, later, end to end (``--e2e``)."""
