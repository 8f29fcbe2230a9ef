"""The README.md (model card) of an exported adapter: what it is, what it was trained on,
and the privacy statement that comes with it; and a portable base-model reference.

peft writes an empty template card and records the base model as an absolute path inside
the exporting machine's virtual environment. Both are replaced: the card states the base
model, task, labels, the federation's size and every privacy level with its epsilon and
delta; `base_model_name_or_path` names the model, not a folder on someone's disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedtune.models.adapter_methods import adapter_method, describe_adapter
from fedtune.config import Config

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the bundled package ships (never fetched)


def base_model_reference(config: Config) -> str:
    """A name that means the same on any machine: the bundled model's name, or the base
    model folder's own name (its `_name_or_path` when it records one)."""
    from fedtune.models.named import bundled_name

    name = bundled_name(config.model.path, config.model.task)
    if name:
        return BUNDLED_NAME if name == "minilm" else name
    folder = Path(config.model.path)
    try:
        recorded = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path", "")
    except (OSError, ValueError):
        recorded = ""
    return recorded if recorded and not Path(recorded).is_absolute() else folder.name


def _epsilon(value) -> str:
    return "inf (NON-PRIVATE)" if value in ("inf", math.inf) else f"{float(value):.3f}"


def model_card(config: Config, privacy_lines: list[str], trained: str) -> str:
    labels = ", ".join(config.data.labels) if config.data.labels else "(causal LM)"
    return "\n".join([
        f"# {adapter_method(config).title} adapter for {base_model_reference(config)}",
        "",
        f"- base model: `{base_model_reference(config)}` (load it locally; nothing here downloads it)",
        f"- task: {config.model.task}; labels: {labels}",
        f"- adapter: {describe_adapter(config)}; max sequence length {config.model.max_seq_len}",
        f"- trained: {trained}",
        "",
        "## Privacy",
        "",
        *privacy_lines,
        "",
        "Load with stock peft: `PeftModel.from_pretrained(base_model, this_folder)`.",
        "",
    ])


def secure_aggregation_line(config: Config) -> str | None:
    """What secure aggregation hid, and with which parameters, or None when it was off."""
    fed = config.federation
    if not fed.secure_aggregation:
        return None
    from fedtune.config import secagg_bound

    return (f"- secure aggregation: SecAgg+ (Flower's), so the server saw only each round's masked sum; threshold "
            f"{fed.secagg_threshold:g} of the shares, key sharing with {fed.secagg_share_fraction:g} of the cohort, "
            f"each node's update clipped by the node to L2 {secagg_bound(fed):g} and quantized to "
            f"{fed.secagg_quantization_range} levels over +-{fed.secagg_clipping_range:g}, uniform weights")


def federation_privacy_lines(meta: dict, config: Config) -> list[str]:
    """The privacy statement of a federation checkpoint: each level, epsilon and delta."""
    lines = []
    nodes = meta.get("node_privacy", {})
    epsilons = meta.get("node_epsilon", {})
    if not config.dp.enabled:
        lines.append("- record level: **NON-PRIVATE** (trained without differential privacy)")
    elif epsilons:
        worst = max(epsilons.values(), key=lambda e: math.inf if e == "inf" else float(e))
        deltas = sorted({float(p["delta"]) for p in nodes.values() if "delta" in p})
        lines.append(f"- record level (each node's rows, DP-SGD at the node): epsilon at most {_epsilon(worst)} over "
                     f"{len(epsilons)} nodes, delta {', '.join(f'{d:.3g}' for d in deltas) or 'per node'}")
    user = meta.get("user_ledger")
    if user:
        from fedtune.privacy import PrivacyLedger

        ledger = PrivacyLedger.from_dict(user, source="checkpoint")
        lines.append(f"- user level (a whole node's data, DP-FedAvg at the server): epsilon {_epsilon(ledger.epsilon())}, "
                     f"delta {ledger.delta:.3g}, cohorts {config.federation.cohort_sampling}")
    secure = secure_aggregation_line(config)
    if secure:
        lines.append(secure)
    return lines or ["- no privacy accounting recorded"]
