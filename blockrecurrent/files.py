"""Atomic file writes, shared by the data cache, checkpoints and reports: a reader (or a resumed
run) sees a file or directory whole or not at all, and a failed write leaves what was there."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# mkstemp/mkdtemp create private (0600/0700) entries; give the results the usual permissions.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory in `parent` to fill and then rename into place."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def usual_mode(path) -> None:
    """Give a file written by a library that makes it private (safetensors' save_file: 0600)
    the mode of any saved file, so that others on a shared machine can read it too."""
    os.chmod(path, 0o666 & ~_UMASK)


def write_atomic(path: Path, write) -> None:
    """Call write(binary file) on a temporary file in the same directory, then os.replace it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8")))
