"""`fedtune client`: start a Flower SuperNode beside a hospital's (or bank's) private data.

The node's policy (its epsilon cap, delta, data and evaluation files, model, budget folder,
which metrics may leave) goes into the SuperNode's node config, which only this machine
sets; the federation's server can neither read nor change it, and every request it sends
is checked against it (`fedtune.privacy.policy`). A node refuses to start without an epsilon cap.
The policy can also come from a TOML file (`--policy`), whose keys are the node-config
keys; flags override it. Everything is validated before anything is created. TLS uses the
federation's CA certificate; the node authenticates with its own private key (its public
key is registered by the operator). The process is replaced by `flower-supernode`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from fedtune.config import load_toml, toml_value
from fedtune.data.tables import check_declared_labels
from fedtune.errors import ConfigError
from fedtune.models.named import bundled_name
from fedtune.privacy.policy import STATE_DIR_KEY, NodePolicy
from fedtune.system.processes import flower_environment, flower_executable


def read_policy_file(path: str) -> dict[str, Any]:
    """A node policy file: TOML, node-config keys at the top level (e.g. max-epsilon = 3)."""
    raw = load_toml(path)
    nested = [key for key, value in raw.items() if isinstance(value, dict)]
    if nested:
        raise ConfigError(f"{path}: [{nested[0]}]: a policy file has keys only (e.g. max-epsilon = 3), no tables")
    return {key.replace("_", "-"): value for key, value in raw.items()}


def resolve_policy(file_values: Mapping[str, Any], flag_values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Policy file values overridden by flags, paths made absolute, then validated whole."""
    values = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    bundled = bool(values.get("model-path")) and bundled_name(str(values["model-path"])) is not None
    for key in ("data-path", "eval-path", "budget-dir") + (() if bundled else ("model-path",)):
        if values.get(key):
            values[key] = str(Path(str(values[key])).expanduser().resolve())
    policy = NodePolicy.from_node_config(values, source=source)  # one-line errors for a bad policy
    for key, kind in (("data-path", "file"), ("eval-path", "file")) + (() if bundled else (("model-path", "folder"),)):
        path = values.get(key)
        if path and not (Path(path).is_file() if kind == "file" else Path(path).is_dir()):
            raise ConfigError(f"{source}: {key} = {path}: {kind} not found")
    if policy.own.node.labels:  # the rows meet the policy now, never in answer to a server
        check_declared_labels(policy.own.data, policy.own.node.labels)
    return values


def supernode_command(superlink: str, state_dir: str, ca: str | None, key: str | None, policy: Mapping[str, Any],
                      port: int = 9094, insecure: bool = False) -> list[str]:
    """The flower-supernode command line; checks everything, creates nothing."""
    if ":" not in superlink:
        raise ConfigError(f"--superlink = {superlink!r}: expected HOST:PORT of the federation's SuperLink (e.g. fl.example.org:9092)")
    if Path(state_dir).exists() and not Path(state_dir).is_dir():
        raise ConfigError(f"--state-dir {state_dir}: a file, not a folder")
    node_config = {STATE_DIR_KEY: str(Path(state_dir).resolve()), **policy}
    config_text = " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())
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


def exec_supernode(command: list[str], state_dir: str, policy_line: str) -> None:
    Path(state_dir).mkdir(parents=True, exist_ok=True)  # only now: every check has passed
    flower_environment()
    print(policy_line, flush=True)
    print("starting: " + " ".join(command), flush=True)
    os.execv(command[0], command)
