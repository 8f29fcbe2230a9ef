"""The server-optimizer registry: one class per optimizer, one entry each, a one-line error
naming the field for an unknown name, state that survives a checkpoint under the array
names old checkpoints used, and the distributed-DP gradient step taken by the optimizer."""

from collections import OrderedDict

import numpy as np
import pytest

from fedtune.config import build_config
from fedtune.errors import ConfigError
from fedtune.federation.cohort import Cohort
from fedtune.federation.server_optimizers import SERVER_OPTIMIZERS, FedAvg, server_optimizer
from fedtune.federation.strategy import ClientReply, Strategy


def _state(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return OrderedDict([("a.lora_A.weight", (rng.normal(size=(2, 3)) * scale).astype(np.float32)),
                        ("a.lora_B.weight", (rng.normal(size=(3, 2)) * scale).astype(np.float32))])


def _rounds(optimizer, reference, first, last):
    """Apply rounds first..last of seeded aggregates; the global after each."""
    for server_round in range(first, last + 1):
        target = OrderedDict((k, reference[k] + _state(100 + server_round, 0.1)[k]) for k in reference)
        reference = optimizer.apply(reference, target, server_round)
    return reference


@pytest.mark.parametrize("name", ["sgd", "FedAdam", ""])
def test_an_unknown_server_optimizer_is_a_one_line_config_error_naming_the_field(name):
    with pytest.raises(ConfigError) as direct:
        server_optimizer(name, 0.1)
    with pytest.raises(ConfigError) as configured:
        build_config({"federation": {"server_optimizer": name}})
    for error in (direct.value, configured.value):
        message = str(error)
        assert message.startswith("federation.server_optimizer = ") and repr(name) in message
        assert all(known in message for known in SERVER_OPTIMIZERS) and "\n" not in message


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_each_optimizer_resumes_from_its_saved_state_exactly(name):
    """Two rounds, save, load into a fresh optimizer: round 3 is the same bit for bit as
    without the interruption, and the arrays keep the names old checkpoints used."""
    uninterrupted = server_optimizer(name, 0.05)
    middle = _rounds(uninterrupted, _state(0), 1, 2)
    saved = {k: np.array(v) for k, v in uninterrupted.state_arrays().items()}
    resumed = server_optimizer(name, 0.05)
    resumed.load_state_arrays(saved)
    assert resumed.state_arrays().keys() == saved.keys()
    after = (_rounds(uninterrupted, middle, 3, 3), _rounds(resumed, middle, 3, 3))
    assert all(np.array_equal(after[0][k], after[1][k]) for k in middle)
    expected = set() if name == "fedavg" else {f"{moment}/{k}" for moment in "mv" for k in middle}
    assert set(saved) == expected


def test_a_fresh_optimizer_differs_from_a_resumed_one():
    """The round-trip test above could pass with state that does nothing: it does not."""
    adam = server_optimizer("fedadam", 0.05)
    middle = _rounds(adam, _state(0), 1, 2)
    fresh = _rounds(server_optimizer("fedadam", 0.05), middle, 3, 3)
    resumed = _rounds(adam, middle, 3, 3)
    assert not all(np.array_equal(fresh[k], resumed[k]) for k in middle)


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_a_gradient_step_is_sgd_for_fedavg_and_a_pseudo_update_for_the_adaptive_ones(name):
    reference, step = _state(0), _state(1, 0.01)
    got = server_optimizer(name, 0.5).apply_gradient_step(reference, step, 2)
    if name == "fedavg":
        expected = OrderedDict((k, (reference[k] + 0.5 * step[k]).astype(np.float32)) for k in reference)
    else:
        target = OrderedDict((k, reference[k] + step[k]) for k in reference)
        expected = server_optimizer(name, 0.5).apply(reference, target, 2)
    assert all(np.array_equal(got[k], expected[k]) and got[k].dtype == np.float32 for k in reference)


def test_a_new_server_optimizer_is_one_registry_entry(monkeypatch):
    """Config validation and the strategy read the same registry: no other code changes."""
    class HalfStep(FedAvg):
        def apply(self, global_state, aggregate, server_round=1):
            return OrderedDict((k, (global_state[k] + 0.5 * (aggregate[k] - global_state[k])).astype(np.float32))
                               for k in global_state)

    monkeypatch.setitem(SERVER_OPTIMIZERS, "half-step", HalfStep)
    config = build_config({"federation": {"server_optimizer": "half-step", "clients_per_round": 2, "min_clients": 1,
                                          "adaptive_norm_bound": 0.0, "weight_cap": 0.0}})
    reference, reply = _state(0), _state(1)
    cohort = Cohort(2, (1,), "fixed", 0.5, 1.0)
    got = Strategy(config).aggregate(1, reference, [ClientReply(1, "ok", reply, 5)], cohort)
    assert all(np.allclose(got[k], (reference[k] + reply[k]) / 2, atol=1e-6) for k in reference)
