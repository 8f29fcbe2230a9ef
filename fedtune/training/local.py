"""One node's private fine-tuning end to end: what `fedtune train-local` runs.

`prepare_node` does everything that can fail on user input (config, data, model) before
anything is written, so a bad input leaves no half-made run directory. `train_local`
then trains epoch by epoch, logging metrics and the epsilon spent, and writes the run
directory: resolved config, metrics JSONL, ledger, label map and a PEFT adapter dir.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from torch.utils.data import TensorDataset

from fedtune.models.adapter_methods import attach_adapter
from fedtune.models.adapter_io import save_adapter_dir, state_nbytes, state_num_parameters, trainable_state
from fedtune.system.atomic import append_jsonl, atomic_write_json, atomic_write_text
from fedtune.privacy.budget import RecordSet
from fedtune.config import Config, check_against_data
from fedtune.data.tables import LabelMap, TokenCache, load_table, read_for_task, subsample, to_dataset, train_val_split
from fedtune.data.named import Table, fixed_split
from fedtune.training.dp_train import train_call
from fedtune.errors import DataError, FedtuneError
from fedtune.training.evaluate import evaluate, evaluate_instruct, majority_baseline
from fedtune.models.base import load_base_model, load_tokenizer, resolve_device, resolve_model_path
from fedtune.training.model_card import base_model_reference, model_card
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.planning import DPPlan, plan_training
from fedtune.privacy.randomness import GENERATOR_NOTE, Randomness
from fedtune.privacy.spending import spend

NON_PRIVATE_LABEL = "NON-PRIVATE (no differential privacy)"


@dataclass
class NodeData:
    train: TensorDataset
    val: TensorDataset | None  # None when the node keeps no validation split
    label_map: LabelMap | None
    majority_accuracy: float | None
    fingerprint: str = ""  # of every row the node holds (training file and evaluation file)
    records: int = 0  # how many rows that budget protects: the n of the automatic delta 1 / (10 n)
    summary: dict | None = None  # instruct: rows kept, skipped (response too long), prompts shortened
    val_prompts: tuple | None = None  # instruct: the validation rows' prompt ids and expected answers
    record_set: RecordSet | None = None  # each row's digest: finds the ledgers that already protect them


@dataclass
class PreparedNode:
    config: Config
    model: object
    tokenizer: object
    data: NodeData
    plan: DPPlan


def privacy_label(plan: DPPlan, epsilon: float) -> str:
    if not plan.private:
        return NON_PRIVATE_LABEL
    return f"epsilon={epsilon:.3f} (delta={plan.delta:.3g}, target {plan.target_epsilon:g})"


def table_records(*tables: Table, with_labels: bool = False) -> RecordSet:
    """Every record in `tables`, whatever their order, as the budget identifies them. An
    instruct record is its prompt and its response (`with_labels`): two data sets that ask
    the same questions with different answers are different data."""
    if with_labels:
        return RecordSet.of([f"{text}\x1e{label}" for table in tables for text, label in zip(table.texts, table.labels)])
    return RecordSet.of([text for table in tables for text in table.texts])


def prepare_data(config: Config, tokenizer, cache: TokenCache | None = None, table: Table | None = None,
                 validation: bool = True) -> NodeData:
    """Read, split, label-encode and tokenize the node's data (all checks, no writes).

    `table` replaces the configured source (a simulation passes a client's partition).
    `validation=False` trains on every row and keeps no split: a federated node whose
    server evaluates centrally has no use for one.
    """
    task = config.model.task
    cache = cache or TokenCache()
    held_out = None
    if table is None:
        table = load_table(config.data, task)
        rows = table  # the budget covers the whole source, whatever share of it trains
        split = fixed_split(table)
        if split is not None:  # a built-in instruct task: its own fixed held-out rows
            table, held_out = split
        table = subsample(table, config.data.max_examples, config.training.seed)
    else:
        rows = table
    eval_table = read_for_task(config.data.eval_path, config.data, task) if config.data.eval_path else held_out
    protected = [rows] + ([eval_table] if eval_table is not None and eval_table is not held_out else [])
    record_set = table_records(*protected, with_labels=task == "instruct")
    records = sum(len(t) for t in protected)
    if not validation:
        train_table, val_table = table, None
    elif eval_table is not None:
        train_table, val_table = table, eval_table
    else:
        train_table, val_table = train_val_split(table, config.data.val_fraction, config.training.seed)
    if task == "instruct":
        return _instruct_data(config, tokenizer, train_table, val_table, record_set, records)
    label_map = train_ids = val_ids = majority = None
    if task == "classification":
        label_map = (LabelMap.from_config(config.data.labels) if config.data.labels
                     else LabelMap.from_labels(train_table.labels, source=train_table.source))
        train_ids = label_map.encode(train_table.labels, source=train_table.source)
        if val_table is not None:
            val_ids = label_map.encode(val_table.labels, source=f"{val_table.source} (evaluation)")
            majority = majority_baseline(val_ids)
    length = config.model.max_seq_len
    train = to_dataset(cache.tokenize(tokenizer, train_table.texts, length), train_ids)
    val = to_dataset(cache.tokenize(tokenizer, val_table.texts, length), val_ids) if val_table is not None else None
    check_against_data(config, len(train))
    return NodeData(train, val, label_map, majority, record_set.fingerprint, records, record_set=record_set)


def _instruct_data(config: Config, tokenizer, train_table: Table, val_table: Table | None, record_set: RecordSet,
                   records: int) -> NodeData:
    """Instruct rows -> response-masked datasets; what did not fit is counted and said."""
    from fedtune.data.instruct import describe_skips, encode_rows

    length, messages = config.model.max_seq_len, bool(config.data.messages_column)
    # every row is kept (too long ones silent): the count never depends on one answer's length
    encoding, train, _ = encode_rows(tokenizer, train_table, length, messages, keep_all=True)
    summary = {"train": encoding.summary()}
    line = describe_skips(encoding, train_table.source, length)
    if line:
        print(f"fedtune: {line}", file=sys.stderr)
    if not encoding.kept:
        raise DataError(f"{train_table.source}: no example fits in model.max_seq_len = {length}; raise it")
    val = val_prompts = None
    if val_table is not None:
        held, val, val_prompts = encode_rows(tokenizer, val_table, length, messages, keep_all=True)
        summary["validation"] = held.summary()
    check_against_data(config, len(train))
    return NodeData(train, val, None, None, record_set.fingerprint, records, summary, val_prompts, record_set)


def build_model(config: Config, tokenizer, num_labels: int | None):
    """Base model (frozen) + seeded LoRA adapter on the configured device."""
    base = load_base_model(resolve_model_path(config.model), config.model.task, num_labels, tokenizer.pad_token_id)
    model = attach_adapter(base, config)
    return model.to(resolve_device(config.model.device))


def prepare_node(config: Config, table: Table | None = None) -> PreparedNode:
    """`table` (a simulation client's partition) replaces the configured source; such a
    node trains on every row, as the simulation's client does."""
    resolve_device(config.model.device)
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    data = prepare_data(config, tokenizer, table=table, validation=table is None)
    plan = plan_training(config, len(data.train), delta=config.dp.resolved_delta(data.records))
    model = build_model(config, tokenizer, len(data.label_map) if data.label_map else None)
    return PreparedNode(config, model, tokenizer, data, plan)


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)


def train_local(
    node: PreparedNode, run_dir: str | Path, echo: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """Train for `training.rounds` calls of `training.epochs` epochs; write the run dir.

    The budget is the records', not the run's: it is opened (and locked) in the node's budget
    folder by the records' digests, so a new --out on the same rows, or on rows that grew,
    continues it (`fedtune.privacy.spending`). A run
    that the remaining budget cannot carry to its end is refused before anything is written."""
    config, model, plan = node.config, node.model, node.plan
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FedtuneError(f"--out {run_dir}: a file, not a folder; choose a new --out")
    if (run_dir / "ledger.json").exists():
        raise FedtuneError(f"{run_dir}: already holds a run (ledger.json); choose a new --out")
    randomness = Randomness.from_setting(config.dp.noise_seed)
    n = len(node.data.train)
    with spend(config, node.data.record_set, plan.delta, "train-local",
               plan_at=lambda delta: plan_training(config, n, delta=delta),
               steps_to_fit=lambda planned: planned.steps_per_call * planned.planned_calls) as spending:
        ledger, plan, budget = spending.ledger, spending.plan, spending.budget
        spent_before = ledger.epsilon()
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", config.to_toml())
        atomic_write_json(run_dir / "plan.json", {**plan.to_dict(), "noise": randomness.label})
        if node.data.label_map:
            node.data.label_map.save(run_dir / "label_map.json")
        snapshot = run_dir / "ledger.json"

        def persist(current: PrivacyLedger) -> None:
            spending.persist(current)
            current.save(snapshot)  # this run's copy; the budget's ledger is the authority

        metrics_path = run_dir / "metrics.jsonl"
        sent = trainable_state(model)
        echo(
            f"fedtune train-local: {len(node.data.train)} train / {len(node.data.val)} validation examples, "
            f"{state_num_parameters(sent):,} trainable adapter parameters ({state_nbytes(sent) / 1e6:.2f} MB), "
            + (f"DP-SGD sigma={plan.noise_multiplier:.4f} C={plan.max_grad_norm} q={plan.sample_rate:.4g}, "
               f"target epsilon {plan.target_epsilon:g} at delta {plan.delta:.3g}" if plan.private else NON_PRIVATE_LABEL)
        )
        echo(f"privacy budget of this data: {budget.ledger_path} (spent before this run: "
             f"{_epsilon_text(spent_before)}, cap {ledger.max_epsilon if ledger.max_epsilon else 'none'}); "
             f"{randomness.label}")
        if plan.private and not config.dp.secure_mode:
            echo(GENERATOR_NOTE)
        if node.data.majority_accuracy is not None:
            echo(f"majority-class baseline accuracy on validation: {node.data.majority_accuracy:.4f}")
        record = {}
        for call in range(1, plan.planned_calls + 1):
            for epoch in range(1, plan.epochs + 1):
                bar = _progress(plan.steps_per_epoch, f"call {call} epoch {epoch}") if progress else None
                result = train_call(
                    model, node.data.train, config, _one_epoch_plan(plan), ledger, persist,
                    label=f"call {call} epoch {epoch}", randomness=randomness,
                    on_step=(lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}"))) if bar else None,
                )
                if bar:
                    bar.close()
                metrics = evaluate_node(node)
                record = {
                    "call": call,
                    "epoch": epoch,
                    "train_loss": result.mean_loss,
                    "steps": result.steps,
                    **{f"val_{k}": v for k, v in metrics.items()},
                    "epsilon": result.epsilon if math.isfinite(result.epsilon) else "inf",
                    "delta": plan.delta,
                    "private": plan.private,
                    "privacy": privacy_label(plan, result.epsilon),
                    "noise": randomness.label,
                    "seconds": round(result.seconds, 3),
                }
                append_jsonl(metrics_path, record)
                shown = ", ".join(
                    f"{k[4:]} {v:.4f}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float)
                )
                echo(f"call {call} epoch {epoch}: train loss {result.mean_loss:.4f}, {shown}, {privacy_label(plan, result.epsilon)}")
        extra = {"label_map.json": json.dumps(node.data.label_map.to_dict(), indent=2)} if node.data.label_map else {}
        extra["fedtune_privacy.json"] = json.dumps(
            {"private": plan.private, "epsilon": record.get("epsilon"), "delta": ledger.delta, "noise": randomness.label,
             "ledger": ledger.to_dict()}, indent=2
        )
        privacy = [f"- record level (DP-SGD on this node's rows): epsilon {_epsilon_text(ledger.epsilon())} spent on this "
                   f"data so far, delta {ledger.delta:.3g}, cap {ledger.max_epsilon}; {randomness.label}"
                   if plan.private else f"- {NON_PRIVATE_LABEL}"]
        extra["README.md"] = model_card(config, privacy, f"train-local, {plan.planned_calls} call(s) of {plan.epochs} "
                                        f"epoch(s) on {len(node.data.train)} rows")
        save_adapter_dir(model, run_dir / "adapter", extra, base_reference=base_model_reference(config))
    echo(f"wrote {run_dir}/ (config.toml, metrics.jsonl, ledger.json, adapter/)")
    return record


def evaluate_node(node: PreparedNode) -> dict:
    """Validation metrics on the node's own held-out rows (they never leave the node)."""
    data, config = node.data, node.config
    if config.model.task == "instruct":
        metrics = evaluate_instruct(node.model, node.tokenizer, data.val, *data.val_prompts, config.model.max_new_tokens,
                                    precision=config.training.precision)
        metrics.pop("samples")
        return metrics
    return evaluate(node.model, data.val, config.model.task, num_classes=len(data.label_map) if data.label_map else None)


def _epsilon_text(epsilon: float) -> str:
    return "inf (non-private)" if math.isinf(epsilon) else f"{epsilon:.3f}"


def _one_epoch_plan(plan: DPPlan) -> DPPlan:
    """The same mechanism, charged one epoch at a time so metrics follow each epoch."""
    return replace(plan, epochs=1)
