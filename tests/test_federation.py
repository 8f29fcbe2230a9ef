"""Federated rounds: aggregation math, reply validation, server resume, node ledgers."""

import time
from collections import OrderedDict

import numpy as np
import pytest

from fedtune.federation.aggregate import weighted_mean
from fedtune.federation.server_optimizers import server_optimizer
from fedtune.config import build_config
from fedtune.federation.server import ClientReply, FederationServer, RoundFailedError


def _state(seed, shape=(2, 3)):
    rng = np.random.default_rng(seed)
    return OrderedDict([("a.lora_A.weight", rng.normal(size=shape).astype(np.float32)),
                        ("a.lora_B.weight", rng.normal(size=shape[::-1]).astype(np.float32))])


def test_weighted_mean_equals_hand_computation():
    s1, s2 = _state(1), _state(2)
    mean = weighted_mean([s1, s2], [30, 10])
    for key in s1:
        assert np.allclose(mean[key], (30 * s1[key] + 10 * s2[key]) / 40, atol=1e-7)


def test_ffa_aggregate_of_b_times_shared_a_is_exact():
    """With A shared and frozen, (weighted mean of B_i) @ A == weighted mean of (B_i @ A)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 16))
    bs, weights = [rng.normal(size=(16, 4)) for _ in range(3)], [5, 17, 9]
    aggregated_b = weighted_mean([{"b": b} for b in bs], weights)["b"]
    expected = sum(w * (b @ a) for w, b in zip(weights, bs)) / sum(weights)
    assert np.allclose(aggregated_b @ a, expected, atol=1e-10)
    # ... while averaging A and B separately (plain LoRA) is not exact
    a_s = [rng.normal(size=(4, 16)) for _ in range(3)]
    separate = weighted_mean([{"b": b} for b in bs], weights)["b"] @ weighted_mean([{"a": x} for x in a_s], weights)["a"]
    assert not np.allclose(separate, sum(w * (b @ x) for w, b, x in zip(weights, bs, a_s)) / sum(weights))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda s: s.__setitem__("a.lora_A.weight", np.full((2, 3), np.nan, np.float32)), "non-finite"),
        (lambda s: s.__setitem__("a.lora_A.weight", np.zeros((3, 3), np.float32)), "shape"),
        (lambda s: s.pop("a.lora_B.weight"), "missing tensor"),
        (lambda s: s.__setitem__("a.lora_A.weight", s["a.lora_A.weight"] + 1000), "exceeds the bound"),
        (lambda s: s.__setitem__("a.lora_A.weight", s["a.lora_A.weight"].astype(np.float64)), "dtype"),
        (lambda s: s.__setitem__("extra", np.zeros(1, np.float32)), "unexpected tensor"),
    ],
)
def test_bad_reply_is_rejected_and_round_completes(tmp_path, mutate, reason):
    config = build_config({"federation": {"clients_per_round": 3, "min_clients": 2, "max_update_norm": 50.0},
                           "data": {"labels": ["a", "b"]}})
    reference = _state(0)
    server = FederationServer(config, tmp_path, reference, list(reference))
    bad = OrderedDict((k, v.copy()) for k, v in _state(1).items())
    mutate(bad)
    replies = [ClientReply(1, "ok", _state(1), 10, 1.0), ClientReply(2, "ok", _state(2), 30, 2.0),
               ClientReply(3, "ok", bad, 10, 1.5)]
    record = server.finish_round(1, replies, time.perf_counter(), 0)
    assert [r["node"] for r in record["clients_rejected"]] == [3] and reason in record["clients_rejected"][0]["reason"]
    expected = weighted_mean([_state(1), _state(2)], [10, 30])
    assert all(np.allclose(server.adapter[k], expected[k]) for k in expected)
    assert record["epsilon_max"] == 2.0 and (tmp_path / "metrics.jsonl").exists()


def test_round_fails_loudly_without_enough_valid_replies(tmp_path):
    config = build_config({"federation": {"clients_per_round": 3, "min_clients": 2}})
    reference = _state(0)
    server = FederationServer(config, tmp_path, reference, list(reference))
    replies = [ClientReply(1, "ok", _state(1), 10, 1.0), ClientReply(2, "budget-exhausted", None, 0, 8.0, message="spent"),
               ClientReply(3, "error", message="client error: boom")]
    with pytest.raises(RoundFailedError, match="1 valid replies, need min_clients = 2"):
        server.finish_round(1, replies, time.perf_counter(), 0)


def test_server_killed_after_round_1_resumes_at_round_2(tmp_path):
    config = build_config({"federation": {"clients_per_round": 2, "min_clients": 2, "server_optimizer": "fedadam"}})
    initial = _state(0)
    uninterrupted = FederationServer(config, tmp_path / "a", initial, list(initial))
    crashed = FederationServer.start_or_resume(config, tmp_path / "b", initial, list(initial))
    for server_round, server in [(1, uninterrupted), (1, crashed)]:
        server.finish_round(server_round, [ClientReply(1, "ok", _state(1), 5, 1.0), ClientReply(2, "ok", _state(2), 5, 1.0)], time.perf_counter(), 0)
    del crashed  # the process dies; only the checkpoint remains
    resumed = FederationServer.start_or_resume(config, tmp_path / "b", _state(99), list(initial))
    assert resumed.round_done == 1 and resumed.strategy.optimizer.m
    for server in (uninterrupted, resumed):
        server.finish_round(2, [ClientReply(1, "ok", _state(3), 5, 2.0), ClientReply(2, "ok", _state(4), 5, 2.0)], time.perf_counter(), 0)
    assert all(np.array_equal(uninterrupted.adapter[k], resumed.adapter[k]) for k in initial)
    assert [r["round"] for r in resumed.history] == [1, 2]


def test_fedyogi_and_fedadam_move_towards_the_aggregate():
    reference, target = _state(0), _state(1)
    for kind in ("fedadam", "fedyogi"):
        new = server_optimizer(kind, learning_rate=0.1).apply(reference, target)
        for key in reference:
            moved = new[key] - reference[key]
            assert np.all(np.sign(moved[np.abs(target[key] - reference[key]) > 1e-3]) ==
                          np.sign((target[key] - reference[key])[np.abs(target[key] - reference[key]) > 1e-3]))
