"""A node's distributed-DP round: one DP-SGD step over the union of the cohort's batches,
of which this node computes its part and adds only its share of the noise.

What the node decides, never the server (`node.distributed`, `node.distributed_min_contributors`):
whether it joins such rounds at all, and t, the fewest contributors it trusts to add their
shares. Its share is calibrated to its own t (variance 1/t of the whole noise,
`fedtune.privacy.ddgauss.DDGaussSpec.local_stddev`), never to the cohort a server
announces, and it refuses a round whose secure aggregation could finish with fewer than t
contributors (`check_protocol`): the SecAgg+ threshold, the cohort, and a quantization
that does not carry its integers exactly, all before anything is charged.

The charge (`fedtune.privacy.ledger.PrivacyLedger.charge_distributed`) is written before the
message is computed: the record's own Poisson rate q = B / n, the noise of t honest shares
over the rounded sensitivity Delta2 (quantization included), one step. A round that
aborts afterwards (fewer than t survivors: the masks are never removed) keeps its charge
and counts against `node.max_unreleased_rounds`: the count is written before the step and
taken back only when the node answers the unmask stage.

One step per round, never several local steps: several steps would release a sum of a
trajectory through the node's own noise-free intermediate models, for which the one-step
guarantee of the distributed mechanism does not hold.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from clients.node import (STATUS_BUDGET_EXHAUSTED, STATUS_OK, NodeSetup, NodeState, TrainOutcome, _check_unreleased,
                          _guarded, _load_global, _node_data)
from fedtune.training.distributed_step import distributed_contribution, flat_dim
from fedtune.errors import BudgetExhaustedError, DeadlinePassedError
from fedtune.privacy import ddgauss_accounting
from fedtune.privacy.ddgauss import DDGaussSpec
from fedtune.privacy.policy import PolicyRefusal
from fedtune.privacy.randomness import Randomness
from fedtune.privacy.spending import OverBudgetError, spend


@dataclass(frozen=True)
class Announced:
    """What the server announces for a distributed round besides the request: the
    granularity gamma, the public rotation seed, and the tensors whose gradient is encoded."""

    granularity: float
    rotation_seed: int
    keys: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Announced":
        try:
            granularity, seed, keys = float(data["granularity"]), int(data["rotation_seed"]), tuple(data["keys"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PolicyRefusal("distributed", f"the round's parameters are malformed ({type(exc).__name__})") from None
        if not (math.isfinite(granularity) and granularity > 0) or not keys or not all(isinstance(k, str) for k in keys):
            raise PolicyRefusal("distributed", "granularity must be a finite number > 0 and keys a list of tensor names")
        return cls(granularity, seed, keys)


@dataclass(frozen=True)
class Protocol:
    """The secure-aggregation parameters this node agreed to at setup (Flower's SecAgg+ state)."""

    cohort: int
    threshold: int
    clipping_range: float
    target_range: int
    mod_range: int
    max_weight: float


def check_protocol(protocol: Protocol, bits: int, t: int) -> None:
    """Refuse, before any charge, a round in which fewer than t noise shares could reach the
    released sum, or whose quantization would not carry this node's integers exactly.

    Flower's SecAgg+ maps x in [-r, r] to (x + r) * R / (2 r), stochastically rounded: with
    r = 2^(bits-1), R = 2^bits and weight 1 that is x + r, exact for integers, and the
    server's mean gives back the integer sum. Any other setting would apply a per-node,
    non-linear function (a clip, a rescale) before the sum: the sum of such functions is not
    post-processing of the noisy sum, so the guarantee would not hold."""
    if protocol.threshold < t:
        raise PolicyRefusal("node.distributed_min_contributors", f"the secure aggregation's threshold is "
                            f"{protocol.threshold}, below the {t} contributors this node's noise share relies on")
    if protocol.cohort < t:
        raise PolicyRefusal("node.distributed_min_contributors", f"the cohort has {protocol.cohort} nodes, fewer than "
                            f"the {t} contributors this node's noise share relies on")
    half = float(1 << (bits - 1))
    exact = (protocol.clipping_range == half and protocol.target_range == 1 << bits and protocol.max_weight == 1.0
             and protocol.mod_range % (1 << bits) == 0)
    if not exact:
        raise PolicyRefusal("dp.distributed_bits", f"the secure aggregation's quantization (range "
                            f"{protocol.clipping_range:g}, levels {protocol.target_range}, modulus {protocol.mod_range}, "
                            f"weight {protocol.max_weight:g}) does not carry integers modulo 2^{bits} exactly")


MAX_ROUNDING_INFLATION = 2.0


def check_granularity(spec: DDGaussSpec) -> None:
    """Refuse a granularity that would waste the node's budget or break its integers: one
    clipped example must fit the modulus (C / gamma <= 2^(bits-1)), else the encoding
    overflows; and rounding may at most double the sensitivity the node is charged for
    (a coarse gamma makes the charge buy mostly rounding noise)."""
    steps_per_clip = spec.clip / spec.granularity
    if steps_per_clip > 1 << (spec.bits - 1):
        raise PolicyRefusal("distributed", f"granularity {spec.granularity:g} puts one clipped example at "
                            f"{steps_per_clip:.3g} integer steps, beyond the modulus 2^{spec.bits}")
    if spec.rounding_inflation > MAX_ROUNDING_INFLATION:
        raise PolicyRefusal("distributed", f"granularity {spec.granularity:g} would make rounding inflate the "
                            f"sensitivity {spec.rounding_inflation:.2f}-fold (at most {MAX_ROUNDING_INFLATION:g})")


def distributed_round(setup: NodeSetup, request: Mapping[str, Any], global_arrays: "dict[str, np.ndarray]",
                      server_round: int, announced: Announced, protocol: Protocol, central_evaluation: bool = True,
                      deadline: float = 0.0) -> tuple[TrainOutcome, np.ndarray | None]:
    """The node's part of one distributed step: (its released scalars, the integer vector
    in [0, 2^bits) that goes into secure aggregation), or a refusal and no vector."""
    holder: list[np.ndarray] = []
    outcome = _guarded(lambda: _distributed(setup, request, global_arrays, server_round, announced, protocol,
                                            central_evaluation, deadline, holder), TrainOutcome)
    return outcome, (holder[0] if holder and outcome.status == STATUS_OK else None)


def _distributed(setup: NodeSetup, request, global_arrays, server_round: int, announced: Announced,
                 protocol: Protocol, central_evaluation: bool, deadline: float, holder: list) -> TrainOutcome:
    config = setup.policy.config_for(request)
    if config.dp.mode != "distributed":
        raise PolicyRefusal("dp.mode", "this SecAgg+ round announced distributed-DP parameters but the request's "
                                       "dp.mode is not distributed")
    if not config.dp.enabled:
        raise PolicyRefusal("dp.enabled", "distributed rounds are private rounds")
    if not config.dp.noise_multiplier > 0:
        raise PolicyRefusal("dp.noise_multiplier", "a distributed round needs the federation's noise multiplier "
                                                   "(every node's share is a part of one noise)")
    t = setup.policy.own.node.distributed_min_contributors
    check_protocol(protocol, config.dp.distributed_bits, t)
    state = NodeState(setup.state_dir)
    randomness = Randomness.from_setting(config.dp.noise_seed)
    label = f"round {server_round} (distributed)"
    with state.locked():
        _check_unreleased(state, config)
        model, data = _node_data(config, setup.table, validation=not central_evaluation)
        try:
            dim = flat_dim(model, list(announced.keys))
        except KeyError:
            raise PolicyRefusal("distributed", "the round names tensors this node's adapter does not train") from None
        spec = DDGaussSpec(clip=config.dp.max_grad_norm, granularity=announced.granularity,
                           bits=config.dp.distributed_bits, contributors=t, noise_multiplier=config.dp.noise_multiplier,
                           dim=dim)
        check_granularity(spec)
        n = len(data.train)
        rate = min(1.0, config.training.batch_size / n)
        steps = ddgauss_accounting.steps_for(spec, rate, 1)
        try:
            with spend(config, data.record_set, setup.policy.delta_for(config, data.records), label,
                       recorded_steps=state.recorded_steps, on_persist=state.record_charge) as spending:
                ledger = spending.ledger
                if not ledger.distributed_fits(steps):
                    raise OverBudgetError(
                        f"privacy budget exhausted: this distributed step would take the epsilon of these records to "
                        f"{ledger.epsilon_after_distributed(steps):.3f}, above their cap {ledger.max_epsilon:g} "
                        f"(already spent {ledger.epsilon():.3f})", ledger)
                _load_global(model, global_arrays, config)
                if deadline and time.time() >= deadline:
                    raise DeadlinePassedError("the round's deadline passed before training started; nothing charged")
                ledger.charge_distributed(steps, label=label, contributors=t, bits=spec.bits, clip=spec.clip,
                                          granularity=spec.granularity, rounding_inflation=spec.rounding_inflation,
                                          local_stddev=spec.local_stddev)
                spending.persist()  # write-ahead: charged before the message exists
                state.record_unreleased(+1)  # in node.json until the node answers unmask (clients.secagg)
                started = time.perf_counter()
                vector, _ = distributed_contribution(
                    model, data.train, config, spec, list(announced.keys), rate, announced.rotation_seed,
                    sampling=randomness.torch_generator("distributed batch", ledger.data_fingerprint, ledger.steps))
                holder.append(vector)
                state.record_round(server_round, trained=True, labels=config.data.labels or None, central=central_evaluation)
                metrics = {"train-seconds": time.perf_counter() - started, "steps": 1,
                           "noise-multiplier": spec.noise_multiplier, "sample-rate": rate, "delta": ledger.delta,
                           "private": 1}
                return TrainOutcome(STATUS_OK, None, n, ledger.epsilon(), metrics, ledger=ledger,
                                    noise="distributed: secret shares (OpenDP, OS entropy)")
        except BudgetExhaustedError as exc:
            ledger = getattr(exc, "ledger", None)
            state.record_round(server_round, trained=False, labels=config.data.labels or None)
            return TrainOutcome(STATUS_BUDGET_EXHAUSTED, epsilon=ledger.epsilon() if ledger else math.nan,
                                message=str(exc), ledger=ledger, noise=randomness.label)
