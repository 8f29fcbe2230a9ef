"""Federated audit: canary clients against user-level DP-FedAvg, in a simulation.

The mechanism audited is the server's user-level DP step (`fedtune.federation.strategy.UserLevelDP`:
each node's update clipped to S, Gaussian noise z S on the sum, the fixed denominator,
the user-level ledger), which the harness extends (`AuditedUserLevelDP`) and hands to the
`Strategy` it drives. m canary clients (`fedtune.privacy.canaries.UpdateCanaries`),
each included by a fair coin, join the rounds at the cohort's sampling rate with an
update of S along their own adapter coordinate; the real clients train for real on their
partitions (record-level DP-SGD, as configured), each charged to the budget its records
carry in the node's budget folder (`node.budget_dir`), as any training. The auditing server scores each canary
by the released noisy sum minus the real nodes' clipped sum, over every round, and the
one-run bound (`fedtune.audit.bounds`) turns the guesses into a lower bound on the
user-level epsilon, beside what the user-level ledger claims.

This drives the core (the same `Strategy`, local training and partitions a Flower
simulation uses) round by round in one process, without Flower's engine: the mechanism
audited lives entirely in the strategy, and a canary client has no data to train on.

    python -m simulations.federated_audit [--config file.toml] [--canaries 1000] [--guesses 200] [--control noise-off]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

import numpy as np

from fedtune.models.adapter_io import load_state, trainable_state
from fedtune.audit.node_audit import AuditResult, CanaryFinding, noise_check
from fedtune.training.dp_train import train_call
from fedtune.errors import ConfigError, FedtuneError
from fedtune.training.local import prepare_data, prepare_node
from fedtune.audit.bounds import best_possible_bound, epsilon_lower_bound
from fedtune.privacy.canaries import UpdateCanaries, guess
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
    server holds). `noise_off` is the audit's control: no noise, and the ledger says so
    (charged as non-private, never less than what ran)."""

    def __init__(self, ledger: PrivacyLedger, clip: float, noise_multiplier: float, randomness: Randomness,
                 population: int = 0, *, canaries: UpdateCanaries, noise_off: bool = False):
        super().__init__(ledger, clip, noise_multiplier, randomness, population)
        self.canaries = canaries
        self.noise_off = noise_off

    def charge(self, server_round: int, cohort) -> None:
        if self.noise_off:
            self.ledger.charge_non_private(1, label=f"round {server_round} (noise OFF: audit control)")
        else:
            super().charge(server_round, cohort)

    def noised(self, clipped_sum, reference, cohort, rng):
        noise = 0.0 if self.noise_off else self.noise_multiplier
        joined = self.canaries.updates(reference, self.clip, cohort.accounted_rate)
        step = add_noise([clipped_sum] + joined, reference, self.clip, noise, cohort.expected_size, rng)
        self.canaries.score({k: v * cohort.expected_size for k, v in step.items()}, clipped_sum, self.clip)
        return step


def audit_user_level(config, canaries: int = 1000, guesses: int = 200, control: str = "", confidence: float = 0.95,
                     echo=print) -> AuditResult:
    """Run the federation of `config` with canary clients and return what the audit proves
    about its user-level DP. `control`: "" (the audit), "noise-off" (no user-level noise:
    the audit must flag it) or "no-canaries" (coins drawn, nothing inserted)."""
    fed = config.federation
    if fed.user_dp_noise <= 0:
        raise ConfigError("federation.user_dp_noise = 0: user-level DP is off, there is no user-level claim to audit")
    if control not in ("", "noise-off", "no-canaries"):
        raise ConfigError(f"federated audit control {control!r}: expected noise-off or no-canaries")
    clients = count_partitions(config)
    first = prepare_node(config, client_table(config, 0))
    model, tokenizer = first.model, first.tokenizer
    data = [first.data] + [prepare_data(config, tokenizer, table=client_table(config, i), validation=False)
                           for i in range(1, clients)]
    budgets = contextlib.ExitStack()  # every client's records keep their budget, as a node's do
    with budgets:
        ledgers = [budgets.enter_context(spend(config, d.record_set, config.dp.resolved_delta(d.records),
                                               f"federated audit client {i}",
                                               plan_at=lambda delta, d=d: plan_training(config, len(d.train), delta=delta),
                                               steps_to_fit=lambda plan: plan.steps_per_call))
                   for i, d in enumerate(data)]
        return _audit_rounds(config, clients, model, data, ledgers, canaries, guesses, control, confidence, first,
                             echo)


def _audit_rounds(config, clients, model, data, spendings, canaries, guesses, control, confidence, first,
                  echo) -> AuditResult:
    """The federation's rounds with the canary clients joined, each client charged to the
    budget its records already carry."""
    fed = config.federation
    ledgers = [spending.ledger for spending in spendings]
    randomness = Randomness.from_setting(config.dp.noise_seed)
    reference = trainable_state(model)
    audited = AuditedUserLevelDP.from_config(
        config, randomness, canaries=UpdateCanaries(reference, canaries, randomness, inject=control != "no-canaries"),
        noise_off=control == "noise-off")
    strategy = Strategy(config, user_level=audited)
    echo(f"federated audit{' (control: ' + control + ')' if control else ''}: {clients} clients, {canaries} canary "
         f"clients ({int(audited.canaries.included.sum())} included), {guesses} guesses, {config.training.rounds} "
         f"rounds, user-level clip {fed.user_dp_clip} noise {fed.user_dp_noise}")
    for server_round in range(1, config.training.rounds + 1):
        cohort = strategy.cohort(list(range(clients)), server_round)
        replies = []
        for node in cohort.sampled:
            load_state(model, reference, partial=True)
            plan = plan_training(config, len(data[node].train), delta=ledgers[node].delta)
            train_call(model, data[node].train, config, plan, ledgers[node], spendings[node].persist,
                       label=f"federated audit round {server_round}", randomness=randomness)
            replies.append(ClientReply(node, "ok", trainable_state(model), len(data[node].train)))
        reference = strategy.aggregate(server_round, reference, replies, cohort)
    scores, included = audited.canaries.scores, audited.canaries.included
    r, v = guess(scores, included, guesses)
    delta = strategy.user_ledger.delta
    # the claim is the planned mechanism's, charged as the strategy charges a round (a
    # noise-off ledger rightly says infinite)
    claimed = PrivacyLedger(strategy.user_ledger.accountant, delta, None)
    claim = charge_user_level(claimed, fed.user_dp_noise, cohort, config.training.rounds)
    finding = CanaryFinding("canary clients (white-box, user level)", canaries, int(included.sum()), r, v,
                            epsilon_lower_bound(canaries, r, v, delta, confidence),
                            best_possible_bound(canaries, r, delta, confidence))
    planned = dataclasses.replace(first.plan, noise_multiplier=fed.user_dp_noise, sample_rate=cohort.accounted_rate)
    as_included = included if control != "no-canaries" else np.zeros(canaries, dtype=bool)
    return AuditResult(control, claim, delta, audited.canaries.rounds, (finding,),
                       noise_check(scores, as_included, audited.canaries.rounds,
                                   dataclasses.replace(planned, delta=delta), strategy.user_ledger.accountant))


def main(argv: list[str] | None = None) -> int:
    from fedtune.audit.node_audit import report_line
    from fedtune.config import load_config
    from simulations.defaults import default_config_path

    parser = argparse.ArgumentParser(description="Federated (user-level) one-run audit with canary clients")
    parser.add_argument("--config", default=default_config_path())
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--guesses", type=int, default=200)
    parser.add_argument("--control", default="")
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
