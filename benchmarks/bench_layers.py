"""Per-layer benchmark (same as ``wush bench --layers``): python benchmarks/bench_layers.py [--out DIR] ..."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wush_compile.bench import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.script_main("--layers", __doc__))
