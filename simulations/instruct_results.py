"""Federated instruction tuning of a real LLM: the runs behind `docs/results-instruct.md`.

SmolLM2-135M-Instruct (bundled) on a built-in instruct task, 5 nodes: the base model
zero-shot (every run's round 0: LoRA starts at B = 0, exactly the base model), federated
non-private, and federated with record-level DP-SGD at epsilon 8 per node. Each is a real
`fedtune simulate` (Flower simulation engine, Ray, Opacus, peft) scored by greedy
generation on the task's fixed held-out rows; the report is written from the runs' own
records, nothing typed by hand.

    python -m simulations.instruct_results [--dataset tweets-instruct] [--out runs/instruct-results]
    python -m simulations.instruct_results --report-only   # rewrite the report from finished runs

The base configuration is `simulations/instruct.toml` (sizes in its header); a finished
run is not re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedtune.atomic import atomic_write_json, atomic_write_text
from fedtune.config import load_config, parse_override
from fedtune.errors import FedtuneError
from fedtune.machine import machine_description
from fedtune.report import SAMPLES_FILE, ZERO_SHOT_FILE
from simulations.commands import default_config_path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # run name -> (what it is, overrides on simulations/instruct.toml)
    "non-private": ("federated, NON-PRIVATE", ["dp.enabled=false"]),
    "dp-eps8": ("federated, DP-SGD epsilon 8 per node", ["dp.target_epsilon=8"]),
}


def run_setting(name: str, dataset: str, out: Path) -> Path:
    from simulations.run import simulate

    target = out / name
    if (target / "summary.md").is_file():
        return target
    overrides = [parse_override(text) for text in SETTINGS[name][1] + [f"data.dataset={dataset!r}"]]
    config = load_config(default_config_path("instruct"), overrides)
    started = time.perf_counter()
    simulate(config, target)
    atomic_write_json(target / "wall_time.json", {"seconds": round(time.perf_counter() - started, 1)})
    return target


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


TRY_PROMPTS = ["Classify the sentiment of this tweet as negative, neutral or positive. Answer with one word.\n"
               "Tweet: my flight got cancelled again, three hours on the phone and nobody can help",
               "Classify the sentiment of this tweet as negative, neutral or positive. Answer with one word.\n"
               "Tweet: the new bridge opens to traffic on monday"]


def majority_line(dataset: str) -> str:
    """The share of the held-out rows whose answer is the most common one: what always
    giving that answer would score (a reference, not a model)."""
    from collections import Counter

    from fedtune.datasets_builtin import fixed_split, load_builtin

    answers = fixed_split(load_builtin(dataset))[1].labels
    answer, count = Counter(answers).most_common(1)[0]
    return (f"For reference, always answering the most common held-out answer (\"{answer}\") would score "
            f"{count / len(answers):.3f}.")


def answer_counts(run: Path, dataset: str) -> dict[str, int]:
    """How often each (normalised) answer was given on the held-out rows by the run's final
    adapter, generated once and kept in the run folder: whether a model learned the
    mapping or only the most common answer."""
    import torch

    from fedtune.datasets_builtin import fixed_split, load_builtin
    from fedtune.dp_train import autocast
    from fedtune.generation import load_for_generation
    from fedtune.instruct import answer_budget, encode_instruct, generate_from_ids, normalise_answer

    path = run / "answer_counts.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    model, tokenizer = load_for_generation(run / "adapter")
    held_out = fixed_split(load_builtin(dataset))[1]
    encoding = encode_instruct(tokenizer, held_out.texts, held_out.labels, 128)
    with torch.no_grad(), autocast(next(model.parameters()).device, "bf16"):
        answers = generate_from_ids(model, tokenizer, encoding.prompt_ids, answer_budget(tokenizer, held_out.labels, 0))
    counts: dict[str, int] = {}
    for answer in answers:
        key = normalise_answer(answer) or "(empty)"
        counts[key] = counts.get(key, 0) + 1
    counts = dict(sorted(counts.items(), key=lambda item: -item[1]))
    atomic_write_json(path, counts)
    return counts


def reading_lines(zero: dict, last: dict[str, dict], counts: dict[str, dict[str, int]], dataset: str) -> list[str]:
    """What the numbers say, computed from them."""
    dp, open_ = last["dp-eps8"], last["non-private"]
    config = load_config(default_config_path("instruct"))
    per_node = config.data.max_examples // config.federation.num_clients
    top_answer, top = next(iter(counts["dp-eps8"].items()))
    total = sum(counts["dp-eps8"].values())
    return ["", "Reading it: federated DP-SGD at epsilon 8 is "
            f"{dp['accuracy'] - zero['accuracy']:+.3f} over the base model zero-shot and "
            f"{dp['accuracy'] - open_['accuracy']:+.3f} against the same federation without DP. Zero-shot, the "
            "model rarely answers in the asked form; one round teaches it the form. Beyond that, at this size "
            f"({per_node} rows per node) the epsilon-8 adapter gives \"{top_answer}\" for {top} of {total} rows: "
            "it has learned the answer format and the class prior, and little of the mapping from the row to its "
            "answer; the non-private federation learns a little more of it. More rows per node is what DP "
            "needs here (see docs/results.md for the same effect on the classifier)."]


def stock_peft_lines(adapter: Path) -> list[str]:
    """The exported DP adapter loaded with stock `PeftModel.from_pretrained` on the converted
    base (what `fedtune generate` does), answering prompts that are not in the data."""
    from fedtune.generation import generate_answers

    answers = generate_answers(adapter, TRY_PROMPTS, max_new_tokens=8)
    lines = ["", "The exported epsilon-8 adapter, loaded with stock `PeftModel.from_pretrained` on the converted base "
             f"(`fedtune generate {adapter} \"PROMPT\"`), on tweets written for this page:", ""]
    for prompt, answer in zip(TRY_PROMPTS, answers):
        lines.append(f"- \"{prompt.split('Tweet: ', 1)[1]}\" -> `{answer}`")
    return lines


def write_report(out: Path, report: Path, dataset: str) -> Path:
    runs = {name: out / name for name in SETTINGS}
    missing = [str(run) for run in runs.values() if not (run / "summary.md").is_file()]
    if missing:
        raise FedtuneError(f"no finished run in {', '.join(missing)}: run without --report-only first")
    zero = json.loads((runs["dp-eps8"] / ZERO_SHOT_FILE).read_text(encoding="utf-8"))
    described = machine_description()
    config_text = Path(default_config_path("instruct")).read_text(encoding="utf-8")
    lines = [
        "# Federated instruction tuning of a real LLM", "",
        f"SmolLM2-135M-Instruct (bundled, Q4_1 GGUF dequantized to fp32), `{dataset}`, 5 nodes, all 5 every round, "
        "LoRA rank 8 on q/v. Every accuracy is exact match of the greedy answer (normalised: case, surrounding "
        f"punctuation, first line) on the task's fixed {int(zero['examples'])} held-out rows, scored by the server "
        "each round; the loss is the response-only loss on the same rows.", "",
        f"Machine: {described}.", "",
        "Produced by `python -m simulations.instruct_results` (writes this file from the runs' records).", "",
        "| setting | exact-match accuracy | response loss | epsilon per node (max) | wall time |",
        "|---|---|---|---|---|",
        f"| base model, zero-shot (round 0) | {zero['accuracy']:.3f} | {zero['loss']:.3f} | 0 (no training) | "
        f"{_minutes(zero.get('seconds', 0))} (evaluation only) |",
    ]
    for name, run in runs.items():
        last = _metrics(run)[-1]
        seconds = json.loads((run / "wall_time.json").read_text(encoding="utf-8"))["seconds"]
        eps = last.get("epsilon_max")
        eps_text = "inf (NON-PRIVATE)" if name == "non-private" else f"{float(eps):.2f}"
        lines.append(f"| {SETTINGS[name][0]}, {last['round']} rounds | {last['accuracy']:.3f} | {last['loss']:.3f} | "
                     f"{eps_text} | {_minutes(seconds)} |")
    lines += ["", majority_line(dataset), "", "Answers the final adapters give on the held-out rows (normalised):", ""]
    for name, run in runs.items():
        counts = answer_counts(run, dataset)
        lines.append(f"- {SETTINGS[name][0]}: " + ", ".join(f"{answer} {count}" for answer, count in counts.items()))
    lines += ["", "Wall times include the round-0 evaluation, every round's evaluation on the held-out rows and "
              "starting Ray.", "", "Per round (accuracy, loss):", ""]
    for name, run in runs.items():
        rounds = ", ".join(f"round {r['round']}: {r['accuracy']:.3f} / {r['loss']:.3f}" for r in _metrics(run))
        lines.append(f"- {SETTINGS[name][0]}: round 0: {zero['accuracy']:.3f} / {zero['loss']:.3f}, {rounds}")
    lines += ["", "Generated answers (first held-out rows):", "", "| expected | zero-shot | non-private | DP epsilon 8 |",
              "|---|---|---|---|"]
    final = {name: [json.loads(x) for x in (run / SAMPLES_FILE).read_text(encoding="utf-8").splitlines() if x.strip()][-1]
             for name, run in runs.items()}
    for i, sample in enumerate(zero["samples"]):
        cells = [sample["expected"], sample["generated"]] + [final[name]["samples"][i]["generated"] for name in runs]
        lines.append("| " + " | ".join(" ".join(str(c).split()).replace("|", "\\|") for c in cells) + " |")
    lines += reading_lines(zero, {name: _metrics(run)[-1] for name, run in runs.items()},
                           {name: answer_counts(run, dataset) for name, run in runs.items()}, dataset)
    lines += stock_peft_lines(runs["dp-eps8"] / "adapter")
    lines += ["", "Each run's `summary.md` has the privacy table (every epsilon recomputed by Opacus and by "
              "dp-accounting from the ledgers).", "", "The base configuration (`simulations/instruct.toml`):", "",
              "```toml", config_text.rstrip(), "```", ""]
    atomic_write_text(report, "\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="tweets-instruct", help="a built-in instruct task (default tweets-instruct)")
    parser.add_argument("--out", default="runs/instruct-results", help="where the runs go (default runs/instruct-results)")
    parser.add_argument("--report", default=str(ROOT / "docs" / "results-instruct.md"), help="the report to write")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if not args.report_only:
            for name in SETTINGS:
                run_setting(name, args.dataset, out)
        print(write_report(out, Path(args.report), args.dataset))
    except FedtuneError as exc:
        print(f"instruct_results: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
