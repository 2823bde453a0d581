"""What counts as an expected failure of a command (one line, exit status 2) rather than a bug
(a traceback): the library's own exceptions for failed runs, and the test `is_expected`.

Stdlib only, so that `brt` can tell them apart without importing torch.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent

# Files and the environment: a path the user named, a permission. (A package not installed is
# checked apart: a missing module of our own is a bug.)
_ENVIRONMENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# Raised by this package's own checks of what it was given.
_VALIDATION = (ValueError, TypeError, ImportError)


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for max_nonfinite optimizer steps in a row."""


class TrainingInterrupted(Exception):
    """A run stopped by a signal before it finished; its checkpoint lets a rerun resume."""


def raised_by_our_check(err: BaseException) -> bool:
    """Whether err was raised by a `raise` statement in this package's source: a check of its
    arguments, settings or files; not an exception of Python or a library inside our code (a
    TypeError from a wrong call, a ValueError deep in numpy), which is a bug to show whole."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False
    line = tb.tb_lineno  # None in rare frames of Python >= 3.10
    return ours and line is not None and any(a <= line <= b
                                             for a, b in _raise_statements(filename))


@functools.lru_cache(maxsize=None)
def _raise_statements(filename: str) -> tuple[tuple[int, int], ...]:
    """The (first, last) lines of every `raise` statement in a source file (none if unreadable);
    a statement's lines, since Python versions differ in which of them a traceback names."""
    try:
        tree = ast.parse(Path(filename).read_text("utf-8"))
    except (OSError, ValueError, SyntaxError):
        return ()
    return tuple((n.lineno, n.end_lineno or n.lineno) for n in ast.walk(tree)
                 if isinstance(n, ast.Raise))


def is_expected(err: BaseException) -> bool:
    """A failure to report in one line: a diverged run, a file or package problem, or a
    ValueError/TypeError/ImportError raised by this package's own checks."""
    if isinstance(err, (NonFiniteLossError, TrainingInterrupted, _ENVIRONMENT)):
        return True
    if isinstance(err, ModuleNotFoundError):  # an optional package the user has not installed
        name = err.name or ""
        return name != _PACKAGE.name and not name.startswith(_PACKAGE.name + ".")
    return isinstance(err, _VALIDATION) and raised_by_our_check(err)
