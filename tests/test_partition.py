"""Partitioning among virtual clients (flwr-datasets) and the server's held-out set."""

import csv

import pytest

from fedtune.config import build_config
from fedtune.errors import ConfigError, DataError
from simulations.partition import client_table, held_out_table, partition_report
from simulations.run import prepare_simulation
from simulations.settings import simulation_settings


def _write(path, rows, header=("text", "label", "site")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture()
def sorted_csv(tmp_path):
    # stored by label, as most datasets are: 60 "a" rows, then 60 "b" rows
    rows = [(f"text {i} alpha", "a", f"site{i % 4}") for i in range(60)] + [(f"text {i} beta", "b", f"site{i % 4}") for i in range(60)]
    return _write(tmp_path / "sorted.csv", rows)


def _config(data, clients_per_round=2, **simulation):
    return build_config({"data": {"path": str(data)},
                         "federation": {"clients_per_round": clients_per_round, "min_clients": 1},
                         "simulation": {"num_clients": 4, **simulation}})


def test_iid_clients_each_hold_both_labels_of_a_sorted_file(sorted_csv):
    config = _config(sorted_csv)
    report = partition_report(config)
    assert [r["examples"] for r in report] == [30, 30, 30, 30]
    for r in report:  # contiguous shards would give clients 0-1 only "a" and 2-3 only "b"
        assert set(r["labels"]) == {"a", "b"} and min(r["labels"].values()) >= 7


def test_partitions_are_seeded_and_disjoint(sorted_csv):
    config = _config(sorted_csv)
    texts = [client_table(config, pid).texts for pid in range(4)]
    assert sum(len(t) for t in texts) == len({x for t in texts for x in t}) == 120
    other_seed = config.replace(training=config.training.__class__(seed=1))
    assert client_table(other_seed, 0).texts != texts[0]


def test_dirichlet_skews_labels(sorted_csv):
    report = partition_report(_config(sorted_csv, partitioner="dirichlet", dirichlet_alpha=0.1))
    shares = [max(r["labels"].values()) / r["examples"] for r in report]
    assert sum(r["examples"] for r in report) == 120 and max(shares) > 0.8


def test_natural_partition_gives_one_client_per_value(sorted_csv):
    config = prepare_simulation(_config(sorted_csv, partitioner="natural", partition_column="site"))
    assert simulation_settings(config).num_clients == 4
    for pid in range(4):
        sites = set(client_table(config, pid).extra["site"])
        assert len(sites) == 1
    with pytest.raises(DataError, match="partition_column = 'hospital'"):
        prepare_simulation(_config(sorted_csv, partitioner="natural", partition_column="hospital"))


def test_pre_split_files_become_clients(tmp_path):
    folder = tmp_path / "clients"
    folder.mkdir()
    for number in range(3):
        _write(folder / f"hospital-{number}.csv", [(f"note {number} {i}", "a" if i % 2 else "b", "") for i in range(10 + number)])
    config = prepare_simulation(_config(tmp_path / "unused.csv", partitioner="files", client_files=str(folder)))
    assert simulation_settings(config).num_clients == 3
    assert config.simulation["num_clients"] == 3  # the resolved table the run records
    sizes = sorted(len(client_table(config, pid)) for pid in range(3))
    assert sizes == [10, 11, 12]
    assert config.data.labels == ("a", "b")
    with pytest.raises(ConfigError, match="clients_per_round = 4"):
        prepare_simulation(_config(tmp_path / "unused.csv", partitioner="files", client_files=str(folder),
                                   num_clients=4, clients_per_round=4))
    with pytest.raises(DataError, match="not a folder"):
        prepare_simulation(_config(tmp_path / "x.csv", partitioner="files", client_files=str(tmp_path / "missing")))


def test_central_holdout_never_reaches_a_client(sorted_csv):
    config = _config(sorted_csv, central_holdout=0.25)
    held = set(held_out_table(config).texts)
    assert len(held) == 30
    clients = {x for pid in range(4) for x in client_table(config, pid).texts}
    assert len(clients) == 90 and not held & clients
    assert held_out_table(_config(sorted_csv)) is None


def test_partition_keys_are_validated():
    with pytest.raises(ConfigError, match="simulation.partition_column"):
        simulation_settings(build_config({"simulation": {"partitioner": "natural"}}))
    with pytest.raises(ConfigError, match="simulation.central_holdout"):
        simulation_settings(build_config({"simulation": {"central_holdout": 1.5}}))
    with pytest.raises(ConfigError, match="simulation.partitioner = 'random': expected one of iid, dirichlet"):
        partition_report(build_config({"simulation": {"partitioner": "random"}}))


def test_rows_per_client_cuts_the_pool_and_keeps_the_held_out_rows(sorted_csv):
    """A data-per-client curve scores every size on the same held-out rows: the held-out
    share is taken before the pool is cut to rows_per_client x num_clients."""
    sizes = {}
    for rows in (0, 10, 20):
        config = _config(sorted_csv, central_holdout=0.2, rows_per_client=rows)
        sizes[rows] = [r["examples"] for r in partition_report(config)]
        held_out = held_out_table(config)
        if rows == 0:
            reference = held_out.texts
        assert held_out.texts == reference
        trained = {text for pid in range(4) for text in client_table(config, pid).texts}
        assert not trained & set(held_out.texts)
    assert sizes == {0: [24, 24, 24, 24], 10: [10, 10, 10, 10], 20: [20, 20, 20, 20]}


def test_rows_per_client_beyond_the_pool_is_a_one_line_error(sorted_csv):
    with pytest.raises(ConfigError, match=r"rows_per_client = 30: 4 clients need 120 rows.*has 96.*at most 24"):
        partition_report(_config(sorted_csv, central_holdout=0.2, rows_per_client=30))
    with pytest.raises(ConfigError, match="simulation.rows_per_client = 5: expected 0 with partitioner = 'natural'"):
        simulation_settings(_config(sorted_csv, partitioner="natural", partition_column="site", rows_per_client=5))
