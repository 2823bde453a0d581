"""Running the application: `serve` (what `brt serve` calls) loads a saved model and serves it
with uvicorn until interrupted; `start_in_thread` serves an app on a free port (the OS picks it:
a socket bound to port 0 is handed to uvicorn, so no other process can take the port in between)
for tests and benchmarks.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

__all__ = ["BackgroundServer", "build_app", "serve", "start_in_thread"]


def _need_extras() -> None:
    """fastapi and uvicorn, or a ModuleNotFoundError that says how to install them."""
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            raise ModuleNotFoundError(f"brt serve needs {name}: pip install "
                                      f"'blockrecurrent[serve]'", name=name) from None


def build_app(model_dir, *, session_dir, device: str = "cpu", name: str | None = None,
              max_tokens: int = 1024, max_prompt_tokens: int = 65536,
              max_in_memory: int = 64, max_batch: int = 64, state_tune=None):
    """The application serving the model saved in model_dir (its tokenizer beside it), with a
    state tuning file applied if one is given (its sessions then belong to the tuned model)."""
    _need_extras()
    from ..data.tokenizer import load_tokenizer
    from ..model.state_tune import apply_state_tune
    from ..model.transformer import BlockRecurrentTransformer
    from .app import create_app
    from .completions import Limits

    model_dir = Path(model_dir)
    model = BlockRecurrentTransformer.from_pretrained(model_dir, map_location=device).eval()
    if state_tune is not None:
        apply_state_tune(model, state_tune)
    tokenizer = load_tokenizer(model_dir)
    return create_app(model, tokenizer, name=name or model_dir.resolve().name,
                      session_dir=session_dir, limits=Limits(max_tokens, max_prompt_tokens),
                      max_in_memory=max_in_memory, max_batch=max_batch)


def serve(model_dir, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **kwargs) -> None:
    """Serve the saved model over HTTP until interrupted (kwargs: build_app's); port 0 takes a
    free port, named in the first line printed."""
    import uvicorn

    app = build_app(model_dir, **kwargs)
    sock = _listen(host, port)
    print(f"serving {model_dir} as {app.title!r} on http://{host}:{sock.getsockname()[1]}/v1 "
          f"(sessions in {kwargs.get('session_dir')})", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(
            sockets=[sock])
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (0: a port the OS picks), so that a client may connect
    as soon as the port is named; uvicorn serves it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(2048)  # uvicorn's default backlog; connections queue until it accepts them
    return sock


class BackgroundServer:
    """An app served by uvicorn on a thread; `url` is its /v1 base. stop() ends it."""

    def __init__(self, server, thread: threading.Thread, sock: socket.socket):
        self.server, self.thread, self.sock = server, thread, sock
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def start_in_thread(app, host: str = "127.0.0.1", log_level: str = "warning",
                    timeout: float = 20.0) -> BackgroundServer:
    """Serve `app` on a port the OS picks, on a daemon thread; returns once it accepts."""
    import uvicorn

    sock = _listen(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return BackgroundServer(server, thread, sock)
