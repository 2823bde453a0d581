"""A session on disk: what the model carries for some documents (their memories, states and
next-token logits), saved to one safetensors file and read back to continue them later, in
another process (`brt generate --state-in/--state-out`, `brt serve`).

    res = generate(model, prompt, 64, seed=0, return_state=True)
    save_session("doc.session", model, Session.from_result(res))
    ...
    more = generate(model, None, 64, past=load_session("doc.session", model).to_result())

The file holds the tensors of `XLMemories.state_dict()` (the cache: < 2W tokens per layer),
`states` (r, b, s, e), `logits` (b, v), `finished` (b,) and, when sampling was seeded, the
generator's state (so the continuation draws the same random numbers as one call would), and a
JSON header in the safetensors metadata: the model's fingerprint (its config, the names, shapes
and dtypes of its weights and a sample of their values), the tokens each row has read, the cache
length and block position, and a SHA-256 of the tensors' bytes. Its size depends on the block
width, not on how long the documents are. Loading checks the header against the model and the
digest against the bytes before returning anything, and raises ValueError naming what is wrong.
Files are written atomically (temporary file + rename): a killed process leaves the old file or
the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..files import write_atomic
from ..model.memories import XLMemories
from ..model.state_tune import weights_fingerprint
from .generation import GenerationResult

__all__ = ["SESSION_FORMAT", "Session", "load_session", "model_fingerprint", "read_header",
           "save_session"]

SESSION_FORMAT, VERSION, HEADER_KEY = "blockrecurrent-session", 1, "blockrecurrent_session"
# Cached state keys/values are saved; their source state is `states` itself (not saved twice).
_SOURCE = "state_source."


@dataclass
class Session:
    """The documents of `rows` rows after the tokens they have read. A new session (nothing read
    yet) has xl_memories, states and logits None. `generator_state` continues seeded sampling."""
    xl_memories: XLMemories | None
    states: Tensor | None  # (r, b, s, e)
    logits: Tensor | None  # (b, v) float32: the next token's logits
    finished: Tensor | None = None  # (b,) bool: rows that emitted eos
    generator_state: Tensor | None = None  # torch.Generator.get_state()
    rows: int = 1

    @property
    def tokens_seen(self) -> list[int]:
        return [0] * self.rows if self.xl_memories is None else \
            [int(n) for n in self.xl_memories.lengths]

    @property
    def cache_len(self) -> int:
        return 0 if self.xl_memories is None else self.xl_memories.cache_len

    @classmethod
    def from_result(cls, result: GenerationResult) -> "Session":
        """The session of generate(..., return_state=True)'s result."""
        gen = result.generator
        return cls(result.xl_memories, result.states, result.logits, result.finished,
                   gen.get_state() if gen is not None else None, result.logits.shape[0])

    def to_result(self, device=None) -> GenerationResult:
        """A GenerationResult to continue with generate(model, prompt_or_None, n, past=...):
        no tokens, the saved generator's state in a fresh generator (on `device`)."""
        if self.xl_memories is None:
            raise ValueError("this session has read no tokens yet: start it with a prompt")
        dev = self.logits.device if device is None else torch.device(device)
        gen = None
        if self.generator_state is not None:
            gen = torch.Generator(device=dev)
            gen.set_state(self.generator_state)
        finished = (self.finished if self.finished is not None else
                    torch.zeros(self.rows, dtype=torch.bool, device=dev))
        tokens = torch.zeros(self.rows, 0, dtype=torch.long, device=dev)
        return GenerationResult(tokens, self.xl_memories, self.states, self.logits, finished,
                                gen)


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the config and of every weight's name, shape, dtype and a strided sample of up
    to 256 of its values (cheap at any size; the same on every device)."""
    return weights_fingerprint(model)


def _tensors(session: Session) -> dict[str, Tensor]:
    if session.xl_memories is None:
        return {"new_session": torch.zeros(1, dtype=torch.uint8)}
    out = {f"mems.{k}": v for k, v in session.xl_memories.state_dict().items()
           if not k.startswith(_SOURCE)}
    out["states"], out["logits"] = session.states, session.logits.float()
    if session.finished is not None:
        out["finished"] = session.finished.to(torch.uint8)
    if session.generator_state is not None:
        out["generator_state"] = session.generator_state
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_session(path: str | os.PathLike, model: nn.Module, session: Session,
                 fingerprint: str | None = None, extra: dict | None = None) -> dict:
    """Write `session` to `path` atomically -> its header. fingerprint: model_fingerprint(model),
    when the caller has it already. extra: more JSON-able fields for the header."""
    from safetensors.torch import save

    tensors = _tensors(session)
    W = model.config.block_width
    header = {"format": SESSION_FORMAT, "version": VERSION,
              "fingerprint": fingerprint or model_fingerprint(model),
              "rows": session.rows, "tokens_seen": session.tokens_seen,
              "cache_len": session.cache_len, "block_position": session.cache_len % W,
              "block_width": W, "has_logits": session.logits is not None,
              "digest": _digest(tensors), **(extra or {})}
    data = save(tensors, metadata={HEADER_KEY: json.dumps(header), "format": "pt"})
    write_atomic(Path(path), lambda f: f.write(data))
    return header


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a session file (no tensor is read); ValueError if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"session file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        header = json.loads(meta[HEADER_KEY])
    except Exception as err:  # safetensors' own errors, a missing key, bad JSON
        raise ValueError(f"{path} is not a readable session file (corrupt or of another "
                         f"kind): {type(err).__name__}: {err}") from None
    if not isinstance(header, dict) or header.get("format") != SESSION_FORMAT:
        raise ValueError(f"{path} is not a blockrecurrent session file")
    if header.get("version") != VERSION:
        raise ValueError(f"{path} is a session file of version {header.get('version')}; this "
                         f"release reads version {VERSION}")
    return header


def load_session(path: str | os.PathLike, model: nn.Module, fingerprint: str | None = None,
                 device=None) -> Session:
    """The session saved in `path`, checked to come from `model` and to be whole, on `device`
    (default: the model's). ValueError (before any model work) if it is corrupt or belongs to
    another model."""
    from safetensors.torch import load

    path = Path(path)
    header = read_header(path)
    fingerprint = fingerprint or model_fingerprint(model)
    if header.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} was saved by another model (fingerprint "
                         f"{header.get('fingerprint')}, this model's is {fingerprint}); a "
                         f"session continues only on the model that wrote it")
    try:
        tensors = load(path.read_bytes())
    except Exception as err:
        raise ValueError(f"cannot read the tensors of {path}: {err}") from None
    if _digest(tensors) != header.get("digest"):
        raise ValueError(f"{path} is corrupt: its tensors do not match the digest in its header")
    dev = model.token_emb.weight.device if device is None else torch.device(device)
    return _session_of(path, model, header, {k: v.to(dev) for k, v in tensors.items()})


def _session_of(path: Path, model: nn.Module, header: dict, t: dict[str, Tensor]) -> Session:
    """The Session of a file's checked tensors, checked to fit the model."""
    rows = header.get("rows")
    if "new_session" in t:
        return Session(None, None, None, rows=rows)
    mem = {k.removeprefix("mems."): v for k, v in t.items() if k.startswith("mems.")}
    try:
        mems = XLMemories.from_state_dict(mem)
        states = t["states"]
        if mems.state_keys is not None:
            mems.state_source = tuple(states.unbind(0))
        model._check_inputs(torch.zeros(rows, 1, dtype=torch.long), mems, states, None)
        logits = t["logits"]
        if tuple(logits.shape) != (rows, model.config.num_tokens):
            raise ValueError(f"logits of shape {tuple(logits.shape)}")
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path} does not fit this model: {err}") from None
    finished = t["finished"].bool() if "finished" in t else None
    gen = t.get("generator_state")
    return Session(mems, states, logits, finished, gen.cpu() if gen is not None else None, rows)
