"""`brt serve`: the model over HTTP with OpenAI's completions API, sessions that keep a document's
state between requests (on disk, in generate/session.py's files), and concurrent requests decoded
as one batch. Needs the `serve` extra (fastapi, uvicorn).

    from blockrecurrent.serve.server import build_app, serve, start_in_thread

Layering: this package imports generate/, model/ and data/; only the command line imports it.
"""
