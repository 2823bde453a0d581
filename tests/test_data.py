import json
import sys

import numpy as np
import pytest
import torch

from blockrecurrent import data as D
from blockrecurrent.errors import is_expected


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def make_docs(n, seed=0, lo=1, hi=60):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefgh éü€日\n")
    return [D.Document(f"doc{i:03d}.txt", "".join(rng.choice(alphabet, int(rng.integers(lo, hi)))))
            for i in range(n)]


# ------------------------------------------------------------------------------- corpora


def test_directory_and_glob_loading(tmp_path):
    write(tmp_path / "c" / "b.txt", "bee")
    write(tmp_path / "c" / "sub" / "a.txt", "ay é")
    write(tmp_path / "c" / "sub" / "x.md", "markdown")
    write(tmp_path / "c" / ".hidden" / "junk.bin", b"\x00\x01")
    write(tmp_path / "c" / "empty.txt", "")
    docs = D.load_documents(str(tmp_path / "c"))
    assert docs == [("b.txt", "bee"), ("sub/a.txt", "ay é"), ("sub/x.md", "markdown")]
    docs = D.load_documents(str(tmp_path / "c" / "**" / "*.txt"))
    assert [d.name for d in docs] == ["b.txt", "sub/a.txt"]
    assert [d.name for d in D.load_documents(tmp_path / "c" / "sub" / "a.txt")] == ["a.txt"]


def test_loading_errors(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        D.load_documents(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no file matches"):
        D.load_documents(str(tmp_path / "*.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        D.load_documents(str(tmp_path / "empty"))
    write(tmp_path / "bin" / "ok.txt", "fine")
    write(tmp_path / "bin" / "blob.dat", b"abc\x00def")
    with pytest.raises(ValueError, match="blob.dat"):
        D.load_documents(str(tmp_path / "bin"))
    write(tmp_path / "latin" / "l.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="l.txt.*UTF-8"):
        D.load_documents(str(tmp_path / "latin"))
    with pytest.raises(TypeError):
        D.load_documents(42)


def test_jsonl(tmp_path):
    path = write(tmp_path / "corpus.jsonl",
                 '{"text": "one"}\n\n{"text": "two", "id": 5}\n{"body": "three", "text": "3"}\n')
    docs = D.load_documents(str(path))
    assert [d.text for d in docs] == ["one", "two", "3"]
    assert docs[0].name == "corpus.jsonl/000000001"
    write(path, '{"text": "ok"}\n{"text": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        D.load_documents(str(path))
    write(path, '{"text": "ok"}\n{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 3"):
        D.load_documents(str(path))
    write(path, '{"body": "ok"}\n')
    with pytest.raises(ValueError, match="text_field"):
        D.load_documents(str(path))
    assert D.load_documents(str(path), text_field="body")[0].text == "ok"


def test_stdlib_corpus():
    docs = list(D.iter_stdlib())  # names only matter here; no tokenization
    names = [d.name for d in docs]
    assert len(names) > 300 and names == sorted(names)
    assert "os.py" in names and "json/__init__.py" in names
    banned = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not any(banned & set(n.split("/")) for n in names)
    assert all(n.endswith(".py") and not n.startswith("/") for n in names)


def test_split_deterministic_disjoint_nonempty():
    docs = make_docs(200)
    a, b = D.split_documents(docs, 0.1, 0.1), D.split_documents(list(reversed(docs)), 0.1, 0.1)
    names = {k: {d.name for d in v} for k, v in a.items()}
    assert names == {k: {d.name for d in v} for k, v in b.items()}
    assert sum(map(len, names.values())) == 200
    assert set.union(*names.values()) == {d.name for d in docs}
    assert not names["train"] & names["val"] and not names["train"] & names["test"]
    assert not names["val"] & names["test"]
    assert 5 <= len(names["val"]) <= 40 and 5 <= len(names["test"]) <= 40
    # Adding a document never moves the others.
    c = D.split_documents(docs + [D.Document("new.txt", "x")], 0.1, 0.1)
    assert all({d.name for d in a[k]} <= {d.name for d in c[k]} for k in a)
    for n in (3, 4, 7):
        s = D.split_documents(docs[:n], 0.05, 0.05)
        assert all(s[k] for k in s) and sum(map(len, s.values())) == n
    assert D.split_documents(docs[:5], 0.0, 0.0)["train"] == docs[:5]
    with pytest.raises(ValueError, match="val_fraction"):
        D.split_documents(docs, 1.5)
    with pytest.raises(ValueError, match="sum"):
        D.split_documents(docs, 0.6, 0.5)
    with pytest.raises(TypeError):
        D.split_documents(["just text"])


def test_split_of_one_or_two_documents_trains():
    """A one-file corpus whose name hashes to a held-out split still has a training document."""
    held_out = [d for d in make_docs(400) if D._unit_hash(d.name) < 0.1][:2]
    assert len(held_out) == 2
    assert D.split_documents(held_out[:1])["train"] == held_out[:1]
    two = D.split_documents(held_out)
    assert len(two["train"]) == 1 and sum(map(len, two.values())) == 2


# ---------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_roundtrip_and_stream(tmp_path):
    tok = D.ByteTokenizer()
    text = "héllo wörld, 日本語 € 🙂"
    ids = tok.encode(text)
    assert tok.vocab_size == 257 and tok.bos_id == 256 and max(ids) < 256
    assert tok.decode([tok.bos_id] + ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    emoji = "🙂".encode("utf-8")
    stream = tok.stream_decoder()
    assert stream.feed(list(b"ab") + [emoji[0]]) == "ab"
    assert stream.feed(emoji[1:3]) == ""
    assert stream.feed(torch.tensor(emoji[3])) == "🙂"
    assert stream.feed([emoji[0]]) == "" and stream.flush() == "\ufffd"
    tok.save(tmp_path / "t")
    assert isinstance(D.load_tokenizer(tmp_path / "t"), D.ByteTokenizer)
    assert isinstance(D.make_tokenizer("byte"), D.ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size"):
        D.make_tokenizer("byte", vocab_size=1000)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        D.make_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="no tokenizer"):
        D.load_tokenizer(tmp_path)
    (tmp_path / "t" / "tokenizer_config.json").write_text("{not json")  # one line in brt
    with pytest.raises(ValueError, match="not a tokenizer configuration") as err:
        D.load_tokenizer(tmp_path / "t")
    assert is_expected(err.value)


@pytest.fixture(scope="module")
def bpe_docs():
    words = ["def", "return", "self", "import", "class", "lambda", "é", "日本", "€uro", "<|doc|>"]
    rng = np.random.default_rng(1)
    return [D.Document(f"f{i}.py", " ".join(rng.choice(words, 80)) + "\n") for i in range(12)]


def refuse_to_train(*args, **kwargs):
    raise RuntimeError("retrained")


def test_bpe_train_save_load_and_cache(tmp_path, bpe_docs, monkeypatch):
    tok = D.make_tokenizer("bpe", bpe_docs, vocab_size=300, cache_dir=tmp_path / "tc")
    assert isinstance(tok, D.BPETokenizer) and 257 < tok.vocab_size <= 300
    text = "def 日本 lambda: self.€uro  <|doc|>\n\tnew 🙂"
    ids = tok.encode(text)
    assert tok.bos_id not in ids  # literal "<|doc|>" in text is data, not the special token
    assert tok.decode([tok.bos_id] + ids) == text
    assert len(tok.encode("import import import")) < len("import import import")
    # Stream decoding agrees with decoding all at once and never emits a replacement character.
    stream = tok.stream_decoder()
    pieces = [stream.feed([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    # Save / load round trip keeps ids and the fingerprint.
    tok.save(tmp_path / "saved")
    again = D.load_tokenizer(tmp_path / "saved")
    assert isinstance(again, D.BPETokenizer) and again.encode(text) == ids
    assert again.fingerprint == tok.fingerprint
    # A second make_tokenizer call loads from the cache instead of training.
    monkeypatch.setattr(D, "train_bpe", refuse_to_train)
    cached = D.make_tokenizer("bpe", bpe_docs, vocab_size=300, cache_dir=tmp_path / "tc")
    assert cached.fingerprint == tok.fingerprint and cached.encode(text) == ids
    with pytest.raises(RuntimeError, match="retrained"):  # different documents: a new cache key
        D.make_tokenizer("bpe", bpe_docs[:-1], vocab_size=300, cache_dir=tmp_path / "tc")
    with pytest.raises(ValueError, match="vocab_size"):
        D.make_tokenizer("bpe", bpe_docs)
    with pytest.raises(ValueError, match="train_texts"):
        D.make_tokenizer("bpe", None, vocab_size=300)


def test_missing_tokenizers_package_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r"pip install blockrecurrent\[bpe\]"):
        D.make_tokenizer("bpe", ["some text"], vocab_size=300)


def test_hf_directory(tmp_path, bpe_docs):
    tok = D.train_bpe([d.text for d in bpe_docs], 280)
    tok.save(tmp_path / "hf")
    # now a bare Hugging Face tokenizer directory
    (tmp_path / "hf" / "tokenizer_config.json").unlink()
    hf = D.make_tokenizer(str(tmp_path / "hf"))
    assert type(hf) is D.HFTokenizer and hf.bos_id == tok.bos_id
    assert hf.encode("def x") == tok.encode("def x")
    hf.save(tmp_path / "hf2")
    assert type(D.load_tokenizer(tmp_path / "hf2")) is D.HFTokenizer
    tk = pytest.importorskip("tokenizers")
    bare = tk.Tokenizer(tk.models.BPE())
    bare.train_from_iterator(["abc abc"],
                             tk.trainers.BpeTrainer(vocab_size=10, show_progress=False))
    (tmp_path / "nobos").mkdir()
    bare.save(str(tmp_path / "nobos" / "tokenizer.json"))
    with pytest.raises(ValueError, match="document-start"):
        D.load_tokenizer(tmp_path / "nobos")


# ----------------------------------------------------------------------- tokenized corpus


def test_tokenized_corpus_cache(tmp_path, monkeypatch):
    docs = make_docs(10)
    tok = D.ByteTokenizer()
    corpus = D.tokenize_corpus(docs, tok, tmp_path / "cache")
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
    again = D.tokenize_corpus(docs, tok, tmp_path / "cache")
    assert np.array_equal(again.tokens, corpus.tokens)
    # A changed document is noticed and the cache rebuilt.
    monkeypatch.undo()
    changed = docs[:3] + [D.Document(docs[3].name, docs[3].text + "!")] + docs[4:]
    rebuilt = D.tokenize_corpus(changed, tok, tmp_path / "cache")
    assert tok.decode(rebuilt.doc(3)) == docs[3].text + "!"
    assert rebuilt.total_tokens == corpus.total_tokens + 1
    in_memory = D.tokenize_corpus(changed, tok)
    assert np.array_equal(in_memory.tokens, rebuilt.tokens)
    assert not list((tmp_path / "cache").glob(".*tmp"))  # no stray temporary files
    with pytest.raises(ValueError, match="no documents"):
        D.tokenize_corpus([], tok)


# ------------------------------------------------------------------------- document lanes


def corpus_of(lengths, bos=0):
    """A corpus whose document i has ids bos, 1000*i+1, 1000*i+2, ... (len == lengths[i])."""
    docs = [np.array([bos] + [1000 * i + k for k in range(1, n)]) for i, n in enumerate(lengths)]
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    return D.TokenizedCorpus(np.concatenate(docs), offsets, np.array(lengths) - 1,
                             [f"d{i}" for i in range(len(lengths))], bos_id=bos, vocab_size=100_000)


def test_lanes_small_example():
    corpus = corpus_of([9, 3])  # 8 and 2 targets
    lanes = D.DocumentLanes(corpus, 1, 4, shuffle=False)
    batches = [lanes.next_batch() for _ in range(4)]
    assert [b["inputs"][0].tolist() for b in batches] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [0, 1001, 0, 0], [0, 1, 2, 3]]
    assert [b["targets"][0].tolist() for b in batches] == [
        [1, 2, 3, 4], [5, 6, 7, 8], [1001, 1002, 0, 0], [1, 2, 3, 4]]
    assert [b["positions"][0].tolist() for b in batches] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [0, 1, -1, -1], [0, 1, 2, 3]]
    assert [bool(b["reset"][0]) for b in batches] == [True, False, True, True]
    assert [int(b["doc_index"][0]) for b in batches] == [0, 0, 1, 0]
    assert lanes.padding_fraction == 2 / 16


def test_lanes_segments_targets_padding_resets():
    lengths = [1 + int(n) for n in np.random.default_rng(0).integers(1, 40, 24)]
    corpus = corpus_of(lengths)
    lanes = D.DocumentLanes(corpus, 4, 8, seed=3)
    previous = {}  # lane -> (document, where its next segment must start)
    for _ in range(60):
        b = lanes.next_batch()
        assert b["inputs"].dtype == b["targets"].dtype == torch.int64
        assert b["loss_mask"].dtype == torch.bool
        for k in range(4):
            m, i = b["loss_mask"][k], int(b["doc_index"][k])
            n = int(m.sum())
            assert m[:n].all() and not m[n:].any()  # real tokens first, then padding
            ids = torch.from_numpy(corpus.doc(i).astype(np.int64))
            p = int(b["positions"][k, 0])
            assert i % 4 == k  # each lane keeps to its own documents
            assert torch.equal(b["inputs"][k, :n], ids[p:p + n])
            assert torch.equal(b["targets"][k, :n], ids[p + 1:p + 1 + n])
            assert torch.equal(b["positions"][k, :n], torch.arange(p, p + n))
            assert (b["positions"][k, n:] == -1).all() and (b["targets"][k, n:] == 0).all()
            assert (b["inputs"][k, n:] == corpus.bos_id).all()
            assert bool(b["reset"][k]) == (p == 0)
            if k in previous:
                prev_doc, prev_end = previous[k]
                if p:  # continues the document exactly where the last segment stopped
                    assert (i, p) == (prev_doc, prev_end)
                else:  # a new document starts only after the previous one finished
                    assert prev_end == len(corpus.doc(prev_doc)) - 1
            previous[k] = (i, p + n)
            assert n == 8 or p + n == len(ids) - 1  # padding only at a document's end
    assert 0 < lanes.padding_fraction < 1


def test_lanes_cover_every_token_once_without_loop():
    # last: bos only
    lengths = [1 + int(n) for n in np.random.default_rng(1).integers(1, 30, 23)] + [1]
    corpus = corpus_of(lengths)
    lanes = D.DocumentLanes(corpus, 5, 7, shuffle=True, loop=False)
    got = {i: [] for i in range(len(lengths))}
    batches = 0
    for b in lanes:
        batches += 1
        for k in range(5):
            m = b["loss_mask"][k]
            if not m.any():
                assert bool(b["reset"][k]) and int(b["doc_index"][k]) == -1
                continue
            got[int(b["doc_index"][k])] += list(zip(b["positions"][k][m].tolist(),
                                                    b["targets"][k][m].tolist(), strict=True))
    assert lanes.exhausted and batches < 100
    for i in range(len(lengths)):
        assert got[i] == list(enumerate(corpus.doc(i)[1:].tolist()))
    padded = lanes.next_batch()  # after exhaustion: fully padded rows, harmless to run
    assert not padded["loss_mask"].any() and padded["reset"].all()


def test_lanes_rank_sharding_matches_single_process():
    corpus = corpus_of([1 + int(n) for n in np.random.default_rng(2).integers(1, 50, 40)])
    single = D.DocumentLanes(corpus, 6, 5, seed=7)
    ranks = [D.DocumentLanes(corpus, 3, 5, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):
        whole, parts = single.next_batch(), [lanes.next_batch() for lanes in ranks]
        for key in whole:
            assert torch.equal(whole[key], torch.cat([p[key] for p in parts])), key


def test_lanes_state_dict_exact_resume():
    corpus = corpus_of([1 + int(n) for n in np.random.default_rng(3).integers(1, 20, 9)])
    a = D.DocumentLanes(corpus, 3, 4, seed=11)
    for _ in range(37):  # past the first epoch of every lane
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = D.DocumentLanes(corpus, 3, 4, seed=11)
    b.load_state_dict(state)
    for _ in range(30):
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a.padding_fraction == b.padding_fraction
    with pytest.raises(ValueError, match="batch_size"):
        D.DocumentLanes(corpus, 1, 4, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        D.DocumentLanes(corpus, 3, 4, seed=12).load_state_dict(state)


def test_lanes_argument_errors():
    corpus = corpus_of([5, 6, 7])
    with pytest.raises(ValueError, match="lower batch_size or world_size"):
        D.DocumentLanes(corpus, 2, 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        D.DocumentLanes(corpus, 1, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="segment_len"):
        D.DocumentLanes(corpus, 1, 0)
    with pytest.raises(TypeError, match="batch_size"):
        D.DocumentLanes(corpus, 1.5, 4)
