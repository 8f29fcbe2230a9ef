"""A record never gets a fresh budget: the epsilon a row has spent follows it into any data
set that holds it. Tried as a hospital's data lives: a week of rows appended to the file,
the file re-exported shuffled under a new name, duplicates removed, a subset taken, two
files merged; each under a new state dir, the way an operator told "new data, new state
dir" would do it. Before budgets followed records, every one of these started at zero.

Each node plans one round (`training.rounds = 1`), so its first training spends its whole
cap: any later training that touches the same rows must be refused."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from clients.node import NodeSetup, train_round
from fedtune.models.adapter_io import adapter_state
from fedtune.privacy import PrivacyLedger, independent_epsilon
from fedtune.privacy.budget import BudgetStore, RecordSet
from fedtune.privacy.policy import NodePolicy, server_request
from fedtune.training.model_cache import MODELS
from tests.conftest import make_texts, tiny_config, write_csv


@pytest.fixture
def site(tiny_bert, tmp_path):
    rows = make_texts(60, seed=4)

    def config(data, rounds=1):
        made = tiny_config(tiny_bert, data, data={"labels": ["neg", "pos"]},
                           training={"epochs": 1, "batch_size": 8, "rounds": rounds})
        return made.replace(node=dataclasses.replace(made.node, budget_dir=str(tmp_path / "budgets")))

    def train(data, state, rounds=1):
        made = config(data, rounds)
        setup = NodeSetup(NodePolicy.from_config(made), tmp_path / state)
        return train_round(setup, server_request(made), adapter_state(MODELS.get(made, 2)[0]), 1)

    return {"rows": rows, "tmp": tmp_path, "train": train, "budgets": tmp_path / "budgets"}


def _ledgers(site) -> list[PrivacyLedger]:
    return [PrivacyLedger.load(p) for p in sorted(site["budgets"].glob("ledger-*.json"))]


def _variant(site, kind: str):
    rows = list(site["rows"])
    if kind == "append":  # next week's rows after this week's
        rows += make_texts(20, seed=77)
    elif kind == "shuffle":  # the same rows re-exported in another order, under another name
        random.Random(1).shuffle(rows)
    elif kind == "dedupe":  # the first file held every row twice; the export removed the copies
        pass
    elif kind == "subset":
        rows = rows[::2]
    return write_csv(site["tmp"] / f"{kind}.csv", rows)


@pytest.mark.parametrize("kind", ["append", "shuffle", "dedupe", "subset"])
def test_rows_already_charged_keep_their_spend_in_any_new_file(site, kind):
    first_rows = site["rows"] * 2 if kind == "dedupe" else site["rows"]
    first = site["train"](write_csv(site["tmp"] / "week-1.csv", first_rows), "state-week-1")
    assert first.status == "ok" and first.epsilon > 7.9  # one planned round spends the cap of 8
    again = site["train"](_variant(site, kind), f"state-{kind}")
    assert again.status == "budget-exhausted" and again.arrays is None, again.message
    [ledger] = _ledgers(site)  # one budget: the new file continued it
    assert ledger.steps == int(first.metrics["steps"])


def test_appended_rows_continue_the_ledger_and_join_it(site):
    """Under a cap that leaves room, the appended file trains on the same ledger, and the new
    rows are registered to it: a file of only the new rows continues it too."""
    first = site["train"](write_csv(site["tmp"] / "week-1.csv", site["rows"]), "state", rounds=4)
    grown = site["train"](_variant(site, "append"), "state", rounds=4)  # the same state dir: no new one needed
    assert first.status == grown.status == "ok"
    [ledger] = _ledgers(site)
    assert ledger.steps == int(first.metrics["steps"]) + int(grown.metrics["steps"])
    assert grown.epsilon == pytest.approx(ledger.epsilon()) and grown.epsilon > first.epsilon
    only_new = site["train"](write_csv(site["tmp"] / "week-2.csv", make_texts(20, seed=77)), "state-2", rounds=4)
    assert only_new.status == "ok" and only_new.epsilon > grown.epsilon and len(_ledgers(site)) == 1


def test_merged_files_carry_the_composition_of_both_budgets(site, tmp_path):
    a_rows, b_rows = site["rows"], make_texts(60, seed=123)
    a = site["train"](write_csv(tmp_path / "a.csv", a_rows), "state-a", rounds=4)
    b = site["train"](write_csv(tmp_path / "b.csv", b_rows), "state-b", rounds=4)
    assert a.status == b.status == "ok"
    before = {ledger.data_fingerprint: ledger for ledger in _ledgers(site)}
    merged_outcome = site["train"](write_csv(tmp_path / "ab.csv", a_rows + b_rows), "state-ab", rounds=4)
    assert merged_outcome.status == "ok"
    ledgers = {ledger.data_fingerprint: ledger for ledger in _ledgers(site)}
    [merged_id] = set(ledgers) - set(before)
    merged = ledgers[merged_id]
    # the merged ledger starts from both histories, then this training
    assert merged.steps == a.ledger.steps + b.ledger.steps + int(merged_outcome.metrics["steps"])
    history = [tuple(entry) for entry in a.ledger.history + b.ledger.history]
    assert independent_epsilon(merged.accountant, merged.history, merged.delta) >= \
        independent_epsilon(merged.accountant, history, merged.delta) > 0
    assert merged_outcome.epsilon > max(a.epsilon, b.epsilon)
    assert {event.get("event") for event in merged.calls} >= {"merged"}
    # the old ledgers are untouched: their other rows (none here) stay with them
    assert all(ledgers[k].steps == before[k].steps for k in before)
    # a's rows now follow the merged ledger: file a alone continues it (its own ledger had room
    # for three more rounds; the merged one, which carries b's spend too, has not)
    again = site["train"](write_csv(tmp_path / "a-again.csv", a_rows), "state-a2", rounds=4)
    assert again.status == "budget-exhausted" and again.epsilon == pytest.approx(merged_outcome.epsilon)
    assert a.ledger.epsilon_after(*a.ledger.history[-1][:2], int(a.metrics["steps"])) <= 8


def test_the_index_keeps_digests_only_and_is_private(site):
    site["train"](write_csv(site["tmp"] / "week-1.csv", site["rows"]), "state", rounds=4)
    index = site["budgets"] / "records.sqlite"
    assert index.stat().st_mode & 0o777 == 0o600
    assert site["rows"][0][0].encode() not in index.read_bytes()
    assert BudgetStore(site["budgets"]).index.count() == len({text for text, _ in site["rows"]})
    journal = next(site["budgets"].glob("ledger-*.journal.jsonl"))
    assert journal.stat().st_mode & 0o777 == 0o600  # like its ledger


def test_a_deleted_ledger_is_caught_by_the_index_alone(site, capsys):
    """Ledger, journal and state dir gone: the index still knows these rows were charged."""
    site["train"](write_csv(site["tmp"] / "week-1.csv", site["rows"]), "state", rounds=4)
    for path in site["budgets"].glob("ledger-*.json*"):
        path.unlink()
    refused = site["train"](write_csv(site["tmp"] / "copy.csv", site["rows"][::-1]), "fresh-state", rounds=4)
    assert refused.status == "node-error" and "ledger needs its operator" in refused.message
    assert "records.sqlite records it" in capsys.readouterr().err
    assert not list(site["budgets"].glob("ledger-*.json"))  # nothing started a new budget


def test_record_sets_ignore_order_and_duplicates():
    texts = ["a", "b", "c"]
    assert RecordSet.of(texts).digests == RecordSet.of(["c", "a", "b", "a"]).digests
    assert RecordSet.of(texts).fingerprint == RecordSet.of(["c", "b", "a"]).fingerprint
    assert json.dumps(sorted(d.hex() for d in RecordSet.of(["a"]).digests))  # digests, never the text
