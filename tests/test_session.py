"""generate/session.py: a session file continues a document exactly (logits, greedy and seeded
samples), refuses another model's or a corrupt file before any work, is written atomically and
its size does not grow with the document; `brt generate --state-in/--state-out`."""

import io
import json
import os

import pytest
import torch
from helpers import run

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.generate.generation import generate, prefill
from blockrecurrent.generate.session import (
    HEADER_KEY,
    Session,
    load_session,
    model_fingerprint,
    read_header,
    save_session,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BlockRecurrentTransformer(preset("tiny")).eval()


def ids(b, n, seed=1):
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(seed))


def test_pieces_across_loads_equal_one_call(model, tmp_path):
    p = ids(2, 37)
    full = generate(model, p, 30, seed=3, return_state=True)
    first = generate(model, p, 13, seed=3, return_state=True)
    save_session(tmp_path / "s", model, Session.from_result(first))
    back = load_session(tmp_path / "s", model)  # a fresh read, as another process would
    rest = generate(model, None, 17, past=back.to_result(), return_state=True)
    assert torch.equal(torch.cat([first.tokens, rest.tokens], 1), full.tokens)
    assert torch.equal(rest.logits, full.logits)
    # Prompt pieces: read 50 tokens, save, load, read 150 more == read 200 at once.
    doc = ids(1, 200, seed=2)
    logits, mems, states = prefill(model, doc[:, :50])
    save_session(tmp_path / "p", model, Session(mems, states, logits))
    s = load_session(tmp_path / "p", model)
    got = prefill(model, doc[:, 50:], s.xl_memories, s.states)[0]
    torch.testing.assert_close(got, prefill(model, doc)[0], atol=1e-5, rtol=1e-5)


def test_header_and_constant_size(model, tmp_path):
    sizes = {}
    for n in (40, 1000, 4008):  # 4008 = 40 mod W=16... every n >= 2W with one residue
        logits, mems, states = prefill(model, ids(1, n))
        head = save_session(tmp_path / f"{n}", model, Session(mems, states, logits))
        sizes[n] = os.path.getsize(tmp_path / f"{n}")
        assert head["tokens_seen"] == [n] and head["block_position"] == n % 16
        assert head["cache_len"] == mems.cache_len < 32
    assert sizes[40] == sizes[4008]  # same position in the block: same bytes, any length
    assert read_header(tmp_path / "40")["fingerprint"] == model_fingerprint(model)


def test_new_session_and_to_result(model, tmp_path):
    save_session(tmp_path / "new", model, Session(None, None, None))
    s = load_session(tmp_path / "new", model)
    assert s.xl_memories is None and s.tokens_seen == [0]
    with pytest.raises(ValueError, match="no tokens yet"):
        s.to_result()


def _rewrite(src, dst, change):
    """A copy of a session file with its header changed by change(header)."""
    from safetensors.torch import load, save

    tensors = load(src.read_bytes())
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    header = json.loads(meta[HEADER_KEY])
    change(header, tensors)
    dst.write_bytes(save(tensors, metadata={**meta, HEADER_KEY: json.dumps(header)}))


def test_refuses_other_models_and_corrupt_files(model, tmp_path):
    logits, mems, states = prefill(model, ids(1, 40))
    path = tmp_path / "s"
    save_session(path, model, Session(mems, states, logits))
    torch.manual_seed(1)
    other = BlockRecurrentTransformer(preset("tiny")).eval()  # same shapes, other weights
    with pytest.raises(ValueError, match="another model"):
        load_session(path, other)
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="not a readable session file"):
        load_session(tmp_path / "cut", model)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a byte of the last tensor
    (tmp_path / "flip").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt"):
        load_session(tmp_path / "flip", model)
    _rewrite(path, tmp_path / "v", lambda h, t: h.update(version=99))
    with pytest.raises(ValueError, match="version 99"):
        load_session(tmp_path / "v", model)
    with pytest.raises(ValueError, match="does not exist"):
        load_session(tmp_path / "missing", model)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="not a blockrecurrent session|not a readable"):
        load_session(tmp_path / "m" / "model.safetensors", model)


def test_atomic_write_keeps_the_old_file(model, tmp_path, monkeypatch):
    logits, mems, states = prefill(model, ids(1, 40))
    path = tmp_path / "s"
    save_session(path, model, Session(mems, states, logits))
    before = path.read_bytes()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)  # dies between writing and renaming
    with pytest.raises(KeyboardInterrupt):
        save_session(path, model, Session(mems, states, logits * 2))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_brt_generate_state_in_out(capsys, model_dir, tmp_path):
    from blockrecurrent.generate.text import generate_text

    def gen(n, **kw):
        return generate_text(model_dir, max_new_tokens=n, out=io.StringIO(), err=io.StringIO(),
                             **kw)["new_token_ids"]

    whole = gen(24, prompt="def f(x):", seed=5)
    s1, s2 = tmp_path / "a.session", tmp_path / "b.session"
    part1 = gen(10, prompt="def f(x):", seed=5, state_out=s1)  # each call loads the model
    part2 = gen(14, state_in=s1, state_out=s2)  # the saved random stream continues
    assert part1 + part2 == whole and len(part1) == 10 < len(whole)
    n1 = read_header(s1)["tokens_seen"][0]
    assert n1 == 1 + len("def f(x):") + 10
    # The command line: a prompt continues the saved document (no new bos); another file of
    # the wrong kind is refused with a one-line error.
    n2 = read_header(s2)["tokens_seen"][0]
    assert n2 == n1 + len(part2)
    code, _, _ = run(capsys, "generate", model_dir, "--prompt", " y", "--max-new-tokens", "2",
                     "--state-in", s2, "--state-out", s2)
    assert code == 0 and n2 + 2 <= read_header(s2)["tokens_seen"][0] <= n2 + 4
    (tmp_path / "bad").write_bytes(b"not a session")
    code, _, err = run(capsys, "generate", model_dir, "--state-in", tmp_path / "bad")
    assert code == 2 and "not a readable session file" in err


def test_separate_processes_continue_as_one_call(model, model_dir, tmp_path):
    """Three `brt generate` processes, each continuing the last one's file, end where one
    process generating it all ends: the same tokens read, the same next-token logits."""
    import subprocess
    import sys

    def brt(*args) -> None:
        done = subprocess.run([sys.executable, "-m", "blockrecurrent.cli", "generate",
                               str(model_dir), "--threads", "1", *map(str, args)],
                              capture_output=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr.decode()

    brt("--prompt", "def f(x):", "--max-new-tokens", "30", "--seed", "7", "--state-out", "w")
    brt("--prompt", "def f(x):", "--max-new-tokens", "12", "--seed", "7", "--state-out", "a")
    brt("--max-new-tokens", "10", "--state-in", "a", "--state-out", "b")
    brt("--max-new-tokens", "8", "--state-in", "b", "--state-out", "c")
    whole, pieces = (load_session(tmp_path / n, model) for n in ("w", "c"))
    assert read_header(tmp_path / "c")["tokens_seen"] == read_header(tmp_path / "w")[
        "tokens_seen"] == [1 + len("def f(x):") + 30]
    assert torch.equal(pieces.logits, whole.logits)
