"""train/train_data.py: the trainer's fixed evaluation set, whole validation documents in name
order taken while they fit in eval_tokens, else prefixes of the first (books), with exact bytes.
(Building the corpora: test_trainer, test_corpus.)"""

import numpy as np
import pytest
from helpers import corpus_of

from blockrecurrent.data.corpus import Document, make_tokenizer, tokenize_corpus
from blockrecurrent.data.prefixes import prefix_plan
from blockrecurrent.data.tokenizer import ByteTokenizer
from blockrecurrent.train.distributed import DistEnv
from blockrecurrent.train.settings import TrainConfig
from blockrecurrent.train.train_data import (
    describe_eval_set,
    eval_subset,
    fit_to_corpus,
    fixed_eval_set,
    prefix_subset,
)


def test_eval_subset_takes_whole_documents_while_they_fit():
    corpus = corpus_of([5, 1, 9, 4, 3])  # tokens per document, bos included
    sub = eval_subset(corpus, 12)
    # d0 fits (5), d1 has nothing to predict, d2 does not fit (14 > 12), d3 (9) and d4 (12) do.
    assert sub.names == ["d0", "d3", "d4"] and sub.total_tokens == 12
    assert [sub.doc(i).tolist() for i in range(3)] == [corpus.doc(i).tolist() for i in (0, 3, 4)]
    assert [sub.num_bytes(i) for i in range(3)] == [corpus.num_bytes(i) for i in (0, 3, 4)]
    assert (sub.bos_id, sub.vocab_size) == (corpus.bos_id, corpus.vocab_size)
    assert eval_subset(corpus, 1) is None


def test_fixed_eval_set():
    corpus = corpus_of([5, 9])
    assert fixed_eval_set(None, 100) is None and fixed_eval_set(corpus, 0) is None
    assert fixed_eval_set(corpus, 5).names == ["d0"]


def byte_corpus(lengths, seed=0):
    """Byte-tokenized documents of these many characters, some of them multi-byte."""
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefgh \n") + ["é", "€", "😀"]
    return tokenize_corpus([Document(f"book{i}", "".join(rng.choice(alphabet, n)))
                            for i, n in enumerate(lengths)], ByteTokenizer())


def test_prefix_plan_spreads_the_budget():
    assert prefix_plan([100, 100], 30, min_prefix=10) == [(0, 15), (1, 15)]
    assert prefix_plan([100, 4, 0, 100], 30, min_prefix=10) == [(0, 10), (1, 4), (3, 16)]
    assert prefix_plan([100, 100], 30) == [(0, 30)]  # at least PREFIX_TOKENS each: one
    assert prefix_plan([100], 0) == [] and prefix_plan([0, 0], 10) == []


def test_long_documents_are_evaluated_by_prefix():
    corpus = byte_corpus([5000, 9000, 7000])
    assert eval_subset(corpus, 4000) is None  # no whole document fits
    sub = fixed_eval_set(corpus, 4000)  # bos + the first 3,999 bytes of the first book
    assert sub.names == ["book0[:4000]"] and sub.total_tokens == 4000
    assert np.array_equal(sub.doc(0), corpus.doc(0)[:4000])
    assert sub.num_bytes(0) == 3999  # exact: the bytes the prefix holds
    sub = prefix_subset(corpus, 9000, min_prefix=3000)
    assert sub.names == ["book0[:3000]", "book1[:3000]", "book2[:3000]"]
    assert eval_subset(sub, 6000).names == sub.names[:2]  # the state ablation's share fits
    line = describe_eval_set(corpus, 4000)
    assert line.startswith("eval_tokens=4000 holds no whole validation document: each "
                           "evaluation scores the first 4,000 tokens (bos included) of 1 of "
                           "the 3 (prefixes")
    whole = int(corpus.doc_lengths[0])
    assert describe_eval_set(corpus, whole) is None and describe_eval_set(None, 10) is None


def test_prefix_bytes_are_exact_for_bpe():
    pytest.importorskip("tokenizers")
    docs = [Document(f"d{i}", t) for i, t in
            enumerate(["héllo wörld, 日本語 😀 " * 40, "plain ascii text " * 50])]
    tok = make_tokenizer("bpe", docs, vocab_size=300)
    corpus = tokenize_corpus(docs, tok)
    for i in range(2):
        ids = corpus.doc(i)
        for n in range(1, len(ids) + 1):
            text = tok.decode(ids[:n])
            if not text.endswith("\ufffd"):  # a whole character: decoding gives the bytes
                assert corpus.prefix_bytes(i, n) == len(text.encode("utf-8"))
        assert corpus.prefix_bytes(i, len(ids)) == corpus.num_bytes(i)
    with pytest.raises(ValueError, match="whole documents"):
        corpus_of([50]).prefix_bytes(0, 10)


def test_fit_to_corpus_says_when_evaluation_reads_prefixes(capsys):
    corpus = byte_corpus([5000, 9000])
    cfg = TrainConfig(eval_tokens=4000, batch_size=1)
    cfg.unset = set()
    fit_to_corpus(cfg, corpus, corpus, DistEnv(), resume=False)
    assert "each evaluation scores the first 4,000 tokens" in capsys.readouterr().err
    cfg = TrainConfig(eval_tokens=4000, batch_size=1)
    cfg.unset = {"eval_tokens"}  # left unset: the shortest whole document, as before
    fitted = fit_to_corpus(cfg, corpus, corpus, DistEnv(), resume=False)
    assert fitted.eval_tokens == int(corpus.doc_lengths[0])
    assert "prefixes" not in capsys.readouterr().err
