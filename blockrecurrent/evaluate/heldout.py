"""The held-out documents of a corpus, split as the trainer splits them (load_heldout), and the
corpus a saved model was trained on (training_data), for evaluating a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.corpus import TokenizedCorpus, tokenize_corpus
from ..data.ingest import ingest
from ..data.splits import load_splits


def load_heldout(source, tokenizer, split: str = "test", *, text_field: str = "text",
                 val_fraction: float = 0.05, test_fraction: float = 0.05,
                 cache_dir: str | os.PathLike | None = "data_cache") -> TokenizedCorpus:
    """The `split` ('val' or 'test') documents of `source` (see data.load_documents), split as
    the trainer splits them (data.splits.load_splits: the source's own split where it has one,
    else the same fractions -> same documents, by a hash of their names),
    tokenized with `tokenizer` into the token store under cache_dir that the trainer builds
    too (data.ingest; None: in memory)."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test' (held-out documents), got {split!r}")
    if cache_dir is None:
        docs = load_splits(source, text_field, val_fraction, test_fraction)[split]
    else:  # the token store the trainer streams (data.ingest), shared with it
        docs = ingest(source, tokenizer, cache_dir, text_field=text_field,
                      val_fraction=val_fraction, test_fraction=test_fraction)[split]
    if not docs:
        raise ValueError(f"the {split} split of {os.fspath(source)!r} is empty (the corpus has too "
                         f"few documents, or its own split has no {split} folder or file); use "
                         f"a larger corpus or raise {split}_fraction")
    return tokenize_corpus(docs, tokenizer) if cache_dir is None else docs


def training_data(model_dir: str | os.PathLike) -> tuple[str, str] | None:
    """(data, text_field) of the run that wrote `model_dir`, from the trainer's trainer.json:
    in the directory itself (a checkpoint) or in the latest checkpoint beside it (the exported
    out_dir/model). None when there is no such record."""
    model_dir = Path(model_dir)
    candidates = [model_dir / "trainer.json"]
    root = model_dir.parent / "checkpoints"
    if (root / "latest").is_file():
        candidates.append(root / (root / "latest").read_text().strip() / "trainer.json")
    for path in candidates:
        try:
            tc = json.loads(path.read_text())["train_config"]
            return tc["data"], tc.get("text_field", "text")
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None
