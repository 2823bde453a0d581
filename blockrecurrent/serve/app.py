"""The HTTP application (FastAPI): OpenAI's `/v1/models` and `/v1/completions` (whole or streamed
as server-sent events), and `/v1/sessions` to create, inspect and delete sessions.

    POST /v1/completions {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k",
                          "seed", "stream", "session", "new_session"}
    POST /v1/sessions {"id": optional}      GET/DELETE /v1/sessions/{id}      GET /v1/models

A request naming a `session` continues that session's document (its prompt follows what the
session has read; `new_session: true` creates it first), and the session's state after the
request is written to disk before the response ends. Mistakes get 400 (malformed JSON, a bad
field, too many tokens), 404 (unknown model or session) or 409 (a session busy or taken), with
OpenAI's error body {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .batching import Scheduler
from .completions import ApiError, CompletionRequest, Limits, collect, prepare, sse
from .store import SessionBusy, SessionExists, SessionNotFound, SessionStore, check_name

__all__ = ["create_app"]


def create_app(model, tokenizer, *, name: str, session_dir, limits: Limits | None = None,
               max_in_memory: int = 64, max_batch: int = 64) -> FastAPI:
    """The application serving `model` (in eval mode, on its device) under the model id
    `name`, its sessions in `session_dir`. app.state.scheduler / app.state.store are its
    decoding thread and its sessions."""
    model.eval()
    limits = limits or Limits()
    store = SessionStore(session_dir, model, max_in_memory)
    scheduler = Scheduler(model, max_batch)

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="brt serve", description=__doc__, lifespan=lifespan)
    app.state.store, app.state.scheduler = store, scheduler
    created = int(time.time())
    _errors(app)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "blockrecurrent"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        p = prepare(req, model=model, tokenizer=tokenizer, store=store, name=name,
                    limits=limits)
        scheduler.submit(p.job)
        if req.stream:
            return StreamingResponse(sse(p, tokenizer, name), media_type="text/event-stream")
        return await collect(p, tokenizer, name)

    _session_routes(app, store)
    return app


def _session_routes(app: FastAPI, store: SessionStore) -> None:
    @app.post("/v1/sessions")
    async def create_session(request: Request) -> dict:
        body = await _json_or_empty(request)
        sid = body.get("id") or uuid.uuid4().hex
        try:
            check_name(sid)
            store.create(sid)
        except ValueError as err:
            raise ApiError(400, str(err), "id") from None
        except SessionExists as err:
            raise ApiError(409, str(err), "id") from None
        return store.info(sid)

    @app.get("/v1/sessions/{sid}")
    def get_session(sid: str) -> dict:
        return _session_call(store.info, sid)

    @app.delete("/v1/sessions/{sid}")
    def delete_session(sid: str) -> dict:
        _session_call(store.delete, sid)
        return {"id": sid, "object": "session", "deleted": True}


def _session_call(fn, sid: str):
    try:
        check_name(sid)
        return fn(sid)
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    except SessionNotFound as err:
        raise ApiError(404, err.args[0]) from None
    except SessionBusy as err:
        raise ApiError(409, str(err)) from None


async def _json_or_empty(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    import json

    try:
        body = json.loads(raw)
    except ValueError as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        # Malformed JSON or a field of the wrong type: 400, as OpenAI answers, not FastAPI's 422.
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: "
                 f"{e.get('msg')}" for e in err.errors()]
        return JSONResponse(ApiError(400, "invalid request: " + "; ".join(parts)).body(),
                            status_code=400)
