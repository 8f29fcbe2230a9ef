"""The user-level audit table in `docs/audit-user-level.md`: canary clients at 1,000 users.

A user-level delta is only meaningful when it is small next to 1 / users: at the 5 clients
of the default simulation, 1 / (10 x 5) = 0.02 says little. This table audits user-level
DP-FedAvg (`simulations.federated_audit`) in a federation of 1,000 simulated users (delta
1e-4): 8,000 tweets split IID over the users (8 each; each user's rows are charged to a
budget of its own, as each node keeps its own), a Poisson
cohort of 20 users a round (q = 0.02) for 10 rounds, each sampled user training for real
under its own record-level DP-SGD, the server clipping each update to 1 and adding noise of
multiplier 0.5 to the sum. 10,000 canary clients (one adapter coordinate each, each included
by a fair coin) join each round at the cohort's rate; the auditing server scores each by
the log likelihood ratio of every round's observation. The runs: the audit, two leaking
controls that keep the planned claim (noise halved, noise off: the bound must exceed the
claim) and nothing inserted (the bounds must be about zero).

Every run writes one record under `docs/results/records/audit-user-level/`; the report is
rendered from those records alone.

    python -m simulations.federated_audit_table [--out runs/audit-user-level]   # runs not recorded yet
    python -m simulations.federated_audit_table --report-only                   # the report from the records
"""

from __future__ import annotations

import time
from pathlib import Path

from simulations.audit_table import (FINDING_FIELDS, NOISE_FIELDS, leaks_sentence, table_header, table_row,
                                     tightest_lines)
from simulations.records import (RECORDS, field_error, load_record, machine_line, missing_field, plain_json,
                                 report_command, shown, write_record)

ROOT = Path(__file__).resolve().parent.parent
RECORD_DIR = RECORDS / "audit-user-level"
REPORT = ROOT / "docs" / "audit-user-level.md"
USERS = 1000
SETTINGS = (("data", "dataset", "tweets"), ("data", "labels", ["negative", "neutral", "positive"]),
            ("simulation", "num_clients", USERS), ("simulation", "partitioner", "iid"),
            ("simulation", "rows_per_client", 8),
            ("model", "max_seq_len", 32), ("federation", "population", USERS),
            ("federation", "cohort_sampling", "poisson"), ("federation", "clients_per_round", 20),
            ("federation", "min_clients", 1), ("federation", "user_dp_clip", 1.0),
            ("federation", "user_dp_noise", 0.5), ("training", "rounds", 10), ("training", "batch_size", 8))
SETTING = {key: value for _, key, value in SETTINGS}
DESIGN = {"canaries": 10000, "guesses": 1000}
RUNS = ("none", "noise-halved", "noise-off", "no-canaries")  # "none" is the audit itself
REQUIRED = ("control", "design", "users", "claimed_epsilon", "delta", "findings", "noise", "passed", "verdict",
            "seconds", "config", "versions", "machine")


def federation_config(budget_dir: Path):
    """The default simulation's config with the tweets at 1,000 users, its budgets in `budget_dir`."""
    from fedtune.config import load_config
    from simulations.defaults import default_config_path

    return load_config(default_config_path(), [*SETTINGS, ("node", "budget_dir", str(budget_dir))])


def run(out: Path, log=print) -> None:
    """Each run without a record: the audit and its controls, each in its own budget folder
    (the users' rows are public tweets; every run charges them as any training)."""
    from fedtune.system.machine import machine_description
    from simulations.federated_audit import audit_user_level

    for control in RUNS:
        if (RECORD_DIR / f"{control}.json").is_file():
            log(f"[user-level audit] {control}: recorded before, kept")
            continue
        config = federation_config(out / control / "budget")
        started = time.monotonic()
        result = audit_user_level(config, DESIGN["canaries"], DESIGN["guesses"], "" if control == "none" else control,
                                  echo=log)
        record = {**result.to_dict(), "design": DESIGN, "users": USERS, "seconds": round(time.monotonic() - started),
                  "config": config.to_toml(), "machine_description": machine_description()}
        log(f"[user-level audit] wrote {shown(write_record(RECORD_DIR, control, plain_json(record)))}")


def load_records(folder: Path = RECORD_DIR) -> list[dict]:
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        record = load_record(path, REQUIRED)
        missing = missing_field(record["noise"], NOISE_FIELDS, "noise.")
        for index, finding in enumerate(record["findings"]):
            missing = missing or missing_field(finding, FINDING_FIELDS, f"findings[{index}].")
        if missing:
            raise field_error(path, missing)
        records.append(record)
    return sorted(records, key=lambda r: RUNS.index(r["control"]) if r["control"] in RUNS else len(RUNS))


def report(records: list[dict]) -> str:
    if not records:
        return "# User-level audit\n\nNo records yet: run `python -m simulations.federated_audit_table`.\n"
    first = records[0]
    rate = SETTING["clients_per_round"] / USERS
    never = (1 - rate) ** SETTING["rounds"]  # an included canary that never joins
    lines = ["# User-level audit: canary clients at 1,000 users", "",
             "Written by `python -m simulations.federated_audit_table --report-only` from the records in "
             "`docs/results/records/audit-user-level/` (do not edit by hand). What canary clients (Andrew et al., "
             "ICLR 2024) prove about user-level DP-FedAvg in one federated run: "
             f"{first['users']:,} simulated users (8,000 tweets split IID, 8 each), a Poisson cohort of 20 a round "
             "(q = 0.02) for 10 rounds, updates clipped to 1, noise multiplier 0.5 on the sum, each sampled user "
             "training for real under its own record-level DP-SGD; the claim is the user-level ledger's epsilon at "
             f"delta {float(first['delta']):.3g} (1 / (10 x users)). {first['design']['canaries']:,} canary clients "
             "(one adapter coordinate each, each included by a fair coin) join each round at the cohort's rate; the "
             "auditing server scores each by the log likelihood ratio of its rounds' observations (the released sum "
             "minus the real users' clipped sum). The estimators are those of `docs/audit.md`.", "",
             *table_header(), *[table_row(r, f) for r in records for f in r["findings"]], "",
             *tightest_lines(records), *[f"- {r['control']}: {r['verdict']}" for r in records], "",
             "## Reading the table", "",
             f"- Sampling hides a user: a canary client joins a round with probability {rate:g}, so in "
             f"{SETTING['rounds']} rounds most included canaries never join at all ({never:.0%} of them) and nothing "
             "can tell them from excluded ones. The claimed epsilon is driven by the rare canary that joins several "
             "times; a one-run audit sees the bulk, so its bounds sit far below a claim made with amplification by "
             "sampling. What it can do is catch a leak: the leaking controls keep the planned claim, and the proof "
             "must exceed the planned mechanism's tight epsilon (in brackets after the claim: the privacy loss "
             "distribution's, where the ledger's accountant is RDP). " + leaks_sentence(records),
             "- 'Epsilon as measured' puts the noise multiplier the excluded canaries measured through the user-level "
             "accountant with the planned rate and rounds.", "",
             f"Machine: {machine_line(records)}. Wall time: "
             + ", ".join(f"{r['control']} {r['seconds']} s" for r in records) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return report_command(argv, name="federated_audit_table", description=__doc__.splitlines()[0],
                          default_out="runs/audit-user-level", report_path=REPORT, run=run,
                          render=lambda: report(load_records()))


if __name__ == "__main__":
    raise SystemExit(main())
