"""The per-node (and the server's user-level) privacy ledger: all privacy spent, composable
across training calls and restarts, charged before anything is released.

The ledger is charged *before* a training call runs (write-ahead), so a crash during or
after training can only over-count the budget, never refund it. Its history loads
straight into an Opacus accountant:

    acc = opacus.accountants.RDPAccountant(); acc.history = ledger["history"]
    acc.get_epsilon(delta=ledger["delta"])
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from pathlib import Path

from fedtune.system.atomic import atomic_write_json
from fedtune.privacy import ddgauss_accounting
from fedtune.privacy.ddgauss_accounting import DistributedSteps
from fedtune.errors import BudgetExhaustedError, ConfigError, FedtuneError
from fedtune.privacy.accountants import (_check_accountant, _check_delta, _check_mechanism, _epsilon_of, accountant_named,
                                         make_accountant, without_replacement_epsilon)

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

LEDGER_FORMAT = 2  # 2 added data_fingerprint and the max_epsilon name; format 1 still loads
# 3 adds `without_replacement`; a ledger is written as 3 only when it holds such entries, so
# a reader that does not know them refuses the file instead of under-counting it.
WITHOUT_REPLACEMENT_FORMAT = 3
# 4 adds `distributed` (distributed discrete Gaussian steps), written only when present,
# for the same reason.
DISTRIBUTED_FORMAT = 4

# Relative slack when comparing a planned epsilon with its target: the planner's own
# bisection lands a hair under the target, and float round-off must not refuse it.
_BUDGET_SLACK = 1e-9


@dataclass
class PrivacyLedger:
    """All privacy a node has spent, composable across training calls and restarts.

    `history` uses Opacus's own format (consecutive calls with the same noise and sample
    rate merge, as Opacus's step hook does), so it loads straight into an accountant.
    `non_private_steps` counts steps taken without DP: once it is non-zero the node's
    epsilon is infinite forever, which is the honest statement. `max_epsilon` is the
    node's hard cap (its policy's node.max_epsilon); `data_fingerprint` names the data the
    budget protects. Metric releases (a Gaussian mechanism over the node's rows) enter the
    history as (sigma, 1.0, 1): a full-batch Gaussian step is exactly that mechanism.

    `without_replacement` (the server's user-level ledger only) holds fixed-size cohorts
    drawn from more users than they hold, as (noise_multiplier, registered, size, rounds):
    sampling without replacement, where removing a user lets another take its slot. Once it
    holds an entry, epsilon is of the replace-one relation, composed by dp-accounting
    (`fedtune.privacy.accountants.without_replacement_epsilon`); Opacus has no such accountant.
    """

    accountant: str
    delta: float
    max_epsilon: float | None  # the cap: no charge may take epsilon past it (None: no cap)
    history: list[tuple[float, float, int]] = field(default_factory=list)
    non_private_steps: int = 0
    calls: list[dict] = field(default_factory=list)
    data_fingerprint: str = ""
    without_replacement: list[tuple[float, int, int, int]] = field(default_factory=list)
    distributed: list[tuple[float, float, int, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_accountant(self.accountant)
        _check_delta(self.delta)
        for noise, registered, size, rounds in self.without_replacement:
            _check_cohort(noise, registered, size, rounds)
        for entry in self.distributed:
            DistributedSteps(*entry)  # validates
        if self.distributed and self.without_replacement:
            raise ConfigError("a ledger holds either a node's distributed steps or the server's fixed cohorts, not both")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise ConfigError(f"max_epsilon = {self.max_epsilon!r}: expected a number > 0")

    # -- reading ---------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return (sum(n for _, _, n in self.history) + sum(r for *_, r in self.without_replacement)
                + sum(n for *_, n in self.distributed) + self.non_private_steps)

    @property
    def is_private(self) -> bool:
        return self.non_private_steps == 0

    def epsilon(self) -> float:
        """Epsilon spent so far at this ledger's delta (inf after any non-private step)."""
        if not self.is_private:
            return math.inf
        return self._epsilon(self.history, self.distributed)

    def _epsilon(self, history, distributed) -> float:
        if self.without_replacement:
            return without_replacement_epsilon(history, self.without_replacement, self.delta)
        if distributed:  # Renyi composition with the ordinary steps (fedtune.privacy.ddgauss_accounting)
            return ddgauss_accounting.epsilon(list(distributed), self.delta, list(history))
        return _epsilon_of(self.accountant, history, self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the ledger would show after one more call of `steps` steps."""
        _check_mechanism(noise_multiplier, sample_rate, steps)
        if not self.is_private:
            return math.inf
        return self._epsilon(_merged(self.history, noise_multiplier, sample_rate, steps), self.distributed)

    def epsilon_after_distributed(self, steps: DistributedSteps) -> float:
        """Epsilon the ledger would show after `steps` more distributed steps."""
        if not self.is_private:
            return math.inf
        return self._epsilon(self.history, _merged_distributed(self.distributed, steps))

    def distributed_parameters(self) -> dict:
        """The node's t and its noise share's standard deviation, as its last distributed
        charge logged them: what recomputes its epsilon if contributors collude ({} if none)."""
        last = next((c for c in reversed(self.calls) if "contributors" in c), None)
        return {"contributors": last.get("contributors"), "local_stddev": last.get("local_stddev")} if last else {}

    def distributed_fits(self, steps: DistributedSteps) -> bool:
        return self.max_epsilon is None or \
            self.epsilon_after_distributed(steps) <= self.max_epsilon * (1 + _BUDGET_SLACK)

    def remaining_fits(self, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        if self.max_epsilon is None:
            return True
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        return after <= self.max_epsilon * (1 + _BUDGET_SLACK)

    def to_opacus(self) -> "IAccountant":
        """An Opacus accountant holding this ledger's history (for independent checks); fixed
        cohorts drawn without replacement have no Opacus accountant and are not in it."""
        return make_accountant(self.accountant, self.history)

    # -- spending --------------------------------------------------------------------
    def charge(self, noise_multiplier: float, sample_rate: float, steps: int, label: str = "") -> float:
        """Record a DP training call of `steps` steps; refuse it if it breaks the budget.

        Returns the epsilon after the charge. Raises `BudgetExhaustedError` and records
        nothing when the call would go past the cap `max_epsilon`.
        """
        if not self.remaining_fits(noise_multiplier, sample_rate, steps):
            raise BudgetExhaustedError(
                f"privacy budget exhausted: epsilon would reach "
                f"{self.epsilon_after(noise_multiplier, sample_rate, steps):.4f} > target "
                f"{self.max_epsilon} (spent {self.epsilon():.4f} at delta={self.delta:g})"
            )
        self.history = _merged(self.history, noise_multiplier, sample_rate, steps)
        eps = self.epsilon()
        self.calls.append(
            {
                "label": label,
                "time": time.time(),
                "noise_multiplier": float(noise_multiplier),
                "sample_rate": float(sample_rate),
                "steps": int(steps),
                "epsilon_after": eps,
            }
        )
        return eps

    def charge_without_replacement(self, noise_multiplier: float, registered: int, size: int, rounds: int = 1,
                                   label: str = "") -> float:
        """Record `rounds` rounds of a fixed-size cohort: `size` of the `registered` users,
        drawn without replacement, Gaussian noise `noise_multiplier` x clip on the sum of
        their clipped updates. Refused (nothing recorded) past the cap `max_epsilon`.

        A cohort of every registered user is full participation: charge it with `charge`
        (q = 1), which stays add/remove. Returns the epsilon after the charge."""
        _check_cohort(noise_multiplier, registered, size, rounds)
        if not accountant_named(self.accountant).fixed_cohorts:
            raise ConfigError(f"accountant = {self.accountant!r}: sampling without replacement is accounted by "
                              "dp-accounting's RDP accountant only; keep this ledger's accountant 'rdp'")
        entries = _merged_cohorts(self.without_replacement, noise_multiplier, registered, size, rounds)
        after = without_replacement_epsilon(self.history, entries, self.delta) if self.is_private else math.inf
        if self.max_epsilon is not None and not after <= self.max_epsilon * (1 + _BUDGET_SLACK):
            raise BudgetExhaustedError(
                f"privacy budget exhausted: epsilon would reach {after:.4f} > cap {self.max_epsilon} "
                f"(spent {self.epsilon():.4f} at delta={self.delta:g})")
        self.without_replacement = entries
        self.calls.append({"label": label, "time": time.time(), "sampling": "without replacement",
                           "noise_multiplier": float(noise_multiplier), "registered": int(registered),
                           "size": int(size), "rounds": int(rounds), "epsilon_after": _json_float(after)})
        return after

    def charge_distributed(self, steps: DistributedSteps, label: str = "", **logged) -> float:
        """Record distributed discrete Gaussian steps (`fedtune.privacy.ddgauss_accounting`:
        the record's own Poisson rate, the noise of t honest shares over the rounded
        sensitivity, Proposition 14's tau); refused, recording nothing, past the cap.
        `logged` (t, bits, clip, ...) goes into the call's entry for the report."""
        after = self.epsilon_after_distributed(steps)
        if self.max_epsilon is not None and not after <= self.max_epsilon * (1 + _BUDGET_SLACK):
            raise BudgetExhaustedError(
                f"privacy budget exhausted: epsilon would reach {after:.4f} > cap {self.max_epsilon} "
                f"(spent {self.epsilon():.4f} at delta={self.delta:g})")
        self.distributed = _merged_distributed(self.distributed, steps)
        self.calls.append({"label": label, "time": time.time(), "mechanism": "distributed discrete Gaussian",
                           "noise_multiplier": steps.noise_multiplier, "tau": steps.tau, "dim": steps.dim,
                           "sample_rate": steps.sample_rate, "steps": steps.steps, **logged,
                           "epsilon_after": _json_float(after)})
        return after

    def lower_delta(self, delta: float, label: str = "") -> None:
        """Account everything (past included) at a smaller delta from now on. The epsilon
        of the whole history only grows, so this never under-counts; raising is refused."""
        _check_delta(delta)
        if delta < self.delta:
            self.calls.append({"label": label, "time": time.time(), "event": "delta lowered",
                               "from": self.delta, "to": float(delta)})
            self.delta = float(delta)

    def set_cap(self, max_epsilon: float, label: str = "") -> None:
        """The node's cap, as its policy states it now; every change is recorded.

        A cap is the node operator's decision, never a server's: raising it spends more of
        the same data's privacy, and the ledger keeps counting from what is spent."""
        if not max_epsilon > 0:
            raise ConfigError(f"max_epsilon = {max_epsilon!r}: expected a number > 0")
        if self.max_epsilon != max_epsilon:
            self.calls.append({"label": label, "time": time.time(), "event": "cap set",
                               "from": self.max_epsilon, "to": float(max_epsilon)})
            self.max_epsilon = float(max_epsilon)

    def charge_non_private(self, steps: int, label: str = "") -> None:
        """Record a NON-PRIVATE call: epsilon becomes infinite and stays so."""
        self.non_private_steps += int(steps)
        self.calls.append({"label": label, "time": time.time(), "steps": int(steps), "non_private": True})

    @classmethod
    def merged(cls, ledgers: "list[PrivacyLedger]", ledger_id: str, label: str = "") -> "PrivacyLedger":
        """One ledger for records gathered from several: every history composed (a record
        spent at most the sum of what its own ledger spent, so this over-counts, never
        under-counts), at the smallest delta and cap any of them held."""
        if not ledgers:
            raise ValueError("merged() needs at least one ledger")
        history: list = []
        for ledger in ledgers:
            for sigma, rate, steps in ledger.history:
                history = _merged(history, sigma, rate, steps)
        caps = [ledger.max_epsilon for ledger in ledgers if ledger.max_epsilon is not None]
        merged = cls(accountant=ledgers[0].accountant, delta=min(ledger.delta for ledger in ledgers),
                     max_epsilon=min(caps) if caps else None, history=history,
                     non_private_steps=sum(ledger.non_private_steps for ledger in ledgers), data_fingerprint=ledger_id,
                     without_replacement=[entry for ledger in ledgers for entry in ledger.without_replacement],
                     distributed=[entry for ledger in ledgers for entry in ledger.distributed])
        merged.calls.append({"label": label, "time": time.time(), "event": "merged",
                             "from": [ledger.data_fingerprint for ledger in ledgers],
                             "epsilon_after": _json_float(merged.epsilon())})
        return merged

    # -- persistence -----------------------------------------------------------------
    def to_dict(self) -> dict:
        extra = ({"without_replacement": [list(entry) for entry in self.without_replacement]}
                 if self.without_replacement else {})
        if self.distributed:
            extra["distributed"] = [list(entry) for entry in self.distributed]
        form = (DISTRIBUTED_FORMAT if self.distributed else
                WITHOUT_REPLACEMENT_FORMAT if self.without_replacement else LEDGER_FORMAT)
        return {
            "format": form,
            "data_fingerprint": self.data_fingerprint,
            "accountant": self.accountant,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "history": [list(entry) for entry in self.history],
            "non_private_steps": self.non_private_steps,
            "epsilon": _json_float(self.epsilon()),
            "calls": self.calls,
            **extra,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "ledger") -> "PrivacyLedger":
        try:
            if data.get("format") not in (1, LEDGER_FORMAT, WITHOUT_REPLACEMENT_FORMAT, DISTRIBUTED_FORMAT):
                raise FedtuneError(f"{source}: unsupported ledger format {data.get('format')!r}")
            cap = data["target_epsilon"] if data.get("format") == 1 else data["max_epsilon"]
            return cls(
                accountant=data["accountant"],
                delta=float(data["delta"]),
                max_epsilon=None if cap is None else float(cap),
                data_fingerprint=str(data.get("data_fingerprint", "")),
                history=[(float(s), float(q), int(n)) for s, q, n in data["history"]],
                non_private_steps=int(data.get("non_private_steps", 0)),
                calls=list(data.get("calls", [])),
                without_replacement=[(float(s), int(big), int(m), int(r))
                                     for s, big, m, r in data.get("without_replacement", [])],
                distributed=[(float(z), float(tau), int(d), float(q), int(n))
                             for z, tau, d, q, n in data.get("distributed", [])],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FedtuneError(f"{source}: not a fedtune privacy ledger ({exc})") from None

    def save(self, path: str | Path) -> None:
        """Write atomically and durably (temp file, fsync, rename)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "PrivacyLedger":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FedtuneError(f"{path}: no privacy ledger there") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FedtuneError(f"{path}: privacy ledger is not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))


def _merged(history, noise_multiplier, sample_rate, steps):
    """`history` plus one entry, merged into the last like Opacus's step hook does."""
    out = [tuple(entry) for entry in history]
    if steps == 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + steps)
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


def _merged_distributed(entries, steps: DistributedSteps):
    """Consecutive distributed steps of the same mechanism merge, as `_merged` does."""
    entries = [tuple(e) for e in entries]
    if entries and entries[-1][:4] == steps.as_tuple()[:4]:
        return entries[:-1] + [(*entries[-1][:4], entries[-1][4] + steps.steps)]
    return entries + [steps.as_tuple()]


def _merged_cohorts(entries, noise_multiplier, registered, size, rounds):
    """`entries` plus `rounds` rounds of one fixed-size cohort, merged into the last entry
    when noise, registered count and size are the same."""
    out = [tuple(entry) for entry in entries]
    if rounds == 0:
        return out
    key = (float(noise_multiplier), int(registered), int(size))
    if out and out[-1][:3] == key:
        out[-1] = (*key, out[-1][3] + int(rounds))
    else:
        out.append((*key, int(rounds)))
    return out


def _check_cohort(noise_multiplier, registered, size, rounds) -> None:
    """A fixed-size cohort drawn without replacement: 0 < size < registered (a cohort of
    everyone is full participation, charged with q = 1), noise > 0, rounds >= 0."""
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0):
        raise ConfigError(f"noise_multiplier = {noise_multiplier!r}: expected a number > 0")
    if not (0 < size < registered):
        raise ConfigError(f"a cohort of {size} of {registered} registered users: sampling without replacement needs "
                          "0 < size < registered (a cohort of everyone is full participation, q = 1)")
    if rounds < 0:
        raise ConfigError(f"rounds = {rounds!r}: expected a whole number >= 0")


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value
