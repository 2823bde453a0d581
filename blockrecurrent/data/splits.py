"""A corpus's train/val/test documents: its own split where the source has one (train/,
validation/ (or val/, dev/, valid/) and test/ folders, split files such as train.jsonl,
validation.parquet, test.jsonl.gz, shards such as data/train-00000-of-00004.parquet, or a
`datasets` DatasetDict saved to disk), else the hash split of data/corpus.py's split_documents.
"""
from __future__ import annotations

import os
from pathlib import Path

from .corpus import Document, load_documents, split_documents
from .formats import DATA_SUFFIXES

SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "dev", "valid"),
               "test": ("test",)}


def _candidates(src: Path, name: str) -> list[Path]:
    """The folder `name`, files name.<data suffix> (e.g. train.jsonl, train.parquet), or shards
    name-*.<data suffix> in src or src/data (the Hugging Face Hub's layout, e.g.
    data/train-00000-of-00004.parquet), as one glob pattern per suffix."""
    found = [src / name] if (src / name).is_dir() else []
    found += [src / f"{name}{s}" for s in DATA_SUFFIXES if (src / f"{name}{s}").is_file()]
    for folder in (src, src / "data"):
        found += [folder / f"{name}-*{s}" for s in DATA_SUFFIXES
                  if any(p.is_file() for p in folder.glob(f"{name}-*{s}"))]
    return found


def find_splits(source) -> dict[str, Path] | None:
    """{'train': path, 'val': path, 'test': path} (val or test may be missing) when `source` is a
    directory holding its own split: a train folder or file and at least one held-out one.
    None otherwise (the hash split applies)."""
    if not isinstance(source, (str, os.PathLike)) or os.fspath(source) == "stdlib":
        return None
    src = Path(source)
    if not src.is_dir():
        return None
    found: dict[str, Path] = {}
    for split, names in SPLIT_NAMES.items():
        hits = [p for name in names for p in _candidates(src, name)]
        if len(hits) > 1:
            raise ValueError(f"{src} has {len(hits)} candidates for its {split} split ("
                             f"{', '.join(p.name for p in hits)}); keep one")
        if hits:
            found[split] = hits[0]
    if "train" not in found or len(found) < 2:
        return None
    return found


def describe_splits(found: dict[str, Path]) -> str:
    """One line: which folders or files are the splits."""
    parts = [f"{split} = {p.name}{'/' if p.is_dir() else ''}" for split, p in found.items()]
    return "the corpus's own split: " + ", ".join(parts)


def _load_split(path: Path, text_field: str) -> list[Document]:
    docs = load_documents(path, text_field)
    if path.is_dir():  # names relative to the split's folder: prefix it, as in the whole corpus
        return [Document(f"{path.name}/{d.name}", d.text) for d in docs]
    return docs  # a split file's documents are named '<file name>/<row>' already


def load_splits(source, text_field: str = "text", val_fraction: float = 0.05,
                test_fraction: float = 0.05) -> dict[str, list[Document]]:
    """{'train', 'val', 'test'} -> documents sorted by name: the source's own split where it has
    one (find_splits; a split it lacks is empty and the fractions are unused), else
    split_documents(load_documents(source), val_fraction, test_fraction)."""
    found = find_splits(source)
    if found is None:
        return split_documents(load_documents(source, text_field), val_fraction, test_fraction)
    return {split: _load_split(found[split], text_field) if split in found else []
            for split in SPLIT_NAMES}
