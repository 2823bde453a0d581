"""data/ingest.py and data/store.py: streaming a source into token stores, one per split, with the
ids of tokenize_corpus; found again from the files' names, sizes and times (or contents); an
interrupted build is never taken for a finished one."""
import json
import os

import numpy as np
import pytest

import blockrecurrent.data.ingest as ingest_module
from blockrecurrent.data.corpus import Document, make_tokenizer, tokenize_corpus
from blockrecurrent.data.ingest import ingest, source_fingerprint
from blockrecurrent.data.splits import load_splits
from blockrecurrent.data.store import StoreWriter, TokenizedCorpus
from blockrecurrent.data.tokenizer import ByteTokenizer


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def text_corpus(root, n=40, seed=0):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefgh éü€日\n") + ["😀"]
    for i in range(n):
        text = "".join(rng.choice(alphabet, int(rng.integers(1, 300))))
        write(root / f"sub{i % 3}" / f"doc{i:03d}.txt", "" if i == 5 else text)
    return root


def assert_same(stores, source, tokenizer, **kw):
    """Each split's store holds the ids, offsets, bytes and names of tokenize_corpus."""
    for split, docs in load_splits(source, **kw).items():
        if not docs:
            assert stores[split] is None
            continue
        ref, got = tokenize_corpus(docs, tokenizer), stores[split]
        assert isinstance(got.tokens, np.memmap) and got.tokens.dtype == ref.tokens.dtype
        assert np.array_equal(got.tokens, ref.tokens) and got.names == ref.names
        assert np.array_equal(got.offsets, ref.offsets)
        assert [got.num_bytes(i) for i in range(len(got))] == \
            [ref.num_bytes(i) for i in range(len(ref))]
        assert got.byte_counter is not None


def test_streamed_stores_hold_tokenize_corpus_ids(tmp_path):
    src = text_corpus(tmp_path / "c")
    tok = ByteTokenizer()
    stores = ingest(src, tok, tmp_path / "cache", val_fraction=0.2, test_fraction=0.2,
                    shard_tokens=7, batch_bytes=50)  # many shards and batches
    assert_same(stores, src, tok, val_fraction=0.2, test_fraction=0.2)
    assert sum(len(s) for s in stores.values()) == 39  # the empty document is left out
    assert np.array_equal(tok.encode_array("é😀x"), tok.encode("é😀x"))


def test_own_split_jsonl_and_bpe(tmp_path):
    pytest.importorskip("tokenizers")
    for split in ("train", "validation", "test"):
        write(tmp_path / "j" / f"{split}.jsonl",
              "".join(json.dumps({"text": f"{split} doc {i} é日"}) + "\n" for i in range(5)))
    docs = [Document(f"{i}", f"some text {i} to learn é日 from") for i in range(20)]
    tok = make_tokenizer("bpe", docs, vocab_size=300)
    stores = ingest(tmp_path / "j", tok, tmp_path / "cache", batch_bytes=30)
    assert_same(stores, tmp_path / "j", tok)
    assert stores["val"].names[0] == "validation.jsonl/000000001"


def test_tiny_and_unordered_sources_fall_back_to_the_sorted_list(tmp_path, monkeypatch):
    write(tmp_path / "t" / "a.txt", "one")  # 3 documents: split_documents moves one into
    write(tmp_path / "t" / "b.txt", "two")  # each empty split
    write(tmp_path / "t" / "c.txt", "three")
    stores = ingest(tmp_path / "t", ByteTokenizer(), tmp_path / "cache")
    assert all(stores[s] is not None for s in stores)
    assert_same(stores, tmp_path / "t", ByteTokenizer())
    src = text_corpus(tmp_path / "u", n=12)
    real = ingest_module.iter_documents
    monkeypatch.setattr(ingest_module, "iter_documents",
                        lambda *a: reversed(list(real(*a))))
    assert_same(ingest(src, ByteTokenizer(), tmp_path / "cache"), src, ByteTokenizer())


def test_a_built_store_is_found_again_without_reading_the_corpus(tmp_path, monkeypatch):
    src = text_corpus(tmp_path / "c")
    tok = ByteTokenizer()
    first = ingest(src, tok, tmp_path / "cache")
    monkeypatch.setattr(ingest_module, "iter_documents",
                        lambda *a: pytest.fail("read the corpus again"))
    monkeypatch.setattr(ingest_module, "load_splits", lambda *a: pytest.fail("read it again"))
    again = ingest(src, tok, tmp_path / "cache")
    assert np.array_equal(again["train"].tokens, first["train"].tokens)
    monkeypatch.undo()
    # A changed file (here: its time only) is noticed and the stores rebuilt.
    path = src / "sub0" / "doc000.txt"
    write(path, "changed text")
    os.utime(path, ns=(1, 1))
    rebuilt = ingest(src, tok, tmp_path / "cache")
    assert_same(rebuilt, src, tok)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # replaced, nothing left beside it
    # verify="content": the same bytes with another time are the same corpus.
    ingest(src, tok, tmp_path / "cache", verify="content")
    before = source_fingerprint(src, "content")
    os.utime(path, ns=(2, 2))
    assert source_fingerprint(src, "content") == before != source_fingerprint(src, "stat")
    monkeypatch.setattr(ingest_module, "iter_documents", lambda *a: pytest.fail("rebuilt"))
    ingest(src, tok, tmp_path / "cache", verify="content")
    with pytest.raises(ValueError, match="verify"):
        source_fingerprint(src, "mtime")


def test_an_interrupted_build_is_never_taken_for_a_finished_one(tmp_path, monkeypatch):
    src = text_corpus(tmp_path / "c")
    tok = ByteTokenizer()
    calls = []

    def failing_add(self, name, ids, num_bytes, real=StoreWriter.add):
        calls.append(name)
        if len(calls) == 20:
            raise KeyboardInterrupt
        real(self, name, ids, num_bytes)

    monkeypatch.setattr(StoreWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, tok, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # no store, no temporary directory
    monkeypatch.undo()
    stores = ingest(src, tok, tmp_path / "cache")
    root = stores["train"].tokens.filename
    (next((tmp_path / "cache").iterdir()) / "ingest.json").unlink()  # as if cut off before it
    assert_same(ingest(src, tok, tmp_path / "cache"), src, tok)
    assert os.path.exists(root)


def test_store_writer_and_errors(tmp_path):
    w = StoreWriter(tmp_path / "s", bos_id=256, vocab_size=257, shard_tokens=3)
    w.add("a", np.array([1, 2, 3, 4], np.uint8), 4)
    w.add("b", np.array([], np.uint8), 0)
    with pytest.raises(ValueError, match="outside"):
        w.add("c", np.array([300]), 1)
    with pytest.raises(ValueError, match="line break"):
        w.add("c\nd", np.array([1]), 1)
    w.finish()
    c = TokenizedCorpus.load(tmp_path / "s")
    assert c.tokens.tolist() == [256, 1, 2, 3, 4, 256] and c.names == ["a", "b"]
    with pytest.raises(ValueError, match="no file matches"):
        ingest(str(tmp_path / "*.nope"), ByteTokenizer(), tmp_path / "cache")
    write(tmp_path / "e" / "train" / "a.txt", "x")
    write(tmp_path / "e" / "test" / "b.txt", "")
    with pytest.raises(ValueError, match="empty"):
        ingest(tmp_path / "e", ByteTokenizer(), tmp_path / "cache")
