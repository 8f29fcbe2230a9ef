"""The ServerApp waits for federation.min_clients nodes before a round, says what it waits
for (Flower's local simulation starts 2 virtual nodes unless told otherwise), and fails the
round at its timeout before sending anything, rather than training too few nodes."""

from __future__ import annotations

import pytest

import server.server_app as server_app
from fedtune.federation.server import RoundFailedError


class _Grid:
    """The one call the wait makes on Flower's grid: the ids of the connected nodes."""

    def __init__(self, *connected: list[int]):
        self.connected = list(connected)

    def get_node_ids(self) -> list[int]:
        return self.connected.pop(0) if len(self.connected) > 1 else self.connected[0]


def test_the_wait_returns_once_enough_nodes_connected(monkeypatch):
    monkeypatch.setattr(server_app.time, "sleep", lambda _: None)
    said = []
    assert sorted(server_app._wait_for_nodes(_Grid([1], [1, 2], [3, 1, 2]), 3, 60, 1, said.append)) == [1, 2, 3]


def test_too_few_nodes_are_said_then_fail_the_round_before_anything_is_sent(monkeypatch):
    monkeypatch.setattr(server_app, "NODES_HINT_AFTER", 0.0)
    said = []
    with pytest.raises(RoundFailedError) as failed:
        server_app._wait_for_nodes(_Grid([7, 9]), 3, 1.5, 1, said.append)
    assert str(failed.value) == "round 1: 2 node(s) connected in 2 s, federation.min_clients = 3"
    assert said == ["waiting for nodes: 2 connected, federation.min_clients = 3 (on Flower's local simulation "
                    "runtime, start more: flwr run . --federation-config num-supernodes=5)"]
