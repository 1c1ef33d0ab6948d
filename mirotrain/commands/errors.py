"""How every command reports a user error: one line per problem, exit code 2, no traceback.

A user error is a bad config key, a bad data file (file:line), a missing file, a missing or unusable
checkpoint or a run lock held by another training: something the user fixes in their input, for which a
traceback only hides the line that matters. Any other exception is our bug and keeps its traceback, as do
user errors under ``--debug``. Under torchrun every rank exits 2 and only global rank 0 prints.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
from typing import Callable

# (module, class) of each user error. An exception can only be an instance of a class whose module is loaded,
# so the check reads sys.modules and never imports the engine's heavier parts itself.
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("mirotrain.config.loader", "ConfigError"),
    ("mirotrain.data.errors", "DataError"),
    ("mirotrain.checkpoint.layout", "CheckpointInputError"),
    ("mirotrain.training.run_lock", "RunLockedError"),
    ("builtins", "FileNotFoundError"),  # a path the user gave that is not there
)
DEBUG_FLAG = "--debug"
RANK_GRACE_S = 10.0


def is_user_error(exc: BaseException) -> bool:
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(exc, getattr(module, class_name)):
            return True
    return False


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--debug``: show the traceback of a user error instead of its one line (for bug reports)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on a config, data or input error, raise it with its traceback instead of one line")
    return parser


def _is_other_rank() -> bool:
    return os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _leave_after_rank_0() -> None:
    """Let rank 0 print and exit first, and exit 2 when torchrun then stops this rank.

    torchrun stops the other ranks with SIGTERM as soon as one rank fails. Were this rank to exit first, rank 0
    could be stopped before it prints the error; were it still running, its exit code would read as a kill
    (-15) and the pipeline would retry a run that cannot succeed (tasks/_retry.py). So it waits (at most
    RANK_GRACE_S) with SIGTERM mapped to exit code 2.
    """
    signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
    time.sleep(RANK_GRACE_S)


def report(prog: str, exc: BaseException) -> None:
    """Print ``exc`` as ``prog: <line>`` lines on stderr, from global rank 0 only."""
    if _is_other_rank():
        return
    problems = getattr(exc, "errors", None) or [exc]
    for problem in problems:
        for line in str(problem).splitlines() or [type(problem).__name__]:
            print(f"{prog}: {line}", file=sys.stderr, flush=True)


def reports_user_errors(prog: str) -> Callable[[Callable[[list[str]], int]], Callable[[list[str]], int]]:
    """Decorate a command's ``main(argv)``: a user error becomes its message and exit code 2."""

    def wrap(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        @functools.wraps(main)
        def run(argv: list[str]) -> int:
            try:
                return main(argv)
            except Exception as exc:  # noqa: BLE001 - anything not a user error is re-raised unchanged
                if not is_user_error(exc) or DEBUG_FLAG in argv:
                    raise
                report(prog, exc)
                if _is_other_rank():
                    _leave_after_rank_0()
                return 2

        return run

    return wrap
