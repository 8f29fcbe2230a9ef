"""Privacy in one room: what a node may spend and how it is counted.

    accountants     epsilon of a mechanism history (Opacus), noise for a budget, an independent check (dp-accounting)
    ledger          PrivacyLedger: all privacy spent on one data set (or by the server at user level)
    planning        DPPlan: the mechanism of a node's whole training, step counts that match Opacus
    policy          the node's privacy policy and what a server may request
    budget          budgets on disk that follow the records: record index, lock, journal, lost-ledger checks
    record_index    which ledger protects each record ever charged (digests only)
    spending        the one ritual before a charge: open, cap, delta, plan, persist, check the fit
    randomness      secret generators (OS entropy); reproducible ones only on request
    releases        everything that leaves a node, with its cost
"""

from fedtune.privacy.accountants import (ACCOUNTANTS, compute_epsilon, independent_epsilon, make_accountant,
                                         noise_for_budget)
from fedtune.privacy.ledger import PrivacyLedger

__all__ = ["ACCOUNTANTS", "PrivacyLedger", "compute_epsilon", "independent_epsilon", "make_accountant", "noise_for_budget"]
