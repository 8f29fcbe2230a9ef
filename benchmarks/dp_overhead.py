"""DP-SGD step time / non-private step time, LoRA on all-MiniLM-L6-v2, side by side.

Three copies of the same LoRA model (non-private; Opacus hooks; Opacus ghost clipping)
take optimizer steps on *the same* batches, interleaved in rotating order, so machine
noise hits every mode alike. Batches are fixed-size (32) BBC News articles at sequence
128 (padding kept: every step does the full 32 x 128 work). Reports the median step
time per mode and the ratios to non-private, plus the machine.

    python benchmarks/dp_overhead.py [--steps 12] [--batch-size 32] [--seq-len 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402

from fedtune.system.quiet import quiet_libraries  # noqa: E402
from fedtune.config import LoraSettings  # noqa: E402
from fedtune.data.tables import LabelMap, TokenCache, load_builtin  # noqa: E402
from fedtune.system.machine import machine  # noqa: E402
from fedtune.training.losses import PerExampleLoss  # noqa: E402
from fedtune.models.base import attach_lora, bundled_model_path, load_base_model, load_tokenizer, trainable_named_parameters  # noqa: E402


class Mode:
    """One model + optimizer (+ Opacus) that can take a step on a given batch."""

    def __init__(self, name: str, base_path: Path, num_labels: int, pad_id: int, batch_size: int, device):
        self.name = name
        base = load_base_model(base_path, "classification", num_labels, pad_id)
        self.model = attach_lora(base, LoraSettings(rank=8, alpha=16), "classification", seed=0).to(device)
        self.model.train()
        params = [p for _, p in trainable_named_parameters(self.model)]
        self.optimizer = torch.optim.AdamW(params, lr=1e-3)
        self.criterion = PerExampleLoss("classification")
        if name == "non-private":
            return
        dummy = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(batch_size * 10)), batch_size=batch_size)
        prepared = PrivacyEngine().make_private(
            module=self.model, optimizer=self.optimizer, criterion=self.criterion, data_loader=dummy,
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=name, wrap_model=False,
        )
        self.optimizer = prepared[1]
        if name == "ghost":
            self.criterion = prepared[2]

    def step(self, input_ids, mask, labels) -> float:
        started = time.perf_counter()
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        loss = self.criterion(logits, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started


def measure(steps: int = 12, warmup: int = 2, batch_size: int = 32, seq_len: int = 128) -> dict:
    """Median step time per mode on the same interleaved batches, and the ratios."""
    quiet_libraries()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    path = bundled_model_path()
    tokenizer = load_tokenizer(path)
    table = load_builtin("bbc-news")
    label_map = LabelMap.from_labels(table.labels)
    n = batch_size * (steps + warmup)
    order = torch.randperm(len(table), generator=torch.Generator().manual_seed(0))[:n].tolist()
    encoded = TokenCache().tokenize(tokenizer, [table.texts[i] for i in order], seq_len)
    labels = torch.as_tensor(label_map.encode([table.labels[i] for i in order]))

    modes = [Mode(name, path, len(label_map), tokenizer.pad_token_id, batch_size, device)
             for name in ("non-private", "hooks", "ghost")]
    times: dict[str, list[float]] = {m.name: [] for m in modes}
    for step in range(steps + warmup):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        tensors = [t[batch].to(device) for t in (encoded["input_ids"], encoded["attention_mask"], labels)]
        rotation = modes[step % 3:] + modes[: step % 3]  # rotate who goes first
        for mode in rotation:
            elapsed = mode.step(*tensors)
            if step >= warmup:
                times[mode.name].append(elapsed)

    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "benchmark": "dp_overhead",
        "workload": f"all-MiniLM-L6-v2 + LoRA r=8 (query, value) + head, batch {batch_size}, seq {seq_len}, "
                    f"AdamW, {steps} measured steps per mode, interleaved",
        "batch_size": batch_size,
        "seq_len": seq_len,
        "median_step_seconds": median,
        "ratio_hooks": median["hooks"] / median["non-private"],
        "ratio_ghost": median["ghost"] / median["non-private"],
        "goal_hooks": 1.10,
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    result = measure(args.steps, args.warmup, args.batch_size, args.seq_len)
    median = result["median_step_seconds"]
    print(f"machine: {result['machine']['cpu']} ({result['machine']['cores']} cores), GPU: {result['machine']['gpu']}")
    print(f"workload: {result['workload']}")
    for name, seconds in median.items():
        print(f"  {name:12s} median step {seconds * 1000:8.1f} ms")
    print(f"DP hooks / non-private = {result['ratio_hooks']:.3f}x (goal <= 1.10x)")
    print(f"DP ghost / non-private = {result['ratio_ghost']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
