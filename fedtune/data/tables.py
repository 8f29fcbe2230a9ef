"""Local text data: tables from files or named datasets, label ids, split, tokenization.

Data never leaves the node; this module only turns it into tensors. Tokenization is done
once per (tokenizer, length, texts) and cached on disk, so a restarted node or a
simulation worker does not redo it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedtune.system.atomic import atomic_write_bytes, atomic_write_json
from fedtune.config import DataConfig
from fedtune.data.named import Table, load_builtin
from fedtune.errors import DataError

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".parquet")
IGNORE_INDEX = -100  # label value the causal-LM loss skips (padding)


# -- reading ------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected .csv, .jsonl or .parquet")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises many types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    if suffix == ".csv":
        return _read_csv(path, text)
    rows = []
    # JSON Lines end at "\n" only: str.splitlines would also split at U+2028 and other
    # separators that JSON allows inside a string
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _read_csv(path: Path, text: str) -> list[dict]:
    """CSV rows; quoted fields may span lines and hold any text up to the whole file's size."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None


def read_table(path: str | Path, text_column: str, label_column: str | None) -> Table:
    """Read a CSV / JSONL / Parquet file into a `Table`; `label_column=None` for causal LM."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    wanted = [text_column] + ([label_column] if label_column else [])
    for column in wanted:
        if column not in rows[0]:
            raise DataError(f"{path}: missing column {column!r} (columns: {', '.join(map(str, rows[0]))})")
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {number} has an empty or non-text {text_column!r}")
        texts.append(text)
        if label_column:
            label = row.get(label_column)
            if label is None or label == "":
                raise DataError(f"{path}: row {number} has no {label_column!r}")
            labels.append(label)
    extra_columns = [c for c in rows[0] if c not in wanted]
    extra = {c: [str(r.get(c, "")) for r in rows] for c in extra_columns}
    return Table(texts, labels, extra, str(path))


ROLES = ("system", "user", "assistant")


def parse_messages(value, where: str) -> list[dict]:
    """A messages cell (a list, or its JSON text in CSV) -> validated [{role, content}, ...]
    whose last message is the assistant's response."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: messages are not valid JSON ({exc.msg})") from None
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{where}: expected a list of at least two chat messages [{{role, content}}, ...]")
    messages = []
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a text content")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"{where}: the last message must be the assistant's (non-empty) response")
    return messages


def read_instruct_table(path: str | Path, config: DataConfig) -> Table:
    """An instruct file: prompt/response columns, or one messages column whose last message
    is the response. A messages row keeps its earlier turns as JSON in `texts`."""
    if not config.messages_column:
        return read_table(path, config.prompt_column, config.response_column)
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    if config.messages_column not in rows[0]:
        raise DataError(f"{path}: missing column {config.messages_column!r} (columns: {', '.join(map(str, rows[0]))})")
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        messages = parse_messages(row.get(config.messages_column), f"{path}: row {number}")
        texts.append(json.dumps(messages[:-1], ensure_ascii=False))
        labels.append(messages[-1]["content"])
    return Table(texts, labels, {}, str(path))


def read_for_task(path: str | Path, config: DataConfig, task: str) -> Table:
    """A node's file read with the columns its task uses."""
    if task == "instruct":
        return read_instruct_table(path, config)
    return read_table(path, config.text_column, config.label_column if task == "classification" else None)


def check_declared_labels(config: DataConfig, labels) -> None:
    """At a node's start, before it answers anything: every row of its files holds a label
    its policy declares (`node.labels`). Run here, the check's outcome is the operator's to
    see; run in answer to a request, it would tell the server whether some row holds a label."""
    label_map = LabelMap.from_config(labels)
    files = [config.path] + ([config.eval_path] if config.eval_path else [])
    for path in files:
        table = read_for_task(path, config, "classification")
        label_map.encode(table.labels, source=f"{path} (the node's declared labels: {', '.join(map(str, labels))})")


def load_table(config: DataConfig, task: str) -> Table:
    """The training table named by the config: a local file, else a built-in dataset."""
    if config.path:
        return read_for_task(config.path, config, task)
    return load_builtin(config.dataset)


# -- labels -------------------------------------------------------------------------
def _normalise_label(label):
    """Integers stay integers whatever the file type (CSV has only strings): "3" == 3."""
    if isinstance(label, bool):
        return str(label)
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label.strip())
    return label


@dataclass(frozen=True)
class LabelMap:
    """Stable label <-> id mapping: sorted labels (numeric order for integers).

    Saved beside the adapter so a served model and every federated node agree on ids.
    """

    labels: tuple

    @classmethod
    def from_config(cls, labels: tuple[str, ...]) -> "LabelMap":
        """A fixed label set (a federation's), normalised like inferred ones."""
        values = [_normalise_label(x) for x in labels]
        ordered = tuple(values) if all(isinstance(v, int) for v in values) else tuple(str(v) for v in values)
        if len(set(ordered)) < 2 or len(set(ordered)) != len(ordered):
            raise DataError(f"data.labels = {list(labels)!r}: expected at least two distinct labels")
        return cls(ordered)

    @classmethod
    def from_labels(cls, labels: list, source: str = "data") -> "LabelMap":
        values = {_normalise_label(x) for x in labels}
        if all(isinstance(v, int) for v in values):
            ordered = tuple(sorted(values))
        else:
            ordered = tuple(sorted(str(v) for v in values))
        if len(ordered) < 2:
            raise DataError(f"{source}: only one class ({ordered[0]!r}); classification needs at least two")
        return cls(ordered)

    def encode(self, labels: list, source: str = "data") -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        as_str = not isinstance(self.labels[0], int)
        ids = []
        for label in labels:
            key = str(_normalise_label(label)) if as_str else _normalise_label(label)
            if key not in index:
                raise DataError(f"{source}: unknown label {label!r}; the model knows {list(self.labels)}")
            ids.append(index[key])
        return np.asarray(ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {"labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict) -> "LabelMap":
        return cls(tuple(data["labels"]))

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "LabelMap":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# -- splitting ----------------------------------------------------------------------
def subsample(table: Table, max_examples: int, seed: int) -> Table:
    """A seeded random subset of at most `max_examples` rows (0 = all)."""
    if not max_examples or max_examples >= len(table):
        return table
    keep = np.sort(np.random.default_rng(seed).permutation(len(table))[:max_examples])
    return select(table, keep)


def select(table: Table, indices) -> Table:
    indices = [int(i) for i in indices]
    return Table(
        [table.texts[i] for i in indices],
        [table.labels[i] for i in indices] if table.labels else [],
        {k: [v[i] for i in indices] for k, v in table.extra.items()},
        table.source,
    )


def train_val_split(table: Table, val_fraction: float, seed: int) -> tuple[Table, Table]:
    """Seeded split; the same seed gives the same split on every machine."""
    n = len(table)
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 2:
        raise DataError(f"{table.source}: {n} rows are too few to split off {val_fraction:.0%} for validation")
    order = np.random.default_rng(seed).permutation(n)
    return select(table, np.sort(order[n_val:])), select(table, np.sort(order[:n_val]))


# -- tokenization -------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE_DIR", Path.home() / ".cache" / "fedtune"))


class TokenCache:
    """Tokenized tensors keyed by tokenizer identity, max length and the texts' hash.

    Memory first, then disk (`FEDTUNE_CACHE_DIR`, default ~/.cache/fedtune/tokens).
    """

    def __init__(self, directory: str | Path | None = None, in_memory: int = 64):
        self.directory = Path(directory) if directory else default_cache_dir() / "tokens"
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self._in_memory = in_memory

    @staticmethod
    def key(tokenizer, texts: list[str], max_len: int) -> str:
        digest = hashlib.sha256()
        ident = f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{len(tokenizer)}|{max_len}|{tokenizer.padding_side}"
        digest.update(ident.encode())
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass"))
            digest.update(b"\x1f")
        return digest.hexdigest()[:32]

    def tokenize(self, tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        key = self.key(tokenizer, texts, max_len)
        if key in self._memory:
            return self._memory[key]
        path = self.directory / f"{key}.pt"
        encoded = None
        if path.is_file():
            try:
                encoded = torch.load(path, weights_only=True)
            except Exception:  # a corrupt cache entry is rebuilt, never trusted
                encoded = None
        if encoded is None:
            out = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
            encoded = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
            buffer = _torch_bytes(encoded)
            try:
                atomic_write_bytes(path, buffer)
            except OSError:
                pass  # a read-only cache is only slower
        if len(self._memory) >= self._in_memory:
            self._memory.pop(next(iter(self._memory)))
        self._memory[key] = encoded
        return encoded


def _torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def to_dataset(encoded: dict[str, torch.Tensor], label_ids: np.ndarray | None,
               labels: torch.Tensor | None = None) -> TensorDataset:
    """(input_ids, attention_mask, labels) tuples, the shape Opacus's DPDataLoader needs.

    For causal LM (`label_ids=None`) the labels are the input ids with padding ignored;
    instruct passes its own token `labels` (the prompt masked out).
    """
    input_ids, mask = encoded["input_ids"], encoded["attention_mask"]
    if labels is not None:
        return TensorDataset(input_ids, mask, labels)
    if label_ids is None:
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    else:
        labels = torch.as_tensor(label_ids, dtype=torch.long)
    return TensorDataset(input_ids, mask, labels)
