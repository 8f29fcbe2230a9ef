"""A server that stops waiting before the node can finish makes the node spend budget for
nothing: the charge is written before the first step (it must be), and nothing is released.
Measured before the node limited it: a round timeout of a millisecond, repeated, took a
node to 0.6 of its cap with nothing released. The node now charges nothing for a round
whose deadline passed before training, and tolerates `node.max_unreleased_rounds` charged
rounds that released nothing, then refuses (policy-refused, nothing charged)."""

from __future__ import annotations

import dataclasses
import json
import time

from clients.node import NodeSetup, train_round
from fedtune.models.adapter_io import adapter_state
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.policy import NodePolicy, server_request
from fedtune.training.model_cache import MODELS
from tests.conftest import make_texts, tiny_config, write_csv


def test_rounds_cut_short_by_the_server_are_limited_by_the_node(tiny_bert, tmp_path):
    data = write_csv(tmp_path / "rows.csv", make_texts(60, seed=4))
    config = tiny_config(tiny_bert, data, data={"labels": ["neg", "pos"]},
                         training={"epochs": 400, "batch_size": 8, "rounds": 50})
    config = config.replace(node=dataclasses.replace(config.node, budget_dir=str(tmp_path / "budgets"),
                                                     max_unreleased_rounds=2))
    setup = NodeSetup(NodePolicy.from_config(config), tmp_path / "state")
    arrays = adapter_state(MODELS.get(config, 2)[0])
    request = server_request(config)
    ledger = lambda: PrivacyLedger.load(next((tmp_path / "budgets").glob("ledger-*.json")))  # noqa: E731
    spent = []
    for server_round in (1, 2):  # the deadline falls inside a round of 400 epochs
        cut = train_round(setup, request, arrays, server_round, deadline=time.time() + 3.0)
        assert cut.status == "node-error" and "deadline" in cut.message and cut.arrays is None
        spent.append(ledger().steps)
    assert 0 < spent[0] < spent[1]  # charged, never refunded
    info = json.loads((tmp_path / "state" / "node.json").read_text())
    assert info["unreleased_rounds"] == 2
    refused = train_round(setup, request, arrays, 3, deadline=time.time() + 3.0)
    assert refused.status == "policy-refused" and "max_unreleased_rounds = 2" in refused.message
    assert ledger().steps == spent[1]  # the refusal cost nothing
    # the operator looked and raised the limit: the node trains again, and a released round
    # does not count
    raised = config.replace(node=dataclasses.replace(config.node, max_unreleased_rounds=3),
                            training=dataclasses.replace(config.training, epochs=1))
    setup = NodeSetup(NodePolicy.from_config(raised), tmp_path / "state")
    assert train_round(setup, server_request(raised), arrays, 4).status == "ok"
    assert json.loads((tmp_path / "state" / "node.json").read_text())["unreleased_rounds"] == 2
