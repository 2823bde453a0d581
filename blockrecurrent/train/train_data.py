"""The run's corpora: documents split into train/val/test, the tokenizer, tokenized corpora
cached on disk, and the fixed evaluation subset of the validation documents."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..data import corpus as D
from .distributed import DistEnv
from .settings import TrainConfig


def _corpus_cache(cfg: TrainConfig, split: str, tokenizer) -> Path | None:
    if not cfg.cache_dir:
        return None
    source = cfg.data if cfg.data == "stdlib" else os.path.abspath(cfg.data)
    key = json.dumps([source, cfg.text_field, split, tokenizer.fingerprint])
    return Path(cfg.cache_dir) / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def build_data(cfg: TrainConfig, env: DistEnv | None = None, tokenizer=None):
    """(tokenizer, train corpus, val corpus or None). Documents are split by data.split_documents
    with its default fractions, which evaluation reuses for the test split. Rank 0 fills the
    cache first; the other ranks then read it."""
    env = env or DistEnv()
    docs = D.load_documents(cfg.data, cfg.text_field)
    splits = D.split_documents(docs)
    if env.rank != 0:
        env.barrier()
    if tokenizer is None:
        bpe = cfg.tokenizer == "bpe"
        tokenizer = D.make_tokenizer(cfg.tokenizer, train_texts=splits["train"] if bpe else None,
                                     vocab_size=cfg.bpe_vocab_size if bpe else None,
                                     cache_dir=cfg.cache_dir or None)
    train_corpus = D.tokenize_corpus(splits["train"], tokenizer,
                                     _corpus_cache(cfg, "train", tokenizer))
    val_corpus = (D.tokenize_corpus(splits["val"], tokenizer, _corpus_cache(cfg, "val", tokenizer))
                  if splits["val"] else None)
    if env.rank == 0:
        env.barrier()
    return tokenizer, train_corpus, val_corpus


def eval_subset(corpus: D.TokenizedCorpus, max_tokens: int) -> D.TokenizedCorpus | None:
    """The fixed evaluation set: validation documents in name order, each whole (so bits per
    byte is exact), taken while they fit in max_tokens. None if no document fits."""
    chosen, total = [], 0
    for i, n in enumerate(corpus.doc_lengths):
        if 2 <= n <= max_tokens - total:
            chosen.append(i)
            total += int(n)
    if not chosen:
        return None
    lengths = [len(corpus.doc(i)) for i in chosen]
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    return D.TokenizedCorpus(np.concatenate([corpus.doc(i) for i in chosen]), offsets,
                             np.array([corpus.num_bytes(i) for i in chosen], np.int64),
                             [corpus.names[i] for i in chosen], bos_id=corpus.bos_id,
                             vocab_size=corpus.vocab_size)



def fixed_eval_set(val_corpus: D.TokenizedCorpus | None, eval_tokens: int
                   ) -> D.TokenizedCorpus | None:
    """The trainer's evaluation set (eval_subset); None without validation documents or with
    eval_tokens=0, a ValueError if no validation document fits in eval_tokens."""
    if val_corpus is None or eval_tokens <= 0:
        return None
    subset = eval_subset(val_corpus, eval_tokens)
    if subset is None:
        raise ValueError(f"eval_tokens={eval_tokens} is smaller than every validation document "
                         f"(shortest: {int(val_corpus.doc_lengths.min())} tokens); raise "
                         "eval_tokens, or set it to 0 to skip evaluation")
    return subset
