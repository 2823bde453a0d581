"""The server's sessions: each a document's state (generate/session.py's Session), kept in memory
for the most recently used `max_in_memory` sessions and on disk for all of them: every change is
written (atomically) before the request that made it answers, so a killed server loses nothing
that it has answered. One request at a time per session (`acquire` ... `release`).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path

from torch import nn

from ..generate.session import Session, load_session, model_fingerprint, read_header, save_session

__all__ = ["SessionBusy", "SessionExists", "SessionNotFound", "SessionStore"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SUFFIX = ".session"


class SessionNotFound(KeyError):
    pass


class SessionBusy(RuntimeError):
    pass


class SessionExists(RuntimeError):
    pass


def check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a session name is 1 to 128 letters, digits, '_', '.' or '-' starting "
                         f"with a letter or digit, got {name!r}")
    return name


class SessionStore:
    def __init__(self, directory, model: nn.Module, max_in_memory: int = 64):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model, self.max_in_memory = model, max_in_memory
        self.fingerprint = model_fingerprint(model)
        self.memory: OrderedDict[str, Session] = OrderedDict()
        self.busy: set[str] = set()
        self.lock = threading.RLock()

    def path(self, name: str) -> Path:
        return self.dir / (check_name(name) + SUFFIX)

    def exists(self, name: str) -> bool:
        return name in self.memory or self.path(name).is_file()

    def names(self) -> list[str]:
        return sorted(p.name[:-len(SUFFIX)] for p in self.dir.glob("*" + SUFFIX))

    def create(self, name: str) -> dict:
        """A new session (a document not started yet) -> its header; SessionExists if taken."""
        with self.lock:
            if self.exists(name) or name in self.busy:
                raise SessionExists(f"session {name!r} exists already")
            return self._write(name, Session(None, None, None))

    def acquire(self, name: str) -> Session:
        """The session, reserved for one request until release(name)."""
        with self.lock:
            if not self.exists(name):
                raise SessionNotFound(f"no session named {name!r}; create it first (POST "
                                      f"/v1/sessions, or new_session: true in the request)")
            if name in self.busy:
                raise SessionBusy(f"session {name!r} is answering another request; send its "
                                  f"requests one after another")
            self.busy.add(name)
        try:
            session = self.memory.get(name)
            if session is None:
                session = load_session(self.path(name), self.model, self.fingerprint)
            return session
        except BaseException:
            self.release(name)
            raise

    def release(self, name: str, session: Session | None = None) -> None:
        """End a request; with `session`, its new state, written to disk first."""
        try:
            if session is not None:
                self._write(name, session)
        finally:
            with self.lock:
                self.busy.discard(name)

    def info(self, name: str) -> dict:
        if not self.exists(name):
            raise SessionNotFound(f"no session named {name!r}")
        header = read_header(self.path(name))
        return {k: header[k] for k in ("tokens_seen", "cache_len", "block_position")} | {
            "id": name, "object": "session", "bytes": self.path(name).stat().st_size}

    def delete(self, name: str) -> None:
        with self.lock:
            if not self.exists(name):
                raise SessionNotFound(f"no session named {name!r}")
            if name in self.busy:
                raise SessionBusy(f"session {name!r} is answering a request")
            self.memory.pop(name, None)
            self.path(name).unlink(missing_ok=True)

    def _write(self, name: str, session: Session) -> dict:
        if session.xl_memories is not None:  # its own copy: not a view of a batch's tensors
            session.xl_memories = session.xl_memories.to(copy=True)
            session.states = session.states.clone()
        header = save_session(self.path(name), self.model, session, self.fingerprint)
        with self.lock:
            self.memory[name] = session
            self.memory.move_to_end(name)
            while len(self.memory) > self.max_in_memory:
                self.memory.popitem(last=False)  # on disk already
        return header
