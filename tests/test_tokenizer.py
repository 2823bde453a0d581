"""data/tokenizer.py: the byte tokenizer, byte-level BPE and Hugging Face tokenizer directories:
round trips, stream decoding, saving and loading, and choosing one (corpus.make_tokenizer) with its
cache."""
import sys

import numpy as np
import pytest
import torch

from blockrecurrent.data import corpus
from blockrecurrent.data.corpus import Document, make_tokenizer
from blockrecurrent.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    train_bpe,
)
from blockrecurrent.errors import is_expected


def test_byte_tokenizer_roundtrip_and_stream(tmp_path):
    tok = ByteTokenizer()
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
    assert isinstance(load_tokenizer(tmp_path / "t"), ByteTokenizer)
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size"):
        make_tokenizer("byte", vocab_size=1000)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        make_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "t" / "tokenizer_config.json").write_text("{not json")  # one line in brt
    with pytest.raises(ValueError, match="not a tokenizer configuration") as err:
        load_tokenizer(tmp_path / "t")
    assert is_expected(err.value)


@pytest.fixture(scope="module")
def bpe_docs():
    words = ["def", "return", "self", "import", "class", "lambda", "é", "日本", "€uro", "<|doc|>"]
    rng = np.random.default_rng(1)
    return [Document(f"f{i}.py", " ".join(rng.choice(words, 80)) + "\n") for i in range(12)]


def refuse_to_train(*args, **kwargs):
    raise RuntimeError("retrained")


def test_bpe_train_save_load_and_cache(tmp_path, bpe_docs, monkeypatch):
    tok = make_tokenizer("bpe", bpe_docs, vocab_size=300, cache_dir=tmp_path / "tc")
    assert isinstance(tok, BPETokenizer) and 257 < tok.vocab_size <= 300
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
    again = load_tokenizer(tmp_path / "saved")
    assert isinstance(again, BPETokenizer) and again.encode(text) == ids
    assert again.fingerprint == tok.fingerprint
    # A second make_tokenizer call loads from the cache instead of training.
    monkeypatch.setattr(corpus, "train_bpe", refuse_to_train)  # called by make_tokenizer
    cached = make_tokenizer("bpe", bpe_docs, vocab_size=300, cache_dir=tmp_path / "tc")
    assert cached.fingerprint == tok.fingerprint and cached.encode(text) == ids
    with pytest.raises(RuntimeError, match="retrained"):  # different documents: a new cache key
        make_tokenizer("bpe", bpe_docs[:-1], vocab_size=300, cache_dir=tmp_path / "tc")
    with pytest.raises(ValueError, match="vocab_size"):
        make_tokenizer("bpe", bpe_docs)
    with pytest.raises(ValueError, match="train_texts"):
        make_tokenizer("bpe", None, vocab_size=300)


def test_missing_tokenizers_package_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r"pip install blockrecurrent\[bpe\]"):
        make_tokenizer("bpe", ["some text"], vocab_size=300)


def test_hf_directory(tmp_path, bpe_docs):
    tok = train_bpe([d.text for d in bpe_docs], 280)
    tok.save(tmp_path / "hf")
    # now a bare Hugging Face tokenizer directory
    (tmp_path / "hf" / "tokenizer_config.json").unlink()
    hf = make_tokenizer(str(tmp_path / "hf"))
    assert type(hf) is HFTokenizer and hf.bos_id == tok.bos_id
    assert hf.encode("def x") == tok.encode("def x")
    hf.save(tmp_path / "hf2")
    assert type(load_tokenizer(tmp_path / "hf2")) is HFTokenizer
    tk = pytest.importorskip("tokenizers")
    bare = tk.Tokenizer(tk.models.BPE())
    bare.train_from_iterator(["abc abc"],
                             tk.trainers.BpeTrainer(vocab_size=10, show_progress=False))
    (tmp_path / "nobos").mkdir()
    bare.save(str(tmp_path / "nobos" / "tokenizer.json"))
    with pytest.raises(ValueError, match="document-start"):
        load_tokenizer(tmp_path / "nobos")
