"""Hardware efficiency: achieved training FLOP/s / a matrix-multiply peak measured here.

The peak is what this machine's BLAS (or CUDA) reaches on large square matrix multiplies
in the training dtype; the achieved figure is model FLOPs per token x tokens per second of
LoRA training (from `dp_overhead.py`'s measured step times, padding kept so every step does
the full batch x sequence work). FLOPs per token are counted from the model config:
forward = 2 x (attention and MLP weight matrices) + the attention score and mix products;
training with a frozen base adds the backward pass through the activations (about one more
forward) and almost nothing for the rank-8 adapter weights, so training ~ 2 x forward.
For all-MiniLM-L6-v2 at sequence 128 this is ~45 MFLOP per token, the figure the issue gives.

    python benchmarks/hardware_efficiency.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def training_flops_per_token(hidden: int, intermediate: int, layers: int, seq_len: int) -> float:
    """LoRA training FLOPs per token of a BERT-style encoder with a frozen base (see module doc)."""
    weights = 4 * hidden * hidden + 2 * hidden * intermediate  # Q, K, V, O + the two MLP matrices
    forward = 2 * weights * layers + 2 * 2 * seq_len * hidden * layers  # + QK^T and AV
    return 2.0 * forward


def minilm_flops_per_token(seq_len: int) -> float:
    from transformers import AutoConfig

    from fedtune.models.base import bundled_model_path

    config = AutoConfig.from_pretrained(bundled_model_path())
    return training_flops_per_token(config.hidden_size, config.intermediate_size, config.num_hidden_layers, seq_len)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 3.0) -> float:
    """Best FLOP/s over repeated size x size matrix multiplies (after a warm-up)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.matmul(a, b)
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - started))
    return best


def efficiency(dp_result: dict, seconds: float = 3.0) -> dict:
    """Fractions of the measured matmul peak reached by the DP benchmark's training steps."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak(device, seconds=seconds)
    per_token = minilm_flops_per_token(dp_result["seq_len"])
    tokens = dp_result["batch_size"] * dp_result["seq_len"]
    achieved = {mode: per_token * tokens / step for mode, step in dp_result["median_step_seconds"].items()}
    return {
        "benchmark": "hardware_efficiency",
        "device": str(device),
        "matmul_peak_flops": peak,
        "flops_per_token": per_token,
        "tokens_per_step": tokens,
        "achieved_flops": achieved,
        "fraction_of_peak": {mode: flops / peak for mode, flops in achieved.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dp_overhead import measure

    result = efficiency(measure(steps=args.steps))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
