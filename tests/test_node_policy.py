"""The node owns its privacy: crafted server messages against a deployed node's real
ClientApp (real Flower messages, real Opacus, a tiny real model). Whatever the server
sends, DP stays on, the cap and delta hold, no path on the node can be named, and a
refused request leaves the ledger byte for byte as it was."""

import json
import math

import pytest

from clients.client_app import app
from fedtune.models.adapter_io import adapter_state
from fedtune.config import build_config
from fedtune.privacy.policy import NodePolicy, PolicyRefusal, ownership_table, request_text, server_request
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.releases import TRAIN_RELEASES
from fedtune.training.model_cache import MODELS
from tests.conftest import delivered, make_texts, node_context, write_csv


@pytest.fixture
def node(tiny_bert, tmp_path):
    """A deployed node's own policy (its node config), and an honest server's config."""
    data = write_csv(tmp_path / "hospital.csv", make_texts(60, seed=3))
    node_config = {"state-dir": str(tmp_path / "state"), "data": str(data), "max-epsilon": 8.0, "labels": "neg,pos",
                   "model": str(tiny_bert), "budget-dir": str(tmp_path / "budgets")}
    server = build_config({"model": {"path": str(tiny_bert), "max_seq_len": 16}, "data": {"labels": ["neg", "pos"]},
                           "training": {"epochs": 1, "batch_size": 8, "rounds": 3}})
    model, _ = MODELS.get(server, 2)
    return {"config": node_config, "server": server, "arrays": adapter_state(model), "budgets": tmp_path / "budgets",
            "state": tmp_path / "state"}


def _train(node, request: dict, server_round: int = 1, node_config: dict | None = None):
    reply = app(delivered("train", server_round, request_text(request), node["arrays"]),
                node_context(node_config or node["config"]))
    return dict(reply.content["status"]), dict(reply.content["metrics"]), reply.content


def _ledger_files(node) -> dict:
    return {p.name: p.read_bytes() for p in sorted(node["budgets"].glob("ledger-*"))}


def test_honest_request_trains_and_the_reply_holds_only_listed_values(node):
    status, metrics, content = _train(node, server_request(node["server"]))
    assert status["status"] == "ok" and "arrays" in content
    assert set(status) | set(metrics) | {"arrays"} <= set(TRAIN_RELEASES)
    assert "train-loss" not in metrics  # the default policy releases no loss
    assert status["noise"] == "noise seeded from OS entropy per call"
    ledger = PrivacyLedger.load(next(node["budgets"].glob("ledger-*.json")))
    assert metrics["epsilon"] == pytest.approx(ledger.epsilon()) and ledger.max_epsilon == 8.0
    assert json.loads(status["ledger"])["history"] == [list(h) for h in ledger.history]


@pytest.mark.parametrize("section, key, value", [
    ("dp", "enabled", False),                       # turn DP off
    ("dp", "target_epsilon", 20.0),                 # a target above the node's cap of 8
    ("dp", "delta", 0.4),                           # a larger delta: less noise, smaller reported epsilon
    ("data", "eval_path", "/etc/passwd"),           # evaluate a file of the server's choosing
    ("data", "path", "/secure/other-ward.csv"),     # train on a file of the server's choosing
    ("model", "path", "/srv/backdoored-model"),     # load a model of the server's choosing
    ("dp", "noise_seed", 0),                        # noise the server could replay
    ("dp", "accountant", "prv"),                    # count epsilon the server's way
    ("node", "max_epsilon", 1000.0),                # raise the cap
    ("node", "release_evaluation", "dp"),           # open a release the node closed
    ("federation", "central_eval_path", "/x.csv"),  # a server-only setting
    ("data", "response_column", "diagnosis"),       # choose which column of the node's file the model learns to emit
    ("data", "messages_column", "chart"),           # ... or which column is read as a conversation
    ("training", "physical_batch_size", 1),         # the node's memory is the node's
    ("nonsense", "key", 1),                         # not a section at all
])
def test_a_request_outside_the_policy_is_refused_and_the_ledger_is_unchanged(node, section, key, value):
    assert _train(node, server_request(node["server"]))[0]["status"] == "ok"  # a ledger exists
    before = _ledger_files(node)
    rounds_before = json.loads((node["state"] / "node.json").read_text())["rounds_trained"]
    crafted = server_request(node["server"])
    crafted.setdefault(section, {})[key] = value
    status, metrics, content = _train(node, crafted, server_round=2)
    assert status["status"] == "policy-refused" and "arrays" not in content
    assert status["message"].startswith(f"policy-refused: {section if section == 'nonsense' else f'{section}.{key}'}")
    assert _ledger_files(node) == before
    assert json.loads((node["state"] / "node.json").read_text())["rounds_trained"] == rounds_before


def test_an_adapter_opacus_cannot_clip_is_refused_before_any_charge(node):
    """A server asking for IA3 under Opacus hooks (which never see IA3's vectors, so they
    would not be clipped per example) is refused, not trained without per-example clipping."""
    assert _train(node, server_request(node["server"]))[0]["status"] == "ok"
    before = _ledger_files(node)
    crafted = server_request(node["server"])
    crafted.setdefault("adapter", {})["method"] = "ia3"
    status, _, content = _train(node, crafted, server_round=2)
    assert status["status"] == "policy-refused" and "arrays" not in content
    assert "dp.grad_sample_mode" in status["message"]
    assert _ledger_files(node) == before


def test_a_node_without_a_cap_refuses_to_train(node, capsys):
    uncapped = {k: v for k, v in node["config"].items() if k != "max-epsilon"}
    status, _, content = _train(node, server_request(node["server"]), node_config=uncapped)
    assert status["status"] == "node-error" and "misconfigured" in status["message"]  # the kind, to the server
    assert "max-epsilon is required" in capsys.readouterr().err                        # the detail, in its log
    assert "arrays" not in content and not node["budgets"].exists()


def test_delta_is_the_nodes_a_stricter_request_is_honoured(node):
    n_rows = 51  # 60 rows, 15% validation split
    own = 1 / (10 * n_rows)
    looser = server_request(node["server"])
    looser["dp"]["delta"] = own * 2
    assert _train(node, looser)[0]["message"].startswith("policy-refused: dp.delta")
    stricter = server_request(node["server"])
    stricter["dp"]["delta"] = 1e-6
    status, metrics, _ = _train(node, stricter)
    assert status["status"] == "ok" and metrics["delta"] == 1e-6
    assert PrivacyLedger.load(next(node["budgets"].glob("ledger-*.json"))).delta == 1e-6


def test_a_lower_target_is_honoured_the_cap_stays_the_nodes(node):
    request = server_request(node["server"])
    request["dp"]["target_epsilon"] = 3.0
    epsilons = [_train(node, request, server_round=r)[1]["epsilon"] for r in (1, 2, 3)]
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 3.0 + 1e-6  # calibrated for the 3 planned rounds
    ledger = PrivacyLedger.load(next(node["budgets"].glob("ledger-*.json")))
    assert ledger.max_epsilon == 8.0  # the cap is the node's, not the request's


def test_non_private_training_only_where_the_node_allows_it(node):
    request = server_request(node["server"])
    request["dp"]["enabled"] = False
    assert _train(node, request)[0]["status"] == "policy-refused"
    allowing = {**node["config"], "allow-non-private": True}
    status, metrics, _ = _train(node, request, node_config=allowing)
    assert status["status"] == "ok" and metrics["private"] == 0 and math.isinf(metrics["epsilon"])


def test_a_malformed_request_is_refused(node):
    from tests.conftest import delivered as message

    reply = app(message("train", 1, "dp = [broken", node["arrays"]), node_context(node["config"]))
    assert dict(reply.content["status"])["message"].startswith("policy-refused: request")


def test_simulation_and_deployment_take_the_same_path(tiny_bert, sentiment_csv):
    """One config drives a virtual client: its policy and its request meet exactly."""
    from tests.conftest import tiny_config

    config = tiny_config(tiny_bert, sentiment_csv, dp={"target_epsilon": 3.0, "delta": 1e-4}, data={"labels": ["neg", "pos"]})
    assert NodePolicy.from_config(config).config_for(server_request(config)) == NodePolicy.from_config(config).own
    with pytest.raises(PolicyRefusal, match="dp.enabled"):
        NodePolicy.from_config(config).config_for({"dp": {"enabled": False}})


def test_every_config_field_has_an_owner():
    table = ownership_table()
    assert {owner for _, owner, _ in table} == {"node", "server", "server, within the node's policy",
                                                 "server alone (never sent to nodes)"}
    owners = {name: owner for name, owner, _ in table}
    for name in ("dp.enabled", "dp.delta", "dp.target_epsilon"):
        assert owners[name] == "server, within the node's policy"
    for name in ("model.path", "data.path", "data.eval_path", "dp.noise_seed", "dp.accountant", "node.max_epsilon"):
        assert owners[name] == "node"


def test_the_deployment_guide_shows_the_ownership_table_of_the_code():
    from pathlib import Path

    from fedtune.privacy.policy import ownership_markdown

    guide = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert ownership_markdown() in guide


def test_flwr_run_simulation_nodes_get_their_setup_from_the_run_not_the_server(tiny_bert, tmp_path):
    """`flwr run` on the local simulation engine: a virtual node's rows and state dir come from
    the run's simulation config, its policy from the node side (tests/test_simulation_policy.py),
    never from a server message; the deployment app there plays a demonstration site that
    takes nothing from the run config either."""
    from clients.client_app import deployment_setup
    from fedtune.privacy.policy import NodePolicy as Policy

    data = write_csv(tmp_path / "rows.csv", make_texts(40, seed=2))
    config = tmp_path / "sim.toml"
    config.write_text(f'[model]\npath = "{tiny_bert}"\nmax_seq_len = 16\n[data]\npath = "{data}"\n'
                      '[federation]\nclients_per_round = 2\nmin_clients = 2\n[simulation]\nnum_clients = 2\n')
    from flwr.app import Context, RecordDict

    context = Context(run_id=1, node_id=9, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                      run_config={"config": str(config), "run-dir": str(tmp_path / "run")})
    # the deployment app on Flower's runtime: a demonstration site whose rows and policy are
    # its own (clients.virtual_node); the run config's data and model never reach it
    demo = deployment_setup(context)
    assert str(data) not in demo.table.source and len(demo.table) == 1112 and demo.policy.own.max_epsilon == 8.0
    assert demo.policy.own.model.path != str(tiny_bert)
    from simulations.run import flwr_run_setup

    setup = flwr_run_setup(context)  # what the ClientApp does inside the engine's Ray actors
    assert setup.state_dir == (tmp_path / "run" / "clients" / "client-00001").resolve()
    assert len(setup.table) == 20 and isinstance(setup.policy, Policy)
    assert setup.policy.own.node.budget_dir == str(setup.state_dir) and setup.policy.own.data.labels == ("neg", "pos")


def test_a_request_cannot_read_rows_back_through_error_messages(node):
    """A server naming labels the node's file does not use is refused by the node's declared
    labels (its policy, not its rows); the reply names no cell of the file."""
    rows = {cell for row in make_texts(60, seed=3) for cell in row}
    request = server_request(node["server"])
    request["data"]["labels"] = ["a", "b"]
    status, _, content = _train(node, request)
    assert status["status"] == "policy-refused" and "data.labels" in status["message"] and "arrays" not in content
    assert not any(cell in status["message"] for cell in rows), status["message"]
    relabel = server_request(node["server"])
    relabel["data"]["label_column"] = "text"  # train on (and echo) the text as if it were a label
    assert _train(node, relabel)[0]["message"].startswith("policy-refused: data.label_column")


def test_the_request_cannot_move_the_delta_through_the_validation_share(node):
    request = server_request(node["server"])
    request["data"]["val_fraction"] = 0.9  # 6 training rows of 60
    request["training"]["batch_size"] = 2
    status, metrics, _ = _train(node, request)
    assert status["status"] == "ok" and metrics["num-examples"] == 6
    assert metrics["delta"] == pytest.approx(1 / (10 * 60))  # every row the budget protects, not the 6


@pytest.mark.parametrize("key, value", [("noise_multiplier", float("inf")), ("target_epsilon", 5e-324)])
def test_values_that_would_hang_the_accountant_are_refused(node, key, value):
    request = server_request(node["server"])
    request["dp"][key] = value
    assert _train(node, request)[0]["message"].startswith(f"policy-refused: dp.{key}")


def test_a_malformed_message_gets_a_status_not_a_traceback(node):
    from flwr.app import ConfigRecord

    message = delivered("train", 1, request_text(server_request(node["server"])), node["arrays"])
    message.content["config"] = ConfigRecord({"server-round": "one", "fedtune-request": "[dp]\n"})
    reply = app(message, node_context(node["config"]))
    assert dict(reply.content["status"])["message"] == "policy-refused: message: malformed (ValueError)"
    del message.content["arrays"]
    assert dict(app(message, node_context(node["config"])).content["status"])["status"] == "policy-refused"
