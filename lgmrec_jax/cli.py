"""What every command-line entry point shares: one-line errors, flag parsing, quiet library logs."""

from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Optional

from absl import flags, logging


def fail(message: str, code: int = 2):
    """Prints ``error: message`` on stderr and exits (2: bad input), never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing (``app.run(..., flags_parser=parse_flags)``) with one-line errors."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        fail(f"bad flag: {err}")


def out_dir_problem(out: str) -> Optional[str]:
    """Why directory ``out`` cannot receive results, checked before the work that makes them; None if
    it can (the nearest existing ancestor must be a writable directory)."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{path} is a file, expected a directory (or a path to create)"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def require_out_dir(out: str) -> None:
    """``error: --out=...`` and exit 2 unless ``out`` can receive results (:func:`out_dir_problem`)."""
    problem = out_dir_problem(out)
    if problem:
        fail(f"--out={out}: {problem}")


class QuietLibraries(py_logging.Filter):
    """Keeps our INFO lines; drops orbax's per-save and JAX's backend-probe INFO chatter. orbax's
    errors keep their one-line message but not their traceback (a failed save is reported by the run,
    e.g. ``error: .../checkpoints: saving checkpoint 3 failed (No space left on device)``)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        noisy = "orbax" in record.pathname or "xla_bridge" in record.pathname
        if noisy and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return record.levelno >= py_logging.WARNING or not noisy


def setup_logging(level=logging.INFO) -> None:
    logging.set_verbosity(level)
    logging.get_absl_handler().addFilter(QuietLibraries())
