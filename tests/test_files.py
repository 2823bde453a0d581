"""files.py: atomic writes. A reader sees the old file or the new one whole, never a part; a
failed write leaves what was there and no temporary file; results get the usual modes."""

import json
import os

import pytest

from blockrecurrent.files import make_temp_dir, write_atomic, write_json


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"new, but only ha")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_an_interrupted_first_write_leaves_nothing(tmp_path):
    path = tmp_path / "sub" / "new.json"

    def interrupted(f):
        f.write(b'{"partial": ')
        raise KeyboardInterrupt  # Ctrl-C mid-write: not an Exception, cleaned up all the same

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, interrupted)
    assert not path.exists() and list(path.parent.iterdir()) == []


def test_write_json_replaces_the_file_whole_with_the_usual_mode(tmp_path):
    path = tmp_path / "a" / "b.json"  # the parent is created
    write_json(path, {"x": [1, 2]})
    write_json(path, {"y": "é"})
    assert json.loads(path.read_text("utf-8")) == {"y": "é"}
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask()  # not mkstemp's private 0600
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def test_make_temp_dir(tmp_path):
    d = make_temp_dir(tmp_path, ".step_")
    assert d.is_dir() and d.parent == tmp_path and d.name.startswith(".step_")
    assert d.stat().st_mode & 0o777 == 0o777 & ~umask()  # not mkdtemp's private 0700
    assert make_temp_dir(tmp_path, ".step_") != d
