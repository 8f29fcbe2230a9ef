"""The one way to open a node's budget before spending it.

Everything that trains on a node's records or releases something computed from them (a
federated node's round and its evaluation, `fedtune train-local`, `fedtune audit`) goes
through `spend`, so that none of them can skip a step the others take:

1. open the budget of these records (`BudgetStore.open`: locked, one process at a time,
   the ledger that already protects them, checked against every record of its charges);
2. set the node's cap as its policy states it now: a lower cap binds at once, even on a
   ledger that was opened under a higher one;
3. lower delta to the policy's when that is stricter (never raise it);
4. plan once, at the delta the ledger accounts at;
5. write the ledger (cap and delta changes included) durably before anything trains;
6. check that what the caller is about to spend fits under the cap, refusing before a step.

The caller then charges through `Spending.persist` (the write-ahead hook of `train_call`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from fedtune.config import Config
from fedtune.errors import BudgetExhaustedError, FedtuneError
from fedtune.privacy.budget import Budget, BudgetStore, RecordSet, default_budget_dir
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.planning import DPPlan


class OverBudgetError(BudgetExhaustedError):
    """What the caller asked to spend does not fit; `ledger` is the budget as it stands."""

    def __init__(self, message: str, ledger: PrivacyLedger):
        super().__init__(message)
        self.ledger = ledger


@dataclass
class Spending:
    """An open budget, ready to be charged: its ledger, the plan made at the ledger's delta,
    and `persist`, which writes every charge (ledger, journal, the caller's own record)."""

    budget: Budget
    plan: DPPlan | None
    on_persist: list[Callable[[Budget, PrivacyLedger], None]] = field(default_factory=list)

    @property
    def ledger(self) -> PrivacyLedger:
        return self.budget.ledger

    @property
    def path(self) -> Path:
        return self.budget.ledger_path

    def persist(self, ledger: PrivacyLedger | None = None) -> None:
        ledger = ledger or self.ledger
        self.budget.persist(ledger)
        for hook in self.on_persist:
            hook(self.budget, ledger)

    def require_fit(self, noise_multiplier: float, sample_rate: float, steps: int, what: str) -> None:
        """Refuse, before anything trains, `steps` DP-SGD steps that would pass the cap."""
        require_fit(self.ledger, noise_multiplier, sample_rate, steps, what)


def require_fit(ledger: PrivacyLedger, noise_multiplier: float, sample_rate: float, steps: int, what: str) -> None:
    """Refuse `steps` DP-SGD steps that would take `ledger` past its cap, in one line that
    names no path of the node's (a node sends it to the server as the reason)."""
    if noise_multiplier > 0 and not ledger.remaining_fits(noise_multiplier, sample_rate, steps):
        raise OverBudgetError(
            f"privacy budget exhausted: {what} would take the epsilon of these records to "
            f"{ledger.epsilon_after(noise_multiplier, sample_rate, steps):.3f}, above their cap "
            f"{ledger.max_epsilon:g} (already spent {ledger.epsilon():.3f}); the budget belongs to the data, "
            "not to a run folder or a state dir: raising the cap is the node operator's decision (--max-epsilon; "
            "the ledger keeps counting)", ledger)


@contextmanager
def spend(config: Config, records: RecordSet, delta: float, label: str, *,
          plan_at: Callable[[float], DPPlan] | None = None, steps_to_fit: Callable[[DPPlan], int] | None = None,
          recorded_steps: Callable[[str], tuple[int, str]] | None = None,
          on_persist: Callable[[Budget, PrivacyLedger], None] | None = None) -> Iterator[Spending]:
    """Open the budget of `records` under `config`'s policy (its cap, the node's `delta`),
    plan with `plan_at(delta the ledger accounts at)`, persist, and check that
    `steps_to_fit(plan)` steps fit. `label` names the caller in the ledger's history."""
    if records is None:
        raise FedtuneError("the node's records are unknown: nothing can be charged to them")
    private = config.dp.enabled
    store = BudgetStore(config.node.budget_dir or default_budget_dir())
    new = lambda: PrivacyLedger(config.dp.accountant, delta, config.max_epsilon if private else None)  # noqa: E731
    with store.open(records, new, recorded_steps=recorded_steps, source=data_source(config)) as budget:
        ledger = budget.ledger
        ledger.lower_delta(delta, label=label)
        if ledger.is_private and private:
            ledger.set_cap(config.max_epsilon, label=label)
        plan = plan_at(ledger.delta) if plan_at is not None else None
        spending = Spending(budget, plan, [on_persist] if on_persist else [])
        spending.persist()
        if plan is not None and plan.private and steps_to_fit is not None:
            spending.require_fit(plan.noise_multiplier, plan.sample_rate, steps_to_fit(plan), label)
        yield spending


def data_source(config: Config) -> str:
    """The node's data as its operator named it (the file's path or the named dataset, and
    the evaluation file), never a row of it: what `fedtune budget` shows a privacy officer
    beside a ledger whose name is only a fingerprint of the rows."""
    data = config.data
    parts = [f"file {Path(data.path).expanduser().resolve()}" if data.path
             else f"dataset {data.dataset}" if data.dataset else ""]
    if data.eval_path:
        parts.append(f"evaluation file {Path(data.eval_path).expanduser().resolve()}")
    return " + ".join(part for part in parts if part)
