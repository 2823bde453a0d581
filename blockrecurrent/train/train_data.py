"""The run's corpora: documents split into train/val/test, the tokenizer, tokenized corpora
cached on disk, the fixed evaluation subset of the validation documents, and the settings left
unset fitted to the corpus (fit_to_corpus)."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from ..data import corpus as D
from ..data import splits as S
from ..data.ingest import ingest
from ..data.lanes import lanes_that_fit
from ..data.prefixes import PREFIX_TOKENS, prefix_plan
from .distributed import DistEnv
from .settings import TrainConfig


def build_data(cfg: TrainConfig, env: DistEnv | None = None, tokenizer=None):
    """(tokenizer, train corpus, val corpus or None). Documents are split by the corpus's own
    split where it has one (data.splits.find_splits), else by data.split_documents with its
    default fractions, which evaluation reuses for the test split (data.splits.load_splits).
    With a cache_dir the corpora are token stores streamed into it (data.ingest: memory
    bounded, found again from the files' names, sizes and times); rank 0 builds them first,
    the other ranks then read them. Training a BPE tokenizer reads the training documents."""
    env = env or DistEnv()
    own = S.find_splits(cfg.data)
    if own and env.is_main:
        print(S.describe_splits(own), file=sys.stderr)
    if env.rank != 0:
        env.barrier()
    splits = None
    if tokenizer is None:
        bpe = cfg.tokenizer == "bpe"
        splits = S.load_splits(cfg.data, cfg.text_field) if bpe else None
        tokenizer = D.make_tokenizer(cfg.tokenizer, train_texts=splits["train"] if bpe else None,
                                     vocab_size=cfg.bpe_vocab_size if bpe else None,
                                     cache_dir=cfg.cache_dir or None)
    if cfg.cache_dir:
        log = (lambda line: print(line, file=sys.stderr)) if env.is_main else None
        stores = ingest(cfg.data, tokenizer, cfg.cache_dir, text_field=cfg.text_field, log=log)
        train_corpus, val_corpus = stores["train"], stores["val"]
    else:
        splits = splits or S.load_splits(cfg.data, cfg.text_field)
        train_corpus = D.tokenize_corpus(splits["train"], tokenizer)
        val_corpus = D.tokenize_corpus(splits["val"], tokenizer) if splits["val"] else None
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
    return corpus.subset([(i, None) for i in chosen]) if chosen else None


def _prefix_plan(corpus: D.TokenizedCorpus, max_tokens: int, min_prefix: int = PREFIX_TOKENS
                 ) -> list[tuple[int, int]]:
    """prefix_plan over the documents' tokens, bos included (as eval_subset counts them), of
    the documents with text; each prefix holds its bos and at least one token after it."""
    lengths = np.where(corpus.doc_lengths >= 2, corpus.doc_lengths, 0)
    return [(i, n) for i, n in prefix_plan(lengths, max_tokens, min_prefix) if n >= 2]


def prefix_subset(corpus: D.TokenizedCorpus, max_tokens: int,
                  min_prefix: int = PREFIX_TOKENS) -> D.TokenizedCorpus | None:
    """The evaluation set when no whole validation document fits in max_tokens (books):
    max_tokens tokens (bos included) spread over the first documents in name order
    (data.prefixes.prefix_plan: each at least min_prefix), each read from its start and named
    '<name>[:<tokens>]', with the exact UTF-8 bytes of the text it holds (bits per byte stays
    exact). None if max_tokens < 2."""
    plan = _prefix_plan(corpus, max_tokens, min_prefix)
    return corpus.subset(plan) if plan else None


def describe_eval_set(val_corpus: D.TokenizedCorpus | None, eval_tokens: int) -> str | None:
    """One line when the evaluation set (fixed_eval_set) reads prefixes; else None."""
    if (val_corpus is None or eval_tokens <= 0
            or eval_subset(val_corpus, eval_tokens) is not None):
        return None
    plan = _prefix_plan(val_corpus, eval_tokens)
    if not plan:
        return None
    lengths = sorted({n for _, n in plan})
    each = f"{lengths[0]:,}" if len(lengths) == 1 else f"{lengths[0]:,} to {lengths[-1]:,}"
    return (f"eval_tokens={eval_tokens} holds no whole validation document: each evaluation "
            f"scores the first {each} tokens (bos included) of {len(plan)} of the "
            f"{len(val_corpus)} (prefixes; bits per byte over the bytes they hold)")


def fixed_eval_set(val_corpus: D.TokenizedCorpus | None, eval_tokens: int
                   ) -> D.TokenizedCorpus | None:
    """The trainer's evaluation set: whole documents (eval_subset) or, where none fits in
    eval_tokens, document prefixes (prefix_subset); None without validation documents or with
    eval_tokens=0."""
    if val_corpus is None or eval_tokens <= 0:
        return None
    subset = eval_subset(val_corpus, eval_tokens)
    return subset if subset is not None else prefix_subset(val_corpus, eval_tokens)


def fit_to_corpus(cfg: TrainConfig, train_corpus: D.TokenizedCorpus,
                   val_corpus: D.TokenizedCorpus | None, env: DistEnv, resume: bool
                   ) -> TrainConfig:
    """cfg with the settings the user left unset (cfg.unset) fitted to this run: fewer lanes
    where the corpus has too few training documents for batch_size, and eval_tokens holding
    the shortest validation document where none fits; one line saying so. And one line when
    the evaluation set reads document prefixes (describe_eval_set)."""
    fitted, changes = [], {}
    if "warmup_steps" in cfg.unset and cfg.warmup_steps != TrainConfig.warmup_steps:
        fitted.append(f"warmup_steps={cfg.warmup_steps} (a tenth of max_steps={cfg.max_steps}; "
                      f"the default {TrainConfig.warmup_steps} is longer)")
    fits = lanes_that_fit(train_corpus.doc_lengths, env.world_size, cfg.batch_size)
    if "batch_size" in cfg.unset and not resume and 0 < fits < cfg.batch_size:
        docs = int((train_corpus.doc_lengths >= 2).sum())
        fitted.append(f"batch_size={fits} (each batch row reads its own documents and the "
                      f"training split has {docs}, too few for the default {cfg.batch_size})")
        changes["batch_size"] = fits
    if ("eval_tokens" in cfg.unset and not resume and val_corpus is not None and cfg.eval_tokens
            and eval_subset(val_corpus, cfg.eval_tokens) is None):
        changes["eval_tokens"] = shortest = int(val_corpus.doc_lengths.min())
        fitted.append(f"eval_tokens={shortest} (the shortest validation document, whole; the "
                      f"default {cfg.eval_tokens} holds none)")
    if changes:
        unset = cfg.unset
        cfg = dataclasses.replace(cfg, **changes)
        cfg.unset = unset
    if fitted and env.is_main and fits >= cfg.batch_size:  # else the Trainer's error follows
        print("fitted to this run (set them to choose): " + "; ".join(fitted), file=sys.stderr)
    line = describe_eval_set(val_corpus, cfg.eval_tokens)
    if line and env.is_main:
        print(line, file=sys.stderr)
    return cfg
