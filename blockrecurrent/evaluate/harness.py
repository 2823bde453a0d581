"""lm-evaluation-harness tasks from local files: a rolling log-likelihood task over held-out
documents (the harness's word/byte perplexity, comparable with `brt eval`) and a multiple-choice
task, written as a JSONL file and a task YAML that `lm_eval --include_path DIRECTORY --tasks NAME`
reads without any download (docs: Hugging Face and lm-eval).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.splits import load_splits
from .evaluation import training_data

__all__ = ["write_choice_task", "write_heldout_task", "write_rolling_task"]


def _write_task(directory, name: str, records: list[dict], spec: dict) -> Path:
    """`name`.jsonl and `name`.yaml in directory (no download: the data_files path is local)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"task name must be an identifier such as 'brt_heldout', got {name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = (directory / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    spec = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test", **spec}
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(spec, indent=1) + "\n")  # JSON is YAML
    return path


def write_rolling_task(directory, documents, name: str = "brt_heldout") -> Path:
    """A loglikelihood_rolling task over `documents` (str or (name, text) pairs): perplexity
    and bits per byte, as `brt eval` reports them. Returns the .yaml path; run it with
    `lm_eval --include_path DIRECTORY --tasks NAME ...` (docs/huggingface.md)."""
    texts = [d if isinstance(d, str) else d[1] for d in documents]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("documents must be a non-empty list of non-empty texts")
    return _write_task(directory, name, [{"text": t} for t in texts], {
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity",
                                                "bits_per_byte")]})


def write_choice_task(directory, items, name: str = "brt_choice") -> Path:
    """A multiple_choice task: items are (question, choices, index of the right choice); the
    answer scored is the continuation " <choice>" after the question. Returns the .yaml path."""
    records = []
    for item in items:
        try:
            question, choices, answer = item
        except (TypeError, ValueError):
            raise TypeError(f"each item must be (question, choices, answer index), "
                            f"got {item!r}") from None
        if not isinstance(question, str) or not question or not isinstance(choices, (list, tuple)) \
                or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"item {item!r}: need a question and at least two non-empty choices")
        if (isinstance(answer, bool) or not isinstance(answer, int)
                or not 0 <= answer < len(choices)):
            raise ValueError(f"item {item!r}: answer must index one of the {len(choices)} choices")
        records.append({"question": question, "choices": [" " + c for c in choices],
                        "answer": answer})
    if not records:
        raise ValueError("items must not be empty")
    return _write_task(directory, name, records, {
        "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}]})


def write_heldout_task(model_dir, directory, split: str = "test", data=None,
                       name: str = "brt_heldout") -> Path:
    """The rolling task over the held-out `split` documents of the run that wrote model_dir
    (its data and split, as `brt eval` reads them; data overrides the recorded corpus)."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    source, field = training_data(model_dir) or ("stdlib", "text")
    docs = load_splits(data or source, field)[split]  # the corpus's own split where it has one
    if not docs:
        raise ValueError(f"the {split} split of {data or source!r} is empty")
    return write_rolling_task(directory, docs, name)
