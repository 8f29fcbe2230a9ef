"""The strategy seam: each aggregator against a hand computation and against Flower's own
strategies on the same inputs, robust aggregation under attack (a sign flip at the norm
bound, an inflated example count) with the bound the shift must respect, and a new
aggregator registered without touching federation, node or report code."""

import time
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedtune.federation import aggregate as aggregate
from fedtune.federation.cohort import Cohort
from fedtune.config import build_config
from fedtune.federation.server import ClientReply, FederationServer
from fedtune.federation.strategy import Strategy


def _state(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return OrderedDict([("a.lora_A.weight", (rng.normal(size=(2, 3)) * scale).astype(np.float32)),
                        ("a.lora_B.weight", (rng.normal(size=(3, 2)) * scale).astype(np.float32))])


def _config(**federation):
    base = {"clients_per_round": 5, "min_clients": 2, "adaptive_norm_bound": 0.0, "weight_cap": 0.0}
    return build_config({"federation": {**base, **federation}})


def _aggregate(config, reference, replies, server_round=1):
    accepted = Strategy(config).screen(replies, reference).accepted
    cohort = Cohort(len(replies), tuple(r.node_id for r in replies), "fixed", 1.0, float(len(replies)))
    return Strategy(config).aggregate(server_round, reference, accepted, cohort)


def _flower(strategy, reference, replies, server_round=1):
    """The same replies through one of Flower's own Message-API strategies."""
    strategy.current_arrays = {k: v.copy() for k, v in reference.items()}
    messages = []
    for r in replies:
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in r.arrays.items()}),
                              "metrics": MetricRecord({"num-examples": r.num_examples})})
        metadata = Metadata(run_id=1, message_id=f"r{r.node_id}", src_node_id=r.node_id, dst_node_id=0,
                            reply_to_message_id="m", group_id="1", created_at=time.time(), ttl=100, message_type="train")
        messages.append(Message(content=content, metadata=metadata))
    arrays, _ = strategy.aggregate_train(server_round, messages)
    return {k: a.numpy() for k, a in arrays.items()}


REFERENCE = _state(0)
REPLIES = [ClientReply(n, "ok", _state(n), 10 * n, 1.0) for n in range(1, 6)]


def test_mean_median_and_trimmed_mean_by_hand():
    stacked = {k: np.stack([r.arrays[k] - REFERENCE[k] for r in REPLIES]) for k in REFERENCE}
    weights = np.array([r.num_examples for r in REPLIES], float)
    by_hand = {
        "mean": {k: REFERENCE[k] + np.tensordot(weights / weights.sum(), v, axes=1) for k, v in stacked.items()},
        "median": {k: REFERENCE[k] + np.median(v, axis=0) for k, v in stacked.items()},
        "trimmed-mean": {k: REFERENCE[k] + np.sort(v, axis=0)[1:4].mean(axis=0) for k, v in stacked.items()},
    }
    for name, expected in by_hand.items():
        got = _aggregate(_config(aggregator=name, trim_fraction=0.2), REFERENCE, REPLIES)
        assert all(np.allclose(got[k], expected[k], atol=1e-6) for k in REFERENCE), name


def test_aggregators_match_flowers_own_strategies():
    from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

    for name, flower in (("mean", FedAvg()), ("median", FedMedian()), ("trimmed-mean", FedTrimmedAvg(beta=0.2))):
        ours = _aggregate(_config(aggregator=name, trim_fraction=0.2), REFERENCE, REPLIES)
        theirs = _flower(flower, REFERENCE, REPLIES)
        assert all(np.allclose(ours[k], theirs[k], atol=1e-6) for k in REFERENCE), name


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_server_optimizers_match_flowers_over_three_rounds(kind):
    """FedAdam is bias-corrected as Flower's is (eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)));
    FedYogi is not corrected, in both."""
    from flwr.serverapp.strategy import FedAdam, FedYogi

    config = _config(server_optimizer=kind, server_learning_rate=0.1)
    flower = (FedAdam if kind == "fedadam" else FedYogi)(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    strategy = Strategy(config)
    ours, theirs = OrderedDict(REFERENCE), dict(REFERENCE)
    for server_round in (1, 2, 3):
        replies = [ClientReply(n, "ok", _state(10 * server_round + n), 10 * n, 1.0) for n in range(1, 4)]
        cohort = Cohort(3, (1, 2, 3), "fixed", 1.0, 3.0)
        ours = strategy.aggregate(server_round, ours, strategy.screen(replies, ours).accepted, cohort)
        theirs = _flower(flower, theirs, replies, server_round)
        assert all(np.allclose(ours[k], theirs[k], atol=1e-5) for k in REFERENCE), server_round


def test_dp_fedavg_is_clip_then_sum_then_noise_over_the_expected_cohort():
    config = build_config({"federation": {"clients_per_round": 4, "min_clients": 1,
                                          "user_dp_clip": 0.5, "user_dp_noise": 1.3, "population": 8},
                           "dp": {"noise_seed": 4}})
    cohort = Cohort(8, (1, 2, 3), "poisson", 0.5, 4.0)
    got = Strategy(config).aggregate(2, REFERENCE, REPLIES[:3], cohort)
    rng = Strategy(config).randomness.numpy_generator("server", "user-level noise", 2)
    for k in REFERENCE:
        clipped = []
        for r in REPLIES[:3]:
            update = {j: r.arrays[j].astype(np.float64) - REFERENCE[j] for j in REFERENCE}
            size = np.sqrt(sum(np.sum(v ** 2) for v in update.values()))
            clipped.append(update[k] * min(1.0, 0.5 / size))
        noise = rng.normal(0.0, 1.3 * 0.5, size=REFERENCE[k].shape)
        assert np.allclose(got[k], REFERENCE[k] + (sum(clipped) + noise) / 4.0, atol=1e-6)


def test_ffa_payload_sends_b_only_after_round_one():
    config = build_config({"lora": {"ffa": True}})
    travel = ["a.lora_B.weight"]
    strategy = Strategy(config)
    assert list(strategy.payload(1, REFERENCE, travel)) == list(REFERENCE)
    assert list(strategy.payload(2, REFERENCE, travel)) == travel


def _attack(config, honest=4):
    """Honest updates of norm ~2.6 with 100 examples each; one attacker flips the sign of
    the honest mean, scales it to just under max_update_norm (100) and claims 1e9 rows."""
    rng = np.random.default_rng(7)
    reference = OrderedDict([("w", np.zeros(64, np.float32))])
    direction = rng.normal(size=64)
    direction /= np.linalg.norm(direction)
    good = [ClientReply(n, "ok", OrderedDict([("w", (2.6 * direction + 0.3 * rng.normal(size=64)).astype(np.float32))]),
                        100, 1.0) for n in range(1, honest + 1)]
    bad = ClientReply(99, "ok", OrderedDict([("w", (-99.9 * direction).astype(np.float32))]), 10**9, 1.0)
    cohort = Cohort(honest + 1, tuple(range(honest + 1)), "fixed", 1.0, float(honest + 1))
    clean = Strategy(config).aggregate(1, reference, good, cohort)["w"]
    attacked = Strategy(config).aggregate(1, reference, good + [bad], cohort)["w"]
    honest_norm = float(np.linalg.norm(clean))
    median_norm = float(np.median([np.linalg.norm(r.arrays["w"]) for r in good + [bad]]))
    return float(np.linalg.norm(attacked - clean)) / honest_norm, honest_norm, median_norm


def test_a_sign_flip_and_an_inflated_count_move_the_aggregate_no_more_than_the_stated_bound():
    """Undefended, the attacker sets the aggregate alone (shift ~39x the honest update).

    Defended FedAvg (weight_cap c = 4, adaptive_norm_bound r = 3): the attacker weighs at
    most c x the median claim and its update is clipped to r x the median norm, so the
    shift is at most share x (r x median norm + honest mean norm), share = c / (c + honest
    count): here 4 / 8 x (3 x 3.5 + 2.6) / 2.6 = 2.5 honest updates (each honest update has
    norm ~3.5, their mean ~2.6). Median and trimmed mean bound it by the honest spread."""
    undefended, _, _ = _attack(_config(max_update_norm=100.0))
    defended, honest_norm, median_norm = _attack(_config(max_update_norm=100.0, weight_cap=4.0, adaptive_norm_bound=3.0))
    median, _, _ = _attack(_config(max_update_norm=100.0, aggregator="median"))
    trimmed, _, _ = _attack(_config(max_update_norm=100.0, aggregator="trimmed-mean", trim_fraction=0.2))
    assert undefended > 30
    bound = 4 / (4 + 4) * (3 * median_norm + honest_norm) / honest_norm
    assert defended <= bound + 1e-6 and bound < 2.6
    assert median < 0.35 and trimmed < 0.35
    print(f"shift / honest update: undefended {undefended:.1f}, defended mean {defended:.2f}, "
          f"median {median:.2f}, trimmed mean {trimmed:.2f}")


def test_a_new_aggregator_is_one_registry_entry(tmp_path, monkeypatch):
    """Registered here, in a test: no federation, node or report code changes."""
    def largest_norm_dropped(states, weights, **_):
        keep = sorted(states, key=aggregate.norm)[:-1]
        return aggregate.weighted_mean(keep, [1.0] * len(keep))

    monkeypatch.setitem(aggregate.AGGREGATORS, "drop-largest", largest_norm_dropped)
    config = _config(aggregator="drop-largest")
    server = FederationServer(config, tmp_path, REFERENCE, list(REFERENCE))
    record = server.finish_round(1, REPLIES, time.perf_counter(), 0)
    assert len(record["clients_accepted"]) == 5
    largest = max(REPLIES, key=lambda r: aggregate.update_norm(r.arrays, REFERENCE))
    expected = aggregate.weighted_mean([r.arrays for r in REPLIES if r is not largest], [1.0] * 4)
    assert all(np.allclose(server.adapter[k], expected[k], atol=1e-6) for k in REFERENCE)


def test_fedprox_pulls_each_step_towards_the_rounds_global_adapter():
    """FedProx is a request field the nodes apply: after every local step,
    w <- w - lr * mu * (w - w_global), a step that touches no data (privacy-free)."""
    import torch

    from fedtune.training.dp_train import _proximal_step

    config = build_config({"federation": {"proximal_mu": 0.5}, "training": {"learning_rate": 0.1}})
    weights = [torch.nn.Parameter(torch.tensor([1.0, -2.0]))]
    anchors = [torch.tensor([0.0, 0.0])]
    _proximal_step(weights, anchors, config)
    assert torch.allclose(weights[0].detach(), torch.tensor([1.0, -2.0]) * (1 - 0.1 * 0.5))
    untouched = [torch.nn.Parameter(torch.tensor([1.0]))]
    _proximal_step(untouched, [torch.tensor([0.0])], build_config({}))
    assert untouched[0].item() == 1.0


def test_a_secure_round_adds_user_level_noise_to_the_unmasked_sum():
    """SecAgg+ hands the server the mean of k clipped updates; user-level noise goes on the
    sum (k x mean), over the expected cohort, exactly as in the plain DP-FedAvg path."""
    config = build_config({"federation": {"clients_per_round": 4, "min_clients": 1, "population": 8,
                                          "user_dp_clip": 0.5, "user_dp_noise": 1.3, "secure_aggregation": True},
                           "dp": {"noise_seed": 4}})
    mean = OrderedDict((k, np.full(v.shape, 0.01)) for k, v in REFERENCE.items())
    cohort = Cohort(8, (1, 2, 3), "poisson", 0.5, 4.0)
    strategy = Strategy(config)
    got = strategy.aggregate_secure(2, REFERENCE, mean, 3, cohort)
    rng = Strategy(config).randomness.numpy_generator("server", "user-level noise", 2)
    for key in REFERENCE:
        noise = rng.normal(0.0, 1.3 * 0.5, size=REFERENCE[key].shape)
        assert np.allclose(got[key], REFERENCE[key] + (0.03 + noise) / 4.0, atol=1e-6)
    assert strategy.user_ledger.history == [(1.3, 0.5, 1)]


@pytest.mark.parametrize("federation, field", [
    ({"secure_aggregation": True, "aggregator": "median"}, "federation.aggregator"),
    ({"secure_aggregation": True, "user_dp_clip": 1.0, "user_dp_noise": 1.0, "secagg_clip": 2.0, "population": 5},
     "federation.secagg_clip"),
    ({"secure_aggregation": True, "secagg_threshold": 0.0}, "federation.secagg_threshold"),
])
def test_secure_aggregation_settings_that_cannot_work_are_refused(federation, field):
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        build_config({"federation": federation})


def test_a_node_clips_its_own_update_before_masking():
    from clients.secagg import masked_update

    update = {"w": np.full(4, 3.0)}
    clipped = masked_update(update, 1.5)
    assert np.isclose(np.linalg.norm(clipped["w"]), 1.5) and np.allclose(clipped["w"] / clipped["w"][0], 1.0)


def test_a_node_refuses_what_would_expose_its_update():
    """A cohort of 2 (each reads the other off the mean), a threshold of half the shares,
    a non-finite update, a bound the rounding error would exceed."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    from clients.secagg import SecAggRefusal, check_setup, masked_update

    with pytest.raises(SecAggRefusal, match="at least 3"):
        check_setup({Key.SAMPLE_NUMBER: 2, Key.SHARE_NUMBER: 2, Key.THRESHOLD: 2})
    with pytest.raises(SecAggRefusal, match="exceed half"):
        check_setup({Key.SAMPLE_NUMBER: 4, Key.SHARE_NUMBER: 4, Key.THRESHOLD: 2})
    check_setup({Key.SAMPLE_NUMBER: 5, Key.SHARE_NUMBER: 5, Key.THRESHOLD: 3})
    with pytest.raises(SecAggRefusal, match="non-finite"):
        masked_update({"w": np.array([1.0, np.nan])}, 1.0)
    with pytest.raises(SecAggRefusal, match="no room"):
        masked_update({"w": np.ones(100)}, 1e-6, quantum=1e-6)
    clipped = masked_update({"w": np.full(100, 3.0)}, 2.0, quantum=1e-3)
    assert np.linalg.norm(clipped["w"]) <= 2.0 - 1e-3 * 10 + 1e-9  # room left for the rounding


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_round(tiny_bert, tmp_path):
    from clients.client_app import app
    from fedtune.models.adapter_io import adapter_state
    from fedtune.privacy.policy import request_text, server_request
    from fedtune.training.model_cache import MODELS
    from tests.conftest import delivered, make_texts, node_context, write_csv

    data = write_csv(tmp_path / "rows.csv", make_texts(40, seed=1))
    server = build_config({"model": {"path": str(tiny_bert), "max_seq_len": 16}, "data": {"labels": ["neg", "pos"]},
                           "training": {"epochs": 1, "batch_size": 8}})
    node = {"state-dir": str(tmp_path / "state"), "data": str(data), "max-epsilon": 8.0, "labels": "neg,pos",
            "model": str(tiny_bert), "budget-dir": str(tmp_path / "budgets"), "require-secure-aggregation": True}
    arrays = adapter_state(MODELS.get(server, 2)[0])
    reply = app(delivered("train", 1, request_text(server_request(server)), arrays), node_context(node))
    status = dict(reply.content["status"])
    assert status["status"] == "policy-refused" and "SecAgg+" in status["message"] and "arrays" not in reply.content
    assert not (tmp_path / "budgets").exists()
