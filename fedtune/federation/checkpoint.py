"""Server checkpoints: one safetensors file per federation, replaced atomically each round.

The global adapter, the server optimizer's moments and a JSON metadata block (round
number, config, metrics so far, user-level ledger) live in one file, so they can never
disagree: a restarted server sees the last completed round whole or not at all.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_bytes
from safetensors.numpy import save as save_bytes

from fedtune.system.atomic import atomic_write_bytes
from fedtune.errors import FedtuneError

_ADAPTER = "adapter/"
_OPTIMIZER = "optimizer/"


@dataclass
class Checkpoint:
    round: int
    adapter: "OrderedDict[str, np.ndarray]"
    optimizer: dict[str, np.ndarray]
    meta: dict


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    tensors = {_ADAPTER + k: np.ascontiguousarray(v) for k, v in checkpoint.adapter.items()}
    tensors.update({_OPTIMIZER + k: np.ascontiguousarray(v) for k, v in checkpoint.optimizer.items()})
    metadata = {
        "round": str(checkpoint.round),
        "order": json.dumps(list(checkpoint.adapter)),
        "meta": json.dumps(checkpoint.meta),
    }
    atomic_write_bytes(path, save_bytes(tensors, metadata=metadata))


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        raw = path.read_bytes()
        tensors = load_bytes(raw)
        from safetensors import safe_open  # metadata needs the file API

        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata()
        order = json.loads(metadata["order"])
        adapter = OrderedDict((k, tensors[_ADAPTER + k]) for k in order)
        optimizer = {k[len(_OPTIMIZER):]: v for k, v in tensors.items() if k.startswith(_OPTIMIZER)}
        return Checkpoint(int(metadata["round"]), adapter, optimizer, json.loads(metadata["meta"]))
    except FileNotFoundError:
        raise FedtuneError(f"{path}: no checkpoint there") from None
    except (KeyError, ValueError, OSError, TypeError, SafetensorError) as exc:  # truncated, foreign or random bytes
        raise FedtuneError(f"{path}: not a fedtune checkpoint ({str(exc)[:200]})") from None
