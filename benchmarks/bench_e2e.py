"""End-to-end benchmark (same as ``wush bench --e2e``): python benchmarks/bench_e2e.py [--out DIR] [--model NAME]
[--batch B] [--prompt-len L] [--new-tokens T]"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wush_compile.bench import cli  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    sys.exit(cli._run(parser.parse_args(["bench", "--e2e", *sys.argv[1:]])))
