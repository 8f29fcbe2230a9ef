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
from pathlib import Path

from opacus.accountants.accountant import IAccountant

from fedtune.atomic import atomic_write_json
from fedtune.errors import BudgetExhaustedError, ConfigError, FedtuneError
from fedtune.privacy.accountants import _check_accountant, _check_delta, _check_mechanism, _epsilon_of, make_accountant

LEDGER_FORMAT = 2  # 2 added data_fingerprint and the max_epsilon name; format 1 still loads

# Relative slack when comparing a planned epsilon with its target: the planner's own
# bisection lands a hair under the target, and float round-off must not refuse it.
_BUDGET_SLACK = 1e-9


@dataclass
class PrivacyLedger:
    """All privacy a node has spent, composable across training calls and restarts.

    `history` uses Opacus's own format (consecutive calls with the same noise and sample
    rate merge, as Opacus's step hook does), so it loads straight into an accountant.
    `non_private_steps` counts steps taken without DP: once it is non-zero the node's
    epsilon is infinite forever, which is the honest statement. `target_epsilon` is the
    node's hard cap (its policy's max_epsilon); `data_fingerprint` names the data the
    budget protects. Metric releases (a Gaussian mechanism over the node's rows) enter the
    history as (sigma, 1.0, 1): a full-batch Gaussian step is exactly that mechanism.
    """

    accountant: str
    delta: float
    target_epsilon: float | None
    history: list[tuple[float, float, int]] = field(default_factory=list)
    non_private_steps: int = 0
    calls: list[dict] = field(default_factory=list)
    data_fingerprint: str = ""

    def __post_init__(self) -> None:
        _check_accountant(self.accountant)
        _check_delta(self.delta)
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"target_epsilon = {self.target_epsilon!r}: expected a number > 0")

    # -- reading ---------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history) + self.non_private_steps

    @property
    def is_private(self) -> bool:
        return self.non_private_steps == 0

    def epsilon(self) -> float:
        """Epsilon spent so far at this ledger's delta (inf after any non-private step)."""
        if not self.is_private:
            return math.inf
        return _epsilon_of(self.accountant, self.history, self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the ledger would show after one more call of `steps` steps."""
        _check_mechanism(noise_multiplier, sample_rate, steps)
        if not self.is_private:
            return math.inf
        return _epsilon_of(self.accountant, _merged(self.history, noise_multiplier, sample_rate, steps), self.delta)

    def remaining_fits(self, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        if self.target_epsilon is None:
            return True
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        return after <= self.target_epsilon * (1 + _BUDGET_SLACK)

    def to_opacus(self) -> IAccountant:
        """An Opacus accountant holding this ledger's history (for independent checks)."""
        return make_accountant(self.accountant, self.history)

    # -- spending --------------------------------------------------------------------
    def charge(self, noise_multiplier: float, sample_rate: float, steps: int, label: str = "") -> float:
        """Record a DP training call of `steps` steps; refuse it if it breaks the budget.

        Returns the epsilon after the charge. Raises `BudgetExhaustedError` and records
        nothing when the call would go past `target_epsilon`.
        """
        if not self.remaining_fits(noise_multiplier, sample_rate, steps):
            raise BudgetExhaustedError(
                f"privacy budget exhausted: epsilon would reach "
                f"{self.epsilon_after(noise_multiplier, sample_rate, steps):.4f} > target "
                f"{self.target_epsilon} (spent {self.epsilon():.4f} at delta={self.delta:g})"
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
        if self.target_epsilon != max_epsilon:
            self.calls.append({"label": label, "time": time.time(), "event": "cap set",
                               "from": self.target_epsilon, "to": float(max_epsilon)})
            self.target_epsilon = float(max_epsilon)

    def charge_non_private(self, steps: int, label: str = "") -> None:
        """Record a NON-PRIVATE call: epsilon becomes infinite and stays so."""
        self.non_private_steps += int(steps)
        self.calls.append({"label": label, "time": time.time(), "steps": int(steps), "non_private": True})

    # -- persistence -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": LEDGER_FORMAT,
            "data_fingerprint": self.data_fingerprint,
            "accountant": self.accountant,
            "delta": self.delta,
            "max_epsilon": self.target_epsilon,
            "history": [list(entry) for entry in self.history],
            "non_private_steps": self.non_private_steps,
            "epsilon": _json_float(self.epsilon()),
            "calls": self.calls,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "ledger") -> "PrivacyLedger":
        try:
            if data.get("format") not in (1, LEDGER_FORMAT):
                raise FedtuneError(f"{source}: unsupported ledger format {data.get('format')!r}")
            cap = data["max_epsilon"] if data.get("format") == LEDGER_FORMAT else data["target_epsilon"]
            return cls(
                accountant=data["accountant"],
                delta=float(data["delta"]),
                target_epsilon=None if cap is None else float(cap),
                data_fingerprint=str(data.get("data_fingerprint", "")),
                history=[(float(s), float(q), int(n)) for s, q, n in data["history"]],
                non_private_steps=int(data.get("non_private_steps", 0)),
                calls=list(data.get("calls", [])),
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


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value
