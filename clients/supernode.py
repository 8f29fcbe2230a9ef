"""`fedtune client`: start a Flower SuperNode beside a hospital's (or bank's) private data.

The node's data file, its state directory (privacy ledger) and its own epsilon cap go
into the SuperNode's node config, which only this machine sets; the federation's server
can neither read nor change them. TLS uses the federation's CA certificate; the node
authenticates with its own private key (its public key is registered by the operator).
The process is replaced by `flower-supernode` (signals reach it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedtune.errors import ConfigError
from server.superlink import flower_executable


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def supernode_command(superlink: str, data: str, state_dir: str, ca: str | None, key: str | None,
                      max_epsilon: float | None = None, port: int = 9094, insecure: bool = False) -> list[str]:
    if ":" not in superlink:
        raise ConfigError(f"--superlink = {superlink!r}: expected HOST:PORT of the federation's SuperLink (e.g. fl.example.org:9092)")
    data_path = Path(data)
    if not data_path.is_file():
        raise ConfigError(f"--data {data}: file not found (the node's CSV / JSONL / Parquet training data)")
    if max_epsilon is not None and not max_epsilon > 0:
        raise ConfigError(f"--max-epsilon = {max_epsilon}: expected a number > 0")
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    node_config = {"data-path": str(data_path.resolve()), "state-dir": str(Path(state_dir).resolve())}
    config_text = " ".join(f"{k}={_toml_string(v)}" for k, v in node_config.items())
    if max_epsilon is not None:
        config_text += f" max-epsilon={float(max_epsilon)}"
    command = [flower_executable("flower-supernode"), "--superlink", superlink, "--node-config", config_text,
               "--port", str(port)]
    if insecure:
        command.append("--insecure")
    else:
        for flag, path in (("--ca", ca), ("--key", key)):
            if not path or not Path(path).is_file():
                raise ConfigError(f"{flag} = {path!r}: file not found (TLS needs the federation's ca.crt and this node's private key)")
        command += ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
    return command


def exec_supernode(command: list[str]) -> None:
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    print("starting: " + " ".join(command), flush=True)
    os.execv(command[0], command)
