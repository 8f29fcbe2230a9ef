"""The audit table in `docs/audit.md`: `fedtune audit` on the default simulation's node.

The node is client 0 of `fedtune simulate`'s defaults (BBC News, 5 IID clients of ~380
articles, 5 rounds x 1 local epoch, its own DP-SGD), audited at epsilon 8 (the default
node's), then 1 and 3, with 20,000 gradient canaries (1,000 Steinke guesses) plus 100 input
canaries (50 guesses), and controls: the leaking ones (noise off, noise halved, one step
released without noise, the Poisson sample made public: a proof must catch each)
and nothing inserted (the bounds must be about zero); every control at epsilon 8, the
noise ones at 1 and 3. Every audit trains a fresh model on the client's rows; budgets live in the output folder.

Every audit run (an epsilon x the audit itself or one control) writes one compact record
under `docs/results/records/audit/`; the report is rendered from those records alone, so a
fresh clone regenerates it in seconds and a test checks the committed report against them.

    python -m simulations.audit_table [--out runs/audit]   # audits each epsilon not measured here yet
    python -m simulations.audit_table --report-only        # docs/audit.md from the records

The record helpers below (`load_record`, `plain_json`, `machine_line`, `provenance_lines`)
are also used by `simulations.instruct_results`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from fedtune.audit.node_audit import TABLE_HEADER, markdown_row
from simulations.records import (RECORDS, field_error, load_record, machine_line, missing_field, plain_json,
                                 provenance_lines, report_command, shown, write_record)

ROOT = Path(__file__).resolve().parent.parent
RECORD_DIR = RECORDS / "audit"
REPORT = ROOT / "docs" / "audit.md"
EPSILONS = (1.0, 3.0, 8.0)
DESIGN = {"canaries": 20000, "guesses": 1000, "input_canaries": 100, "input_guesses": 50}
# "none" is the audit itself, as `AuditResult.to_dict` names it; then the leaking controls and no-canaries
CONTROLS = ("none", "noise-off", "noise-halved", "unnoised-step", "public-sample", "no-canaries")
CONTROLS_AT = {1.0: ("noise-off", "noise-halved"), 3.0: ("noise-off", "noise-halved"),
               8.0: CONTROLS[1:]}
REQUIRED = ("epsilon", "control", "design", "claimed_epsilon", "delta", "findings", "noise", "passed", "verdict",
            "seconds", "config", "versions", "machine")
FINDING_FIELDS = ("kind", "canaries", "included", "guesses", "correct", "lower_bound", "best_possible")
NOISE_FIELDS = ("measured_noise", "planned_noise", "low", "high", "epsilon_as_measured")


# -- runs -------------------------------------------------------------------------------------

def node_config(epsilon: float, budget_dir: Path):
    """The default simulation's config at `epsilon`, with its budget in the output folder and a
    cap of twice the target: the audit and its no-canary control each train once on the rows
    (public BBC News), and each is charged like any training."""
    from fedtune.config import load_config
    from simulations.defaults import default_config_path

    return load_config(default_config_path(), [("dp", "target_epsilon", epsilon), ("node", "budget_dir", str(budget_dir)),
                                               ("node", "max_epsilon", 2 * epsilon)])


def _name(epsilon: float, control: str) -> str:
    return f"eps{epsilon:g}-{control}"


def measured_here(epsilon: float) -> bool:
    """Whether this epsilon's audit and controls all have records measured by this code (a
    recovered record is re-run, so that the command replaces it)."""
    paths = [RECORD_DIR / f"{_name(epsilon, c)}.json" for c in ("none",) + CONTROLS_AT[epsilon]]
    return all(p.is_file() and "provenance" not in json.loads(p.read_text(encoding="utf-8")) for p in paths)


def audit_epsilon(epsilon: float, folder: Path, log=print) -> None:
    """Train the audit and its controls at `epsilon` into `folder` (audit.json, audit.md,
    seconds.txt); an audit.json left by an earlier invocation is kept, not trained again."""
    from fedtune.audit.node_audit import AuditDesign, audit_node
    from simulations.partition import client_table

    if (folder / "audit.json").exists():
        return
    config = node_config(epsilon, folder / "budget")
    started = time.monotonic()
    audit_node(config, AuditDesign(**DESIGN), CONTROLS_AT[epsilon], folder, echo=log, table=client_table(config, 0))
    (folder / "seconds.txt").write_text(f"{time.monotonic() - started:.0f}\n")


def write_epsilon_records(epsilon: float, folder: Path) -> list[Path]:
    """One record per audit run at `epsilon`, from the folder's audit.json. `seconds` is the
    wall time of the audit and its controls together (they train one after another in one
    call), so every record of an epsilon carries the same value and the total counts it once."""
    from fedtune.system.machine import machine_description

    saved = json.loads((folder / "audit.json").read_text(encoding="utf-8"))
    seconds_file = folder / "seconds.txt"
    seconds = int(seconds_file.read_text()) if seconds_file.exists() else None
    config = node_config(epsilon, folder / "budget").to_toml()
    paths = []
    for result in saved["results"]:
        record = {"epsilon": epsilon, "design": saved["design"], **result, "seconds": seconds,
                  "seconds_cover": "the audit and every control at this epsilon", "config": config,
                  "machine_description": machine_description()}
        paths.append(write_record(RECORD_DIR, _name(epsilon, result["control"]), plain_json(record)))
    return paths


def run(out: Path, log=print) -> None:
    for epsilon in sorted(EPSILONS, reverse=True):  # the default node's epsilon (8) first
        if measured_here(epsilon):
            log(f"[audit] epsilon {epsilon:g}: measured before, kept")
            continue
        folder = out / f"eps{epsilon:g}"
        audit_epsilon(epsilon, folder, log)
        for path in write_epsilon_records(epsilon, folder):
            log(f"[audit] wrote {shown(path)}")


# -- the report -------------------------------------------------------------------------------

def check_record(path: Path, record: dict) -> dict:
    """The nested fields the table reads, named like `findings[1].correct`."""
    missing = missing_field(record["noise"], NOISE_FIELDS, "noise.")
    for index, finding in enumerate(record["findings"]):
        missing = missing or missing_field(finding, FINDING_FIELDS, f"findings[{index}].")
    if missing:
        raise field_error(path, missing)
    return record


def load_records(folder: Path = RECORD_DIR) -> list[dict]:
    """Every audit record in `folder`, checked; the order the report shows them in."""
    records = [check_record(path, load_record(path, REQUIRED)) for path in sorted(Path(folder).glob("*.json"))]
    return sorted(records, key=lambda r: (float(r["epsilon"]), CONTROLS.index(r["control"])
                                          if r["control"] in CONTROLS else len(CONTROLS)))


def table_header() -> list[str]:
    return TABLE_HEADER.split("\n")


table_row = markdown_row  # a record is `AuditResult.to_dict` with its provenance: the command's own rows


def epsilon_section(epsilon: float, records: list[dict]) -> list[str]:
    """The table of one epsilon's audit and controls, then each run's verdict in full."""
    mine = [r for r in records if float(r["epsilon"]) == epsilon]
    if not mine:
        return [f"## Epsilon {epsilon:g}", "", "not run", ""]
    lines = [f"## Epsilon {epsilon:g}", "", *table_header()]
    lines += [table_row(r, f) for r in mine for f in r["findings"]] + [""]
    return lines + tightest_lines(mine) + [f"- {r['control']}: {r['verdict']}" for r in mine] + [""]


def _largest(record: dict, *keys: str) -> float:
    """The largest of these figures over a record's findings; 0 where absent or not a number
    (a record from before an estimator existed, a finding it does not apply to)."""
    values = [float(f[key]) for f in record["findings"] for key in keys if f.get(key) is not None]
    return max([v for v in values if not math.isnan(v)], default=0.0)


def _proof(record: dict) -> float:
    """A run's tightest proven epsilon lower bound: the Steinke or the f-DP bound
    (`CanaryFinding.tightest_bound`)."""
    return _largest(record, "lower_bound", "fdp_bound")


def _ruled_out(record: dict) -> bool:
    """Whether the curve test ruled the planned mechanism out (a proof of a leak)."""
    return any(f.get("curve_rejects_planned") for f in record["findings"])


def _curve(record: dict) -> float:
    return _largest(record, "curve_epsilon")


def _estimate(record: dict) -> float:
    return _largest(record, "gdp_epsilon")


def _limit(record: dict) -> float:
    """What a proof must exceed to show a leak (`AuditResult.reference`): the planned
    mechanism's tight epsilon where recorded and below the claim, else the claim."""
    claim, tight = float(record["claimed_epsilon"]), record.get("tight_epsilon")
    return min(claim, float(tight)) if tight is not None else claim


def tightest_lines(records: list[dict]) -> list[str]:
    """The audit's tightest proof and the estimate, as shares of the claim and of the tight
    epsilon (where recorded)."""
    audit = [r for r in records if r["control"] == "none"]
    if not audit or not any(f.get("fdp_bound") is not None for f in audit[0]["findings"]):
        return []
    record = audit[0]
    claim, proof, curve, estimate = (float(record["claimed_epsilon"]), _proof(record), _curve(record),
                                     _estimate(record))
    tight = record.get("tight_epsilon")

    def share(value: float) -> str:
        text = f"{value / claim:.0%} of the claimed {claim:.3f}"
        return text + (f", {value / float(tight):.0%} of the tight {float(tight):.3f}" if tight is not None else "")

    lines = [f"The audit's tightest proven epsilon lower bound (95%): **{proof:.3f}**, {share(proof)}."]
    if any(f.get("curve_rejects_planned") is not None for f in record["findings"]):
        lines.append(f"The curve test {'rules out' if _ruled_out(record) else 'does not rule out'} the planned "
                     f"mechanism, and among mechanisms of its shape it proves epsilon >= **{curve:.3f}**, {share(curve)}.")
    lines.append(f"The Gaussian DP estimate: {estimate:.3f}, {share(estimate)}.")
    return [" ".join(lines), ""]


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def leaks_sentence(records: list[dict]) -> str:
    """Which leaking controls the proof caught, and which the estimate flagged, from the records."""
    leaking = [r for r in records if r["control"] not in ("none", "no-canaries")]
    if not leaking:
        return ""
    name = lambda r: f"{r['control']} at {float(r['epsilon']):g}" if "epsilon" in r else r["control"]  # noqa: E731
    caught = [name(r) for r in leaking if _proof(r) > _limit(r) or _ruled_out(r)]
    missed = [name(r) for r in leaking if not (_proof(r) > _limit(r) or _ruled_out(r))]
    by_bound = [name(r) for r in leaking if _proof(r) > _limit(r)]
    by_curve = [name(r) for r in leaking if _ruled_out(r)]
    parts = [f"A proof caught {_and(caught)}" if caught else "No proof caught a leaking control"]
    if caught:
        parts.append(f"the curve test caught {_and(by_curve) if by_curve else 'none'}, an epsilon lower bound "
                     f"(Steinke or f-DP) {_and(by_bound) if by_bound else 'none'}")
    if missed:
        parts.append(f"nothing caught {_and(missed)}")
    return "; ".join(parts) + "."


def _delta_text(delta: float) -> str:
    mantissa, exponent = f"{delta:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def reading_lines(records: list[dict]) -> list[str]:
    design = records[0]["design"]
    return ["## Reading the table", "",
            f"- Each estimator's ceiling ('/ max') is what the design could show if every included canary outscored "
            f"every excluded one; it is computed before training. The Steinke bound grows only like log(guesses) and its "
            f"delta term grows with the canaries: with {design['guesses']} guesses at this node's delta (1/(10 n), about "
            f"{_delta_text(float(records[0]['delta']))}) it cannot reach a claim of 8 at all. The f-DP bound tests a "
            "whole trade-off curve and can; the curve test, holding the scores to the planned mechanism's own curve "
            "rather than a Gaussian one, comes closest.",
            "- The leaking controls keep the planned claim while the mechanism leaks by a known route: `noise-off` "
            "(no noise), `noise-halved` (half the noise), `unnoised-step` (the last step released without noise: an "
            "uncharged step), `public-sample` (the canaries' Poisson draws known to the auditor, as logged batch "
            "compositions would make them: no amplification by sampling). Each must be caught by a proof, not by "
            "the measured noise (which a leak need not move). " + leaks_sentence(records),
            "- The proofs are held to the planned mechanism's tight epsilon (the privacy loss distribution's, in "
            "brackets after the claim) where the node's accountant (RDP by default) is looser: a proven epsilon above "
            "the tight one shows a leak even while it stays below the printed claim. Each proof is at 95% "
            "confidence; the verdict fails the audit if any of them (or the noise check) does, so its false-alarm "
            "rate is at most the sum of theirs. The curve test's Bonferroni correction runs over the ROC's convex "
            "hull, read off the same scores (jax_privacy's convention), not over thresholds fixed in advance.",
            "- 'Epsilon as measured' puts the measured noise multiplier's 95% lower confidence bound through the "
            "node's accountant with the planned sample rate and steps: the claim re-derived from the noise the "
            "training really added.",
            "- The no-canary control draws the coins and inserts nothing: the guesses are at chance and the bounds "
            "are zero, so a positive bound elsewhere is not an artefact of the guessing.",
            "- Input canaries (black-box: loss drop of random-token records) prove little against DP-SGD, as the "
            "paper reports; they audit the path a record takes, data loader included.",
            "- Dividing the noisy sum by the drawn batch's size, rather than a constant, would leak the Poisson "
            "draw's size beyond the accounted curve; fedtune's DP-SGD divides by a constant on every path "
            "(`tests/test_dp_normalisation.py`), so there is no such leak to audit here.", ""]


def trainings_text(records: list[dict]) -> str:
    """The summed training time: each epsilon's measured time once; recovered records carry
    only the total the earlier report printed, which is quoted as such."""
    measured = {float(r["epsilon"]): r["seconds"] for r in records if r["seconds"] is not None}
    reported = sorted({r["reported_total_minutes"] for r in records
                       if r["seconds"] is None and r.get("reported_total_minutes") is not None})
    unknown = sum(1 for r in records if r["seconds"] is None)
    if not unknown:
        return f"Trainings summed: {sum(measured.values()) / 60:.0f} min."
    if not measured and len(reported) == 1 and unknown == len(records):
        return f"Trainings summed: {reported[0]} min (the earlier report's total; the runs' own times were not kept)."
    return (f"Trainings summed: {sum(measured.values()) / 60:.0f} min over the epsilons that recorded their time; "
            f"{unknown} records carry none.")


def header_lines(records: list[dict]) -> list[str]:
    design = records[0]["design"] if records else DESIGN
    half = design["guesses"] // 2
    return ["# Privacy audit of the default simulation's node", "",
            "Written by `python -m simulations.audit_table --report-only` from the records in "
            "`docs/results/records/audit/`, one per audit run (do not edit by hand). What `fedtune audit` proves about "
            "client 0 of `fedtune simulate`'s defaults (BBC News, 5 IID clients of ~380 articles, 5 rounds x 1 "
            "epoch of DP-SGD, batch 32, sequence 64) from one training run, beside the epsilon the node claims for "
            "that training: four estimators side by side (three proofs and an estimate), each at 95% confidence and "
            "each with what the design could "
            "show at most (its ceiling, known before training), and the noise multiplier the white-box canaries "
            "measured beside the planned one.", "",
            "- **Steinke bound** (Steinke, Nasr and Jagielski, NeurIPS 2023): an (epsilon, delta) claim tested against "
            "the number of right guesses.",
            "- **f-DP bound** (Mahloujifar, Melis and Chaudhuri, ICML 2025): the Gaussian trade-off curve an (epsilon, "
            "delta) Gaussian mechanism has, tested against the same game; a proof for a mechanism whose curve lies "
            "above it, as DP-SGD's accounted one does.",
            "- **Curve test**: the planned mechanism's own trade-off curve (its Poisson-subsampled Gaussian steps, read "
            "from the privacy loss distribution) tested at every threshold's Clopper-Pearson error rates. Valid "
            "because the white-box canaries' scores are independent by construction (each on its own coordinate, "
            "with its own noise, coin and Poisson draws, the records' clipped sum taken out). Whether it rules out "
            "the planned mechanism is a proof of a leak; its epsilon (of the least private mechanism of the planned "
            "shape the scores do not rule out) is a lower bound among mechanisms of that shape, and an estimate for "
            "a leak of another shape.",
            "- **Gaussian DP estimate**: a lower confidence bound on mu from every threshold's Clopper-Pearson error "
            "rates (the canaries' scores are independent samples), and its epsilon at delta: an estimate, exact only "
            "if the mechanism's curve is Gaussian.", "",
            *[line for text in provenance_lines(records, "python -m simulations.audit_table") for line in (text, "")],
            f"Design, fixed before training: {design['canaries']} gradient canaries (one adapter coordinate each, "
            f"sampled like records in every DP-SGD step; white-box score: the likelihood ratio of each step's "
            f"observation, summed), {design['guesses']} guesses for the Steinke bound (the {half} highest scores "
            f"guessed included, the {half} lowest excluded), the best threshold for the others (Bonferroni over the "
            f"thresholds); {design['input_canaries']} input canaries (random tokens, random labels), "
            f"{design['input_guesses']} guesses.", ""]


def report(records: list[dict]) -> str:
    """docs/audit.md, from the records alone."""
    lines = header_lines(records)
    for epsilon in EPSILONS:
        lines += epsilon_section(epsilon, records)
    if records:
        lines += reading_lines(records) + [f"Machine: {machine_line(records)}. {trainings_text(records)}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return report_command(argv, name="audit_table", description=__doc__.splitlines()[0], default_out="runs/audit",
                          report_path=REPORT, run=run, render=lambda: report(load_records()))


if __name__ == "__main__":
    raise SystemExit(main())
