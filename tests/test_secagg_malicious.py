"""SecAgg+ against a server that lies in the protocol, scripted stage by stage against the
real ClientApp and Flower's mod inside it (tests/secagg_script.py plays the server).

The measured attack: at unmask the server lists a target as both active and dropped, each
other node returns both of the target's shares (mask seed and secret key), and the server
strips every mask off the target's update. Against Flower's mod alone it recovered the
target's update to the quantization step; one test below repeats that arithmetic with
shares read off the nodes' state, the others show that no message sequence tried here
makes a node hand them out."""

from __future__ import annotations

import itertools
import json
import re
from collections import OrderedDict

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

from clients.client_app import app
from clients.node import TrainOutcome
from clients.secagg import GUARD_RECORD, SecAggRefusal
from fedtune.models.adapter_io import adapter_state
from fedtune.config import build_config
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.policy import SECAGG_CLIP_FIELD, request_text, server_request
from fedtune.training.model_cache import MODELS
from tests.conftest import make_texts, node_context, write_csv
from tests.secagg_script import CLIPPING_RANGE, TARGET_RANGE, ScriptedRound, fit_config, kinds_revealed

NODES = (11, 22, 33)
TARGET, HONEST, OTHER = NODES
T = 2  # the threshold: 2 of 3 shares (2t > n)
QUANTUM = 2 * CLIPPING_RANGE / TARGET_RANGE


@pytest.fixture(scope="module")
def federation(tiny_bert, tmp_path_factory):
    server = build_config({"model": {"path": str(tiny_bert), "max_seq_len": 16}, "data": {"labels": ["neg", "pos"]},
                           "training": {"epochs": 1, "batch_size": 8, "rounds": 1}})
    data = {nid: write_csv(tmp_path_factory.mktemp("ward") / "rows.csv", make_texts(40, seed=nid)) for nid in NODES}
    return {"request": request_text(server_request(server)), "payload": adapter_state(MODELS.get(server, 2)[0]),
            "model": tiny_bert, "data": data}


@pytest.fixture
def new_round(federation, tmp_path):
    """A fresh protocol instance over nodes that require SecAgg+ (the three of NODES unless
    told; each its own state and budget), with the server's fit config; `policy` adds node
    config keys."""
    def make(clip: float = 4.0, nodes=NODES, threshold=T, **policy) -> ScriptedRound:
        contexts = {nid: node_context({"state-dir": str(tmp_path / f"state-{nid}"),
                                       "data": str(federation["data"].get(nid, federation["data"][TARGET])),
                                       "max-epsilon": 8.0,
                                       "model": str(federation["model"]), "labels": "neg,pos",
                                       "budget-dir": str(tmp_path / f"budgets-{nid}"),
                                       "require-secure-aggregation": True, **policy}, node_id=nid)
                    for nid in nodes}
        return ScriptedRound(app, contexts, federation["payload"], fit_config(federation["request"], clip), threshold)
    return make


@pytest.fixture
def updates(monkeypatch):
    """The clipped update each node hands the mod to mask, by node (what must stay hidden)."""
    import clients.secagg as secagg

    seen, real = {}, secagg.masked_update
    monkeypatch.setattr(secagg, "masked_update", lambda update, bound, quantum=0.0: seen.setdefault(
        len(seen), real(update, bound, quantum)))
    return seen


@pytest.fixture
def quick(monkeypatch, federation):
    """Each node's training replaced by a fixed small update (the protocol, the ClientApp
    and the mod stay real): for tests that run many protocol instances."""
    import clients.client_app as client_app

    def train_round(setup, request, global_arrays, server_round, central=False, deadline=0.0, released_later=False):
        arrays = OrderedDict((k, v + 0.01) for k, v in global_arrays.items())
        return TrainOutcome("ok", arrays, 40, 1.0)
    monkeypatch.setattr(client_app, "train_round", train_round)


def _masked(round_: ScriptedRound) -> ScriptedRound:
    round_.setup()
    round_.share_keys()
    round_.collect()
    return round_


def _everyone_alive(round_: ScriptedRound) -> dict:
    return {nid: (list(NODES), []) for nid in NODES}


def test_an_honest_round_unmasks_the_mean_and_reveals_no_secret_key_share(new_round, updates):
    round_ = new_round()
    shares = round_.honest()
    assert all(kinds_revealed(shares, nid) == {"b": 3, "sk": 0} for nid in NODES)
    mean = round_.unmasked_mean(shares, list(NODES))
    expected = [sum(updates[i][k] for i in range(3)) / 3 for k in round_.payload]
    assert max(float(np.max(np.abs(got - want))) for got, want in zip(mean, expected)) <= QUANTUM
    assert max(float(np.max(np.abs(want))) for want in expected) > 100 * QUANTUM  # not a sum of zeros


def test_given_both_kinds_of_share_the_update_is_recovered(new_round, updates):
    """What the attack did to Flower's mod alone: the target's seed and key shares, here
    read off the other nodes' state, strip its masks to the quantization step. This is the
    arithmetic the refusals below keep a server from doing."""
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState

    round_ = _masked(new_round())
    shares = {TARGET: []}
    for nid in (HONEST, OTHER):
        state = SecAggPlusState(**dict(round_.contexts[nid].state.config_records[RECORD_KEY_STATE]))
        shares[TARGET] += [("b", state.rd_seed_share_dict[TARGET]), ("sk", state.sk1_share_dict[TARGET])]
    recovered = round_.strip_one(TARGET, shares)
    target_update = updates[0]  # the target masked first
    assert max(float(np.max(np.abs(got - target_update[k]))) for got, k in zip(recovered, round_.payload)) <= QUANTUM


@pytest.mark.parametrize("active, dead, why", [
    ([TARGET, HONEST, OTHER], [TARGET], "both active and dropped"),        # the measured attack
    ([TARGET, HONEST, OTHER, 99], [], "not this node's neighbours"),       # an id outside the cohort
    ([TARGET, HONEST, HONEST, OTHER], [], "more than once"),               # a duplicate (two shares of one seed)
    ([HONEST, OTHER], [TARGET, TARGET], "more than once"),
    ([HONEST], [TARGET, OTHER], "fewer than the threshold"),               # too few active
    ([TARGET, OTHER], [HONEST], "active, not dropped"),                    # the node itself dropped
])
@pytest.mark.parametrize("stage", ["survivor set", "unmask"])
def test_lists_that_would_reveal_too_much_are_refused(new_round, active, dead, why, stage):
    """Refused when the server sends them in the consistency round and when it sends them
    at unmask after an honest consistency round; either way nothing comes back."""
    round_ = _masked(new_round())
    if stage == "survivor set":
        with pytest.raises(SecAggRefusal, match=f"survivor set: .*{why}"):
            round_.confirm({HONEST: (active, dead)})
        return
    round_.confirm(_everyone_alive(round_))
    with pytest.raises(SecAggRefusal, match=f"unmask: .*{why}"):
        round_.unmask(HONEST, active, dead)
    assert round_.unmask(HONEST, list(NODES), [])  # the node was not damaged by the refusal: honest lists work


def test_a_second_unmask_asking_the_other_kind_is_refused(new_round):
    round_ = _masked(new_round())
    round_.confirm(_everyone_alive(round_))
    first = round_.unmask(HONEST, list(NODES), [])
    assert kinds_revealed(first, TARGET) == {"b": 1, "sk": 0}
    with pytest.raises(SecAggRefusal, match=rf"already revealed the other kind of share for nodes \[{TARGET}\]"):
        round_.unmask(HONEST, [HONEST, OTHER], [TARGET])


def test_unmask_lists_must_be_the_confirmed_ones(new_round):
    """Confirm "everyone alive", then ask with the target dropped: lists that pass every
    other check are still refused, since the neighbours confirmed other ones."""
    round_ = _masked(new_round())
    round_.confirm(_everyone_alive(round_))
    with pytest.raises(SecAggRefusal, match="differ from the survivor set this node confirmed"):
        round_.unmask(HONEST, [HONEST, OTHER], [TARGET])


def test_no_unmask_without_a_masked_vector_or_a_consistency_round(new_round):
    round_ = new_round()
    round_.setup()
    round_.share_keys()
    round_.collect(nids=[HONEST, OTHER])  # the target never masked
    with pytest.raises(SecAggRefusal, match="sent no masked vector"):
        round_.unmask(TARGET, list(NODES), [])
    with pytest.raises(SecAggRefusal, match="sent no masked vector"):
        round_.confirm({TARGET: (list(NODES), [])})
    with pytest.raises(SecAggRefusal, match="consistency round is missing"):
        round_.unmask(HONEST, list(NODES), [], relay=False)
    round_.confirm({HONEST: (list(NODES), [])})
    with pytest.raises(SecAggRefusal, match="fewer than the threshold"):  # confirmations withheld
        round_.unmask(HONEST, list(NODES), [], relay=False)
    with pytest.raises(SecAggRefusal, match="already confirmed one"):  # one survivor set per instance
        round_.confirm({HONEST: ([HONEST, OTHER], [TARGET])})


def test_a_restart_or_a_repeated_stage_cannot_reach_old_shares(new_round):
    """A second share-keys after masking is refused; a new setup mid-round replaces both
    secrets and every held share (Flower's setup), and this node's record with them, so
    the old instance's shares cannot be asked for any more."""
    round_ = _masked(new_round())
    with pytest.raises(SecAggRefusal, match="past that stage"):
        round_.share_keys()
    instance = round_.contexts[HONEST].state.config_records[GUARD_RECORD]["instance"]
    round_.setup()
    assert round_.contexts[HONEST].state.config_records[GUARD_RECORD]["instance"] != instance
    with pytest.raises(SecAggRefusal, match="sent no masked vector"):
        round_.unmask(HONEST, list(NODES), [])


@pytest.mark.parametrize("clip", [1e30, float("inf"), float("nan"), 0.0, -1.0, 8.5])
def test_a_declared_bound_outside_the_node_policy_is_refused_before_training(new_round, clip, tmp_path):
    round_ = new_round(clip=clip)
    round_.setup()
    round_.share_keys()
    with pytest.raises(SecAggRefusal, match=re.escape(f"secagg-clip = {clip:g} ") + r".*node.secagg_max_clip = 8\]"):
        round_.collect(nids=[HONEST])
    assert not list(tmp_path.glob(f"budgets-{HONEST}/ledger-*"))  # nothing trained, nothing charged


def test_the_node_bound_is_its_own_policy(new_round, tmp_path):
    round_ = new_round(clip=4.0, **{"secagg-max-clip": 2.0})
    round_.setup()
    round_.share_keys()
    with pytest.raises(SecAggRefusal, match=r"secagg-clip = 4 .*node.secagg_max_clip = 2\]"):
        round_.collect(nids=[HONEST])
    round_.fit_config[SECAGG_CLIP_FIELD] = 2.0
    round_.collect()
    assert set(round_.masked) == set(NODES)


def test_different_survivor_sets_to_different_nodes_are_refused(new_round):
    """The target alive for one node, dropped for another: each sees the other's authentic
    confirmation of a different set and refuses; the server holds fewer than t shares of
    the target of either kind."""
    round_ = _masked(new_round())
    round_.confirm({TARGET: (list(NODES), []), HONEST: (list(NODES), []), OTHER: ([HONEST, OTHER], [TARGET])})
    shares = dict(round_.unmask(TARGET, list(NODES), []))
    for nid, (active, dead) in ((HONEST, (list(NODES), [])), (OTHER, ([HONEST, OTHER], [TARGET]))):
        with pytest.raises(SecAggRefusal, match="confirmed a different survivor set"):
            round_.unmask(nid, active, dead)
    got = kinds_revealed(shares, TARGET)
    assert got["b"] < T and got["sk"] < T


def _views(nid: int) -> list[tuple[list[int], list[int]]]:
    """Every survivor set a node's own checks accept in a 3-node round with t = 2: itself
    alive, each other node alive or dropped, at least 2 alive."""
    others = [n for n in NODES if n != nid]
    views = []
    for alive in itertools.product([True, False], repeat=2):
        active = [nid] + [n for n, a in zip(others, alive) if a]
        if len(active) >= T:
            views.append((sorted(active), sorted(n for n, a in zip(others, alive) if not a)))
    return views


def test_no_split_of_survivor_sets_gets_the_server_both_kinds_of_share(new_round, quick):
    """Every way of telling the three nodes survivor sets their own checks accept (27), the
    server relaying to each node only the confirmations that agree with its set (relaying
    a disagreeing one gets a refusal, withholding an agreeing one only lowers the count):
    the nodes that answer all answered with the same set, so the server never holds t
    shares of both kinds for any node, nor of one node's seed and every other's key."""
    for assignment in itertools.product(*(_views(nid) for nid in NODES)):
        views = dict(zip(NODES, assignment))
        round_ = _masked(new_round())
        round_.confirm(views)
        for dst, (srcs, ciphertexts) in list(round_.confirmations.items()):
            agree = [(s, c) for s, c in zip(srcs, ciphertexts) if views[s] == views[dst]]
            round_.confirmations[dst] = ([s for s, _ in agree], [c for _, c in agree])
        shares, answered = {}, []
        for nid in NODES:
            try:
                for owner, got in round_.unmask(nid, *views[nid]).items():
                    shares.setdefault(owner, []).extend(got)
                answered.append(nid)
            except SecAggRefusal:
                pass
        assert len({str(views[nid]) for nid in answered}) <= 1, views  # one survivor set among those answering
        if len({str(view) for view in views.values()}) == 1:
            assert answered == list(NODES)  # an honest server's round still completes
        rebuilt = {nid: {kind for kind, n in kinds_revealed(shares, nid).items() if n >= T} for nid in NODES}
        assert all(kinds != {"b", "sk"} for kinds in rebuilt.values()), views
        for target in NODES:
            stripped = "b" in rebuilt[target] and all("sk" in rebuilt[n] for n in NODES if n != target)
            assert not stripped, (views, target)


def test_five_nodes_told_different_survivor_sets_leak_no_partial_sum(new_round, quick, updates):
    """Five nodes, t = 3. Each node's lists pass its own checks, and together they would
    give the server the seed shares of 11 and 22 and the key shares of 33, 44 and 55: the
    mean of 11's and 22's updates alone, a sum of fewer than t nodes (the control below
    computes it from shares read off the nodes). With the consistency round every node
    sees that no t neighbours confirmed its lists, and answers nothing."""
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState

    five = (11, 22, 33, 44, 55)
    views = {11: ([11, 22, 33], [44, 55]), 22: ([11, 22, 44], [33, 55]), 33: ([11, 22, 33], [44, 55]),
             44: ([11, 22, 44], [33, 55]), 55: ([11, 22, 55], [33, 44])}
    round_ = new_round(nodes=five, threshold=3)
    _masked(round_)
    read = {nid: SecAggPlusState(**dict(round_.contexts[nid].state.config_records[RECORD_KEY_STATE])) for nid in five}
    would = {}  # what Flower's mod alone would have answered to these lists
    for holder, (active, dead) in views.items():
        for owner in active:
            would.setdefault(owner, []).append(("b", read[holder].rd_seed_share_dict[owner]))
        for owner in dead:
            would.setdefault(owner, []).append(("sk", read[holder].sk1_share_dict[owner]))
    leaked = round_.unmasked_mean(would, [11, 22])
    expected = [(updates[0][k] + updates[1][k]) / 2 for k in round_.payload]
    assert max(float(np.max(np.abs(got - want))) for got, want in zip(leaked, expected)) <= QUANTUM

    round_.confirm(views)
    for nid in five:  # every confirmation relayed: a disagreeing one, or too few agreeing ones
        with pytest.raises(SecAggRefusal, match="confirmed a different survivor set|fewer than the threshold 3"):
            round_.unmask(nid, *views[nid])
    round_ = _masked(new_round(nodes=five, threshold=3))
    round_.confirm(views)
    for dst, (srcs, ciphertexts) in list(round_.confirmations.items()):  # only agreeing ones relayed: none
        round_.confirmations[dst] = ([s for s in srcs if views[s] == views[dst]],
                                     [c for s, c in zip(srcs, ciphertexts) if views[s] == views[dst]])
    for nid in five:
        with pytest.raises(SecAggRefusal, match="fewer than the threshold 3"):
            round_.unmask(nid, *views[nid])


def test_the_bound_is_a_key_of_the_node_policy(tmp_path):
    from fedtune.errors import ConfigError
    from fedtune.privacy.policy import NodePolicy

    data = write_csv(tmp_path / "rows.csv", make_texts(4))
    node = {"data": str(data), "max-epsilon": 3.0}
    assert NodePolicy.from_node_config(node).own.node.secagg_max_clip == 8.0
    assert NodePolicy.from_node_config({**node, "secagg-max-clip": 2.5}).own.node.secagg_max_clip == 2.5
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="node.secagg_max_clip"):
            NodePolicy.from_node_config({**node, "secagg-max-clip": bad})


def test_rounds_aborted_after_the_masked_vector_count_against_the_nodes_limit(new_round, tmp_path):
    """A server that collects the masked vectors (each node charged its training) and never
    unmasks, round after round, spends the budget for nothing: the next setup counts the
    abandoned round, and past `max-unreleased-rounds` the node refuses to train."""
    round_ = _masked(new_round(**{"max-unreleased-rounds": 1}))
    charged = {nid: PrivacyLedger.load(next(tmp_path.glob(f"budgets-{nid}/ledger-*.json"))).steps for nid in NODES}
    assert all(steps > 0 for steps in charged.values())
    round_.setup()  # a new instance: the last one was never unmasked
    for nid in NODES:
        assert json.loads((tmp_path / f"state-{nid}" / "node.json").read_text())["unreleased_rounds"] == 1
    round_.share_keys()
    with pytest.raises(SecAggRefusal, match="max_unreleased_rounds = 1"):
        round_.collect(nids=[HONEST])
    assert PrivacyLedger.load(next(tmp_path.glob(f"budgets-{HONEST}/ledger-*.json"))).steps == charged[HONEST]
