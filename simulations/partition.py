"""Split one dataset among virtual clients with flwr-datasets partitioners.

IID or Dirichlet(alpha) over labels, seeded. Each worker process partitions a dataset
once (cached) and hands a client its rows as a fedtune `Table`.
"""

from __future__ import annotations

from functools import lru_cache

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedtune.config import Config
from fedtune.data import load_table, subsample
from fedtune.datasets_builtin import Table


def _partitioner(kind: str, num_partitions: int, alpha: float, seed: int):
    if kind == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                    min_partition_size=2, self_balancing=True, seed=seed)
    return IidPartitioner(num_partitions=num_partitions)


@lru_cache(maxsize=4)
def _partitioned(config: Config) -> tuple[Table, object]:
    table = subsample(load_table(config.data, config.model.task), config.data.max_examples, config.training.seed)
    labels = [str(x) for x in table.labels] if table.labels else [""] * len(table)
    dataset = Dataset.from_dict({"row": list(range(len(table))), "label": labels})
    fed = config.federation
    partitioner = _partitioner(fed.partitioner, fed.num_clients, fed.dirichlet_alpha, config.training.seed)
    partitioner.dataset = dataset
    return table, partitioner


def client_table(config: Config, partition_id: int) -> Table:
    """Rows of virtual client `partition_id` (0-based)."""
    from fedtune.data import select

    table, partitioner = _partitioned(config)
    rows = partitioner.load_partition(partition_id)["row"]
    return select(table, rows)


def partition_report(config: Config) -> list[dict]:
    """Size and label histogram of every client's partition."""
    report = []
    for pid in range(config.federation.num_clients):
        part = client_table(config, pid)
        histogram: dict[str, int] = {}
        for label in part.labels:
            histogram[str(label)] = histogram.get(str(label), 0) + 1
        report.append({"client": pid, "examples": len(part), "labels": dict(sorted(histogram.items()))})
    return report
