"""data/splits.py (a corpus's own train/val/test split) and data/formats.py (compressed JSONL,
Parquet, Arrow and `datasets` save_to_disk directories), on small sources made here."""
import gzip
import json

import pytest

from blockrecurrent.data.corpus import load_documents
from blockrecurrent.data.splits import describe_splits, find_splits, load_splits
from blockrecurrent.data.tokenizer import ByteTokenizer
from blockrecurrent.evaluate.heldout import load_heldout


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def jsonl(texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


# ------------------------------------------------------------------------------ own splits


def test_split_folders_are_the_splits(tmp_path):
    for split, names in (("train", "abcdef"), ("validation", "gh"), ("test", "ij")):
        for n in names:
            write(tmp_path / "c" / split / f"{n}.txt", f"text {n}")
    write(tmp_path / "c" / "README.md", "not a document")
    found = find_splits(tmp_path / "c")
    assert {k: p.name for k, p in found.items()} == {"train": "train", "val": "validation",
                                                     "test": "test"}
    assert describe_splits(found) == ("the corpus's own split: train = train/, "
                                      "val = validation/, test = test/")
    splits = load_splits(str(tmp_path / "c"))
    assert [d.name for d in splits["train"]] == [f"train/{n}.txt" for n in "abcdef"]
    assert [d.name for d in splits["val"]] == ["validation/g.txt", "validation/h.txt"]
    assert [d.text for d in splits["test"]] == ["text i", "text j"]
    held = load_heldout(tmp_path / "c", ByteTokenizer(), "val", cache_dir=None)
    assert held.names == ["validation/g.txt", "validation/h.txt"]


@pytest.mark.parametrize("val_name", ["val", "dev", "valid"])
def test_split_files_and_other_names(tmp_path, val_name):
    write(tmp_path / "train.jsonl", jsonl(["one", "two", "three"]))
    with gzip.open(tmp_path / f"{val_name}.jsonl.gz", "wt") as f:
        f.write(jsonl(["held out"]))
    splits = load_splits(tmp_path)
    assert [d.text for d in splits["train"]] == ["one", "two", "three"]
    assert splits["val"][0].name == f"{val_name}.jsonl.gz/000000001"
    assert splits["test"] == []  # a split the source lacks is empty
    with pytest.raises(ValueError, match="test split .* is empty"):
        load_heldout(tmp_path, ByteTokenizer(), "test", cache_dir=None)


def test_without_own_split_the_hash_split_applies(tmp_path):
    for i in range(20):
        write(tmp_path / "c" / "train" / f"{i}.txt", f"doc {i}")  # train alone: not a split
    assert find_splits(tmp_path / "c") is None and find_splits("stdlib") is None
    splits = load_splits(tmp_path / "c", val_fraction=0.2, test_fraction=0.2)
    assert sum(map(len, splits.values())) == 20 and splits["val"] and splits["test"]
    write(tmp_path / "d" / "val" / "a.txt", "a")
    write(tmp_path / "d" / "validation" / "b.txt", "b")
    write(tmp_path / "d" / "train" / "c.txt", "c")
    with pytest.raises(ValueError, match="2 candidates for its val split"):
        find_splits(tmp_path / "d")


# --------------------------------------------------------------------------------- formats


def test_compressed_jsonl(tmp_path):
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(jsonl(["é one", "", "two"]))
    docs = load_documents(tmp_path / "c.jsonl.gz")
    assert [(d.name, d.text) for d in docs] == [("c.jsonl.gz/000000001", "é one"),
                                                 ("c.jsonl.gz/000000003", "two")]
    zstd = pytest.importorskip("zstandard")
    write(tmp_path / "z" / "c.jsonl.zst", zstd.ZstdCompressor().compress(jsonl(["z1", "z2"])
                                                                          .encode()))
    assert [d.text for d in load_documents(tmp_path / "z" / "c.jsonl.zst")] == ["z1", "z2"]


def test_parquet_and_arrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"id": [1, 2, 3, 4], "text": ["a é", None, "c", ""],
                      "body": ["x", "y", "z", "w"]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    docs = load_documents(tmp_path / "t.parquet")
    assert [(d.name, d.text) for d in docs] == [("t.parquet/000000001", "a é"),
                                                 ("t.parquet/000000003", "c")]
    assert [d.text for d in load_documents(tmp_path / "t.parquet", "body")] == list("xyzw")
    with pytest.raises(ValueError, match="no column 'nope'"):
        load_documents(tmp_path / "t.parquet", "nope")
    with pytest.raises(ValueError, match="row 1.*int"):
        load_documents(tmp_path / "t.parquet", "id")
    # A folder of Parquet shards, nested, is one corpus.
    (tmp_path / "p" / "a").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["s1", "s2"]}), tmp_path / "p" / "a" / "0.parquet")
    pq.write_table(pa.table({"text": ["s3"]}), tmp_path / "p" / "1.parquet")
    assert [d.name for d in load_documents(tmp_path / "p")] == [
        "1.parquet/000000001", "a/0.parquet/000000001", "a/0.parquet/000000002"]


def save_to_disk_layout(directory, texts, pa):
    """What datasets.Dataset.save_to_disk writes: Arrow stream files + state.json +
    dataset_info.json (checked against datasets 2.x/3.x/4.x's layout)."""
    directory.mkdir(parents=True)
    table = pa.table({"text": texts, "n": list(range(len(texts)))})
    halves = [table.slice(0, len(texts) // 2), table.slice(len(texts) // 2)]
    files = []
    for i, part in enumerate(halves):
        name = f"data-{i:05d}-of-00002.arrow"
        with pa.OSFile(str(directory / name), "wb") as sink, \
                pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        files.append({"filename": name})
    write(directory / "state.json", json.dumps({"_data_files": files, "_split": None}))
    write(directory / "dataset_info.json", json.dumps({"features": {}}))


def test_arrow_dataset_directories(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc  # noqa: F401
    save_to_disk_layout(tmp_path / "ds", ["b1", "b2", "b3"], pa)
    docs = load_documents(tmp_path / "ds")
    assert [(d.name, d.text) for d in docs] == [("data-00000-of-00002.arrow/000000001", "b1"),
                                                 ("data-00001-of-00002.arrow/000000001", "b2"),
                                                 ("data-00001-of-00002.arrow/000000002", "b3")]
    # A DatasetDict saved to disk: its split folders are the splits.
    for split, texts in (("train", ["t1", "t2"]), ("validation", ["v1", "v2"]),
                         ("test", ["x1", "x2"])):
        save_to_disk_layout(tmp_path / "dd" / split, texts, pa)
    write(tmp_path / "dd" / "dataset_dict.json", json.dumps({"splits": ["train", "validation",
                                                                      "test"]}))
    splits = load_splits(tmp_path / "dd")
    assert [d.text for d in splits["val"]] == ["v1", "v2"]
    assert splits["test"][0].name == "test/data-00000-of-00002.arrow/000000001"
    # The file format (pyarrow's own .arrow files) reads too.
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, pa.schema([("text", pa.string())])) as writer:
        writer.write_table(pa.table({"text": ["f1", "f2"]}))
    assert [d.text for d in load_documents(tmp_path / "f.arrow")] == ["f1", "f2"]


def test_build_data_uses_the_own_split(tmp_path, capsys):
    from blockrecurrent.train.settings import TrainConfig
    from blockrecurrent.train.train_data import build_data
    for split, names in (("train", "abcd"), ("dev", "e"), ("test", "f")):
        for n in names:
            write(tmp_path / "c" / split / f"{n}.txt", f"text {n}")
    _, train, val = build_data(TrainConfig(data=str(tmp_path / "c"), cache_dir=str(tmp_path)))
    assert train.names == [f"train/{n}.txt" for n in "abcd"] and val.names == ["dev/e.txt"]
    assert "own split: train = train/, val = dev/, test = test/" in capsys.readouterr().err


def test_hub_shards_are_the_splits(tmp_path):
    """The Hugging Face Hub's layout: data/<split>-NNNNN-of-NNNNN.parquet shards."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split, shards in (("train", 2), ("validation", 1), ("test", 1)):
        for k in range(shards):
            pq.write_table(pa.table({"text": [f"{split} {k} {i}" for i in range(3)]}),
                           tmp_path / "hub" / "data" / f"{split}-{k:05d}-of-{shards:05d}.parquet")
    write(tmp_path / "hub" / "README.md", "a dataset card")
    found = find_splits(tmp_path / "hub")
    assert describe_splits(found) == ("the corpus's own split: train = train-*.parquet, "
                                      "val = validation-*.parquet, test = test-*.parquet")
    splits = load_splits(tmp_path / "hub")
    assert [d.name for d in splits["train"]][:4] == [
        "train-00000-of-00002.parquet/000000001", "train-00000-of-00002.parquet/000000002",
        "train-00000-of-00002.parquet/000000003", "train-00001-of-00002.parquet/000000001"]
    assert [d.text for d in splits["val"]] == ["validation 0 0", "validation 0 1",
                                               "validation 0 2"]
    # A glob pattern of data files is a source too.
    docs = load_documents(str(tmp_path / "hub" / "data" / "train-*.parquet"))
    assert docs == splits["train"]
    from blockrecurrent.data.ingest import ingest
    stores = ingest(tmp_path / "hub", ByteTokenizer(), tmp_path / "cache")
    assert stores["train"].names == [d.name for d in splits["train"]]
