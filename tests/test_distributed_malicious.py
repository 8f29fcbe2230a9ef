"""Distributed DP against a server that lies in the protocol, through the real ClientApp and
Flower's SecAgg+ mod inside it (tests/secagg_script.py plays the server, stage by stage).

A distributed-DP node adds only its share of the noise, calibrated to its own t
(`node.distributed_min_contributors`): its vector is private only inside a masked sum of at
least t such vectors, added exactly. Each test below is a server trying to get less than
that, and the node refusing before anything is charged (no ledger file, no charge in
node.json), except where the protocol aborts after the charge: then the charge stands and
the abandoned round counts against `node.max_unreleased_rounds`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import clients.client_app as client_app
import clients.secagg as secagg
from clients.secagg import CONFIRM_STAGE, SecAggRefusal
from fedtune.models.adapter_io import adapter_state
from fedtune.config import build_config
from fedtune.privacy import PrivacyLedger, ddgauss
from fedtune.privacy.policy import (DISTRIBUTED_FIELD, REQUEST_KEY, SECAGG_CLIP_FIELD, request_text,
                                    server_request)
from fedtune.privacy.releases import TRAIN_RELEASES
from fedtune.training.model_cache import MODELS
from server.secagg import integer_sum
from tests.conftest import delivered, make_texts, node_context, write_csv
from tests.secagg_script import ScriptedRound

NODES = (11, 22, 33, 44)
BITS = 20
HALF, LEVELS, MOD = float(1 << (BITS - 1)), 1 << BITS, 1 << 32  # the exact shift x -> x + 2^(bits-1)
NOISE = 1.0


def _server(tiny_bert, **dp):
    return build_config({"model": {"path": str(tiny_bert), "max_seq_len": 16}, "data": {"labels": ["neg", "pos"]},
                         "training": {"epochs": 1, "batch_size": 8, "rounds": 1},
                         "dp": {"mode": "distributed", "noise_multiplier": NOISE, "distributed_bits": BITS, **dp},
                         "federation": {"secure_aggregation": True, "clients_per_round": 4, "min_clients": 3},
                         "simulation": {"num_clients": 4}})


@pytest.fixture(scope="module")
def federation(tiny_bert, tmp_path_factory):
    server = _server(tiny_bert)
    payload = adapter_state(MODELS.get(server, 2)[0])
    dim = int(sum(v.size for v in payload.values()))
    granularity = ddgauss.choose_granularity(server.dp.max_grad_norm, BITS, dim, len(NODES) * 8, NOISE)
    announced = {"granularity": granularity, "rotation_seed": 7, "keys": list(payload)}
    data = {nid: write_csv(tmp_path_factory.mktemp("rows") / "rows.csv", make_texts(40, seed=nid)) for nid in NODES}
    return {"request": request_text(server_request(server)), "payload": payload, "model": tiny_bert, "data": data,
            "announced": json.dumps(announced),
            "local_request": request_text(server_request(_server(tiny_bert, mode="local")))}


@pytest.fixture
def node_config(federation, tmp_path):
    """Node `nid`'s own config: it joins distributed rounds, trusts t contributors, and
    trains only inside SecAgg+ unless told; `policy` adds or replaces node config keys."""
    def make(nid: int, t: int, **policy) -> dict:
        return {"state-dir": str(tmp_path / f"state-{nid}"), "data": str(federation["data"][nid]),
                "max-epsilon": 8.0, "model": str(federation["model"]), "labels": "neg,pos",
                "budget-dir": str(tmp_path / f"budgets-{nid}"), "require-secure-aggregation": True,
                "distributed": True, "distributed-min-contributors": t, **policy}
    return make


@pytest.fixture
def new_round(federation, node_config):
    """A fresh protocol instance over NODES, each node trusting `t` contributors, the server
    announcing `threshold` and the exact integer quantization of BITS."""
    def make(t: int = 3, threshold: int = 3, **policy) -> ScriptedRound:
        contexts = {nid: node_context(node_config(nid, t, **policy), node_id=nid) for nid in NODES}
        fit_config = {"server-round": 1, REQUEST_KEY: federation["request"], "evaluation": "federated",
                      DISTRIBUTED_FIELD: federation["announced"]}
        return ScriptedRound(client_app.app, contexts, federation["payload"], fit_config, threshold,
                             clipping_range=HALF, target_range=LEVELS, mod_range=MOD)
    return make


@pytest.fixture
def vectors(monkeypatch):
    """Each node's integer vector in [0, 2^bits), by node id, as the node hands it to the mod
    (what must never reach the server unmasked)."""
    seen, real = {}, client_app.distributed_round

    def spy(setup, request, global_arrays, server_round, announced, protocol, *args):
        outcome, vector = real(setup, request, global_arrays, server_round, announced, protocol, *args)
        if vector is not None:
            seen[int(setup.state_dir.name.split("-")[1])] = vector
        return outcome, vector
    monkeypatch.setattr(client_app, "distributed_round", spy)
    return seen


def charged(tmp_path, nid: int) -> int:
    """The steps node `nid`'s ledger holds (0: no ledger file), which node.json must record
    too: a charge shows in both places or in neither."""
    ledgers = list(tmp_path.glob(f"budgets-{nid}/ledger-*.json"))
    info = tmp_path / f"state-{nid}" / "node.json"
    recorded = json.loads(info.read_text()).get("ledgers", {}) if info.exists() else {}
    if not ledgers:
        assert not recorded, recorded
        return 0
    ledger = PrivacyLedger.load(ledgers[0])
    assert recorded == {ledger.data_fingerprint: ledger.steps}
    assert not ledger.history and ledger.distributed  # distributed steps only
    return ledger.steps


def unreleased(tmp_path, nid: int) -> int:
    info = tmp_path / f"state-{nid}" / "node.json"
    return int(json.loads(info.read_text()).get("unreleased_rounds", 0)) if info.exists() else 0


def _keys_shared(round_: ScriptedRound, **setup) -> ScriptedRound:
    round_.setup(**setup)
    round_.share_keys()
    return round_


def test_a_threshold_below_the_nodes_t_is_refused_before_any_charge(new_round, tmp_path):
    """t = 4; the server reconstructs from 3 of 4 shares (2t > n holds, so Flower's mod and
    the node's setup check accept it): a masked sum of 3 nodes would be released, carrying
    3/4 of the noise every node relies on. Each node refuses at collect, uncharged; the same
    nodes at threshold 4 contribute and are charged (the control)."""
    round_ = _keys_shared(new_round(t=4, threshold=3))
    for nid in NODES:
        with pytest.raises(SecAggRefusal, match=r"policy-refused: node.distributed_min_contributors: the secure "
                                                r"aggregation's threshold is 3, below the 4 contributors"):
            round_.collect(nids=[nid])
        assert charged(tmp_path, nid) == 0
    assert not round_.masked
    round_.threshold = 4
    _keys_shared(round_).collect()
    assert set(round_.masked) == set(NODES) and all(charged(tmp_path, nid) == 1 for nid in NODES)


def test_a_cohort_below_the_nodes_t_is_refused_before_any_charge(new_round, tmp_path):
    """The server announces a cohort (sample_num) of 3 to nodes that trust t = 4, with a
    threshold of 4: refused on the cohort, nothing charged."""
    round_ = _keys_shared(new_round(t=4, threshold=4), **{Key.SAMPLE_NUMBER: 3})
    for nid in NODES:
        with pytest.raises(SecAggRefusal, match=r"node.distributed_min_contributors: the cohort has 3 nodes, fewer "
                                                r"than the 4 contributors"):
            round_.collect(nids=[nid])
        assert charged(tmp_path, nid) == 0


def test_a_cohort_claimed_large_at_setup_and_small_later_is_refused_before_any_charge(new_round, tmp_path):
    """Where the cohort shows, and what the node checks there, t = threshold = 4:
    - setup: sample_num (>= t, the node's check) and the threshold (>= t, the node's check);
    - share keys: the neighbours' public keys (>= threshold, Flower's mod's check): a server
      that announced 4 and sends 3 keys is refused there, long before any training;
    - collect: the neighbours' encrypted shares (+ itself >= threshold: Flower's mod checks
      it only after the node's training, so the node checks it first) and each of them
      decrypting, under this instance's pairwise key, to a share from that neighbour for
      this node: a server that forwards fewer, repeats one, or forges one is refused
      before the node's charge;
    - unmask: the active list and the agreeing confirmations (>= threshold; covered by
      tests/test_secagg_malicious.py)."""
    round_ = new_round(t=4, threshold=4)
    round_.setup()  # sample_num 4, share_num 4, threshold 4: everything the node checks at setup holds
    three = [n for n in NODES if n != NODES[-1]]
    with pytest.raises(ValueError, match="Available neighbours number smaller than threshold"):
        round_.send(NODES[0], {Key.STAGE: Stage.SHARE_KEYS, **{str(n): list(round_.keys[n]) for n in three}})

    round_ = _keys_shared(new_round(t=4, threshold=4))
    nid = NODES[0]
    srcs, ciphertexts = round_.forwards[nid]
    assert len(srcs) == 3
    lies = {"fewer": (srcs[:2], ciphertexts[:2]),
            "repeated": ([srcs[0]] * 3, [ciphertexts[0]] * 3),
            "forged": (srcs, [ciphertexts[1], ciphertexts[0], ciphertexts[2]]),
            "unknown": (srcs[:2] + [99], ciphertexts)}
    whys = {"fewer": r"collect: shares from 2 neighbours, fewer than the threshold 4",
            "repeated": rf"collect: shares of nodes \[{srcs[0]}\] forwarded more than once",
            "forged": rf"collect: what was forwarded as node {srcs[0]}'s share is not a share from node {srcs[0]}",
            "unknown": r"collect: what was forwarded as node 99's share is not a share from node 99"}
    for lie, forwarded in lies.items():
        round_.forwards[nid] = forwarded
        with pytest.raises(SecAggRefusal, match=whys[lie]):
            round_.collect(nids=[nid])
        assert charged(tmp_path, nid) == 0, lie
    round_.forwards[nid] = (srcs, ciphertexts)  # the control: the honest forward is charged
    round_.collect(nids=[nid])
    assert charged(tmp_path, nid) == 1


@pytest.mark.parametrize("setup", [
    {Key.CLIPPING_RANGE: 2.0 ** BITS},          # a wider range: x -> x/2 + 2^(bits-1), rounded at random
    {Key.CLIPPING_RANGE: HALF - 0.5},           # a range a hair short: the largest integers clipped
    {Key.TARGET_RANGE: 1 << (BITS + 1)},        # twice the levels: every integer doubled
    {Key.MAX_WEIGHT: 2.0},                      # a weight cap that scales the vector by 1/2 before quantizing
    {Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22},  # the local SecAgg+ quantization: clips to [-8, 8]
    {Key.MOD_RANGE: 3 * 10 ** 9},               # a modulus that is no multiple of 2^bits: the sum wraps wrong
])
def test_a_quantization_that_is_not_the_exact_integer_shift_is_refused_before_any_charge(new_round, tmp_path, setup):
    round_ = _keys_shared(new_round(), **setup)
    for nid in NODES[:2]:
        with pytest.raises(SecAggRefusal, match=rf"policy-refused: dp.distributed_bits: the secure aggregation's "
                                                rf"quantization .* does not carry integers modulo 2\^{BITS} exactly"):
            round_.collect(nids=[nid])
        assert charged(tmp_path, nid) == 0


def test_a_node_that_does_not_join_distributed_rounds_refuses_one_before_any_charge(new_round, tmp_path):
    round_ = _keys_shared(new_round(distributed=False))
    for nid in NODES:
        with pytest.raises(SecAggRefusal, match=r"policy-refused: dp.mode: distributed asked, but this node does not "
                                                r"join distributed-DP rounds"):
            round_.collect(nids=[nid])
        assert charged(tmp_path, nid) == 0


@pytest.mark.parametrize("require_secagg, why", [
    (False, "policy-refused: dp.mode: a distributed-DP step is computed only inside a secure aggregation round"),
    (True, "policy-refused: federation.secure_aggregation: this node trains only in SecAgg+ rounds"),
])
def test_a_plain_message_asking_for_a_distributed_step_is_refused_before_any_charge(federation, node_config, tmp_path,
                                                                                     require_secagg, why):
    """Outside SecAgg+ the node's noise share would reach the server in the clear, with 1/t of
    the noise its guarantee needs."""
    nid = NODES[0]
    context = node_context(node_config(nid, 3, **{"require-secure-aggregation": require_secagg}), node_id=nid)
    reply = client_app.app(delivered("train", 1, federation["request"], federation["payload"], node_id=nid), context)
    assert reply.content["status"]["status"] == "policy-refused"
    assert reply.content["status"]["message"].startswith(why), reply.content["status"]["message"]
    assert "arrays" not in reply.content.array_records
    assert charged(tmp_path, nid) == 0


@pytest.mark.parametrize("announce, request_key, why", [
    (False, "request", r"policy-refused: dp.mode: a distributed-DP step is computed only inside a secure aggregation "
                       r"round that announces its parameters"),  # the node would take the local path
    (True, "local_request", r"policy-refused: dp.mode: this SecAgg\+ round announced distributed-DP parameters but "
                            r"the request's dp.mode is not distributed"),
])
def test_a_secure_round_whose_request_and_announcement_disagree_is_refused_before_any_charge(
        federation, new_round, tmp_path, announce, request_key, why):
    round_ = new_round()
    round_.fit_config[REQUEST_KEY] = federation[request_key]
    if not announce:  # a local SecAgg+ round in every other respect: its declared bound, its quantization
        del round_.fit_config[DISTRIBUTED_FIELD]
        round_.fit_config[SECAGG_CLIP_FIELD] = 4.0
        round_.clipping_range, round_.target_range = 8.0, 1 << 22
    _keys_shared(round_)
    nid = NODES[0]
    with pytest.raises(SecAggRefusal, match=why):
        round_.collect(nids=[nid])
    assert charged(tmp_path, nid) == 0


def test_a_round_aborted_below_t_after_collect_keeps_its_charge_and_counts_as_abandoned(new_round, tmp_path):
    """t = threshold = 3 of 4 nodes. All four mask their vectors (each charged one step),
    then two drop: the two survivors hold confirmations from 2 < 3 nodes and reveal nothing,
    so the server cannot unmask. The charges stand, and each counts in node.json as a round
    that released nothing from before its step (durable: a new setup, a refused setup or a
    new Flower run does not clear it, nor count it twice); past `max-unreleased-rounds` = 1
    the next collect is refused before any charge."""
    round_ = _keys_shared(new_round(**{"max-unreleased-rounds": 1}))
    round_.collect()
    assert all(charged(tmp_path, nid) == 1 for nid in NODES)
    survivors = list(NODES[:2])
    round_.confirm({nid: (list(NODES), []) for nid in survivors})  # the other two never answer again
    shares = {}
    for nid in survivors:
        with pytest.raises(SecAggRefusal, match="2 nodes .* confirmed this survivor set, fewer than the threshold 3"):
            shares.update(round_.unmask(nid, list(NODES), []))
    assert not shares
    assert all(charged(tmp_path, nid) == 1 and unreleased(tmp_path, nid) == 1 for nid in NODES)

    small = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 2, Key.SHARE_NUMBER: 4, Key.THRESHOLD: 3,
             Key.CLIPPING_RANGE: HALF, Key.TARGET_RANGE: LEVELS, Key.MOD_RANGE: MOD, Key.MAX_WEIGHT: 1.0}
    for _ in range(2):  # setups the node refuses: the count stands, never doubled
        for nid in NODES:
            with pytest.raises(SecAggRefusal, match="a secure round of 2 nodes"):
                round_.send(nid, dict(small))
        assert all(unreleased(tmp_path, nid) == 1 for nid in NODES)
    for nid in NODES:  # nor does the old instance's unmask reveal anything once it was counted
        with pytest.raises(SecAggRefusal, match="does not belong to this protocol instance"):
            round_.unmask(nid, list(NODES), [])
    _keys_shared(round_)  # a new instance
    assert all(unreleased(tmp_path, nid) == 1 for nid in NODES)
    for nid in NODES:
        with pytest.raises(SecAggRefusal, match=r"policy-refused: node.max_unreleased_rounds: this node has charged 1 "
                                                r"rounds that released nothing"):
            round_.collect(nids=[nid])
        assert charged(tmp_path, nid) == 1


def test_the_collect_reply_holds_only_the_masked_vector_and_released_scalars(new_round, tmp_path, vectors):
    """What the server gets from a node at collect: its masked vector (uniform modulo 2^32,
    not the node's integers in [0, 2^bits)) and the scalars `fedtune.privacy.releases`
    lists, no tensor. The honest unmask gives back exactly the sum of the four integer
    vectors modulo 2^bits: the vectors compared are the ones that were masked."""
    round_ = _keys_shared(new_round())
    replies = {}
    real_send = round_.send

    def send(nid, configs, content=None):
        reply = real_send(nid, configs, content)
        if configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
            replies[nid] = reply
        return reply
    round_.send = send
    round_.collect()
    assert all(unreleased(tmp_path, nid) == 1 for nid in NODES)  # charged, nothing released yet (on disk)
    assert set(vectors) == set(NODES) and set(replies) == set(NODES)
    for nid in NODES:
        content = replies[nid].content
        assert all(len(record) == 0 for record in content.array_records.values())  # no tensor left unmasked
        vector = vectors[nid]
        assert vector.dtype.kind in "iu" and vector.min() >= 0 and vector.max() < LEVELS
        _, *masked = round_.masked[nid]  # the weight factor first, masked too
        masked = np.concatenate([m.ravel() for m in masked]).astype(np.int64)
        assert masked.shape == vector.shape
        assert np.mean(masked == vector) < 1e-3  # no coordinate left as it was, but by chance
        assert np.mean(masked >= LEVELS) > 0.99 and abs(masked.mean() / MOD - 0.5) < 0.05  # masked: uniform mod 2^32
        # every record the server gets: the masked vector, the released scalars, the weight 1, the status
        assert set(content.config_records) == {RECORD_KEY_CONFIGS, "fitres.metrics", "fitres.status"}
        assert set(content.config_records[RECORD_KEY_CONFIGS]) == {Key.MASKED_PARAMETERS}
        released = dict(content.config_records["fitres.metrics"])
        assert released["status"] == "ok" and set(released) <= set(TRAIN_RELEASES) - {"arrays"}
        assert all(isinstance(v, (str, int, float)) for v in released.values())  # scalars and the ledger's JSON
        assert dict(content.metric_records["fitres.num_examples"]) == {"num_examples": 1}  # the weight, not n
        assert set(content.metric_records) == {"fitres.num_examples"}
    round_.confirm({nid: (list(NODES), []) for nid in NODES})
    shares = {}
    for nid in NODES:
        for owner, got in round_.unmask(nid, list(NODES), []).items():
            shares.setdefault(owner, []).extend(got)
    mean = np.concatenate([m.ravel() for m in round_.unmasked_mean(shares, list(NODES))])
    expected = np.mod(sum(vectors[nid].astype(np.int64) for nid in NODES), LEVELS)
    assert np.array_equal(integer_sum(mean, len(NODES), BITS), expected)
    assert all(unreleased(tmp_path, nid) == 0 for nid in NODES)  # answering unmask released the round


def test_dropouts_below_t_after_collect_halt_the_real_workflow_and_every_charge_stands(tiny_bert, tmp_path,
                                                                                      monkeypatch):
    """The same abort through the real ServerApp and Flower's workflow (in-process engine):
    4 nodes, t = threshold = 3; two stop answering after they masked (at the consistency
    round and at unmask). The survivors reveal nothing, the round fails with its reason, and
    every node's ledger holds its one distributed step: charged, nothing released."""
    from flwr.clientapp import ClientApp

    from fedtune.federation.server import RoundFailedError
    from simulations.run import simulate
    from tests.conftest import tiny_config

    real, dropped = client_app.make_client_app, {2, 3}

    def make_client_app(setup_for):
        inner = real(setup_for)
        app = ClientApp()

        @app.train()
        def train(msg, context):
            stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
            if stage in (CONFIRM_STAGE, Stage.UNMASK) and int(context.node_config["partition-id"]) in dropped:
                raise RuntimeError(f"node drops out at {stage}")
            return inner(msg, context)
        return app
    monkeypatch.setattr(client_app, "make_client_app", make_client_app)
    unmask_refusals, check_unmask = [], secagg._check_unmask

    def spy(configs, context):
        try:
            check_unmask(configs, context)
        except SecAggRefusal as exc:
            unmask_refusals.append((int(context.node_config["partition-id"]), str(exc)))
            raise
        unmask_refusals.append((int(context.node_config["partition-id"]), "revealed"))
    monkeypatch.setattr(secagg, "_check_unmask", spy)
    config = tiny_config(tiny_bert, write_csv(tmp_path / "rows.csv", make_texts(150, seed=4)),
                         training={"rounds": 1, "epochs": 1, "batch_size": 8},
                         dp={"mode": "distributed", "target_epsilon": 8.0},
                         federation={"clients_per_round": 4, "min_clients": 3, "secure_aggregation": True,
                                     "secagg_threshold": 0.75},
                         simulation={"num_clients": 4, "central_holdout": 0.2},
                         node={"distributed_min_contributors": 3})
    run = tmp_path / "run"
    with pytest.raises(RoundFailedError, match="round 1: secure aggregation halted"):
        simulate(config, run, engine="in-process", log=lambda line: None)
    why = "unmask: 2 nodes (this one included) confirmed this survivor set, fewer than the threshold 3"
    assert sorted(unmask_refusals) == [(0, why), (1, why)]  # the survivors: asked, and revealed nothing
    failure, = [json.loads(line) for line in (run / "failures.jsonl").read_text().splitlines()]
    assert failure["round"] == 1 and "secure aggregation halted" in failure["reason"]
    assert not (run / "metrics.jsonl").exists()
    ledgers = [PrivacyLedger.load(p) for p in sorted((run / "clients").glob("client-*/ledger-*.json"))]
    assert len(ledgers) == 4
    assert all(ledger.steps == 1 and len(ledger.distributed) == 1 and not ledger.history for ledger in ledgers)
