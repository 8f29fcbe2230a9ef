"""`fedtune export`: a server checkpoint -> a stock PEFT adapter directory or a merged model.

A federation's server exports its global adapter the same way when its last round is done
(`export_federation`), so run-dir/adapter and `fedtune export`'s folder carry one card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.models.adapter_io import load_state, save_adapter_dir, save_merged
from fedtune.federation.checkpoint import load_checkpoint
from fedtune.config import config_from_toml_text
from fedtune.data.tables import LabelMap
from fedtune.errors import FedtuneError
from fedtune.training.local import build_model
from fedtune.models.base import load_tokenizer, resolve_model_path
from fedtune.training.model_card import base_model_reference, federation_privacy_lines, model_card

if TYPE_CHECKING:
    from fedtune.federation.server import FederationServer


def export_checkpoint(source: str | Path, out: str | Path, merged: bool = False) -> Path:
    """Rebuild the model from the checkpoint's own config, load the global adapter, save."""
    source = Path(source)
    path = source / "checkpoint.safetensors" if source.is_dir() else source
    if not path.is_file():
        raise FedtuneError(f"{source}: no checkpoint.safetensors (give a federation run dir or the file)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedtuneError(f"--out {out}: exists and is not an empty folder; choose a new --out")
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint.meta.get("config"), str):
        raise FedtuneError(f"{path}: not a fedtune checkpoint (no federation config in its metadata)")
    config = config_from_toml_text(checkpoint.meta["config"], source=str(path))
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    num_labels = len(config.data.labels) if config.task_is_classification else None
    model = build_model(config, tokenizer, num_labels)
    load_state(model, checkpoint.adapter)
    extra = {"fedtune_round.json": json.dumps({"round": checkpoint.round}, indent=2),
             **_adapter_files(config, checkpoint.meta, checkpoint.round)}
    if merged:
        save_merged(model, out, tokenizer)
        for name, text in extra.items():
            (out / name).write_text(text, encoding="utf-8")
        return out
    return save_adapter_dir(model, out, extra, base_reference=base_model_reference(config))


def federation_card(config, meta: dict, rounds: int) -> str:
    """The model card of a federation's global adapter."""
    nodes = len(meta.get("node_epsilon", {}))
    return model_card(config, federation_privacy_lines(meta, config),
                      f"federated, {rounds} of {config.training.rounds} planned rounds, {nodes} nodes took part")


def export_federation(model, server: FederationServer, out: str | Path) -> Path:
    """A federation's end: `server`'s global adapter loaded into `model` (the run's own, built
    from the same config) and saved as a stock PEFT adapter directory with its card and label
    map. Its round is in the run dir's checkpoint and metrics, so no round file is added."""
    config = server.config
    load_state(model, server.adapter)
    meta = {"node_epsilon": server.node_epsilon, "node_privacy": server.node_privacy, **server.strategy.state_meta()}
    return save_adapter_dir(model, out, _adapter_files(config, meta, server.round_done),
                            base_reference=base_model_reference(config))


def _adapter_files(config, meta: dict, rounds: int) -> dict[str, str]:
    """What goes beside the adapter's weights: its model card, and a classifier's label map."""
    files = {"README.md": federation_card(config, meta, rounds)}
    if config.task_is_classification and config.data.labels:
        files["label_map.json"] = json.dumps(LabelMap.from_config(config.data.labels).to_dict(), indent=2)
    return files
