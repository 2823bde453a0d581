"""data/corpus.py: loading documents (directories, globs, JSONL, the stdlib), the train/val/test
split, and the tokenized corpus with its cache."""
import json

import numpy as np
import pytest

from blockrecurrent.data.corpus import (
    Document,
    iter_stdlib,
    load_documents,
    split_documents,
    tokenize_corpus,
)
from blockrecurrent.data.tokenizer import ByteTokenizer


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def make_docs(n, seed=0, lo=1, hi=60):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefgh éü€日\n")
    return [Document(f"doc{i:03d}.txt", "".join(rng.choice(alphabet, int(rng.integers(lo, hi)))))
            for i in range(n)]


# ------------------------------------------------------------------------------- corpora


def test_directory_and_glob_loading(tmp_path):
    write(tmp_path / "c" / "b.txt", "bee")
    write(tmp_path / "c" / "sub" / "a.txt", "ay é")
    write(tmp_path / "c" / "sub" / "x.md", "markdown")
    write(tmp_path / "c" / ".hidden" / "junk.bin", b"\x00\x01")
    write(tmp_path / "c" / "empty.txt", "")
    docs = load_documents(str(tmp_path / "c"))
    assert docs == [("b.txt", "bee"), ("sub/a.txt", "ay é"), ("sub/x.md", "markdown")]
    docs = load_documents(str(tmp_path / "c" / "**" / "*.txt"))
    assert [d.name for d in docs] == ["b.txt", "sub/a.txt"]
    assert [d.name for d in load_documents(tmp_path / "c" / "sub" / "a.txt")] == ["a.txt"]


def test_loading_errors(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        load_documents(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no file matches"):
        load_documents(str(tmp_path / "*.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_documents(str(tmp_path / "empty"))
    write(tmp_path / "bin" / "ok.txt", "fine")
    write(tmp_path / "bin" / "blob.dat", b"abc\x00def")
    with pytest.raises(ValueError, match="blob.dat"):
        load_documents(str(tmp_path / "bin"))
    write(tmp_path / "latin" / "l.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="l.txt.*UTF-8"):
        load_documents(str(tmp_path / "latin"))
    with pytest.raises(TypeError):
        load_documents(42)


def test_jsonl(tmp_path):
    path = write(tmp_path / "corpus.jsonl",
                 '{"text": "one"}\n\n{"text": "two", "id": 5}\n{"body": "three", "text": "3"}\n')
    docs = load_documents(str(path))
    assert [d.text for d in docs] == ["one", "two", "3"]
    assert docs[0].name == "corpus.jsonl/000000001"
    write(path, '{"text": "ok"}\n{"text": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_documents(str(path))
    write(path, '{"text": "ok"}\n{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 3"):
        load_documents(str(path))
    write(path, '{"body": "ok"}\n')
    with pytest.raises(ValueError, match="text_field"):
        load_documents(str(path))
    assert load_documents(str(path), text_field="body")[0].text == "ok"


def test_stdlib_corpus():
    docs = list(iter_stdlib())  # names only matter here; no tokenization
    names = [d.name for d in docs]
    assert len(names) > 300 and names == sorted(names)
    assert "os.py" in names and "json/__init__.py" in names
    banned = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not any(banned & set(n.split("/")) for n in names)
    assert all(n.endswith(".py") and not n.startswith("/") for n in names)


def test_split_deterministic_disjoint_nonempty():
    docs = make_docs(200)
    a, b = split_documents(docs, 0.1, 0.1), split_documents(list(reversed(docs)), 0.1, 0.1)
    names = {k: {d.name for d in v} for k, v in a.items()}
    assert names == {k: {d.name for d in v} for k, v in b.items()}
    assert sum(map(len, names.values())) == 200
    assert set.union(*names.values()) == {d.name for d in docs}
    assert not names["train"] & names["val"] and not names["train"] & names["test"]
    assert not names["val"] & names["test"]
    assert 5 <= len(names["val"]) <= 40 and 5 <= len(names["test"]) <= 40
    # Adding a document never moves the others.
    c = split_documents(docs + [Document("new.txt", "x")], 0.1, 0.1)
    assert all({d.name for d in a[k]} <= {d.name for d in c[k]} for k in a)
    for n in (3, 4, 7):
        s = split_documents(docs[:n], 0.05, 0.05)
        assert all(s[k] for k in s) and sum(map(len, s.values())) == n
    assert split_documents(docs[:5], 0.0, 0.0)["train"] == docs[:5]
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.5)
    with pytest.raises(ValueError, match="sum"):
        split_documents(docs, 0.6, 0.5)
    with pytest.raises(TypeError):
        split_documents(["just text"])


# ----------------------------------------------------------------------- tokenized corpus


def test_tokenized_corpus_cache(tmp_path, monkeypatch):
    docs = make_docs(10)
    tok = ByteTokenizer()
    corpus = tokenize_corpus(docs, tok, tmp_path / "cache")
    assert len(corpus) == 10 and corpus.names == [d.name for d in docs]
    assert corpus.tokens.dtype == np.uint16 and isinstance(corpus.tokens, np.memmap)
    for i, d in enumerate(docs):
        assert corpus.doc(i)[0] == tok.bos_id and tok.decode(corpus.doc(i)) == d.text
        assert corpus.num_bytes(i) == len(d.text.encode("utf-8"))
    assert corpus.total_tokens == sum(len(d.text.encode()) + 1 for d in docs)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_docs"] == 10 and manifest["tokenizer_kind"] == "byte"
    assert manifest["dtype"] == "uint16"
    # Reused without tokenizing again.
    monkeypatch.setattr(tok, "encode", lambda t: pytest.fail("re-tokenised"))
    monkeypatch.setattr(tok, "encode_batch", lambda t: pytest.fail("re-tokenised"))
    again = tokenize_corpus(docs, tok, tmp_path / "cache")
    assert np.array_equal(again.tokens, corpus.tokens)
    # A changed document is noticed and the cache rebuilt.
    monkeypatch.undo()
    changed = docs[:3] + [Document(docs[3].name, docs[3].text + "!")] + docs[4:]
    rebuilt = tokenize_corpus(changed, tok, tmp_path / "cache")
    assert tok.decode(rebuilt.doc(3)) == docs[3].text + "!"
    assert rebuilt.total_tokens == corpus.total_tokens + 1
    in_memory = tokenize_corpus(changed, tok)
    assert np.array_equal(in_memory.tokens, rebuilt.tokens)
    assert not list((tmp_path / "cache").glob(".*tmp"))  # no stray temporary files
    with pytest.raises(ValueError, match="no documents"):
        tokenize_corpus([], tok)


def test_split_of_one_or_two_documents_trains():
    """A one-file corpus whose name hashes to a held-out split still has a training document."""
    from blockrecurrent.data.corpus import _unit_hash

    held_out = [d for d in make_docs(400) if _unit_hash(d.name) < 0.1][:2]
    assert len(held_out) == 2
    assert split_documents(held_out[:1])["train"] == held_out[:1]
    two = split_documents(held_out)
    assert len(two["train"]) == 1 and sum(map(len, two.values())) == 2
