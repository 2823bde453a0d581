"""serve/: rows decoded as one batch give the tokens each gives alone; `brt serve`'s application
end to end with the official openai client on 127.0.0.1 (a port the OS picks): completions whole
and streamed, sessions that continue a document exactly (also after a restart: saved on disk),
concurrent requests, the 4xx errors, and a `brt serve` process killed and started again."""

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from blockrecurrent.data.tokenizer import ByteTokenizer  # noqa: E402
from blockrecurrent.generate.generation import generate, prefill  # noqa: E402
from blockrecurrent.serve.batching import Row, step_together  # noqa: E402
from blockrecurrent.serve.server import build_app, start_in_thread  # noqa: E402

TOK = ByteTokenizer()
GREEDY = dict(do_sample=False)


def _alone(model, ids, n):
    """The tokens of greedy generation after ids, one document alone (no eos)."""
    return generate(model, [ids], n, do_sample=False)[0].tolist()


def test_step_together_equals_each_alone(saved):
    _, model = saved
    prompts = [list(range(1, 41)), list(range(50, 106)), list(range(7, 20))]  # 40, 56, 13 tokens
    rows = []
    for p in prompts:
        logits, mems, states = prefill(model, [p])
        rows.append(Row(logits, mems, states, remaining=12, sampling=dict(GREEDY)))
    assert rows[0].cache_len == rows[1].cache_len != rows[2].cache_len  # 40 = 56 mod 16
    calls = []
    for _ in range(12):
        for r in rows:
            r.sample()
        calls.append(step_together(model, rows))
    assert calls == [2] * 12  # rows 0 and 1 in one call, row 2 in its own
    for p, r in zip(prompts, rows, strict=True):
        assert r.tokens == _alone(model, p, 12)


@pytest.fixture(scope="module")
def server(saved, tmp_path_factory):
    d, _ = saved
    sessions = tmp_path_factory.mktemp("sessions")
    srv = start_in_thread(build_app(d, session_dir=sessions, name="tiny", max_tokens=64,
                                    max_prompt_tokens=500, max_in_memory=2))
    yield srv, sessions
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url, api_key="unused", max_retries=0)


def _expected(model, parts, n):
    """Greedy tokens after each prompt of `parts` read in turn as one document (bos first),
    n (or n[i]) new tokens per part, stopping a part at bos as the server does."""
    out, res = [], None
    for i, text in enumerate(parts):
        ids = ([TOK.bos_id] if i == 0 else []) + TOK.encode(text)
        res = generate(model, ids or None, n[i] if isinstance(n, list) else n, do_sample=False,
                       return_state=True, eos_token_id=TOK.bos_id, past=res)
        toks = res.tokens[0].tolist()
        out.append(toks[:toks.index(TOK.bos_id)] if TOK.bos_id in toks else toks)
    return out


def test_models_and_a_completion(client, saved):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12,
                                  temperature=0)
    want = _expected(saved[1], ["def f(x):"], 12)[0]
    assert r.choices[0].text == TOK.decode(want)
    assert r.usage.prompt_tokens == 10 and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")


def test_session_continues_the_document(client, server, saved):
    parts = ["import os\n", "x = 1", ""]
    want = _expected(saved[1], parts, 8)
    got = [client.completions.create(model="tiny", prompt=parts[0], max_tokens=8,
                                     temperature=0, extra_body={"session": "doc",
                                                                "new_session": True})
           .choices[0].text]
    for i, text in enumerate(parts[1:], 1):  # streamed, as server-sent events
        chunks = list(client.completions.create(model="tiny", prompt=text, max_tokens=8,
                                                temperature=0, stream=True,
                                                extra_body={"session": "doc"}))
        got.append("".join(c.choices[0].text for c in chunks))
        assert chunks[-1].usage.completion_tokens == len(want[i])
    assert got == [TOK.decode(w) for w in want]
    # Saved on disk after each request: a new server (as after a kill) continues it.
    from blockrecurrent.generate.session import read_header

    seen = read_header(server[1] / "doc.session")["tokens_seen"][0]
    assert seen == 1 + sum(len(TOK.encode(p)) for p in parts) + sum(map(len, want))
    again = start_in_thread(build_app(saved[0], session_dir=server[1], name="tiny"))
    try:
        other = openai.OpenAI(base_url=again.url, api_key="unused", max_retries=0)
        r = other.completions.create(model="tiny", prompt="y", max_tokens=6, temperature=0,
                                     extra_body={"session": "doc"})
    finally:
        again.stop()
    assert r.choices[0].text == TOK.decode(_expected(saved[1], parts + ["y"], [8] * 3 + [6])[-1])


def test_concurrent_sessions(client, saved):
    prompts = [f"line {i}: " + "ab" * i for i in range(4)]
    results = {}

    def ask(i):
        results[i] = client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=10, temperature=0,
            extra_body={"session": f"c{i}", "new_session": True}).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        assert results[i] == TOK.decode(_expected(saved[1], [p], 10)[0])


def _post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_bad_requests(client, server):
    url = server[0].url
    with pytest.raises(openai.NotFoundError, match="no session named 'nope'"):
        client.completions.create(model="tiny", prompt="x", extra_body={"session": "nope"})
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="at most 499"):
        client.completions.create(model="tiny", prompt="x" * 600)
    with pytest.raises(openai.BadRequestError, match="session name"):
        client.completions.create(model="tiny", prompt="x", extra_body={"session": "../etc"})
    client.completions.create(model="tiny", prompt="x", max_tokens=1,
                              extra_body={"session": "dup", "new_session": True})
    with pytest.raises(openai.ConflictError, match="exists already"):
        client.completions.create(model="tiny", prompt="x",
                                  extra_body={"session": "dup", "new_session": True})
    status, body = _post(url + "/completions", b'{"model": "tiny", "prompt": ')
    assert status == 400 and "invalid request" in body["error"]["message"]
    status, body = _post(url + "/completions", b'{"model": "tiny", "max_tokens": "many"}')
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = _post(url + "/sessions", b'{"id": "made"}')
    assert status == 200 and body["tokens_seen"] == [0]
    assert _post(url + "/sessions", b'{"id": "made"}')[0] == 409


def test_brt_serve_command(capsys, tmp_path):
    from helpers import run

    code, out, _ = run(capsys, "serve", "--help")
    assert code == 0 and "--session-dir" in out and "/v1/completions" in out
    code, _, err = run(capsys, "serve", tmp_path / "missing", "--session-dir", tmp_path / "s")
    assert code == 2 and "is not a saved model" in err


def test_store_bound_busy_and_disk(saved, tmp_path):
    from blockrecurrent.generate.session import Session
    from blockrecurrent.serve.store import SessionBusy, SessionNotFound, SessionStore

    _, model = saved
    store = SessionStore(tmp_path, model, max_in_memory=1)
    for name in ("a", "b"):
        store.create(name)
    assert list(store.memory) == ["b"] and store.names() == ["a", "b"]  # "a" on disk only
    s = store.acquire("a")
    with pytest.raises(SessionBusy):
        store.acquire("a")
    logits, mems, states = prefill(model, [[1, 2, 3]])
    store.release("a", Session(mems, states, logits))
    assert store.info("a")["tokens_seen"] == [3] and s.xl_memories is None
    fresh = SessionStore(tmp_path, model)  # as after a restart: read from disk
    back = fresh.acquire("a")
    assert torch.equal(back.logits, logits) and back.tokens_seen == [3]
    fresh.release("a")
    fresh.delete("a")
    with pytest.raises(SessionNotFound):
        fresh.acquire("a")


def test_a_state_tuned_model_is_served(saved, tmp_path):
    """build_app(state_tune=FILE) (`brt serve --state-tune`): completions of the tuned model."""
    from blockrecurrent import BlockRecurrentTransformer
    from blockrecurrent.model.state_tune import apply_state_tune, save_state_tune

    tuned = BlockRecurrentTransformer.from_pretrained(saved[0]).eval()
    with torch.no_grad():
        for layer in tuned.layers:
            if layer.recurrent:
                layer.attn.initial_state.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    save_state_tune(tmp_path / "t.safetensors", tuned)
    check = BlockRecurrentTransformer.from_pretrained(saved[0]).eval()
    apply_state_tune(check, tmp_path / "t.safetensors")
    want = _expected(check, ["def f(x):"], 12)[0]
    assert want != _expected(saved[1], ["def f(x):"], 12)[0]  # the state changes the text
    srv = start_in_thread(build_app(saved[0], session_dir=tmp_path / "s", name="tiny",
                                    state_tune=tmp_path / "t.safetensors"))
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12,
                                      temperature=0)
        assert r.choices[0].text == TOK.decode(want)
        client.close()
    finally:
        srv.stop()


def test_a_killed_brt_serve_loses_no_answered_session(saved, tmp_path):
    """`brt serve` in its own process, SIGKILLed after answering a session's request: a new
    process continues the session where the answer left it."""
    import re
    import signal
    import subprocess
    import sys
    import time

    def start(log):
        with open(tmp_path / log, "w") as err:  # a file, not a pipe nobody drains
            proc = subprocess.Popen(
                [sys.executable, "-m", "blockrecurrent.cli", "serve", str(saved[0]), "--port",
                 "0", "--session-dir", str(tmp_path / "sessions"), "--name", "tiny",
                 "--threads", "1"], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", (tmp_path / log).read_text())
            if found:  # the named port accepts at once (it listens before it is named)
                client = openai.OpenAI(base_url=found.group(1), api_key="unused", max_retries=0)
                assert [m.id for m in client.models.list().data] == ["tiny"]
                return proc, client
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError((tmp_path / log).read_text())

    proc, client = start("first.log")
    try:
        first = client.completions.create(model="tiny", prompt="import os\n", max_tokens=8,
                                          temperature=0,
                                          extra_body={"session": "doc", "new_session": True})
    finally:
        client.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    proc, client = start("second.log")
    try:
        second = client.completions.create(model="tiny", prompt="x = 1", max_tokens=8,
                                           temperature=0, extra_body={"session": "doc"})
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)
    want = _expected(saved[1], ["import os\n", "x = 1"], 8)
    assert [first.choices[0].text, second.choices[0].text] == [TOK.decode(w) for w in want]
