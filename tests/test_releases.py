"""Every value a node releases is accounted for: the registry is enforced, metrics leave
only as the node's policy allows, DP metric releases are charged to the same ledger
before they leave, and evaluation requests past the per-round limit are refused."""

import json
import math

import pytest

from clients.client_app import app, train_release
from clients.node import TrainOutcome
from fedtune.models.adapter_io import adapter_state
from fedtune.config import build_config
from fedtune.privacy.policy import request_text, server_request
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.releases import EVALUATE_RELEASES, checked
from fedtune.training.model_cache import MODELS
from tests.conftest import delivered, make_texts, node_context, write_csv


@pytest.fixture
def node(tiny_bert, tmp_path):
    data = write_csv(tmp_path / "hospital.csv", make_texts(80, seed=6))
    node_config = {"state-dir": str(tmp_path / "state"), "data": str(data), "max-epsilon": 8.0, "labels": "neg,pos",
                   "model": str(tiny_bert), "budget-dir": str(tmp_path / "budgets"),
                   "release-train-loss": "dp", "release-evaluation": "dp", "max-evaluations-per-round": 1}
    server = build_config({"model": {"path": str(tiny_bert), "max_seq_len": 16}, "data": {"labels": ["neg", "pos"]},
                           "training": {"epochs": 1, "batch_size": 8, "rounds": 2}})
    return {"config": node_config, "request": request_text(server_request(server)),
            "arrays": adapter_state(MODELS.get(server, 2)[0]), "budgets": tmp_path / "budgets"}


def _call(node, kind, server_round):
    reply = app(delivered(kind, server_round, node["request"], node["arrays"]), node_context(node["config"]))
    return dict(reply.content["status"]), dict(reply.content["metrics"])


def _ledger(node) -> PrivacyLedger:
    return PrivacyLedger.load(next(node["budgets"].glob("ledger-*.json")))


def test_a_released_train_loss_is_noised_and_charged_before_it_leaves(node):
    status, metrics = _call(node, "train", 1)
    assert status["status"] == "ok" and 0 <= metrics["train-loss"] <= 5.0
    ledger = _ledger(node)
    sgd, release = ledger.history
    assert release == (5.0, 1.0, 1)  # the Gaussian release, in the same ledger as DP-SGD
    assert metrics["epsilon"] == pytest.approx(ledger.epsilon())
    assert ledger.epsilon() > PrivacyLedger("rdp", ledger.delta, None, [sgd]).epsilon()
    assert json.loads(status["ledger"])["history"] == [list(h) for h in ledger.history]


def _releases(ledger: PrivacyLedger) -> int:
    return sum(steps for _, rate, steps in ledger.history if rate == 1.0)


def test_evaluation_is_charged_and_limited_per_round(node):
    _call(node, "train", 1)
    spent, released = _ledger(node).epsilon(), _releases(_ledger(node))
    status, metrics = _call(node, "evaluate", 1)
    assert status["status"] == "ok" and 0 <= metrics["accuracy"] <= 1 and metrics["num-examples"] == 12
    assert set(status) | set(metrics) <= set(EVALUATE_RELEASES)
    assert _releases(_ledger(node)) == released + 1 and _ledger(node).epsilon() > spent
    again, metrics = _call(node, "evaluate", 1)  # a second request in the same round
    assert again["status"] == "policy-refused" and "limit" in again["message"] and "accuracy" not in metrics
    forged, _ = _call(node, "evaluate", 99)  # a server claiming a new round without training one
    assert forged["status"] == "policy-refused" and _releases(_ledger(node)) == released + 1
    _call(node, "train", 2)
    assert _call(node, "evaluate", 2)[0]["status"] == "ok"


def test_planned_releases_stay_within_the_target(node):
    """The noise is calibrated for DP-SGD and every planned release of the 2 rounds."""
    for server_round in (1, 2):
        assert _call(node, "train", server_round)[0]["status"] == "ok"
        assert _call(node, "evaluate", server_round)[0]["status"] == "ok"
    assert _ledger(node).epsilon() <= 8.0 + 1e-6


def test_evaluation_is_refused_when_the_policy_releases_none(node):
    closed = {**node["config"], "release-evaluation": "off"}
    reply = app(delivered("evaluate", 1, node["request"], node["arrays"]), node_context(closed))
    status, metrics = dict(reply.content["status"]), dict(reply.content["metrics"])
    assert status["status"] == "policy-refused" and "accuracy" not in metrics and not node["budgets"].exists()


def test_an_unlisted_value_cannot_leave():
    with pytest.raises(RuntimeError, match="unlisted values \\['raw-texts'\\]"):
        checked({"status": "ok", "raw-texts": "patient notes"}, EVALUATE_RELEASES, "evaluate")
    outcome = TrainOutcome("ok", metrics={"gradient-norms": 1.0})
    with pytest.raises(RuntimeError, match="gradient-norms"):
        train_release(outcome)
    assert math.isnan(train_release(TrainOutcome("policy-refused"))["epsilon"])


def test_no_evaluation_after_a_round_the_server_declared_central(node):
    """The node planned no evaluation release for a centrally evaluated round: a server that
    says "central" and then asks for federated metrics is refused."""
    reply = app(delivered("train", 1, node["request"], node["arrays"], evaluation="central"), node_context(node["config"]))
    assert dict(reply.content["status"])["status"] == "ok"
    status, metrics = _call(node, "evaluate", 1)
    assert status["status"] == "policy-refused" and "centrally evaluated" in status["message"]
