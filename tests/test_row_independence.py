"""Nothing a node answers without a charge depends on its rows: tried with paired data sets,
D and D plus one row, through the real ClientApp, for every refusal path a server can steer.

Measured before the node checked requests against its policy only: a label list that left
one label out made a node whose data held a row with that label answer node-error (nothing
charged) and a node without it train (charged), so 20 requests told the server whether one
"hiv-positive" row existed; for instruct data, num-examples counted the rows whose answer
fit the requested max_seq_len, so probing lengths read off the length of single answers.

The row count itself is public by design (the FedAvg weight, and the Poisson rate q of every
step): refusals that follow from it (a batch larger than the rows, a delta of 1/n or more)
depend on n alone, which the node releases anyway; D and D plus one row differ in it by one,
and in nothing else."""

from __future__ import annotations

import pytest

from clients.client_app import app
from clients.supernode import resolve_policy
from fedtune.models.adapter_io import adapter_state
from fedtune.config import build_config
from fedtune.errors import FedtuneError
from fedtune.privacy.policy import request_text, server_request
from fedtune.privacy.releases import EVALUATE_RELEASES, TRAIN_RELEASES
from fedtune.training.model_cache import MODELS
from tests.conftest import delivered, make_instruct_rows, make_texts, node_context, write_csv

LABELS = ["neg", "pos", "hiv-positive"]


def _reply(node_config: dict, server, num_labels: int | None = None):
    classes = num_labels or len(server.data.labels) or None
    arrays = adapter_state(MODELS.get(server, classes)[0])
    reply = app(delivered("train", 1, request_text(server_request(server)), arrays), node_context(node_config))
    return dict(reply.content["status"]), dict(reply.content["metrics"])


def _paired(tmp_path, rows, extra_row, header=("text", "label")):
    """D, and D plus one row, each with its own state and budget (two separate nodes)."""
    d = write_csv(tmp_path / "d.csv", rows, header)
    d_plus = write_csv(tmp_path / "d-plus-one.csv", rows + [extra_row], header)
    return d, d_plus


def _node(tmp_path, name, data, model, **policy):
    return {"state-dir": str(tmp_path / f"state-{name}"), "data": str(data), "max-epsilon": 8.0,
            "model": str(model), "budget-dir": str(tmp_path / f"budgets-{name}"), **policy}


def _same_answer(a, b):
    """Status and message identical; numbers identical but for the public row count."""
    (status_a, metrics_a), (status_b, metrics_b) = a, b
    assert status_a["status"] == status_b["status"] and status_a["message"] == status_b["message"]
    return metrics_a, metrics_b


@pytest.mark.parametrize("requested", [["neg", "pos"], ["neg", " pos", "hiv-positive "], LABELS, []])
def test_a_label_list_is_answered_the_same_whether_or_not_a_row_holds_the_label(tiny_bert, tmp_path, requested):
    d, d_plus = _paired(tmp_path, make_texts(40, seed=2), ("the patient record text", "hiv-positive"))
    server = build_config({"model": {"path": str(tiny_bert), "max_seq_len": 16}, "data": {"labels": requested},
                           "training": {"epochs": 1, "batch_size": 8, "rounds": 3}})
    answers = [_reply(_node(tmp_path, name, data, tiny_bert, labels=",".join(LABELS)), server, len(LABELS))
               for name, data in (("d", d), ("d-plus", d_plus))]
    _same_answer(*answers)
    status = answers[0][0]
    if requested not in (LABELS, []):  # leaves out (or misspells) a declared label: refused by the policy alone
        assert status["status"] == "policy-refused" and "data.labels" in status["message"]
    else:  # the node's own list, or one that includes it: both train
        assert status["status"] == "ok"
        assert answers[1][1]["num-examples"] == answers[0][1]["num-examples"] + 1


def test_a_node_without_declared_labels_refuses_classification_whatever_its_rows(tiny_bert, tmp_path):
    d, d_plus = _paired(tmp_path, make_texts(40, seed=2), ("the patient record text", "hiv-positive"))
    server = build_config({"model": {"path": str(tiny_bert), "max_seq_len": 16}, "data": {"labels": ["neg", "pos"]},
                           "training": {"epochs": 1, "batch_size": 8, "rounds": 3}})
    answers = [_reply(_node(tmp_path, name, data, tiny_bert), server) for name, data in (("d", d), ("d-plus", d_plus))]
    _same_answer(*answers)
    assert answers[0][0]["status"] == "policy-refused" and "declares no label set" in answers[0][0]["message"]


def test_rows_outside_the_declared_labels_stop_the_node_at_its_start(tiny_bert, tmp_path):
    """The rows meet the policy once, on the operator's console, before anything is answered."""
    d, d_plus = _paired(tmp_path, make_texts(40, seed=2), ("the patient record text", "hiv-positive"))
    policy = {"max-epsilon": 3.0, "labels": "neg,pos", "model": str(tiny_bert)}
    resolve_policy({}, {**policy, "data": str(d)}, "fedtune client")
    with pytest.raises(FedtuneError, match="unknown label 'hiv-positive'") as caught:
        resolve_policy({}, {**policy, "data": str(d_plus)}, "fedtune client")
    assert "\n" not in str(caught.value) and "d-plus-one.csv" in str(caught.value)


def test_probing_max_seq_len_never_reads_an_answers_length(tiny_chat_llama, tmp_path):
    rows = make_instruct_rows(16, seed=5)
    long_answer = ("classify: a short question", " ".join(["word"] * 60))
    d, d_plus = _paired(tmp_path, rows, long_answer, header=("prompt", "response"))
    counts = {"d": set(), "d-plus": set()}
    for length in (16, 32, 64, 96):
        server = build_config({"model": {"path": str(tiny_chat_llama), "task": "instruct", "max_seq_len": length},
                               "training": {"epochs": 1, "batch_size": 4, "rounds": 8}})
        answers = {name: _reply(_node(tmp_path, f"{name}-{length}", data, tiny_chat_llama), server)
                   for name, data in (("d", d), ("d-plus", d_plus))}
        metrics_d, metrics_plus = _same_answer(answers["d"], answers["d-plus"])
        assert answers["d"][0]["status"] == "ok", answers["d"][0]["message"]
        counts["d"].add(metrics_d["num-examples"])
        counts["d-plus"].add(metrics_plus["num-examples"])
    # one count at every length, and it is the training share of the node's rows (a function of how
    # many rows there are and of the requested validation share, never of their lengths)
    share = server.data.val_fraction
    [n_d], [n_plus] = counts["d"], counts["d-plus"]
    assert (n_d, n_plus) == tuple(n - max(1, round(n * share)) for n in (len(rows), len(rows) + 1)), counts


def test_every_release_is_either_charged_or_says_why_it_is_row_independent():
    for releases in (TRAIN_RELEASES, EVALUATE_RELEASES):
        for key, why in releases.items():
            kind, _, reason = why.partition(": ")
            assert kind in ("charged", "row-independent", "observable") and len(reason) > 30, key
    assert [k for k, why in TRAIN_RELEASES.items() if why.startswith("observable")] == ["train-seconds"]
