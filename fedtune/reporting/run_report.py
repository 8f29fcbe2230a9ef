"""Everything a federation run directory reports, regenerated from its raw records.

Inputs (written while the run goes): `metrics.jsonl` (one line per round), `config.toml`,
`partitions.json` and, in simulation, `clients/client-NNNNN/ledger.json`. Outputs:

    metrics.csv      the JSONL as a table (one row per round)
    clients.csv      the per-client privacy ledger table; epsilon recomputed by Opacus's
                     accountant from each ledger's logged (sigma, q, steps) history
    summary.md       what ran, final utility next to the majority baseline, privacy spent
    accuracy.png, loss.png, epsilon.png   utility vs round; epsilon vs round per client

`fedtune report RUN_DIR` rebuilds them; nothing here changes the raw records.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from fedtune.system.atomic import atomic_write_bytes, atomic_write_text
from fedtune.errors import FedtuneError
from fedtune.privacy import PrivacyLedger
from fedtune.reporting.privacy_summary import node_entries, privacy_markdown, read_released, user_entry
from fedtune.privacy.randomness import GENERATOR_NOTE, REPRODUCIBLE_LABEL

METRIC_COLUMNS = ("round", "evaluation", "accuracy", "macro_f1", "loss", "perplexity", "train_loss", "epsilon_max",
                  "epsilon_mean", "user_epsilon", "clients_accepted", "clients_rejected", "clients_refused",
                  "bytes_sent", "bytes_received", "resident_mb", "seconds")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FedtuneError(f"{run_dir}: no metrics.jsonl (not a federation run directory, or no round finished)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise FedtuneError(f"{path}: line {number} is not JSON") from None
    return rows


def read_ledgers(run_dir: Path) -> dict[str, PrivacyLedger]:
    """Each virtual client's ledger (its budget folder is its state dir in simulation)."""
    ledgers = {}
    for path in sorted((run_dir / "clients").glob("client-*/ledger*.json")):
        ledgers.setdefault(path.parent.name, PrivacyLedger.load(path))
    return ledgers


def _cell(value) -> str:
    if isinstance(value, list):
        return str(len(value))  # clients: a count; their ids and reasons stay in the JSONL
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _csv(rows: list[list]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def metrics_csv(metrics: list[dict]) -> str:
    columns = [c for c in METRIC_COLUMNS if any(c in r for r in metrics)]
    return _csv([columns] + [[_cell(r.get(c)) for c in columns] for r in metrics])


def ledger_rows(ledgers: dict[str, PrivacyLedger]) -> list[dict]:
    rows = []
    for client, ledger in ledgers.items():
        rounds = [c for c in ledger.calls if not c.get("non_private")]
        rows.append({
            "client": client,
            "rounds_trained": len(ledger.calls),
            "steps": ledger.steps,
            "noise_multiplier": rounds[-1]["noise_multiplier"] if rounds else None,
            "sample_rate": rounds[-1]["sample_rate"] if rounds else None,
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "epsilon": ledger.epsilon(),  # recomputed from the history by Opacus's accountant
            "max_epsilon": ledger.max_epsilon,
        })
    return rows


def clients_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    return _csv([columns] + [[_cell(r[c]) for c in columns] for r in rows])


def round_of(label: str) -> int | None:
    """The server round a ledger label names (\"round 3\"), else None."""
    parts = label.split()
    return int(parts[1]) if len(parts) == 2 and parts[0] == "round" and parts[1].isdigit() else None


def epsilon_by_round(ledger: PrivacyLedger) -> list[tuple[int, float]]:
    """(round, epsilon after it) for each round the client trained in."""
    points = []
    for call in ledger.calls:
        server_round = round_of(str(call.get("label", "")))
        if server_round is not None:
            points.append((server_round, math.inf if call.get("non_private") else float(call["epsilon_after"])))
    return points


def _plot(path: Path, title: str, ylabel: str, series: dict[str, list[tuple[float, float]]], hline=None) -> None:
    figure, axes = new_figure()
    for name, points in series.items():
        points = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
        if points:
            axes.plot(*zip(*points), marker="o", markersize=3, label=name)
    if hline is not None:
        axes.axhline(hline[1], color="grey", linestyle="--", linewidth=1, label=hline[0])
    axes.set(title=title, xlabel="round", ylabel=ylabel)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    axes.grid(alpha=0.3)
    if len(series) <= 12 or hline is not None:
        axes.legend(fontsize=7)
    save_figure(figure, path)


def new_figure(size=(6, 4)):
    """A matplotlib figure on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=120)


def save_figure(figure, path: Path) -> None:
    """Write a figure as PNG atomically and free it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


ZERO_SHOT_FILE = "zero_shot.json"  # instruct: round 0, the initial adapter (the base model for LoRA / IA3)
SAMPLES_FILE = "samples.jsonl"  # instruct: a few generated answers per round, from the central held-out set
DATA_SUMMARY_FILE = "data_summary.json"  # instruct: rows kept / skipped / prompts shortened


def _instruct_lines(run_dir: Path) -> list[str]:
    """The instruct part of a summary: zero-shot baseline, what fit, a few generations."""
    lines = []
    zero_path, samples_path, data_path = run_dir / ZERO_SHOT_FILE, run_dir / SAMPLES_FILE, run_dir / DATA_SUMMARY_FILE
    if zero_path.is_file():
        zero = json.loads(zero_path.read_text(encoding="utf-8"))
        lines += ["## Scored by generation", "",
                  f"Round 0 (the initial adapter, i.e. the base model zero-shot for LoRA and IA3): exact-match accuracy "
                  f"**{zero['accuracy']:.4f}**, response loss {zero['loss']:.4f}, on {int(zero['examples'])} held-out "
                  "examples (greedy decoding, normalised answer).", ""]
    if data_path.is_file():
        data = json.loads(data_path.read_text(encoding="utf-8"))
        for part, counts in data.items():
            lines.append(f"- {part}: {counts['kept']} of {counts['examples']} examples used; "
                         f"{counts['skipped_response_too_long']} skipped (response does not fit in model.max_seq_len), "
                         f"{counts['prompts_shortened']} prompt(s) shortened")
        lines.append("")
    if samples_path.is_file():
        last = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()][-1]
        lines += [f"Generated answers after round {last['round']} (first held-out examples):", "",
                  "| prompt (end) | expected | generated |", "|---|---|---|"]
        for sample in last["samples"]:
            prompt, expected, generated = (" ".join(str(sample[k]).split()).replace("|", "\\|")
                                           for k in ("prompt", "expected", "generated"))
            lines.append(f"| ...{prompt[-120:]} | {expected} | {generated} |")
        lines.append("")
    return lines


def _summary(run_dir: Path, metrics: list[dict], rows: list[dict], majority: float | None,
             privacy: list[dict]) -> str:
    last = metrics[-1]
    lines = [f"# Federation run `{run_dir.name}`", ""]
    noise = str(last.get("noise", ""))
    if noise == REPRODUCIBLE_LABEL:
        lines += [f"**{REPRODUCIBLE_LABEL}** (dp.noise_seed was set: anyone with the seed can replay this run's noise).", ""]
    config_path = run_dir / "config.toml"
    if config_path.is_file():
        from fedtune.models.adapter_methods import describe_adapter
        from fedtune.config import HARNESS_TABLES, config_from_toml_text, toml_value
        from fedtune.training.model_card import base_model_reference, secure_aggregation_line

        config = config_from_toml_text(config_path.read_text(encoding="utf-8"), source=str(config_path))
        fed, dp, t = config.federation, config.dp, config.training
        data = config.data.path or config.data.dataset
        lines += [f"- data: `{data}`, {fed.clients_per_round} clients per round, {len(metrics)} of {t.rounds} "
                  "rounds done",
                  # a harness's own table (a simulation's clients and partitioning), shown as the run recorded
                  # it: the core does not read its keys, and a deployment's config has none
                  *(f"- {name}: " + ", ".join(f"{key} = {toml_value(value)}" for key, value in table.items())
                    for name in HARNESS_TABLES if (table := getattr(config, name))),
                  f"- model: `{base_model_reference(config)}`, task {config.model.task}, {describe_adapter(config)}"
                  f", {t.epochs} local epoch(s), batch {t.batch_size}, lr {t.learning_rate:g}",
                  "- privacy: " + (f"record-level DP-SGD per client, target epsilon {dp.target_epsilon:g}" if dp.enabled
                                   else "**NON-PRIVATE** (no differential privacy)"),
                  *([f"- noise generator: {GENERATOR_NOTE}"] if dp.enabled and not dp.secure_mode else []),
                  *([line] if (line := secure_aggregation_line(config)) else []),
                  ""]
    lines += ["| round | evaluation | accuracy | loss | epsilon max | seconds |", "|---|---|---|---|---|---|"]
    for r in metrics:
        lines.append(f"| {r['round']} | {r.get('evaluation', '')} | {_cell(r.get('accuracy'))} | {_cell(r.get('loss'))} "
                     f"| {_cell(r.get('epsilon_max'))} | {_cell(r.get('seconds'))} |")
    lines.append("")
    if isinstance(last.get("accuracy"), float):
        baseline = f" (majority class: {majority:.4f})" if majority is not None else ""
        planned = _planned_rounds(run_dir)
        when = ("Final accuracy" if planned is None or last["round"] >= planned
                else f"Accuracy after round {last['round']} of {planned} (run in progress or stopped)")
        lines.append(f"{when} **{last['accuracy']:.4f}**{baseline}.")
    if rows:
        eps = [r["epsilon"] for r in rows]
        lines.append(f"Per-client epsilon, recomputed with Opacus's accountant from each ledger: max {max(eps):.4g}, "
                     f"mean {sum(eps) / len(eps):.4g}, over {len(rows)} clients (delta {rows[0]['delta']:.3g}); "
                     "see clients.csv.")
    if last.get("user_epsilon") is not None:
        lines.append(f"User-level epsilon (DP-FedAvg at the server): {last['user_epsilon']:.4g}.")
    total = sum(r.get("seconds", 0) for r in metrics)
    lines += [f"Wall time over all rounds: {total:.1f} s.", ""]
    lines += _instruct_lines(run_dir)
    if privacy:
        lines += privacy_markdown(privacy, noise)
    lines += ["Plots: `accuracy.png`, `loss.png`, `epsilon.png`. Raw records: `metrics.jsonl`, `clients/*/ledger-*.json`, "
              "`privacy.json`.", ""]
    return "\n".join(lines)


def _planned_rounds(run_dir: Path) -> int | None:
    path = run_dir / "config.toml"
    if not path.is_file():
        return None
    from fedtune.config import config_from_toml_text

    return config_from_toml_text(path.read_text(encoding="utf-8"), source=str(path)).training.rounds


def privacy_entries(run_dir: Path, ledgers: dict[str, PrivacyLedger]) -> list[dict]:
    """Record-level entries per node and the user-level entry, from the run's records."""
    released, user_ledger = read_released(run_dir)
    entries = node_entries(ledgers, released)
    config_path = run_dir / "config.toml"
    fed = {}
    if config_path.is_file():
        from fedtune.config import config_from_toml_text

        fed = config_from_toml_text(config_path.read_text(encoding="utf-8"), source=str(config_path)).to_dict()["federation"]
    user = user_entry(user_ledger, fed)
    return entries + ([user] if user else [])


def write_report(run_dir: str | Path) -> list[Path]:
    """(Re)build metrics.csv, clients.csv, summary.md and the plots; returns what it wrote."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedtuneError(f"{run_dir}: not a directory")
    metrics = read_metrics(run_dir)
    if not metrics:
        raise FedtuneError(f"{run_dir}/metrics.jsonl: no rounds recorded yet")
    ledgers = read_ledgers(run_dir)
    rows = ledger_rows(ledgers)
    majority = next((r["majority_accuracy"] for r in metrics if isinstance(r.get("majority_accuracy"), float)), None)
    written = []

    def put(name: str, text: str) -> None:
        atomic_write_text(run_dir / name, text)
        written.append(run_dir / name)

    put("metrics.csv", metrics_csv(metrics))
    if rows:
        put("clients.csv", clients_csv(rows))
    privacy = privacy_entries(run_dir, ledgers)
    put("privacy.json", json.dumps({"noise": metrics[-1].get("noise"), "entries": privacy}, indent=2) + "\n")
    put("summary.md", _summary(run_dir, metrics, rows, majority, privacy))
    rounds = [r["round"] for r in metrics]
    for key, title in (("accuracy", "accuracy"), ("loss", "loss")):
        if any(isinstance(r.get(key), float) for r in metrics):
            hline = ("majority class", majority) if key == "accuracy" and majority is not None else None
            _plot(run_dir / f"{key}.png", f"global model {title} per round", key,
                  {"global model": [(x, r.get(key)) for x, r in zip(rounds, metrics)]}, hline)
            written.append(run_dir / f"{key}.png")
    if ledgers:
        _plot(run_dir / "epsilon.png", "epsilon spent per client", "epsilon",
              {name: epsilon_by_round(ledger) for name, ledger in ledgers.items()})
        written.append(run_dir / "epsilon.png")
    return written
