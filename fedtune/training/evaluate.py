"""Evaluation: loss, accuracy and macro-F1 for classification; loss and perplexity for
causal LM. Runs without gradients and without Opacus: evaluation on the node's own
validation data releases nothing but the scalars the caller chooses to report."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedtune.training.losses import PerExampleLoss, trim_batch


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in truth or prediction."""
    scores = []
    for c in range(num_classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def majority_baseline(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most common label."""
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0


@torch.no_grad()
def evaluate(model, dataset: Dataset, task: str, batch_size: int = 64, num_classes: int | None = None,
             precision: str = "fp32") -> dict:
    from fedtune.training.dp_train import autocast

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    criterion = PerExampleLoss(task)
    total_loss, total_weight = 0.0, 0
    predictions, truths = [], []
    for input_ids, attention_mask, labels in DataLoader(dataset, batch_size=batch_size):
        input_ids, attention_mask, labels = trim_batch(input_ids, attention_mask, labels, task)
        input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
        with autocast(device, precision):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        if task == "classification":
            total_loss += criterion.per_example(logits, labels).sum().item()
            total_weight += len(labels)
            predictions.append(logits.argmax(dim=-1).cpu().numpy())
            truths.append(labels.cpu().numpy())
        else:  # token-weighted, the usual perplexity
            shift_labels = labels[:, 1:]
            n_tokens = int((shift_labels != -100).sum())
            total_loss += (criterion.per_example(logits, labels) * (shift_labels != -100).sum(dim=1)).sum().item()
            total_weight += n_tokens
    model.train(was_training)
    loss = total_loss / max(total_weight, 1)
    if task != "classification":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total_weight}
    y_pred, y_true = np.concatenate(predictions), np.concatenate(truths)
    return {
        "loss": loss,
        "accuracy": float(np.mean(y_pred == y_true)),
        "macro_f1": macro_f1(y_true, y_pred, num_classes or int(max(y_true.max(), y_pred.max()) + 1)),
        "examples": int(len(y_true)),
    }


def evaluate_instruct(model, tokenizer, dataset: Dataset, prompt_ids: list[list[int]], answers: list,
                      max_new_tokens: int = 0, samples: int = 3, precision: str = "fp32") -> dict:
    """Response-only loss and perplexity (teacher forcing), then greedy generation scored by
    exact match of the normalised answer; the first `samples` generations are kept for
    the run's summary (they stay on the machine that evaluated)."""
    from fedtune.training.dp_train import autocast
    from fedtune.data.instruct import answer_budget, exact_match, generate_from_ids

    metrics = evaluate(model, dataset, "instruct", batch_size=16, precision=precision)
    with autocast(next(model.parameters()).device, precision):
        generated = generate_from_ids(model, tokenizer, prompt_ids, answer_budget(tokenizer, answers, max_new_tokens))
    metrics["accuracy"] = exact_match(generated, answers)
    metrics["examples"] = len(answers)
    metrics["samples"] = [
        {"prompt": tokenizer.decode(ids, skip_special_tokens=True)[-300:], "expected": str(answer), "generated": text}
        for ids, answer, text in list(zip(prompt_ids, answers, generated))[:samples]
    ]
    return metrics
