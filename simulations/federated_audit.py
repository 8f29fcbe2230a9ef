"""Federated audit: canary clients against user-level DP-FedAvg, in a simulation.

The mechanism audited is the server's user-level DP step (`fedtune.federation.strategy.UserLevelDP`:
each node's update clipped to S, Gaussian noise z S on the sum, the fixed denominator,
the user-level ledger), which the harness extends (`AuditedUserLevelDP`) and hands to the
`Strategy` it drives. m canary clients (`fedtune.privacy.canaries.UpdateCanaries`),
each included by a fair coin, join the rounds at the cohort's sampling rate with an
update of S along their own adapter coordinate; the real clients train for real on their
partitions (record-level DP-SGD, as configured), each charged to the budget its records
carry in a budget folder of its own under `node.budget_dir`, as any training. The auditing server scores each canary
by each round's released noisy sum minus the real nodes' clipped sum (1 if it joined, plus
N(0, z^2)), summed as a log likelihood ratio under the planned rate and noise (Andrew et al.,
ICLR 2024, estimate user-level epsilon from such canary clients in one federated run), and
the estimators `fedtune audit` uses (`fedtune.audit.node_audit.canary_finding`: the Steinke
bound, the f-DP one-run bound, the curve test against the planned Poisson-subsampled
Gaussian rounds and the Gaussian DP estimate) read the scores, beside what the user-level
ledger claims and the planned mechanism's tight epsilon. Controls: `noise-off` and
`noise-halved` keep the planned claim while the mechanism leaks (a proof must catch each),
`no-canaries` draws the coins and inserts nothing.

A client's rows are prepared, and its budget entered, when it is first sampled, so a
population of 1,000 users costs only the clients the rounds draw
(`simulations.federated_audit_table` runs the table at 1,000 simulated users).

This drives the core (the same `Strategy`, local training and partitions a Flower
simulation uses) round by round in one process, without Flower's engine: the mechanism
audited lives entirely in the strategy, and a canary client has no data to train on.

    python -m simulations.federated_audit [--config file.toml] [--canaries 1000] [--guesses 200] [--control noise-off]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

from fedtune.models.adapter_io import load_state, trainable_state
from fedtune.audit.node_audit import AuditResult, canary_finding, noise_check, tight_epsilon
from fedtune.training.dp_train import train_call
from fedtune.errors import ConfigError, FedtuneError
from fedtune.training.local import prepare_data, prepare_node
from fedtune.privacy.canaries import UpdateCanaries
from fedtune.privacy.budget import default_budget_dir
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.planning import plan_training
from fedtune.privacy.randomness import Randomness
from fedtune.privacy.spending import spend
from fedtune.federation.aggregate import add_noise
from fedtune.federation.strategy import ClientReply, Strategy, UserLevelDP, charge_user_level
from simulations.partition import client_table, count_partitions


class AuditedUserLevelDP(UserLevelDP):
    """The server's user-level DP step with the audit's canary clients in it: the canaries
    that joined a round are added to the nodes' clipped sum before the noise, and each
    canary is scored by the released sum minus the nodes' clipped sum (which the auditing
    server holds). `leak` is a control: "noise-off" (no noise) or "noise-halved" (half the
    planned noise); the ledger charges what ran (non-private, or the halved multiplier), never
    less, while the audit compares the bound with the planned claim."""

    def __init__(self, ledger: PrivacyLedger, clip: float, noise_multiplier: float, randomness: Randomness,
                 population: int = 0, *, canaries: UpdateCanaries, leak: str = ""):
        super().__init__(ledger, clip, noise_multiplier, randomness, population)
        self.canaries = canaries
        self.planned_noise = noise_multiplier
        self.leak = leak
        if leak == "noise-halved":
            self.noise_multiplier = noise_multiplier / 2  # what runs, and what the ledger charges

    def charge(self, server_round: int, cohort) -> None:
        if self.leak == "noise-off":
            self.ledger.charge_non_private(1, label=f"round {server_round} (noise OFF: audit control)")
        else:
            super().charge(server_round, cohort)

    def noised(self, clipped_sum, reference, cohort, rng):
        noise = 0.0 if self.leak == "noise-off" else self.noise_multiplier
        joined = self.canaries.updates(reference, self.clip, cohort.accounted_rate)
        step = add_noise([clipped_sum] + joined, reference, self.clip, noise, cohort.expected_size, rng)
        # the auditor scores with the planned rate and noise: it does not know the leak
        self.canaries.score({k: v * cohort.expected_size for k, v in step.items()}, clipped_sum, self.clip,
                            cohort.accounted_rate, self.planned_noise)
        return step


CONTROLS = ("noise-off", "noise-halved", "no-canaries")


def audit_user_level(config, canaries: int = 1000, guesses: int = 200, control: str = "", confidence: float = 0.95,
                     echo=print) -> AuditResult:
    """Run the federation of `config` with canary clients and return what the audit proves
    about its user-level DP. `control`: "" (the audit), "noise-off" or "noise-halved" (the
    mechanism leaks while the claim stays the planned one: the audit must flag it) or
    "no-canaries" (coins drawn, nothing inserted)."""
    fed = config.federation
    if fed.user_dp_noise <= 0:
        raise ConfigError("federation.user_dp_noise = 0: user-level DP is off, there is no user-level claim to audit")
    if control and control not in CONTROLS:
        raise ConfigError(f"federated audit control {control!r}: expected one of {', '.join(CONTROLS)}")
    first = prepare_node(config, client_table(config, 0))
    with contextlib.ExitStack() as budgets:  # every client's records keep their budget, as a node's do
        clients = _Clients(config, first, budgets)
        return _audit_rounds(config, clients, canaries, guesses, control, confidence, first, echo)


class _Clients:
    """The federation's clients, each prepared (its rows tokenised, its budget entered) when
    it is first sampled: a population of 1,000 costs only the clients the rounds draw."""

    def __init__(self, config, first, budgets: contextlib.ExitStack):
        self.config, self.budgets, self.tokenizer = config, budgets, first.tokenizer
        self.count = count_partitions(config)
        self.data = {0: first.data}
        self.spendings = {}

    def get(self, node: int):
        """(data, spending) of client `node`."""
        if node not in self.spendings:
            config = self.config
            data = self.data.get(node) or prepare_data(config, self.tokenizer, table=client_table(config, node),
                                                        validation=False)
            self.data[node] = data
            # each client's budget in a folder of its own, as each node keeps its own (a
            # simulation's clients do too): two users may hold the same text, a retweet
            own = config.replace(node=dataclasses.replace(
                config.node, budget_dir=str(Path(config.node.budget_dir or default_budget_dir()) / f"client-{node}")))
            self.spendings[node] = self.budgets.enter_context(spend(
                own, data.record_set, config.dp.resolved_delta(data.records), f"federated audit client {node}",
                plan_at=lambda delta, d=data: plan_training(config, len(d.train), delta=delta),
                steps_to_fit=lambda plan: plan.steps_per_call))
        return self.data[node], self.spendings[node]


def _audit_rounds(config, clients: _Clients, canaries, guesses, control, confidence, first, echo) -> AuditResult:
    """The federation's rounds with the canary clients joined, each client charged to the
    budget its records already carry."""
    fed = config.federation
    model = first.model
    randomness = Randomness.from_setting(config.dp.noise_seed)
    reference = trainable_state(model)
    audited = AuditedUserLevelDP.from_config(
        config, randomness, canaries=UpdateCanaries(reference, canaries, randomness, inject=control != "no-canaries"),
        leak=control if control in ("noise-off", "noise-halved") else "")
    strategy = Strategy(config, user_level=audited)
    echo(f"federated audit{' (control: ' + control + ')' if control else ''}: {clients.count} clients, {canaries} "
         f"canary clients ({int(audited.canaries.included.sum())} included), {guesses} guesses, "
         f"{config.training.rounds} rounds, user-level clip {fed.user_dp_clip} noise {fed.user_dp_noise}")
    for server_round in range(1, config.training.rounds + 1):
        cohort = strategy.cohort(range(clients.count), server_round)
        replies = []
        for node in cohort.sampled:
            data, spending = clients.get(node)
            load_state(model, reference, partial=True)
            plan = plan_training(config, len(data.train), delta=spending.ledger.delta)
            train_call(model, data.train, config, plan, spending.ledger, spending.persist,
                       label=f"federated audit round {server_round}", randomness=randomness)
            replies.append(ClientReply(node, "ok", trainable_state(model), len(data.train)))
        reference = strategy.aggregate(server_round, reference, replies, cohort)
        echo(f"  round {server_round}: {len(cohort.sampled)} clients")
    included = audited.canaries.included
    delta = strategy.user_ledger.delta
    # the claim is the planned mechanism's, charged as the strategy charges a round (a
    # noise-off ledger rightly says infinite)
    claimed = PrivacyLedger(strategy.user_ledger.accountant, delta, None)
    claim = charge_user_level(claimed, fed.user_dp_noise, cohort, config.training.rounds)
    as_included = included if control != "no-canaries" else np.zeros(canaries, dtype=bool)
    # the tight epsilon and the curve test where fedtune's PLD covers the sampling that ran
    # (Poisson, or every node every round); a fixed cohort without replacement is held to the claim
    mechanism = None if cohort.without_replacement else (fed.user_dp_noise, cohort.accounted_rate,
                                                         config.training.rounds)
    finding = canary_finding("canary clients (white-box, user level)", audited.canaries.likelihood_scores,
                             included, guesses, delta, confidence, mechanism)
    planned = dataclasses.replace(first.plan, noise_multiplier=fed.user_dp_noise, sample_rate=cohort.accounted_rate)
    tight = math.nan if mechanism is None else tight_epsilon(*mechanism, delta)
    return AuditResult(control, claim, delta, audited.canaries.rounds, (finding,),
                       noise_check(audited.canaries.scores, as_included, audited.canaries.rounds,
                                   dataclasses.replace(planned, delta=delta), strategy.user_ledger.accountant), tight)


def main(argv: list[str] | None = None) -> int:
    from fedtune.audit.node_audit import report_line
    from fedtune.config import load_config
    from simulations.defaults import default_config_path

    parser = argparse.ArgumentParser(description="Federated (user-level) one-run audit with canary clients")
    parser.add_argument("--config", default=default_config_path())
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--guesses", type=int, default=200)
    parser.add_argument("--control", default="", help=f"one of {', '.join(CONTROLS)} (default: the audit itself)")
    args = parser.parse_args(argv)
    try:
        from fedtune.config import parse_override

        config = load_config(args.config, [parse_override(text) for text in args.set])
        result = audit_user_level(config, args.canaries, args.guesses, args.control)
    except FedtuneError as error:
        print(f"federated audit: error: {error}", file=sys.stderr)
        return 2
    print(report_line(result))
    return 0 if result.verdict()[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
