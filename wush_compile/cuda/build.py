"""``python -m wush_compile.cuda.build``: build the CUDA kernels (cubins + host libraries) ahead of time.

    python -m wush_compile.cuda.build [--arch sm_100a sm_120a sm_90a] [--out DIR] [--only NAME ...] [--jobs N]

Without --out the artifacts go to the keyed user cache the loader searches (see :mod:`.builder`); with --out
to DIR/<arch>/ (point WUSH_CUDA_CUBIN_DIR=DIR at them). Exit status 1 with the reason when the
toolkit, the CUTLASS headers or an architecture is missing.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from .builder import *  # noqa: F401,F403  (the build API, re-exported)
from .builder import ARCHS, DEFAULT_ARCHS, BuildError, build, targets

logger = logging.getLogger(__name__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wush_compile.cuda.build", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), choices=sorted(ARCHS),
                        help="architectures to build (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory; artifacts go to OUT/<arch>/ (default: the keyed user cache)")
    parser.add_argument("--only", nargs="+", default=None, help="build only these targets (variant names, ...)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (default: CPU count)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the artifacts exist")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        for arch in args.arch:
            for t in targets(arch):
                sys.stdout.write(f"{arch}\t{t.kind}\t{t.name}\t{t.filename}\n")
        return 0
    try:
        dirs = build(args.arch, out=args.out, only=args.only, jobs=args.jobs, force=args.force)
    except BuildError as exc:
        logger.error("%s", exc)
        return 1
    for arch, d in dirs.items():
        sys.stdout.write(f"{arch}\t{d}\n")
    return 0




if __name__ == "__main__":
    sys.exit(main())
