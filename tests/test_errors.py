"""errors.py: which failures are expected (one line, exit 2) and which are bugs (a traceback)."""

import subprocess
import sys

import pytest

from blockrecurrent.errors import (
    NonFiniteLossError,
    TrainingInterrupted,
    is_expected,
    raised_by_our_check,
)
from blockrecurrent.files import write_json
from blockrecurrent.train.settings import load_train_config


def test_missing_modules_of_ours_are_bugs():
    """A missing optional package is one line; a missing module of this package is a bug."""
    assert is_expected(ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval"))
    assert not is_expected(ModuleNotFoundError("No module named 'blockrecurrent.gone'",
                                               name="blockrecurrent.gone"))
    assert is_expected(ModuleNotFoundError("No module named 'blockrecurrent_extras'",
                                           name="blockrecurrent_extras"))


def test_failed_runs_and_the_environment_are_expected(tmp_path):
    assert is_expected(NonFiniteLossError("diverged"))
    assert is_expected(TrainingInterrupted("stopped"))
    with pytest.raises(FileNotFoundError) as err:
        (tmp_path / "missing.txt").read_text()
    assert is_expected(err.value)


def test_only_our_own_checks_are_expected(tmp_path):
    """A ValueError raised by a check of this package is expected; one never raised (no
    traceback) is not, nor a TypeError that a library raised inside our code."""
    with pytest.raises(ValueError, match="key=value") as ours:
        load_train_config(overrides=["max_steps"])
    assert raised_by_our_check(ours.value) and is_expected(ours.value)
    assert not is_expected(ValueError("made, never raised"))
    with pytest.raises(TypeError, match="not JSON serializable") as theirs:
        write_json(tmp_path / "x.json", {"a": object()})  # json raises, inside files.py
    assert not raised_by_our_check(theirs.value) and not is_expected(theirs.value)


def test_errors_import_without_torch():
    """`brt` decides what is expected before (and without) importing torch."""
    code = ("import sys; import blockrecurrent.errors; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
