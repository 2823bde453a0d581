"""One `/v1/completions` request: its checks (every mistake an `ApiError` with the usual 4xx status,
raised before any model work), the scheduler job that answers it, and the OpenAI-style
response, whole or as server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict

from ..generate.sampling import check_sampling
from ..generate.session import Session
from .batching import Job, Row
from .store import SessionBusy, SessionExists, SessionNotFound, check_name

__all__ = ["ApiError", "CompletionRequest", "Limits", "Prepared", "prepare"]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {404: "not_found_error", 409: "conflict_error"}.get(self.status,
                                                                   "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": None}}


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request that this server reads, and `session` /
    `new_session` (the openai client sends them with extra_body=)."""
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | list[str] | list[int] = ""
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int | None = 1
    stream: bool | None = False
    stop: str | list[str] | None = None
    echo: bool | None = False
    session: str | None = None
    new_session: bool = False


@dataclass
class Limits:
    max_tokens: int = 1024  # new tokens per request
    max_prompt_tokens: int = 65536  # prompt tokens per request (prefilled in constant memory)


@dataclass
class Prepared:
    """A checked request: its job (not yet submitted) and what the response needs."""
    job: Job
    prompt_tokens: int
    events: asyncio.Queue
    session: str | None


def _check_fields(req: CompletionRequest, name: str, limits: Limits) -> int:
    """Everything but the prompt and the session -> max_tokens."""
    if req.model != name:
        raise ApiError(404, f"model {req.model!r} not found; this server serves {name!r}",
                       "model")
    for field, ok in (("n", req.n in (None, 1)), ("stop", req.stop in (None, [])),
                      ("echo", not req.echo)):
        if not ok:
            raise ApiError(400, f"{field} is not supported by this server", field)
    n = 16 if req.max_tokens is None else req.max_tokens
    if not 0 <= n <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must lie in [0, {limits.max_tokens}], got {n}",
                       "max_tokens")
    try:
        check_sampling(1.0 if req.temperature is None else req.temperature, req.top_k,
                       req.top_p, True)
    except (TypeError, ValueError) as err:
        raise ApiError(400, str(err)) from None
    if req.seed is not None and req.seed < 0:
        raise ApiError(400, f"seed must be >= 0, got {req.seed}", "seed")
    return n


def _prompt_ids(req: CompletionRequest, tokenizer, num_tokens: int) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, "a list of prompts is not supported: send one prompt per "
                                "request (they are batched on the server)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if any(not 0 <= t < num_tokens for t in prompt):
        raise ApiError(400, f"prompt token ids must lie in [0, {num_tokens})", "prompt")
    return list(prompt)


def _open_session(store, req: CompletionRequest) -> Session:
    try:
        check_name(req.session)
        if req.new_session:
            store.create(req.session)
        return store.acquire(req.session)
    except ValueError as err:
        raise ApiError(400, str(err), "session") from None
    except SessionNotFound as err:
        raise ApiError(404, err.args[0], "session") from None
    except (SessionBusy, SessionExists) as err:
        raise ApiError(409, str(err), "session") from None


def prepare(req: CompletionRequest, *, model, tokenizer, store, name: str,
            limits: Limits) -> Prepared:
    """Check a request and build its job; a named session is reserved from here until the job
    ends (saved then) or fails."""
    max_tokens = _check_fields(req, name, limits)
    ids = _prompt_ids(req, tokenizer, model.config.num_tokens)
    if len(ids) + 1 > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server reads at most "
                            f"{limits.max_prompt_tokens - 1} per request (send a long document "
                            f"in pieces to a session)", "prompt")
    session = _open_session(store, req) if req.session is not None else None
    try:
        return _prepared(req, ids, session, max_tokens, model, tokenizer, store)
    except BaseException:
        if req.session is not None:
            store.release(req.session)  # reserved above, never submitted
        raise


def _prepared(req: CompletionRequest, ids: list[int], session: Session | None, max_tokens: int,
              model, tokenizer, store) -> Prepared:
    if session is None or session.xl_memories is None:
        ids = [tokenizer.bos_id] + ids  # a new document
        session = session or Session(None, None, None)
    gen = None
    if req.seed is not None:
        gen = torch.Generator(device=model.token_emb.weight.device).manual_seed(req.seed)
    elif session.generator_state is not None:
        gen = torch.Generator(device=model.token_emb.weight.device)
        gen.set_state(session.generator_state)
    temperature = 1.0 if req.temperature is None else req.temperature
    row = Row(session.logits, session.xl_memories, session.states, max_tokens,
              dict(do_sample=True, temperature=temperature, top_k=req.top_k, top_p=req.top_p),
              gen, eos=tokenizer.bos_id)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    name_ = req.session

    def emit(event: dict) -> None:
        if "error" in event and name_ is not None:
            store.release(name_)  # unchanged: the failed request leaves the session as it was
        loop.call_soon_threadsafe(events.put_nowait, event)

    def finish(r: Row) -> None:
        if name_ is not None:
            state = r.generator.get_state() if r.generator is not None else None
            store.release(name_, Session(r.mems, r.states, r.logits, None, state))

    job = Job(row, ids, emit, finish, keep_state=name_ is not None)
    return Prepared(job, len(ids), events, name_)


def _chunk(cid: str, created: int, model: str, text: str, finish: str | None) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}


def _usage(prompt: int, new: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


async def collect(p: Prepared, tokenizer, model_name: str) -> dict:
    """The whole response of a job (after it has ended, its session saved)."""
    tokens, finish = [], None
    while True:
        ev = await p.events.get()
        if "token" in ev:
            tokens.append(ev["token"])
        elif "done" in ev:
            finish = ev["done"]
            break
        else:
            raise RuntimeError(ev["error"])
    out = _chunk("cmpl-" + uuid.uuid4().hex, int(time.time()), model_name,
                 tokenizer.decode(tokens), finish)
    out["usage"] = _usage(p.prompt_tokens, len(tokens))
    if p.session is not None:
        out["session"] = p.session
    return out


async def sse(p: Prepared, tokenizer, model_name: str):
    """Server-sent events as OpenAI streams them: a `data: {chunk}` per piece of text, the last
    with its finish_reason (and the usage), then `data: [DONE]`."""
    cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
    decoder = tokenizer.stream_decoder()
    while True:
        ev = await p.events.get()
        if "token" in ev:
            piece = decoder.feed([ev["token"]])
            if piece:
                yield f"data: {json.dumps(_chunk(cid, created, model_name, piece, None))}\n\n"
        elif "done" in ev:
            last = _chunk(cid, created, model_name, decoder.flush(), ev["done"])
            last["usage"] = _usage(p.prompt_tokens, ev["tokens"])
            yield f"data: {json.dumps(last)}\n\n"
            break
        else:
            err = {"error": {"message": ev["error"], "type": "server_error"}}
            yield f"data: {json.dumps(err)}\n\n"
            break
    yield "data: [DONE]\n\n"
