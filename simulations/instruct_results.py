"""Federated instruction tuning of a real LLM: the runs behind `docs/results-instruct.md`.

SmolLM2-135M-Instruct (bundled) on a built-in instruct task, 5 nodes: the base model
zero-shot (every run's round 0: LoRA starts at B = 0, exactly the base model), federated
non-private, and federated with record-level DP-SGD at epsilon 8 per node, each trained
once per seed (`--seeds`, default 0,1,2). Each is a real `fedtune simulate` (Flower
simulation engine, Ray, Opacus, peft) scored by greedy generation on the task's fixed
held-out rows.

Every run writes one compact record under `docs/results/records/instruct/` (per-round
accuracy and loss, epsilon, wall time, each held-out row's normalised answer with their
counts and macro-F1, a few generated answers, the resolved config, versions and machine);
the report is rendered from those records alone, so a fresh clone regenerates it in seconds.

    python -m simulations.instruct_results [--seeds 0,1,2] [--dataset tweets-instruct] [--out runs/instruct-results]
    python -m simulations.instruct_results --report-only   # the report from the records

The base configuration is `simulations/instruct.toml` (sizes in its header); a run whose
record was measured by this code is not re-run (a record recovered from an earlier report is).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from fedtune.system.atomic import atomic_write_json, atomic_write_text
from fedtune.errors import FedtuneError
from simulations.records import (MIN_SEEDS, RECORDS, field_error, load_record, machine_line, mean_sd, missing_field,
                                 plain_json, provenance_lines, shown, write_record)
from simulations.settings import simulation_settings

ROOT = Path(__file__).resolve().parent.parent
RECORD_DIR = RECORDS / "instruct"
REPORT = ROOT / "docs" / "results-instruct.md"
SETTINGS = {  # run name -> (what it is, overrides on simulations/instruct.toml)
    "non-private": ("federated, NON-PRIVATE", ["dp.enabled=false"]),
    "dp-eps8": ("federated, DP-SGD epsilon 8 per node", ["dp.target_epsilon=8"]),
}
SEEDS = (0, 1, 2)
ZERO_SHOT = "zero-shot"
GAP_TARGET = 0.10  # what DP at epsilon 8 should add over always giving the most common answer
# What the recipe trains on SmolLM2-135M (30 blocks, hidden 576, 9 query heads and 3 key/value
# heads of 64): LoRA rank 8 on q (576 -> 576) and v (576 -> 192), by advise's count
# (`fedtune.privacy.advise.trainable_parameters`; a slow test checks it against the bundled model).
SMOLLM2_LORA_R8_QV = 460_800
ZERO_FIELDS = ("setting", "dataset", "accuracy", "loss", "examples", "seconds", "samples", "macro_f1", "config",
               "versions", "machine")
TRAINED_FIELDS = ("setting", "seed", "dataset", "rounds", "epsilon_max", "seconds", "answer_counts", "macro_f1",
                  "samples", "stock_peft", "adapter", "rows_per_node", "base_config", "config", "versions", "machine")
ROUND_FIELDS = ("round", "accuracy", "loss")
TRY_PROMPTS = ["Classify the sentiment of this tweet as negative, neutral or positive. Answer with one word.\n"
               "Tweet: my flight got cancelled again, three hours on the phone and nobody can help",
               "Classify the sentiment of this tweet as negative, neutral or positive. Answer with one word.\n"
               "Tweet: the new bridge opens to traffic on monday"]


# -- scoring ----------------------------------------------------------------------------------

def macro_f1(expected: list[str], answers: list[str], labels: list[str] | None = None) -> float:
    """The mean over the answer classes of each class's F1 (2 TP / (2 TP + FP + FN)).

    Exact match rewards a model that always gives the most common answer; macro-F1 weighs
    every class alike, so it shows whether a model learned the mapping or only the prior.
    `labels` are the classes (default: those expected). An answer outside them is wrong for
    every class: it misses its row's class (a false negative) and is no class's positive."""
    labels = sorted(set(expected)) if labels is None else list(labels)
    if not labels:
        return 0.0
    scores = []
    for label in labels:
        tp = sum(e == label and a == label for e, a in zip(expected, answers))
        fp = sum(e != label and a == label for e, a in zip(expected, answers))
        fn = sum(e == label and a != label for e, a in zip(expected, answers))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(labels)


def counts_of(answers: list[str]) -> dict[str, int]:
    """How often each normalised answer was given, most common first: whether a model learned
    the mapping or only the most common answer."""
    return dict(Counter(answer or "(empty)" for answer in answers).most_common())


def majority(dataset: str) -> dict:
    """Always giving the most common held-out answer: its accuracy and macro-F1, from the
    task's fixed held-out labels (cheap, no model) - the reference a trained model must beat."""
    from fedtune.data.named import fixed_split, load_builtin
    from fedtune.data.instruct import normalise_answer

    expected = [normalise_answer(str(label)) for label in fixed_split(load_builtin(dataset))[1].labels]
    answer, count = Counter(expected).most_common(1)[0]
    return {"answer": answer, "accuracy": count / len(expected), "macro_f1": macro_f1(expected, [answer] * len(expected))}


# -- runs -------------------------------------------------------------------------------------

def setting_config(name: str, dataset: str, seed: int):
    from fedtune.config import load_config, parse_override
    from simulations.defaults import default_config_path

    texts = SETTINGS[name][1] + [f"data.dataset={dataset!r}", f"training.seed={seed}"]
    return load_config(default_config_path("instruct"), [parse_override(text) for text in texts])


def run_setting(name: str, dataset: str, out: Path, seed: int) -> Path:
    """One `fedtune simulate` of a setting at a seed; a finished run folder is kept."""
    from simulations.run import simulate

    target = out / f"{name}-seed{seed}"
    if (target / "summary.md").is_file():
        return target
    started = time.perf_counter()
    simulate(setting_config(name, dataset, seed), target)
    atomic_write_json(target / "wall_time.json", {"seconds": round(time.perf_counter() - started, 1)})
    return target


def held_out_answers(run: Path, dataset: str, max_len: int, base: bool = False) -> tuple[list[str], list[str]]:
    """(normalised answer, normalised expected answer) per held-out row, by the run's final
    adapter or, with `base`, the base model (the adapter disabled: the zero-shot answers).
    Generated once and kept in the run folder: macro-F1 and the counts need every row."""
    path = run / ("answers-base.json" if base else "answers.json")
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved["answers"], saved["expected"]
    import torch

    from fedtune.data.named import fixed_split, load_builtin
    from fedtune.training.dp_train import autocast
    from fedtune.models.generation import load_for_generation
    from fedtune.data.instruct import answer_budget, encode_instruct, generate_from_ids, normalise_answer

    model, tokenizer = load_for_generation(run / "adapter")
    held_out = fixed_split(load_builtin(dataset))[1]
    encoding = encode_instruct(tokenizer, held_out.texts, held_out.labels, max_len)
    budget = answer_budget(tokenizer, held_out.labels, 0)
    adapter_off = model.disable_adapter() if base else contextlib.nullcontext()
    with torch.no_grad(), autocast(next(model.parameters()).device, "bf16"), adapter_off:
        generated = generate_from_ids(model, tokenizer, encoding.prompt_ids, budget)
    answers = [normalise_answer(text) for text in generated]
    expected = [normalise_answer(str(held_out.labels[i])) for i in encoding.kept]
    atomic_write_json(path, {"answers": answers, "expected": expected})
    return answers, expected


def stock_peft_answers(adapter: Path) -> list[dict]:
    """The exported adapter loaded with stock `PeftModel.from_pretrained` on the converted
    base (what `fedtune generate` does), answering prompts that are not in the data."""
    from fedtune.models.generation import generate_answers

    answers = generate_answers(adapter, TRY_PROMPTS, max_new_tokens=8)
    return [{"prompt": prompt, "answer": answer} for prompt, answer in zip(TRY_PROMPTS, answers)]


def _samples(items: list[dict]) -> list[dict]:
    return [{"expected": s["expected"], "generated": s["generated"]} for s in items]


def scored(answers: list[str], expected: list[str]) -> dict:
    return {"answers": answers, "answer_counts": counts_of(answers), "macro_f1": macro_f1(expected, answers)}


def _common(config) -> dict:
    from fedtune.system.machine import machine_description
    from simulations.defaults import default_config_path

    return {"dataset": config.data.dataset,
            "rows_per_node": config.data.max_examples // simulation_settings(config).num_clients,
            "base_config": Path(default_config_path("instruct")).read_text(encoding="utf-8"),
            "config": config.to_toml(), "machine_description": machine_description()}


def trained_record(name: str, seed: int, run: Path, config) -> dict:
    """A trained run's record: every round's scores, the final adapter's answers on every
    held-out row, a few generated answers, and (DP) what stock peft answers with its adapter."""
    from fedtune.reporting.run_report import SAMPLES_FILE
    from simulations.records import metrics_rows

    rows = metrics_rows(run)
    samples = [json.loads(x) for x in (run / SAMPLES_FILE).read_text(encoding="utf-8").splitlines() if x.strip()]
    return plain_json({
        "setting": name, "seed": seed, **_common(config),
        "rounds": [{"round": r["round"], "accuracy": r["accuracy"], "loss": r["loss"],
                    "epsilon_max": r.get("epsilon_max")} for r in rows],
        "epsilon_max": rows[-1].get("epsilon_max"),
        "seconds": json.loads((run / "wall_time.json").read_text(encoding="utf-8"))["seconds"],
        **scored(*held_out_answers(run, config.data.dataset, config.model.max_seq_len)),
        "samples": _samples(samples[-1]["samples"]), "adapter": str(run / "adapter"),
        "stock_peft": stock_peft_answers(run / "adapter") if config.dp.enabled else None})


def zero_shot_record(run: Path, config) -> dict:
    """Round 0 of a run (the base model) as its own record, with the base model's answers on
    every held-out row for macro-F1."""
    from fedtune.reporting.run_report import ZERO_SHOT_FILE

    zero = json.loads((run / ZERO_SHOT_FILE).read_text(encoding="utf-8"))
    answers = held_out_answers(run, config.data.dataset, config.model.max_seq_len, base=True)
    return plain_json({"setting": ZERO_SHOT, "seed": None, **_common(config), "accuracy": zero["accuracy"],
                       "loss": zero["loss"], "examples": zero["examples"], "seconds": zero.get("seconds", 0),
                       **scored(*answers), "samples": _samples(zero["samples"]), "taken_from": str(run)})


def measured_here(name: str, dataset: str) -> bool:
    """Whether `name`'s record was measured by this code on `dataset` (a recovered one is re-run)."""
    path = RECORD_DIR / f"{name}.json"
    if not path.is_file():
        return False
    record = json.loads(path.read_text(encoding="utf-8"))
    return "provenance" not in record and record.get("dataset") == dataset


def run(dataset: str, out: Path, seeds: tuple[int, ...], log=print) -> None:
    """Every setting at every seed, seed by seed (a session cut short leaves whole seeds), each
    recorded as it finishes; the zero-shot record comes from the first DP run made here."""
    for seed in seeds:
        for name in SETTINGS:
            if measured_here(f"{name}-seed{seed}", dataset):
                log(f"[instruct] {name} seed {seed}: measured before, kept")
                continue
            config = setting_config(name, dataset, seed)
            folder = run_setting(name, dataset, out, seed)
            record = trained_record(name, seed, folder, config)
            log(f"[instruct] wrote {write_record(RECORD_DIR, f'{name}-seed{seed}', record)}")
            if config.dp.enabled and not measured_here(ZERO_SHOT, dataset):
                log(f"[instruct] wrote {write_record(RECORD_DIR, ZERO_SHOT, zero_shot_record(folder, config))}")


# -- records ----------------------------------------------------------------------------------

def check_record(path: Path) -> dict:
    """One record with every field the report reads, or a one-line error naming the file and field."""
    record = load_record(path, ("setting",))
    if record["setting"] not in (ZERO_SHOT, *SETTINGS):
        raise FedtuneError(f"{shown(path)}: setting {record['setting']!r} is none of {ZERO_SHOT}, {', '.join(SETTINGS)}")
    record = load_record(path, ZERO_FIELDS if record["setting"] == ZERO_SHOT else TRAINED_FIELDS)
    for index, row in enumerate(record.get("rounds", [])):
        missing = missing_field(row, ROUND_FIELDS, f"rounds[{index}].")
        if missing:
            raise field_error(path, missing)
    return record


def load_records(folder: Path = RECORD_DIR) -> dict:
    """{"zero": the zero-shot record, "trained": {setting: its records by seed}}, checked."""
    records = [check_record(path) for path in sorted(Path(folder).glob("*.json"))]
    zero = [r for r in records if r["setting"] == ZERO_SHOT]
    if not zero:
        raise FedtuneError(f"{folder}: no {ZERO_SHOT}.json record; run `python -m simulations.instruct_results` first")
    trained = {name: sorted((r for r in records if r["setting"] == name), key=lambda r: r["seed"]) for name in SETTINGS}
    others = {r["dataset"] for r in records} - {zero[0]["dataset"]}
    if others:
        raise FedtuneError(f"{folder}: records of {zero[0]['dataset']} and {', '.join(sorted(others))} mixed; one "
                           "dataset per folder")
    return {"zero": zero[0], "trained": trained}


# -- the report -------------------------------------------------------------------------------

def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _signed(text: str) -> str:
    return text if text.startswith("-") else "+" + text


def final(record: dict, key: str) -> float:
    return float(record["rounds"][-1][key])


def f1_cell(records: list[dict]) -> str:
    """Macro-F1 as mean ± sd over the seeds that recorded it; 'not recorded' where none did."""
    values = [float(r["macro_f1"]) for r in records if r["macro_f1"] is not None]
    if not values:
        return "not recorded"
    return mean_sd(values) + (f", {len(records) - len(values)} seed(s) not recorded" if len(values) < len(records) else "")


def setting_row(name: str, records: list[dict]) -> str:
    """A trained setting's row: mean ± sd over its seeds, a cell from fewer than three seeds marked."""
    if not records:
        return f"| {SETTINGS[name][0]} | not run | not run | not run | not run | not run | not run |"
    epsilon = "inf (NON-PRIVATE)" if name == "non-private" else f"{max(float(r['epsilon_max']) for r in records):.2f}"
    seconds = statistics.mean(float(r["seconds"]) for r in records)
    wall = _minutes(seconds) + (f" (mean of {len(records)} runs)" if len(records) > 1 else "")
    return (f"| {SETTINGS[name][0]}, {records[-1]['rounds'][-1]['round']} rounds | "
            f"{', '.join(str(r['seed']) for r in records)} | {mean_sd([final(r, 'accuracy') for r in records])} | "
            f"{f1_cell(records)} | {mean_sd([final(r, 'loss') for r in records])} | {epsilon} | {wall} |")


def table_lines(zero: dict, trained: dict, reference: dict) -> list[str]:
    return ["| setting | seeds | exact-match accuracy | macro-F1 | response loss | epsilon per node (max) | wall time |",
            "|---|---|---|---|---|---|---|",
            f"| base model, zero-shot (round 0) | - (no training) | {float(zero['accuracy']):.3f} | {f1_cell([zero])} | "
            f"{float(zero['loss']):.3f} | 0 (no training) | {_minutes(float(zero['seconds']))} (evaluation only) |",
            f"| always the most common held-out answer (\"{reference['answer']}\"), a reference, not a model | - | "
            f"{reference['accuracy']:.3f} | {reference['macro_f1']:.3f} | - | 0 (no training) | - |",
            *[setting_row(name, records) for name, records in trained.items()]]


def gap_lines(trained: dict, reference: dict) -> list[str]:
    """The number the study is judged by: DP at epsilon 8 against always the most common answer."""
    gaps = [(r["seed"], final(r, "accuracy") - reference["accuracy"]) for r in trained["dp-eps8"]]
    if not gaps:
        return ["", "The DP federation at epsilon 8 has not run: no gap over the most common answer to report."]
    mean = statistics.mean(g for _, g in gaps)
    if mean < GAP_TARGET:
        status = "not met" + (f" (and from fewer than {MIN_SEEDS} seeds)" if len(gaps) < MIN_SEEDS else "")
    else:
        status = "met" if len(gaps) >= MIN_SEEDS else f"not yet shown: fewer than {MIN_SEEDS} seeds"
    return ["", f"The gap this study is judged by: at epsilon 8 the DP federation's exact-match accuracy minus always "
            f"answering \"{reference['answer']}\" ({reference['accuracy']:.3f}) is "
            f"{_signed(mean_sd([g for _, g in gaps]))}; per seed: " + ", ".join(f"seed {s} {g:+.3f}" for s, g in gaps)
            + f". The target is at least {GAP_TARGET:+.2f} over {MIN_SEEDS} seeds: {status}."]


def prediction_lines(dataset: str) -> list[str]:
    """What `fedtune privacy advise` predicts for the epsilon-8 recipe, and how many rows per
    node its calibrated threshold asks for at the same rounds, epochs and sample rate: the
    trend the CPU budget could not run."""
    import warnings

    from fedtune.privacy.advise import LEARNS, advise

    config = setting_config("dp-eps8", dataset, 0)
    t, nodes = config.training, config.federation.clients_per_round
    rows = config.data.max_examples // simulation_settings(config).num_clients
    rate = t.batch_size / rows

    def ratio(n: int) -> float:
        with warnings.catch_warnings():  # Opacus: "optimal order is the largest alpha"
            warnings.simplefilter("ignore")
            return advise(n, nodes, t.rounds, t.epochs, max(1, round(rate * n)), config.dp.target_epsilon, SMOLLM2_LORA_R8_QV,
                          accountant=config.dp.accountant).nsr_run

    now = ratio(rows)
    # at a fixed sample rate the ratio falls as 1 / rows (the noise multiplier moves only with
    # delta = 1 / (10 rows)), so scale, then correct for that drift: two or three calls, not a search
    needed, at = rows, now
    while at >= LEARNS and needed < 10_000_000:
        needed = math.ceil(needed * at / LEARNS * 1.01)
        at = ratio(needed)
    return ["", f"What the trend predicts: `fedtune privacy advise` puts this recipe ({rows} rows per node, {nodes} "
            f"nodes, {t.rounds} rounds x {t.epochs} epochs, batch {t.batch_size}, {SMOLLM2_LORA_R8_QV:,} trainable "
            f"parameters) at a run noise-to-signal ratio of {now:.2f}, where its calibrated threshold for \"can learn\" "
            f"is {LEARNS:g}. At the same rounds, epochs and sample rate it reaches that threshold at about "
            f"{needed:,} rows per node ({at:.3f}), {needed / rows:.0f} times the rows; the ratio grows "
            f"with the square root of the trainable parameters, so the same gain from a smaller adapter needs about "
            f"{(needed / rows) ** 2:,.0f} times fewer of them. At 5-9 s a DP step of 24 rows on this 2-core CPU, that many rows is days "
            "of compute a run, which is why it was not run here."]


def seeds_note() -> str:
    return (f"Each trained cell is the mean ± sd over training seeds (n = seeds); a cell from fewer than {MIN_SEEDS} "
            "seeds says so, and \"n = 1, one seed only\" is one run, not a result. Macro-F1 averages the F1 of each "
            "answer class (an answer outside the classes is wrong for every class); \"not recorded\" marks runs "
            "whose per-row answers were not kept.")


def per_run_lines(zero: dict, trained: dict) -> list[str]:
    """Each run's answer counts and per-round scores."""
    runs = [(name, r) for name, records in trained.items() for r in records]
    lines = ["", "Answers the final adapters give on the held-out rows (normalised):", ""]
    lines += [f"- {SETTINGS[name][0]}, seed {r['seed']}: " + ", ".join(f"{a} {c}" for a, c in r["answer_counts"].items())
              for name, r in runs]
    lines += ["", "Wall times include the round-0 evaluation, every round's evaluation on the held-out rows and "
              "starting Ray.", "", "Per round (accuracy, loss):", ""]
    start = f"round 0: {float(zero['accuracy']):.3f} / {float(zero['loss']):.3f}"
    scores = {id(r): ", ".join(f"round {x['round']}: {float(x['accuracy']):.3f} / {float(x['loss']):.3f}"
                               for x in r["rounds"]) for _, r in runs}
    return lines + [f"- {SETTINGS[name][0]}, seed {r['seed']}: {start}, {scores[id(r)]}" for name, r in runs]


def samples_lines(zero: dict, trained: dict) -> list[str]:
    """The first held-out rows' generated answers: zero-shot, then each setting's first seed."""
    first = {name: records[0] for name, records in trained.items() if records}
    seeds = ", ".join(f"{name} seed {r['seed']}" for name, r in first.items())
    lines = ["", f"Generated answers (first held-out rows; {seeds}):", "",
             "| expected | zero-shot | " + " | ".join({"non-private": "non-private", "dp-eps8": "DP epsilon 8"}[n]
                                                      for n in first) + " |", "|---" * (2 + len(first)) + "|"]
    for i, sample in enumerate(zero["samples"]):
        cells = [sample["expected"], sample["generated"]] + [r["samples"][i]["generated"] for r in first.values()]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _seeds_text(*groups: list[dict]) -> str:
    sizes = [len(g) for g in groups]
    return (" (one seed each: n = 1)" if max(sizes) == 1 else
            " (means over seeds: n = " + " and ".join(map(str, sizes)) + (
                f", fewer than {MIN_SEEDS} seeds)" if min(sizes) < MIN_SEEDS else ")"))


def reading_lines(zero: dict, trained: dict, reference: dict) -> list[str]:
    """What the numbers say, computed from them."""
    dp, open_ = trained["dp-eps8"], trained["non-private"]
    if not dp or not open_:
        return []
    dp_mean, open_mean = (statistics.mean(final(r, "accuracy") for r in g) for g in (dp, open_))
    first = dp[0]
    top_answer, top = next(iter(first["answer_counts"].items()))
    learned = dp_mean - reference["accuracy"] < GAP_TARGET
    text = (f"Reading it: federated DP-SGD at epsilon 8 is {dp_mean - float(zero['accuracy']):+.3f} over the base model "
            f"zero-shot and {dp_mean - open_mean:+.3f} against the same federation without DP{_seeds_text(dp, open_)}.")
    if float(zero["accuracy"]) < reference["accuracy"]:
        text += " Zero-shot, the model rarely answers in the asked form; one round teaches it the form."
    text += (f" Beyond that, at this size ({first['rows_per_node']} rows per node) the epsilon-8 adapter (seed "
             f"{first['seed']}) gives \"{top_answer}\" for {top} of {sum(first['answer_counts'].values())} rows: ")
    text += ("it has learned the answer format and the class prior, and little of the mapping from the row to its "
             "answer" if learned else
             "beyond the class prior it has learned part of the mapping from the row to its answer")
    if open_mean > dp_mean:
        text += f"; the non-private federation learns more of it ({open_mean - dp_mean:+.3f})"
    text += "." + (" More rows per node is what DP needs here (see docs/results.md for the same effect on the "
                   "classifier)." if learned else "")
    return ["", text]


def stock_peft_lines(trained: dict) -> list[str]:
    asked = [r for r in trained["dp-eps8"] if r["stock_peft"]]
    if not asked:
        return []
    record = asked[0]
    lines = ["", f"The exported epsilon-8 adapter (seed {record['seed']}), loaded with stock `PeftModel.from_pretrained` "
             f"on the converted base (`fedtune generate {record['adapter']} \"PROMPT\"`), on tweets written for this "
             "page:", ""]
    return lines + [f"- \"{x['prompt'].split('Tweet: ', 1)[-1]}\" -> `{x['answer']}`" for x in record["stock_peft"]]


def header_lines(zero: dict, everything: list[dict]) -> list[str]:
    return ["# Federated instruction tuning of a real LLM", "",
            f"SmolLM2-135M-Instruct (bundled, Q4_1 GGUF dequantized to fp32), `{zero['dataset']}`, 5 nodes, all 5 every "
            "round, LoRA rank 8 on q/v. Every accuracy is exact match of the greedy answer (normalised: case, "
            f"surrounding punctuation, first line) on the task's fixed {int(zero['examples'])} held-out rows, scored by "
            "the server each round; the loss is the response-only loss on the same rows.", "",
            f"Machine: {machine_line(everything)}.", "",
            "Written by `python -m simulations.instruct_results --report-only` from the records in "
            "`docs/results/records/instruct/`, one per run (do not edit by hand).", "",
            *[line for text in provenance_lines(everything, "python -m simulations.instruct_results")
              for line in (text, "")]]


def config_lines(trained: dict) -> list[str]:
    source = next((records[0] for records in (trained["dp-eps8"], trained["non-private"]) if records), None)
    if source is None:
        return []
    return ["", "Each run's folder (under `runs/`, not committed) has a `summary.md` with the privacy table (every "
            "epsilon recomputed by Opacus and by dp-accounting from the ledgers); each record keeps the run's own "
            "configuration.", "", "The base configuration (`simulations/instruct.toml`):", "", "```toml",
            source["base_config"].rstrip(), "```", ""]


def report(records: dict, reference: dict | None = None) -> str:
    """docs/results-instruct.md from the records (and the task's held-out labels, for the
    most-common-answer reference)."""
    zero, trained = records["zero"], records["trained"]
    reference = reference or majority(zero["dataset"])
    everything = [zero] + [r for group in trained.values() for r in group]
    lines = header_lines(zero, everything) + table_lines(zero, trained, reference) + ["", seeds_note()]
    lines += gap_lines(trained, reference) + prediction_lines(zero["dataset"]) + per_run_lines(zero, trained)
    lines += samples_lines(zero, trained)
    lines += reading_lines(zero, trained, reference) + stock_peft_lines(trained) + config_lines(trained)
    return "\n".join(lines)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected whole numbers separated by commas, e.g. 0,1,2")
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected one or more seeds >= 0, e.g. 0,1,2")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="tweets-instruct", help="a built-in instruct task (default tweets-instruct)")
    parser.add_argument("--out", default="runs/instruct-results", help="where the runs go (default runs/instruct-results)")
    parser.add_argument("--seeds", type=_seeds, default=SEEDS,
                        help="training seeds of each trained setting (default 0,1,2)")
    parser.add_argument("--report", default=str(REPORT), help="the report to write")
    parser.add_argument("--report-only", action="store_true", help="write the report from the records only")
    args = parser.parse_args(argv)
    try:
        if not args.report_only:
            run(args.dataset, Path(args.out), args.seeds)
        atomic_write_text(Path(args.report), report(load_records()))
    except FedtuneError as exc:
        print(f"instruct_results: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
