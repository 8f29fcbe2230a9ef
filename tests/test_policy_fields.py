"""The node policy is declared once, in each config field's `opt()` metadata: who decides
the field and why, and the policy key of a field a deployed node sets itself. These tests
fail when a field is left without an owner, when a policy key lands on a field the server
decides, when `fedtune client` lacks a flag for a policy key or describes it out of step
with the field, or when the same policy reads differently from flags and from a file."""

import dataclasses
import re

import pytest

from fedtune.cli import build_parser, main
from fedtune.config import NODE, OWNER_KINDS, SECTIONS, SERVER, WITHIN_POLICY, opt, toml_value
from fedtune.privacy.policy import NODE_CONFIG_KEYS, NODE_KEYS, OWNERS, NodePolicy
from tests.conftest import make_texts, write_csv


def _fields():
    return [(f"{section}.{f.name}", f) for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)]


def test_every_config_field_declares_its_owner_and_why():
    for name, f in _fields():
        assert f.metadata.get("owner") in OWNER_KINDS, name
        assert f.metadata.get("why"), name
    assert list(OWNERS) == [name for name, _ in _fields()]  # every field, in config order (the docs table's)
    assert all(OWNERS[name] == (f.metadata["owner"], f.metadata["why"]) for name, f in _fields())


def test_every_node_key_sets_a_field_the_node_decides():
    declared = {f.metadata["node_key"]: name for name, f in _fields() if f.metadata.get("node_key")}
    assert NODE_CONFIG_KEYS == declared and len(NODE_KEYS) == len(declared)
    for key, name in NODE_CONFIG_KEYS.items():
        assert OWNERS[name][0] in (NODE, WITHIN_POLICY), f"{key} -> {name} is owned by {OWNERS[name][0]!r}"
    # the keys a deployed node cannot do without, and the one the old flag table had left out
    assert {"max-epsilon", "data", "accountant", "metric-loss-clip"} <= set(NODE_CONFIG_KEYS)


def test_opt_refuses_a_policy_it_cannot_honour():
    with pytest.raises(ValueError, match="owner"):
        opt(0, "help", owner="nobody", why="no reason")
    with pytest.raises(ValueError, match="why"):
        opt(0, "help", owner=SERVER, why="")
    with pytest.raises(ValueError, match="node_key"):
        opt(0, "help", owner=SERVER, why="the server's", node_key="batch-size")
    with pytest.raises(ValueError, match="client_help"):
        opt(0, "help", owner=NODE, why="the node's", client_help="no flag without a node_key")
    with pytest.raises(TypeError):  # a flag named apart from its policy key cannot even be declared
        opt(0, "help", owner=NODE, why="the node's", node_key="batch", client_flag="batch-size")


def _client_parser():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return subparsers.choices["client"]


def test_fedtune_client_has_a_flag_for_every_policy_key(capsys):
    with pytest.raises(SystemExit) as done:
        main(["client", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for key in NODE_KEYS:
        assert re.search(rf"--{re.escape(key.flag)}\b", text), key.key
    assert "--metric-loss-clip" in text
    assert "--policy" in text and "--allow-non-private" in text and "--state-dir" in text


def test_client_accountant_help_names_every_accountant():
    from fedtune.privacy import ACCOUNTANTS

    action = next(a for a in _client_parser()._actions if "--accountant" in a.option_strings)
    for name in ACCOUNTANTS:
        assert re.search(rf"\b{re.escape(name)}\b", action.help), f"--accountant help leaves out {name}"


def _policy_values(tmp_path) -> dict:
    """A value for every policy key, none of them the default, the same on flags and in a file."""
    data = write_csv(tmp_path / "ward.csv", make_texts(6), header=("body", "tag"))
    held_out = write_csv(tmp_path / "held-out.csv", make_texts(4, seed=1), header=("body", "tag"))
    (tmp_path / "model").mkdir()
    return {"model": str(tmp_path / "model"), "device": "cpu", "delta": 1e-7, "accountant": "pld",
            "physical-batch-size": 4, "data": str(data), "text-column": "body", "label-column": "tag",
            "prompt-column": "ask", "response-column": "answer", "messages-column": "chat",
            "eval-data": str(held_out), "max-epsilon": 2.5, "budget-dir": str(tmp_path / "budgets"),
            "release-train-loss": "dp", "release-evaluation": "dp", "metric-noise-multiplier": 3.5,
            "metric-loss-clip": 2.5, "require-secure-aggregation": True, "secagg-max-clip": 2.5, "labels": "neg,pos",
            "max-evaluations-per-round": 2, "distributed": True, "distributed-min-contributors": 6,
            "max-unreleased-rounds": 4, "allow-non-private": True}


def test_a_policy_given_by_flags_equals_the_same_policy_in_a_policy_file(tmp_path):
    from clients.commands import client_policy

    values = _policy_values(tmp_path)
    assert set(values) == set(NODE_CONFIG_KEYS) | {"allow-non-private"}  # a new policy key needs a value here
    flag_of = {key.key: key.flag for key in NODE_KEYS} | {"allow-non-private": "allow-non-private"}
    start = ["client", "--superlink", "fl.example.org:9092", "--state-dir", str(tmp_path / "state")]
    by_flags = list(start)
    for key, value in values.items():
        by_flags += [f"--{flag_of[key]}"] if value is True else [f"--{flag_of[key]}", str(value)]
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()), encoding="utf-8")
    parser = build_parser()
    from_flags = client_policy(parser.parse_args(by_flags))
    from_file = client_policy(parser.parse_args(start + ["--policy", str(policy_file)]))
    assert from_flags == from_file
    assert NodePolicy.from_node_config(from_flags) == NodePolicy.from_node_config(from_file)
    own = NodePolicy.from_node_config(from_flags).own
    assert (own.node.metric_loss_clip, own.dp.accountant, own.node.labels) == (2.5, "pld", ("neg", "pos"))
    assert not (tmp_path / "state").exists()


def test_the_deployment_guide_table_is_what_fedtune_privacy_owners_prints(capsys):
    from pathlib import Path

    assert main(["privacy", "owners"]) == 0
    printed = capsys.readouterr().out
    guide = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert printed.startswith("| field | who decides | why |") and printed in guide
    assert printed.count("\n") == len(OWNERS) + 2  # a header, a rule, and one row per field
