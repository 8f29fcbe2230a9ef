"""A finished (or running) federation's run directory as pandas DataFrames: what
`fedtune.simulate(...)` returns and `fedtune.load_run(run_dir)` reads back.

    result.metrics   one row per round: the record metrics.jsonl holds, flat
                     (round, accuracy, loss, epsilon_max, epsilon_mean, user_epsilon,
                     clients_accepted / _rejected / _refused as counts, cohort_* numbers,
                     seconds, evaluation_seconds, train_seconds_sum, bytes_sent, ...)
    result.ledger    one row per entry in every virtual client's own ledger (event: a DP
                     "charge", a "non-private" training, or a policy event such as "cap set")
                     (client, call, event, label, round, noise_multiplier, sample_rate, steps,
                     epsilon_after, non_private, accountant, delta, max_epsilon): the
                     mechanism parameters from which any accountant recomputes each epsilon
    result.clients   one row per client: its ledger's totals (the run report's clients.csv)
    result.run_dir   the directory itself (config.toml, adapter/, summary.md, ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedtune.config import Config, load_config

METRICS_COLUMNS = ("round", "accuracy", "loss", "epsilon_max", "epsilon_mean", "user_epsilon", "clients_accepted",
                   "clients_rejected", "clients_refused", "seconds", "evaluation_seconds", "train_seconds_sum",
                   "bytes_sent", "bytes_received")
LEDGER_COLUMNS = ("client", "call", "event", "label", "round", "noise_multiplier", "sample_rate", "steps", "epsilon_after",
                  "non_private", "accountant", "delta", "max_epsilon")


def flat_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """One round's record, flat: client lists as counts, the cohort's fields as cohort_*."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, list):
            flat[key] = len(value)
        elif isinstance(value, Mapping):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


@dataclass(frozen=True)
class RunResult:
    """A run directory and its tables (see the module docstring for the columns)."""

    run_dir: Path
    config: Config
    metrics: Any   # pandas.DataFrame
    ledger: Any    # pandas.DataFrame
    clients: Any   # pandas.DataFrame


def load_run(run_dir: str | Path) -> RunResult:
    """Read a run directory written by `fedtune simulate` / `fedtune.simulate` / a ServerApp."""
    import pandas as pd

    from fedtune.reporting.run_report import ledger_rows, read_ledgers, read_metrics, round_of

    run_dir = Path(run_dir)
    metrics = pd.DataFrame([flat_record(r) for r in read_metrics(run_dir)])
    metrics = metrics.reindex(columns=list(dict.fromkeys([*METRICS_COLUMNS, *metrics.columns])))
    ledgers = read_ledgers(run_dir)
    rows = []
    for name, ledger in ledgers.items():
        client = int(name.rsplit("-", 1)[1])
        for number, call in enumerate(ledger.calls, start=1):
            event = call.get("event") or ("non-private" if call.get("non_private") else "charge")
            rows.append({"client": client, "call": number, "event": event, "label": call.get("label", ""),
                         "round": round_of(str(call.get("label", ""))), "noise_multiplier": call.get("noise_multiplier"),
                         "sample_rate": call.get("sample_rate"), "steps": call.get("steps"),
                         "epsilon_after": call.get("epsilon_after"), "non_private": bool(call.get("non_private", False)),
                         "accountant": ledger.accountant, "delta": ledger.delta, "max_epsilon": ledger.max_epsilon})
    ledger_frame = pd.DataFrame(rows, columns=list(LEDGER_COLUMNS))
    clients = pd.DataFrame(ledger_rows(ledgers))
    return RunResult(run_dir, load_config(run_dir / "config.toml"), metrics, ledger_frame, clients)
