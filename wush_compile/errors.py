"""The error type of bad user input, and how the ``wush`` command reports it.

:class:`WushUserError` is a ``ValueError`` (code catching ``ValueError`` keeps working); its message names the
value and the fix. The ``wush`` command catches it, and the other errors that user input causes
(:data:`USER_ERRORS`), in one place and prints one line, ``wush COMMAND: error: MESSAGE``, with exit code 2;
``-v`` shows the traceback too.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable

__all__ = ["WushUserError", "USER_ERRORS", "one_line", "run_command"]


class WushUserError(ValueError):
    """Bad input (a file, a flag, a model, calibration data): the message names the value and the fix."""


#: What the ``wush`` command reports as one line with exit code 2 (anything else is a bug: a traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (WushUserError, ValueError, TypeError, OSError, ImportError, RuntimeError)


def one_line(exc: BaseException, command: str) -> str:
    """``wush COMMAND: error: MESSAGE`` on one line; the exception's notes (e.g. the failing block) follow."""
    prefix = f"wush {command}: "
    parts = [str(exc) or type(exc).__name__, *getattr(exc, "__notes__", ())]
    text = "; ".join(" ".join(p.split()) for p in parts if p)
    while text.startswith(prefix):  # messages that already name the command
        text = text[len(prefix):]
    return f"{prefix}error: {text}"


def run_command(func: Callable[[], int | None], command: str, verbose: int = 0) -> int:
    """``func()``'s exit code; a user error (or ``SystemExit("message")``) prints :func:`one_line` on stderr
    and gives 2 (with ``verbose``, after its traceback), Ctrl-C gives 130."""
    try:
        return int(func() or 0)
    except USER_ERRORS as exc:
        if verbose:
            traceback.print_exc()
        print(one_line(exc, command) + ("" if verbose else " (-v shows the traceback)"), file=sys.stderr)
        return 2
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # argparse and sys.exit(N): their own exit code
            raise
        print(one_line(exc, command), file=sys.stderr)  # SystemExit("message"): a user error too
        return 2
    except KeyboardInterrupt:
        print(f"wush {command}: interrupted", file=sys.stderr)
        return 130
