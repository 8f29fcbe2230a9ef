"""Split one dataset among virtual clients with flwr-datasets partitioners.

IID, Dirichlet(alpha) over labels, natural by a column (one client per value, e.g. a
hospital id or a drug-review condition) and pre-split per-client files (one client per
file, partitioned naturally by file). Seeded. A client's rows are cut when it is first
asked for (flwr-datasets' partitioners cut one partition at a time), so a population costs
its data, not its size. "sampled" is for populations larger than the data (cross-device:
a million phones): each client holds `rows_per_client` rows drawn from the pool by a seed
of its own (the run's seed and its number), so nothing is kept per client at all and a
client's rows are the same whenever, and in whichever process, it is sampled; clients may
share rows, as no real population of that size would, which a study says when it uses it. When `simulation.central_holdout` is set, that
share of the dataset is kept back for the server's central evaluation *before*
partitioning, so no client ever trains on it. Each worker process partitions once (cached).
The settings come from the config's [simulation] table (`simulations.settings`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

from fedtune.config import Config
from fedtune.data.tables import SUPPORTED_SUFFIXES, load_table, read_for_task, select, subsample, train_val_split
from fedtune.data.named import Table, fixed_split
from fedtune.errors import ConfigError, DataError
from simulations.settings import simulation_settings, with_simulation

FILE_COLUMN = "__client_file__"
SAMPLED_STREAM = 0x5A4D  # "sampled" clients' rows: a seed stream of their own (the run's seed, this, the client)


def _client_files(folder: str) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"simulation.client_files = {folder!r}: not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no .csv, .jsonl or .parquet files (one per client expected)")
    return files


@lru_cache(maxsize=4)
def _builtin_split(config: Config) -> tuple[Table, Table] | None:
    """(train rows, fixed held-out rows) of a built-in task that has a fixed split, else None;
    loaded once per config (the partitioner and the held-out set both need it)."""
    if config.data.path or simulation_settings(config).partitioner == "files":
        return None
    return fixed_split(load_table(config.data, config.model.task))


def source_table(config: Config) -> Table:
    """The whole dataset; for pre-split files, their concatenation tagged with the file."""
    sim = simulation_settings(config)
    if sim.partitioner != "files":
        split = _builtin_split(config)  # a built-in instruct task trains on its train rows only
        table = split[0] if split is not None else load_table(config.data, config.model.task)
        return subsample(table, config.data.max_examples, config.training.seed)
    texts, labels, tags = [], [], []
    for number, path in enumerate(_client_files(sim.client_files)):
        part = read_for_task(path, config.data, config.model.task)
        texts += part.texts
        labels += part.labels
        tags += [f"{number:05d}"] * len(part)
    return Table(texts, labels, {FILE_COLUMN: tags}, sim.client_files)


def _partitioner(config: Config, table: Table):
    sim, seed = simulation_settings(config), config.training.seed
    if sim.partitioner == "dirichlet":
        return DirichletPartitioner(num_partitions=sim.num_clients, partition_by="label", alpha=sim.dirichlet_alpha,
                                    min_partition_size=2, self_balancing=True, seed=seed)
    if sim.partitioner in ("natural", "files"):
        return NaturalIdPartitioner(partition_by="group")
    return IidPartitioner(num_partitions=sim.num_clients)


def _group_column(config: Config, table: Table) -> list[str] | None:
    sim = simulation_settings(config)
    column = FILE_COLUMN if sim.partitioner == "files" else sim.partition_column
    if sim.partitioner not in ("natural", "files"):
        return None
    if column not in table.extra:
        raise DataError(f"{table.source}: simulation.partition_column = {column!r} is not a column "
                        f"(columns: {', '.join(table.extra) or 'none besides text and label'})")
    return table.extra[column]


@lru_cache(maxsize=4)
def _partitioned(config: Config) -> tuple[Table, Table | None, object]:
    """(training pool, held-out rows or None, flwr-datasets partitioner; None for "sampled")."""
    table = source_table(config)
    held_out = None
    split = _builtin_split(config)
    holdout = simulation_settings(config).central_holdout
    if split is not None:
        held_out = split[1]  # the task's fixed held-out rows (never trained on) win over central_holdout
    elif holdout > 0:
        table, held_out = train_val_split(table, holdout, config.training.seed + 1)
    sim = simulation_settings(config)
    if sim.partitioner == "sampled":
        if sim.rows_per_client > len(table):
            raise ConfigError(f"simulation.rows_per_client = {sim.rows_per_client}: the training pool of {table.source} "
                              f"has {len(table)} rows (after the held-out share); expected at most {len(table)}")
        return table, held_out, None
    table = _pool_of_size(table, config)
    labels = [str(x) for x in table.labels] if table.labels else [""] * len(table)
    columns = {"row": list(range(len(table))), "label": labels}
    groups = _group_column(config, table)
    if groups is not None:
        columns["group"] = groups
    # flwr-datasets' IidPartitioner cuts contiguous shards: without a seeded shuffle, a
    # dataset stored by label (as most are) would give each "IID" client one or two labels.
    dataset = Dataset.from_dict(columns).shuffle(seed=config.training.seed)
    partitioner = _partitioner(config, table)
    partitioner.dataset = dataset
    return table, held_out, partitioner


def _pool_of_size(table: Table, config: Config) -> Table:
    """The training pool cut to rows_per_client x num_clients rows (seeded), after the
    held-out share was taken: every point of a data-per-client curve scores on the same rows."""
    sim = simulation_settings(config)
    if not sim.rows_per_client:
        return table
    wanted = sim.rows_per_client * sim.num_clients
    if wanted > len(table):
        raise ConfigError(f"simulation.rows_per_client = {sim.rows_per_client}: {sim.num_clients} clients need "
                          f"{wanted} rows, the training pool of {table.source} has {len(table)} (after the held-out "
                          f"share); expected at most {len(table) // sim.num_clients}")
    return subsample(table, wanted, config.training.seed + 2)


def count_partitions(config: Config) -> int:
    """How many clients the configured partitioning yields (natural / files: the data says)."""
    partitioner = _partitioned(config)[2]
    return simulation_settings(config).num_clients if partitioner is None else partitioner.num_partitions


def with_partition_count(config: Config) -> Config:
    """Natural and file partitioning fix the number of clients; set it (and check the cohort)."""
    partitioner = simulation_settings(config).partitioner
    if partitioner not in ("natural", "files"):
        return config
    count = count_partitions(config)
    fed = config.federation
    if fed.clients_per_round > count:
        raise ConfigError(f"federation.clients_per_round = {fed.clients_per_round}: the {partitioner} "
                          f"partitioning yields only {count} clients")
    return with_simulation(config, num_clients=count)


def training_pool(config: Config) -> Table:
    """Every client's rows together (the held-out share excluded): the centralized baseline's data."""
    return _partitioned(config)[0]


@lru_cache(maxsize=4096)
def client_table(config: Config, partition_id: int) -> Table:
    """Rows of virtual client `partition_id` (0-based), cut once per worker process: a
    cross-device population is sampled again and again."""
    table, _, partitioner = _partitioned(config)
    if partitioner is None:  # "sampled": the client's own seeded draw from the pool
        rng = np.random.default_rng([config.training.seed, SAMPLED_STREAM, partition_id])
        rows = np.sort(rng.choice(len(table), size=simulation_settings(config).rows_per_client, replace=False))
    else:
        rows = partitioner.load_partition(partition_id)["row"]
    return select(table, rows)


def smallest_partition(config: Config) -> int:
    """The fewest rows any client holds, without cutting a million partitions where the
    partitioner says it: "sampled" clients all hold rows_per_client, flwr-datasets' IID
    shards differ by at most one row."""
    sim = simulation_settings(config)
    table, _, partitioner = _partitioned(config)
    if partitioner is None:
        return sim.rows_per_client
    if sim.partitioner == "iid":
        return len(table) // sim.num_clients
    return min(len(client_table(config, pid)) for pid in range(count_partitions(config)))


def held_out_table(config: Config) -> Table | None:
    """The server's central evaluation set (None without `simulation.central_holdout`)."""
    return _partitioned(config)[1]


def partition_report(config: Config, limit: int | None = None) -> list[dict]:
    """Size and label histogram of every client's partition (of the first `limit` only,
    when given: a cross-device population is described by a sample, not cut whole)."""
    report = []
    clients = simulation_settings(config).num_clients
    for pid in range(clients if limit is None else min(limit, clients)):
        part = client_table(config, pid)
        histogram: dict[str, int] = {}
        for label in part.labels:
            histogram[str(label)] = histogram.get(str(label), 0) + 1
        report.append({"client": pid, "examples": len(part), "labels": dict(sorted(histogram.items()))})
    return report
