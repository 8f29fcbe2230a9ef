"""Privacy in one room: what a node may spend and how it is counted.

May import: `fedtune.models` (advise reads a model's config.json), `fedtune.data` (the
policy checks declared labels with the rows' own encoding), `fedtune.system`,
`fedtune.config`, `fedtune.errors`. `accountants` is read by config validation, so it (and
what it imports at run time) never imports `fedtune.config`.

    accountants         the accountant registry: epsilon of a history, noise for a budget, an independent check
    ledger              PrivacyLedger: all privacy spent on one data set (or by the server at user level)
    planning            DPPlan: the mechanism of a node's whole training, step counts that match Opacus
    policy              the node's privacy policy (declared in the config fields) and what a server may request
    budget              budgets on disk that follow the records: record index, lock, journal, lost-ledger checks
    record_index        which ledger protects each record ever charged (digests only)
    budget_listing      every budget on a machine, read-only: what `fedtune budget` shows
    spending            the one ritual before a charge: open, cap, delta, plan, persist, check the fit
    randomness          secret generators (OS entropy); reproducible ones only on request
    releases            everything that leaves a node, with its cost
    canaries            audit canaries: gradient (white-box), input (black-box), canary clients (user level)
    ddgauss             the distributed discrete Gaussian: encode, noise shares, decode
    ddgauss_accounting  its epsilon, and the noise for a budget
    advise              before a run: the mechanism a federation's shape gets and whether it can learn
"""

from fedtune.privacy.accountants import (ACCOUNTANTS, compute_epsilon, independent_epsilon, make_accountant,
                                         noise_for_budget)
from fedtune.privacy.ledger import PrivacyLedger

__all__ = ["ACCOUNTANTS", "PrivacyLedger", "compute_epsilon", "independent_epsilon", "make_accountant", "noise_for_budget"]
