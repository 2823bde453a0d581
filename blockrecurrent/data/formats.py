"""Document sources beyond plain text files: JSONL compressed with gzip (stdlib) or zstd (the
`zstandard` package), Parquet files and Arrow datasets (a `datasets` save_to_disk directory, read
with pyarrow alone), and directories of such files. Each yields (name, text) pairs in a stable
order; data/corpus.py's load_documents picks the reader (see `data_kind`).
"""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator

JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
PARQUET = (".parquet",)
ARROW = (".arrow",)
DATA_SUFFIXES = JSONL + PARQUET + ARROW
ROWS_PER_BATCH = 256  # rows read at a time from a Parquet or Arrow file


def open_jsonl(path: str | os.PathLike):
    """A binary file object of the decompressed lines (gzip by .gz, zstd by .zst / .zstd)."""
    name = os.fspath(path)
    if name.endswith(".gz"):
        return gzip.open(name, "rb")
    if name.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{name} is zstd-compressed: pip install zstandard (or "
                              "blockrecurrent[zstd])") from None
        raw = open(name, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(name, "rb")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("Parquet and Arrow corpora need pyarrow: pip install "
                          "blockrecurrent[parquet]") from None
    return pyarrow


def is_arrow_dataset(directory: str | os.PathLike) -> bool:
    """A `datasets` save_to_disk directory of one split: state.json or dataset_info.json beside
    its .arrow files."""
    d = Path(directory)
    return (d.is_dir() and ((d / "state.json").is_file() or (d / "dataset_info.json").is_file())
            and any(d.glob("*.arrow")))


def data_kind(path: str | os.PathLike) -> str | None:
    """'jsonl', 'parquet', 'arrow' (one .arrow file) or 'arrow-dataset' (a directory) for the
    sources read here; None for anything else (plain text files)."""
    name = os.fspath(path)
    if os.path.isdir(name):
        return "arrow-dataset" if is_arrow_dataset(name) else None
    if not os.path.isfile(name):
        return None
    for kind, suffixes in (("jsonl", JSONL), ("parquet", PARQUET), ("arrow", ARROW)):
        if name.endswith(suffixes):
            return kind
    return None


def _rows(label: str, batches, text_field: str, where: str) -> Iterator[tuple[str, str]]:
    """(label/<row number>, text) per row of these record batches; null or empty texts skipped."""
    row = 0
    for batch in batches:
        if text_field not in batch.schema.names:
            raise ValueError(f"{where} has no column {text_field!r} (columns: "
                             f"{', '.join(batch.schema.names)}); pass text_field= naming the "
                             "text's column")
        for text in batch.column(batch.schema.get_field_index(text_field)).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"{where}, row {row}: column {text_field!r} holds "
                                 f"{type(text).__name__}, not text; pass text_field= naming a "
                                 "string column")
            yield f"{label}/{row:09d}", text  # zero-padded: sorts in row order


def iter_parquet(path: str | os.PathLike, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """One document per row of a Parquet file, named '<file name>/<row number>'; read a batch of
    rows at a time."""
    pq = _pyarrow().parquet
    path = Path(path)
    f = pq.ParquetFile(path)
    if text_field not in f.schema_arrow.names:
        raise ValueError(f"{path} has no column {text_field!r} (columns: "
                         f"{', '.join(f.schema_arrow.names)}); pass text_field= naming the "
                         "text's column")
    return _rows(path.name, f.iter_batches(ROWS_PER_BATCH, columns=[text_field]), text_field,
                 str(path))


def _arrow_batches(path: Path):
    pa = _pyarrow()
    with pa.memory_map(str(path)) as source:
        try:  # `datasets` writes the streaming format; pyarrow's own files are the file format
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        yield from reader


def iter_arrow(path: str | os.PathLike, text_field: str = "text",
               label: str | None = None) -> Iterator[tuple[str, str]]:
    """One document per row of an Arrow IPC file (stream or file format), memory-mapped."""
    path = Path(path)
    return _rows(label or path.name, _arrow_batches(path), text_field, str(path))


def arrow_dataset_files(directory: str | os.PathLike) -> list[Path]:
    """The .arrow files of a save_to_disk directory in the dataset's order (state.json's
    _data_files; else by name)."""
    d = Path(directory)
    try:
        files = [d / f["filename"] for f in
                 json.loads((d / "state.json").read_text("utf-8"))["_data_files"]]
        if files and all(p.is_file() for p in files):
            return files
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sorted(d.glob("*.arrow"))


def iter_arrow_dataset(directory: str | os.PathLike,
                       text_field: str = "text") -> Iterator[tuple[str, str]]:
    """A `datasets.Dataset.save_to_disk` directory, read with pyarrow (no `datasets` needed):
    its rows in order, named '<arrow file name>/<row number>'."""
    files = arrow_dataset_files(directory)
    _pyarrow()  # fail before yielding anything if it is missing
    for path in files:
        yield from iter_arrow(path, text_field)


def iter_data_file(path: str | os.PathLike, text_field: str, iter_jsonl) -> Iterator:
    """The documents of one data file or Arrow dataset directory (see data_kind); `iter_jsonl`
    is data/corpus.py's JSONL reader."""
    kind = data_kind(path)
    if kind == "jsonl":
        return iter_jsonl(path, text_field)
    if kind == "parquet":
        return iter_parquet(path, text_field)
    if kind == "arrow":
        return iter_arrow(path, text_field)
    if kind == "arrow-dataset":
        return iter_arrow_dataset(path, text_field)
    raise ValueError(f"{os.fspath(path)!r} is not a JSONL, Parquet or Arrow source")
