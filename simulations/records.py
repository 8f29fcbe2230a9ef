"""Committed study records: the three splits, one compact JSON per run, honest statistics.

Every published number in `docs/` is generated from files under `docs/results/records/`,
which are small and committed, so a fresh clone regenerates each report in seconds and a
test can check that the committed report is exactly what its records give. Run folders
(`runs/`, ignored by git) hold checkpoints and logs; a record holds what a reviewer needs
to recompute a cell: the resolved configuration, the versions and machine, the seed, the
metrics after every round, each node's final ledger summary and the wall time.

The splits every study shares (`three_splits`): the dataset's rows -> `test_fraction`
held-out test rows (seed 1) -> of the rest, `validation_fraction` validation rows (seed 2)
-> the pool the clients' rows are drawn from. Every choice (learning rate, rounds, recipe,
a reference's epochs) is made on the validation rows; test rows are scored once per
reported cell.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
from pathlib import Path

from fedtune.system.atomic import atomic_write_json
from fedtune.errors import FedtuneError

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "results" / "records"
MIN_SEEDS = 3  # a reported cell with fewer seeds is marked wherever it is quoted

VERSIONED = ("torch", "opacus", "peft", "transformers", "flwr", "dp-accounting", "opendp")


def write_csv(path: Path, table) -> Path:
    """A `Table` as a text,label CSV (what `data.path` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(table.texts, [str(label) for label in table.labels]))
    return path


def three_splits(dataset: str, work: Path, test_fraction: float = 0.15, validation_fraction: float = 0.15,
                 max_examples: int = 0, unseen_test: bool = False) -> dict[str, Path]:
    """pool.csv, validation.csv and test.csv of a built-in dataset under `work/data/`: the
    same files for every cell and seed of a study (written once, then reused).

    `unseen_test`: drop from the test rows any (text, label) that also occurs among the
    pool or validation rows. Datasets repeat some rows (rotten-tomatoes: 56 of 12,808), and a
    test row a model trained on measures memory, not generalisation."""
    from fedtune.config import build_config
    from fedtune.data.tables import select, subsample, train_val_split
    from simulations.partition import source_table

    folder = work / "data"
    paths = {name: folder / f"{name}.csv" for name in ("pool", "validation", "test")}
    if all(p.exists() for p in paths.values()):
        return paths
    table = source_table(build_config({"data": {"dataset": dataset}}))
    if max_examples:
        table = subsample(table, max_examples, 0)
    rest, test = train_val_split(table, test_fraction, 1)
    pool, validation = train_val_split(rest, validation_fraction, 2)
    if unseen_test:
        seen = set(zip(pool.texts, pool.labels)) | set(zip(validation.texts, validation.labels))
        test = select(test, [i for i, row in enumerate(zip(test.texts, test.labels)) if row not in seen])
    for name, part in (("pool", pool), ("validation", validation), ("test", test)):
        write_csv(paths[name], part)
    return paths


def majority_accuracy(path: Path) -> float:
    """Accuracy of always answering the file's most common label."""
    with open(path, encoding="utf-8") as handle:
        labels = [row["label"] for row in csv.DictReader(handle)]
    return max(labels.count(label) for label in set(labels)) / len(labels)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in VERSIONED}


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def client_ledgers(run_folder: Path) -> list[dict]:
    """Each simulated node's final ledger summary (epsilon, delta, the steps it was charged)."""
    out = []
    for path in sorted((run_folder / "clients").glob("client-*/ledger-*.json")):
        ledger = json.loads(path.read_text(encoding="utf-8"))
        out.append({k: ledger.get(k) for k in ("epsilon", "delta", "history", "distributed") if k in ledger})
    return out


def metrics_rows(run_folder: Path) -> list[dict]:
    path = run_folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_record(folder: Path, name: str, record: dict) -> Path:
    """One run's record, with the versions and machine it ran on."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    atomic_write_json(path, {**record, "versions": versions(), "machine": machine()})
    return path


def read_records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def mean_sd(values: list[float], digits: int = 3) -> str:
    """`mean ± sd (n = k)`; fewer than MIN_SEEDS values are marked, so a single run never
    reads as a result."""
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n = 1, one seed only)"
    text = f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} (n = {len(values)})"
    return text if len(values) >= MIN_SEEDS else text[:-1] + f", fewer than {MIN_SEEDS} seeds)"


def finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


# -- reading records back: a report stops at a damaged record ---------------------------


def shown(path: Path) -> str:
    """A record's path as a reader of the error finds it: relative to the repository."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def missing_field(mapping: dict, fields, prefix: str = "") -> str | None:
    """The first of `fields` the mapping lacks, named as a reader would look for it."""
    for name in fields:
        if not isinstance(mapping, dict) or name not in mapping:
            return prefix + name
    return None


def load_record(path: Path, required) -> dict:
    """One record, or a one-line error naming the file and the first missing field: a
    report rendered from a truncated or hand-edited record must stop, not print a gap."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise FedtuneError(f"{shown(path)}: not a JSON record ({error})") from None
    missing = missing_field(record, required)
    if missing:
        raise field_error(path, missing)
    return record


def field_error(path: Path, field: str) -> FedtuneError:
    """The one line a reader needs: which file, which field, what to do."""
    return FedtuneError(f"{shown(path)}: the record has no field {field!r}; restore the file or re-run the study "
                        "that writes it")


def plain_json(value):
    """Infinities as the text "inf" and NaN as null: plain JSON that any tool reads
    (Python's own `Infinity` is not JSON), and `float()` turns back into numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(item) for item in value]
    return value


def machine_line(records: list[dict]) -> str:
    """The machines the records ran on, one description each (CPU, GPU, library versions)."""
    seen: list[str] = []
    for record in records:
        text = record.get("machine_description") or "; ".join(
            [record["machine"], ", ".join(f"{name} {v}" for name, v in record["versions"].items())])
        if text not in seen:
            seen.append(text)
    return " / ".join(seen)


def provenance_lines(records: list[dict], rerun: str) -> list[str]:
    """What the records are not: runs measured by this code. A record recovered from an
    earlier report says so, and the report repeats it with the command that replaces it."""
    counts: dict[str, int] = {}
    for record in records:
        if record.get("provenance"):
            counts[record["provenance"]] = counts.get(record["provenance"], 0) + 1
    return [f"{'All ' + str(count) if count == len(records) else f'{count} of these {len(records)}'} records were "
            f"{text}. Their numbers are those the earlier report printed (rounded as it printed them), and what it did "
            f"not print is not recorded. `{rerun}` re-runs them and replaces these records with measured ones."
            for text, count in counts.items()]


def report_command(argv, *, name: str, description: str, default_out: str, report_path: Path, run, render) -> int:
    """The command of a study whose report is its records: `run(out)` measures what has no
    record yet (skipped with --report-only), then `render()` writes `report_path`. A user's
    mistake is one line naming it and exit 2."""
    import argparse
    import sys

    from fedtune.system.atomic import atomic_write_text

    parser = argparse.ArgumentParser(prog=f"python -m simulations.{name}", description=description)
    parser.add_argument("--out", default=default_out, help=f"where the runs train (default {default_out})")
    parser.add_argument("--report-only", action="store_true",
                        help=f"only write {shown(report_path)} from the committed records")
    args = parser.parse_args(argv)
    try:
        if not args.report_only:
            run(Path(args.out))
        atomic_write_text(report_path, render())
    except FedtuneError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {shown(report_path)}")
    return 0
