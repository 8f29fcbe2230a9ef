"""A registered population that costs nothing until a node is sampled: Flower's real
simulation engine (`run_simulation`) under `lazy_population`, with a million virtual
nodes, and the "sampled" partitioner that gives each of them rows only when asked."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedtune.config import build_config
from fedtune.errors import ConfigError
from simulations.in_process import in_process_engine
from simulations.lazy_population import PopulationLinkState, lazy_population, pending_destinations, register_population
from tests.conftest import make_texts, tiny_config, write_csv

MILLION = 1_000_000


def _state():
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())


def test_registering_a_million_nodes_makes_none_of_them():
    factory = _state()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    mapping = register_population(MILLION, factory)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    state = factory.state()
    assert isinstance(state, PopulationLinkState)
    assert grown < 100_000  # bytes: nothing per node (Flower's registration keeps ~1 KB each)
    assert len(mapping) == MILLION and not state.nodes.made
    first = mapping.ids.start
    assert mapping[first + 123_456] == 123_456 and first + MILLION not in mapping
    assert state.nodes[first + 7].status == "online" and list(state.nodes.made) == [first + 7]


def _counting_apps(picks: int, rounds: int, seen: dict):
    """A ServerApp that sends `picks` nodes a message per round (the same nodes each round)
    and a ClientApp that counts, in its Context, how often it was called."""
    client = ClientApp()

    @client.train()
    def train(message: Message, context: Context) -> Message:
        calls = int(context.state.config_records.get("calls", ConfigRecord({"n": 0}))["n"]) + 1
        context.state.config_records["calls"] = ConfigRecord({"n": calls})
        return Message(RecordDict({"reply": ConfigRecord({"partition": context.node_config["partition-id"],
                                                          "partitions": context.node_config["num-partitions"],
                                                          "calls": calls})}), reply_to=message)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = grid.get_node_ids()
        while not nodes:  # the engine registers its nodes once the server is running
            time.sleep(0.1)
            nodes = grid.get_node_ids()
        seen["registered"] = len(nodes)
        seen["type"] = type(nodes).__name__
        chosen = [nodes[i] for i in (0, 17, len(nodes) - 1)][:picks]
        seen["chosen"] = chosen
        for _ in range(rounds):
            messages = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node,
                                message_type="train") for node in chosen]
            started = time.monotonic()
            replies = list(grid.send_and_receive(messages, timeout=60))
            seen.setdefault("latency", []).append(time.monotonic() - started)
            seen.setdefault("replies", []).append(
                sorted((r.metadata.src_node_id, dict(r.content["reply"])["partition"],
                        dict(r.content["reply"])["partitions"], dict(r.content["reply"])["calls"]) for r in replies))

    return server, client


def test_flowers_engine_runs_a_million_registered_nodes_and_only_the_sampled_ones_exist():
    """Real `run_simulation`: the server sees a million nodes (as a range, not a million
    ints), messages reach the nodes it picked with Flower's node config (partition id =
    position in the range), each node's Context persists across rounds, and a round's
    latency is not the population's (Flower's own loop polls every node ten times a
    second: ~seconds a sweep at this size)."""
    seen: dict = {}
    server, client = _counting_apps(3, 2, seen)
    started = time.monotonic()
    with lazy_population(), in_process_engine():
        run_simulation(server_app=server, client_app=client, num_supernodes=MILLION,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert seen["registered"] == MILLION and seen["type"] == "range"
    first = seen["chosen"][0]
    expected = sorted((node, node - first, MILLION) for node in seen["chosen"])
    assert seen["replies"][0] == [(*e, 1) for e in expected]
    assert seen["replies"][1] == [(*e, 2) for e in expected]  # each node kept its Context
    assert max(seen["latency"]) < 5.0 and time.monotonic() - started < 60


def test_flowers_engine_is_restored_after_the_block():
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api._register_nodes
    with lazy_population():
        assert vce_api._register_nodes is register_population
    assert vce_api._register_nodes is original


def test_the_extractor_asks_only_for_nodes_with_a_message_waiting():
    factory = _state()
    mapping = register_population(1000, factory)
    state = factory.state()
    assert pending_destinations(state, mapping) == []
    assert not state.nodes.made  # looking for pending messages made no node


def _sampled(tmp_path, seed: int = 5, **simulation):
    tmp_path.mkdir(exist_ok=True)
    data = write_csv(tmp_path / "rows.csv", make_texts(200, seed=3))
    return build_config({"data": {"path": str(data)}, "training": {"seed": seed},
                         "simulation": {"num_clients": MILLION, "partitioner": "sampled", "rows_per_client": 6,
                                        "central_holdout": 0.2, **simulation}})


def test_sampled_clients_hold_their_own_seeded_rows_never_the_held_out_ones(tmp_path):
    from simulations.partition import client_table, held_out_table, partition_report, smallest_partition
    from simulations.run import prepare_simulation

    config = prepare_simulation(_sampled(tmp_path))
    held_out = set(held_out_table(config).texts)
    a, b = client_table(config, 999_999), client_table(config, 3)
    assert len(a) == len(b) == 6 and smallest_partition(config) == 6
    assert a.texts != b.texts and not held_out & set(a.texts + b.texts)
    client_table.cache_clear()
    assert client_table(config, 999_999).texts == a.texts  # the seed decides, not the order asked
    again = prepare_simulation(_sampled(tmp_path / "again"))  # another process would read the same
    assert client_table(again, 999_999).texts == a.texts
    other_seed = prepare_simulation(_sampled(tmp_path / "other", seed=6))
    assert client_table(other_seed, 999_999).texts != a.texts
    assert len(partition_report(config, limit=5)) == 5


def test_sampled_partitioner_mistakes_are_one_line_errors(tmp_path):
    from simulations.partition import client_table
    from simulations.run import prepare_simulation

    with pytest.raises(ConfigError, match="simulation.rows_per_client = 0: expected a whole number > 0 with "
                                          "partitioner = 'sampled'"):
        prepare_simulation(_sampled(tmp_path, rows_per_client=0))
    with pytest.raises(ConfigError, match="simulation.rows_per_client = 500: the training pool .* has 160 rows"):
        client_table(prepare_simulation(_sampled(tmp_path, rows_per_client=500)), 0)


def test_fedtune_simulate_with_two_hundred_thousand_registered_clients(tiny_bert, tmp_path):
    """The whole harness: the cohort is drawn from the range, only the sampled clients get
    a state dir, partitions.json describes the first thousand."""
    from simulations.run import simulate

    data = write_csv(tmp_path / "rows.csv", make_texts(200, seed=3))
    config = tiny_config(tiny_bert, data, training={"rounds": 2, "batch_size": 4},
                         federation={"clients_per_round": 3, "min_clients": 3},
                         simulation={"num_clients": 200_000, "partitioner": "sampled", "rows_per_client": 8,
                                     "central_holdout": 0.2})
    lines: list[str] = []
    run = simulate(config, tmp_path / "run", engine="in-process", log=lines.append)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["cohort"]["registered"] for r in records] == [200_000, 200_000]
    sampled = {n for r in records for n in r["clients_accepted"]}
    assert len(sampled) >= 3 and len(list((run / "clients").iterdir())) == len(sampled)
    assert len(json.loads((run / "partitions.json").read_text())) == 1000
    assert any("describes the first 1,000 of 200,000 clients" in line for line in lines)
