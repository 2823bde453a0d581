"""Issue 33's guard: the token ids of the default corpus (the standard library, byte tokenizer,
hash split) are those of the pipeline every figure so far was measured with. The old path is
copied here, frozen; and a synthetic corpus's ids have a digest stored before the change."""
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

from blockrecurrent.data.corpus import Document, load_documents, split_documents, tokenize_corpus
from blockrecurrent.data.tokenizer import ByteTokenizer
from blockrecurrent.train.settings import TrainConfig
from blockrecurrent.train.train_data import build_data

_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _old_stdlib():  # data/corpus.py's iter_stdlib + load_documents before issue 33
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    docs = [(p.relative_to(root).as_posix(), p.read_bytes().decode("utf-8")) for p in found]
    return sorted((d for d in docs if d[1]), key=lambda d: d[0])


def _old_split(docs, val=0.05, test=0.05):  # no corpus of this test has an empty split
    def unit(name):
        return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2.0**64
    out = {"train": [], "val": [], "test": []}
    for d in docs:
        u = unit(d[0])
        out["test" if u < test else "val" if u < test + val else "train"].append(d)
    return out


def _old_byte_tokens(docs):
    arrays = [np.concatenate(([256], np.asarray(list(t.encode("utf-8")), np.int64)))
              .astype(np.uint16) for _, t in docs]
    return np.concatenate(arrays), np.concatenate(([0], np.cumsum([len(a) for a in arrays])))


def test_default_corpus_ids_unchanged(tmp_path):
    old = _old_split(_old_stdlib())
    new = split_documents(load_documents("stdlib"))
    assert {k: [d.name for d in v] for k, v in new.items()} == \
        {k: [d[0] for d in v] for k, v in old.items()}
    cfg = TrainConfig(data="stdlib", tokenizer="byte", cache_dir=str(tmp_path))
    _, train, val = build_data(cfg)
    for corpus, split in ((val, "val"), (tokenize_corpus(new["test"], ByteTokenizer()), "test")):
        tokens, offsets = _old_byte_tokens(old[split])
        assert corpus.tokens.dtype == np.uint16 and np.array_equal(corpus.tokens, tokens)
        assert np.array_equal(corpus.offsets, offsets)
        assert corpus.names == [d[0] for d in old[split]]
    assert train.names == [d[0] for d in old["train"]]
    assert train.total_tokens == sum(len(t.encode("utf-8")) + 1 for _, t in old["train"])


def synthetic_docs():
    rng = np.random.default_rng(33)
    alphabet = list("abcdefgh éü€日\n\t") + ["😀", "\r\n"]
    return [Document(f"dir{i % 3}/doc{i:03d}.txt",
                     "".join(rng.choice(alphabet, int(rng.integers(1, 400))))) for i in range(60)]


def test_synthetic_corpus_digest_unchanged(tmp_path):
    corpus = tokenize_corpus(synthetic_docs(), ByteTokenizer(), tmp_path / "c")
    h = hashlib.sha1(np.ascontiguousarray(corpus.tokens).tobytes())
    h.update(np.asarray(corpus.offsets, np.int64).tobytes())
    h.update(np.asarray(corpus._num_bytes, np.int64).tobytes())
    assert h.hexdigest() == DIGEST
    in_memory = tokenize_corpus(synthetic_docs(), ByteTokenizer())
    assert np.array_equal(in_memory.tokens, corpus.tokens)


DIGEST = "0a9b77f09fe6993fe7a805655828a226cb8ecb6c"  # made before issue 33 changed anything
