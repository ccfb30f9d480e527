"""End-to-end benchmark (same as ``wush bench --e2e``): python benchmarks/bench_e2e.py [--out DIR] [--model NAME]
[--batch B] [--prompt-len L] [--new-tokens T]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wush_compile.bench import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.script_main("--e2e", __doc__))
