"""`fedtune client`: start a Flower SuperNode beside a hospital's (or bank's) private data.

The node's policy (its epsilon cap, delta, data and evaluation files, model, budget folder,
which metrics may leave) comes from flags and/or a TOML file (`--policy`) whose keys are the
flags' names (`data = "..."` for `--data`); flags override the file. Everything is validated
before anything is created; then the resolved policy is written to STATE_DIR/policy.toml
(owner-only) and the SuperNode's node config names only that file and the state dir. A command
line is readable by every local user (`ps`), so no policy value goes on it: not the data's
path, not the cap. Only this machine sets node config; the federation's server can neither
read nor change it, and every request it sends is checked against the policy
(`fedtune.privacy.policy`). A node refuses to start without an epsilon cap. TLS uses the
federation's CA certificate; the node authenticates with its own private key (its public
key is registered by the operator). The process is replaced by `flower-supernode`, with
fedtune's own `flwr-clientapp` first on its PATH (`clients.pinned_clientapp`): the node runs
the ClientApp installed here, never the one a run's app bundle names, and no other kind
of task (the SuperNode's PATH is STATE_DIR/bin alone).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from clients.pinned_clientapp import install_shim, node_environment
from fedtune.config import toml_value
from fedtune.data.tables import check_declared_labels
from fedtune.errors import ConfigError
from fedtune.models.named import bundled_name
# read_policy_file is fedtune.privacy.policy's (the node reads its file with it too), offered here beside the rest
from fedtune.privacy.budget import remember_budget_folder
from fedtune.privacy.policy import (ALLOW_NON_PRIVATE_KEY, NODE_KEYS, POLICY_FILE_KEY, STATE_DIR_KEY, NodePolicy,
                                    read_policy_file, renamed_keys)
from fedtune.system.atomic import atomic_write_text
from fedtune.system.processes import flower_environment, flower_executable

POLICY_FILE = "policy.toml"  # in the state dir: the node's resolved policy, as its ClientApp reads it


def resolve_policy(file_values: Mapping[str, Any], flag_values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Policy file values overridden by flags, paths made absolute, then validated whole."""
    values = {**renamed_keys(file_values, source), **{k: v for k, v in flag_values.items() if v is not None}}
    bundled = bool(values.get("model")) and bundled_name(str(values["model"])) is not None
    for key in ("data", "eval-data", "budget-dir") + (() if bundled else ("model",)):
        if values.get(key):
            values[key] = str(Path(str(values[key])).expanduser().resolve())
    policy = NodePolicy.from_node_config(values, source=source)  # one-line errors for a bad policy
    for key, kind in (("data", "file"), ("eval-data", "file")) + (() if bundled else (("model", "folder"),)):
        path = values.get(key)
        if path and not (Path(path).is_file() if kind == "file" else Path(path).is_dir()):
            raise ConfigError(f"{source}: {key} = {path}: {kind} not found")
    if policy.own.node.labels:  # the rows meet the policy now, never in answer to a server
        check_declared_labels(policy.own.data, policy.own.node.labels)
    return values


def policy_file_path(state_dir: str | os.PathLike) -> Path:
    """Where `fedtune client` writes the node's resolved policy: in its state dir, whose owner
    is the node's operator, beside node.json."""
    return Path(state_dir).resolve() / POLICY_FILE


def policy_text(policy: Mapping[str, Any]) -> str:
    """A resolved policy as a policy file, its keys in `NODE_KEYS` order; `state-dir` is the
    node config's, never the file's."""
    order = [key.key for key in NODE_KEYS] + [ALLOW_NON_PRIVATE_KEY]
    lines = ["# Written by `fedtune client` at each start: the policy this node enforces, resolved and",
             "# validated (its --policy file overridden by its flags). Change the policy there and",
             "# restart `fedtune client`: this copy is rewritten then."]
    lines += [f"{key} = {toml_value(policy[key])}" for key in order if policy.get(key) is not None]
    return "\n".join(lines) + "\n"


def write_policy_file(state_dir: str | os.PathLike, policy: Mapping[str, Any]) -> Path:
    """Write the resolved policy to STATE_DIR/policy.toml, atomically (the node never reads a
    torn file) and readable by its owner only (the data's path is no one else's business).

    The mode is set before the rename: `atomic_write_text` writes a temp file that
    `tempfile.mkstemp` creates 0o600, so the file is owner-only from its first byte and the
    rename publishes it with that mode; no moment exists in which another user could read it
    (a write-then-chmod would leave one). The chmod after the rename only keeps this true
    should the atomic writer ever create files otherwise."""
    unknown = sorted(set(policy) - {key.key for key in NODE_KEYS} - {ALLOW_NON_PRIVATE_KEY, STATE_DIR_KEY})
    if unknown:  # resolve_policy refuses these first; a caller that skipped it must not lose a key silently
        raise ConfigError(f"policy: unknown key {unknown[0]!r}: resolve the policy first (resolve_policy)")
    path = policy_file_path(state_dir)
    atomic_write_text(path, policy_text(policy))
    os.chmod(path, 0o600)
    return path


SHIM_FOLDER = "bin"  # STATE_DIR/bin/flwr-clientapp: `clients.pinned_clientapp`


def supernode_command(superlink: str, state_dir: str, ca: str | None, key: str | None, policy: Mapping[str, Any],
                      port: int = 9094, insecure: bool = False) -> list[str]:
    """The flower-supernode command line; checks everything, creates nothing. Its node config
    names the state dir and the policy file `exec_supernode` writes there, never a policy value:
    a command line is visible to every local user (`ps`), the file to the node's owner only."""
    if ":" not in superlink:
        raise ConfigError(f"--superlink = {superlink!r}: expected HOST:PORT of the federation's SuperLink (e.g. fl.example.org:9092)")
    if Path(state_dir).exists() and not Path(state_dir).is_dir():
        raise ConfigError(f"--state-dir {state_dir}: a file, not a folder")
    NodePolicy.from_node_config(policy, source="fedtune client")  # never a command for a policy the node refuses
    # Quoted values: Flower would read an unquoted value ending in ".toml" as a node-config file.
    node_config = {STATE_DIR_KEY: str(Path(state_dir).resolve()), POLICY_FILE_KEY: str(policy_file_path(state_dir))}
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


def exec_supernode(command: list[str], state_dir: str, policy: Mapping[str, Any]) -> None:
    """Create the state dir, write the policy file, print the policy the node will enforce
    (read back from the file, as its ClientApp reads it) and become flower-supernode."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)  # only now: every check has passed
    path = write_policy_file(state_dir, policy)
    if policy.get("budget-dir"):
        remember_budget_folder(policy["budget-dir"])  # `fedtune budget` lists it with no --dir
    policy_line = NodePolicy.from_node_config({POLICY_FILE_KEY: str(path)}).describe()
    flower_environment()
    # The SuperNode runs this node's own ClientApp, never the code of the server's app bundle
    environment = node_environment(install_shim(Path(state_dir) / SHIM_FOLDER))
    print(policy_line, flush=True)
    print("starting: " + " ".join(command), flush=True)
    os.execve(command[0], command, environment)
