"""The node's privacy policy, and what a server may ask of a node.

A hospital runs a node because it does not trust the operator with its records, so the
node, not the server, decides everything that sets its privacy: whether DP is on, its
epsilon cap and delta, the accountant, its model, data and evaluation files, where its
budget lives and which metrics may leave. The server's configuration reaches a node as a
*request*: the fields the server may decide are honoured (some only within the policy);
a request that names anything else is refused with `PolicyRefusal`, naming the field,
and the node trains nothing and releases nothing.

Who decides a field is declared once, beside its default and help, in its `opt()` metadata
(`fedtune.config`): its owner and why, and, for a field a deployed node sets itself, its
policy key. `OWNERS` (every configuration field and who decides it), `NODE_CONFIG_KEYS` (a
deployed node's policy keys), the `fedtune client` policy flags and the closing table of
docs/deployment.md are generated from it, so they cannot drift apart. In train-local and
`fedtune simulate` one config plays both roles: `NodePolicy.from_config` takes the node's
fields from it and `server_request` the server's, so simulation runs the deployment code
path. A `flwr run` simulation takes its nodes' policy from the node side only
(`simulations.run`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, get_origin, get_type_hints

# The owner constants live with `opt()` (config must not import the policy); importers of them here keep working.
from fedtune.config import NODE, SECTIONS, SERVER, SERVER_ALONE, WITHIN_POLICY, Config, build_config, toml_value
from fedtune.errors import ConfigError, FedtuneError


@dataclass(frozen=True)
class NodeKey:
    """One key of a deployed node's policy (a policy file, the SuperNode's node config)
    and the `fedtune client` flag that sets it, read off the field's `opt()` metadata. The
    flag is the key: an operator who knows `--data` knows `data = ...` in a policy file."""

    key: str    # e.g. "max-epsilon"
    field: str  # the config field it sets, e.g. "node.max_epsilon"
    flag: str   # the `fedtune client` flag, without its dashes: always the key (one naming)
    help: str   # the field's help
    client_help: str | None  # the flag's own help, where the flag needs other words than the field's
    kind: Any   # the field's type: bool, int, float, str, or tuple[str, ...] (comma-separated text on a flag)
    default: Any


def _declared_fields() -> list[tuple[str, dataclasses.Field, Any]]:
    """(section.key, field, type) for every configuration field, in config order."""
    return [(f"{section}.{f.name}", f, get_type_hints(kind)[f.name])
            for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)]


def _node_keys() -> tuple[NodeKey, ...]:
    """Every field that names a `node_key`, as a policy key and its flag (one name: `opt`
    has no way to name them apart); two fields claiming one key would make a node's policy
    read differently on a flag and in a file, so that stops the import."""
    declared = [(name, f, kind) for name, f, kind in _declared_fields() if f.metadata["node_key"]]
    keys = tuple(NodeKey(f.metadata["node_key"], name, f.metadata["node_key"], f.metadata["help"],
                         f.metadata["client_help"], kind, f.default) for name, f, kind in declared)
    for attribute in ("key", "flag"):
        seen = [getattr(k, attribute) for k in keys]
        doubled = sorted({name for name in seen if seen.count(name) > 1})
        if doubled:  # a bug in fedtune.config, not user input
            raise TypeError(f"node policy {attribute} {doubled[0]!r} is declared by two config fields")
    return keys


# field -> (who decides, why), from each field's `opt(owner=..., why=...)`; every Config field is here.
OWNERS: dict[str, tuple[str, str]] = {name: (f.metadata["owner"], f.metadata["why"])
                                      for name, f, _ in _declared_fields()}

# A deployed node's policy keys (SuperNode node config / `fedtune client` / a policy file),
# from each field's `opt(node_key=...)`, in config order.
NODE_KEYS: tuple[NodeKey, ...] = _node_keys()
NODE_CONFIG_KEYS: dict[str, str] = {k.key: k.field for k in NODE_KEYS}
_LIST_KEYS = frozenset(k.key for k in NODE_KEYS if get_origin(k.kind) is tuple)  # comma-separated in a node config
ALLOW_NON_PRIVATE_KEY = "allow-non-private"
# The policy keys as spelled before a key and its flag became one name. Policy files and node
# configs written with them are still read (hospitals have them), each old key with a one-line
# notice on stderr naming the new one; this is the one place that maps them (`renamed_keys`).
RENAMED: dict[str, str] = {"data-path": "data", "model-path": "model", "eval-path": "eval-data"}
REQUEST_KEY = "fedtune-request"  # where a server message carries its request (TOML text)
# In a SecAgg+ round the request travels in Flower's fit config, with these:
SECAGG_KEYS_FIELD = "fedtune-keys"           # names of the payload's tensors, in order (JSON list)
SECAGG_UPDATE_KEYS_FIELD = "fedtune-update"  # names of the tensors whose update is masked (JSON list)
SECAGG_CLIP_FIELD = "secagg-clip"            # the L2 bound a node clips its update to
DISTRIBUTED_FIELD = "fedtune-distributed"    # distributed DP: granularity, rotation seed, encoded tensors (JSON)
# The survivor-set consistency round fedtune adds before SecAgg+'s unmask stage (clients/secagg.py):
SECAGG_CONFIRM_STAGE = "fedtune-confirm"              # "these are the survivors": each node confirms to each neighbour
SECAGG_CONFIRMERS_FIELD = "fedtune-confirmers"        # at unmask: who sent each relayed confirmation
SECAGG_CONFIRMATIONS_FIELD = "fedtune-confirmations"  # at unmask: the confirmations, encrypted per pair
STATE_DIR_KEY = "state-dir"
# Node config: the absolute path of the node's policy file (`fedtune client` writes the resolved
# policy to STATE_DIR/policy.toml), so that no policy value is on the SuperNode's command line.
POLICY_FILE_KEY = "policy-file"
_NOTICED: set[tuple[str, str]] = set()  # (source, old key): each deprecation notice once per process


def renamed_keys(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`values` with each old key spelling (`RENAMED`) under its new name, in its place, and a
    one-line notice on stderr naming the new key (once per source and process: a node reads its
    node config on every message). An old and a new spelling of one key together are refused:
    which of the two the node obeys would otherwise depend on their order."""
    renamed: dict[str, Any] = {}
    for key, value in values.items():
        new = RENAMED.get(key)
        if new is None:
            renamed[key] = value
            continue
        if new in values:
            raise ConfigError(f"{source}: {key} and {new} both set: {key} is the old name of {new}; keep only {new}")
        if (source, key) not in _NOTICED:
            _NOTICED.add((source, key))
            print(f"fedtune: {source}: policy key {key} is deprecated; write {new} (the name of the flag --{new})",
                  file=sys.stderr, flush=True)
        renamed[new] = value
    return renamed


def read_policy_file(path: str | os.PathLike) -> dict[str, Any]:
    """A node policy file: TOML, policy keys at the top level (max-epsilon = 3, data = "..."),
    as `fedtune client --policy` takes it and as a deployed node reads the copy in its state
    dir (node config `policy-file`). `max_epsilon` is read as `max-epsilon`, an old spelling as
    its new key (`renamed_keys`). Every failure is one line naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: policy file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: policy file is not UTF-8 text") from None
    except OSError as exc:  # a folder, a file this user may not read
        raise ConfigError(f"{path}: policy file unreadable ({exc.strerror or type(exc).__name__})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            raise ConfigError(f"{path}: [{key}]: a policy file has keys only (e.g. max-epsilon = 3), no tables")
        if key.replace("_", "-") in values:
            raise ConfigError(f"{path}: {key}: set twice (as {key.replace('_', '-')} too)")
        values[key.replace("_", "-")] = value
    if POLICY_FILE_KEY in values:
        raise ConfigError(f"{path}: {POLICY_FILE_KEY}: a policy file holds the policy itself, it names no other file")
    return renamed_keys(values, str(path))


class PolicyRefusal(FedtuneError):
    """A server request outside the node's policy. `field` names what was refused."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"policy-refused: {field}: {reason}")
        self.field = field

    @classmethod
    def of(cls, error: ConfigError) -> "PolicyRefusal":
        """A request value that the node's data rules out (a batch larger than its rows, a
        delta of 1/n or more), as a refusal naming the field."""
        return cls(getattr(error, "key", "request"), str(error))


def server_request(config: Config) -> dict[str, dict[str, Any]]:
    """What an honest server sends: every field it may decide, nothing the node owns."""
    full = config.to_dict()
    request: dict[str, dict[str, Any]] = {}
    for name, (owner, _) in OWNERS.items():
        if owner in (SERVER, WITHIN_POLICY):
            section, key = name.split(".")
            request.setdefault(section, {})[key] = full[section][key]
    return request


def request_text(request: Mapping[str, Mapping[str, Any]]) -> str:
    """A request as TOML text: how it travels in a Flower message."""
    lines = []
    for section, values in request.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def parse_request(text: str) -> dict[str, Any]:
    """A received request; anything that is not a TOML table is refused."""
    try:
        return tomllib.loads(str(text))
    except tomllib.TOMLDecodeError as exc:
        raise PolicyRefusal("request", f"not TOML ({exc})") from None


@dataclass(frozen=True)
class NodePolicy:
    """The node's own settings (`own`: a Config whose node-owned fields are the node's)
    and whether it ever allows training without DP."""

    own: Config
    allow_non_private: bool = False

    @classmethod
    def from_config(cls, config: Config) -> "NodePolicy":
        """train-local and simulation: the config is the node's policy, its cap resolved."""
        own = config.replace(node=dataclasses.replace(config.node, max_epsilon=config.max_epsilon,
                                                      labels=config.node.labels or config.data.labels))
        return cls(own, allow_non_private=not config.dp.enabled)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], source: str = "node config") -> "NodePolicy":
        """A deployed node's policy from its SuperNode node config: `state-dir` (not policy)
        and `policy-file`, the file that holds the policy (as `fedtune client` starts a node),
        or the policy's values themselves (keys of `NODE_CONFIG_KEYS`, `allow-non-private`: a
        policy file's contents, a harness or a test that sets node config directly)."""
        if POLICY_FILE_KEY in node_config:
            return cls._from_policy_file(node_config, source)
        raw: dict[str, dict[str, Any]] = {"data": {"dataset": ""}}
        allow = False
        for key, value in renamed_keys(node_config, source).items():
            if key == STATE_DIR_KEY:
                continue
            if key == ALLOW_NON_PRIVATE_KEY:
                if not isinstance(value, bool):
                    raise ConfigError(f"{source}: {key} = {value!r}: expected true or false")
                allow = value
                continue
            if key not in NODE_CONFIG_KEYS:
                raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(NODE_CONFIG_KEYS))}, "
                                  f"{ALLOW_NON_PRIVATE_KEY}, {STATE_DIR_KEY}, {POLICY_FILE_KEY})")
            section, field = NODE_CONFIG_KEYS[key].split(".")
            if key in _LIST_KEYS and isinstance(value, str):  # node config values are scalars: "neg,pos"
                value = [label.strip() for label in value.split(",") if label.strip()]
            raw.setdefault(section, {})[field] = value
        if "max_epsilon" not in raw.get("node", {}):
            raise ConfigError(f"{source}: max-epsilon is required: a deployed node refuses to start without its own "
                              "epsilon cap (fedtune client --max-epsilon)")
        if not raw["data"].get("path"):
            raise ConfigError(f"{source}: data is required: the node's own CSV / JSONL / Parquet file "
                              "(fedtune client --data)")
        cap = raw["node"]["max_epsilon"]
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf:
            raise ConfigError(f"{source}: max-epsilon = {cap!r}: expected a finite number > 0")
        raw.setdefault("dp", {})["target_epsilon"] = cap  # a request sets its own target, up to the cap
        config = build_config(raw, source=source)
        return cls(config.replace(dp=dataclasses.replace(config.dp, enabled=True)), allow_non_private=allow)

    @classmethod
    def _from_policy_file(cls, node_config: Mapping[str, Any], source: str) -> "NodePolicy":
        """The policy in the file node config's `policy-file` names, validated as inline values
        are, its errors naming the file. Only the SuperNode's operator sets node config (a server
        cannot), so the path is as trusted as the values were. The policy sits in one place: a
        value given beside the file is refused rather than silently winning or losing."""
        path = node_config[POLICY_FILE_KEY]
        if not isinstance(path, str) or not os.path.isabs(path):  # the ClientApp runs in a folder of Flower's
            raise ConfigError(f"{source}: {POLICY_FILE_KEY} = {path!r}: expected the absolute path of the node's "
                              "policy file (fedtune client writes STATE_DIR/policy.toml)")
        beside = [key for key in node_config if key not in (STATE_DIR_KEY, POLICY_FILE_KEY)]
        if beside:
            raise ConfigError(f"{source}: {beside[0]} is set beside {POLICY_FILE_KEY}: the policy lives in one "
                              f"place; put it in {path}")
        return cls.from_node_config(read_policy_file(path), source=path)

    @property
    def max_epsilon(self) -> float:
        return self.own.max_epsilon

    def config_for(self, request: Mapping[str, Any]) -> Config:
        """The config this node trains with: its own fields, the request's where the
        server may decide. Raises `PolicyRefusal` for anything outside the policy."""
        if not isinstance(request, Mapping):
            raise PolicyRefusal("request", "expected a table of sections")
        raw = self.own.to_dict()
        for section, values in request.items():
            if section not in SECTIONS or not isinstance(values, Mapping):
                raise PolicyRefusal(str(section), "not a configuration section a server may send")
            for key, value in values.items():
                name = f"{section}.{key}"
                owner, why = OWNERS.get(name, (None, "not a setting fedtune knows"))
                if owner in (NODE, SERVER_ALONE, None):
                    who = "the node decides this" if owner == NODE else "nodes take no such setting from a server"
                    raise PolicyRefusal(name, f"{who} ({why})")
                raw[section][key] = value
        if not raw["data"]["labels"]:  # no list from the server: the node's own, in its order
            raw["data"]["labels"] = list(self.own.node.labels)
        target = raw["dp"]["target_epsilon"]
        if isinstance(target, (int, float)) and not isinstance(target, bool) and target > self.max_epsilon:
            raise PolicyRefusal("dp.target_epsilon", f"{target:g} is above this node's max_epsilon {self.max_epsilon:g}")
        try:
            config = build_config(raw, source="server request")
        except ConfigError as exc:
            raise PolicyRefusal.of(exc) from None
        _check_labels(config, self.own.node.labels)
        if not config.dp.enabled and not self.allow_non_private:
            raise PolicyRefusal("dp.enabled", "false asked, but this node never trains without differential privacy")
        if config.dp.mode == "distributed" and not self.own.node.distributed:
            raise PolicyRefusal("dp.mode", "distributed asked, but this node does not join distributed-DP rounds "
                                           "(node.distributed; `fedtune client --distributed`)")
        own_delta = self.own.dp.delta
        if own_delta > 0 and config.dp.delta > own_delta:
            raise PolicyRefusal("dp.delta", f"{config.dp.delta:g} is above this node's delta {own_delta:g}")
        return config

    def delta_for(self, config: Config, records: int) -> float:
        """The delta this node accounts at for its `records` rows (every row its budget
        protects, whatever share a request trains on): its own (0 = 1 / (10 n)), or the
        request's when that is stricter; a larger request is refused."""
        own = self.own.dp.resolved_delta(records)
        requested = config.dp.delta
        if requested > own * (1 + 1e-12):
            raise PolicyRefusal("dp.delta", f"{requested:g} is above this node's delta {own:.3g}")
        return min(own, requested) if requested > 0 else own

    def describe(self) -> str:
        """One line for the node's log: what this node enforces."""
        own = self.own
        delta = f"{own.dp.delta:g}" if own.dp.delta > 0 else "1/(10 n)"
        return (f"node policy: max epsilon {self.max_epsilon:g}, delta {delta}, {own.dp.accountant} accountant, "
                f"non-private training {'allowed' if self.allow_non_private else 'never'}, "
                f"train loss release {own.node.release_train_loss}, evaluation release {own.node.release_evaluation}")


def _check_labels(config: Config, own: tuple[str, ...]) -> None:
    """A classification request's label list against the node's declared labels: the list
    decides which rows could be encoded, so it is checked against the policy here, where the
    answer is the same whatever the rows hold (the rows meet the policy at the node's start)."""
    if config.model.task != "classification":
        return
    if not own:
        raise PolicyRefusal("data.labels", "this node declares no label set (node config `labels`, `fedtune client "
                                           "--labels`), so it trains no classification")
    if not config.data.labels:
        return
    from fedtune.data.tables import LabelMap  # the very encoding the rows will meet, so no spelling slips past

    label_map = LabelMap.from_config(config.data.labels)
    missing = []
    for label in own:
        try:
            label_map.encode([label])
        except FedtuneError:
            missing.append(label)
    if missing:
        raise PolicyRefusal("data.labels", f"the request's labels leave out {len(missing)} of the labels this node's "
                                           "policy declares; the federation's label list must include every node's labels")


def ownership_table() -> list[tuple[str, str, str]]:
    """(field, who decides, why) for every configuration field, in config order."""
    return [(name, owner, why) for name, (owner, why) in OWNERS.items()]  # OWNERS is built in config order


def ownership_markdown() -> str:
    """The table docs/deployment.md shows (a test keeps the two identical)."""
    rows = ["| field | who decides | why |", "|---|---|---|"]
    rows += [f"| `{name}` | {owner} | {why} |" for name, owner, why in ownership_table()]
    return "\n".join(rows) + "\n"
