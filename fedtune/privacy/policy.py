"""The node's privacy policy, and what a server may ask of a node.

A hospital runs a node because it does not trust the operator with its records, so the
node, not the server, decides everything that sets its privacy: whether DP is on, its
epsilon cap and delta, the accountant, its model, data and evaluation files, where its
budget lives and which metrics may leave. The server's configuration reaches a node as a
*request*: the fields the server may decide are honoured (some only within the policy);
a request that names anything else is refused with `PolicyRefusal`, naming the field,
and the node trains nothing and releases nothing.

`OWNERS` lists every configuration field and who decides it; it is the one place to read
(and the closing table of docs/deployment.md is generated from it). In train-local and
`fedtune simulate` one config plays both roles: `NodePolicy.from_config` takes the node's
fields from it and `server_request` the server's, so simulation runs the deployment code
path. A `flwr run` simulation takes its nodes' policy from the node side only
(`simulations.run`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

from fedtune.config import SECTIONS, Config, build_config, toml_value
from fedtune.errors import ConfigError, FedtuneError

NODE = "node"
SERVER = "server"
WITHIN_POLICY = "server, within the node's policy"
SERVER_ALONE = "server alone (never sent to nodes)"

# field -> (who decides, why). A test checks that every Config field is listed.
OWNERS: dict[str, tuple[str, str]] = {
    "model.path": (NODE, "the node loads its own local copy; a server may not name a path on the node"),
    "model.task": (SERVER, "the federation's task"),
    "model.max_seq_len": (SERVER, "tokens per example: compute, not privacy"),
    "model.device": (NODE, "the node's hardware"),
    "model.max_new_tokens": (SERVER, "answer length when scoring by generation: compute, not privacy"),
    "adapter.method": (SERVER, "the PEFT method every node attaches (fedtune.models.adapter_methods)"),
    "adapter.num_virtual_tokens": (SERVER, "prefix-tuning adapter shape, federation-wide"),
    "lora.rank": (SERVER, "adapter shape: every node must match to be averaged"),
    "lora.alpha": (SERVER, "adapter scaling, federation-wide"),
    "lora.dropout": (SERVER, "regularisation, federation-wide"),
    "lora.target_modules": (SERVER, "adapter shape, federation-wide"),
    "lora.train_head": (SERVER, "what trains, federation-wide"),
    "lora.ffa": (SERVER, "FFA-LoRA: A frozen on every node"),
    "lora.top_layers": (SERVER, "adapter shape: which blocks carry adapters, federation-wide"),
    "dp.enabled": (WITHIN_POLICY, "false is honoured only where the node's policy allows non-private training (never by default)"),
    "dp.target_epsilon": (WITHIN_POLICY, "calibration target of this training: at most the node's max_epsilon"),
    "dp.delta": (WITHIN_POLICY, "0 = the node's own; a stricter (smaller) delta is honoured, a larger one refused"),
    "dp.noise_multiplier": (SERVER, "a fixed sigma: any value is safe, the ledger refuses what would pass the cap"),
    "dp.max_grad_norm": (SERVER, "clipping norm C: the noise is sigma x C, privacy does not depend on C"),
    "dp.mode": (WITHIN_POLICY, "\"distributed\" is honoured only where the node's policy joins distributed rounds (node.distributed); the node adds only its share of the noise, calibrated to its own t"),
    "dp.distributed_bits": (SERVER, "the modulus of the integer sum: utility, not privacy (the node checks that secure aggregation carries its integers exactly)"),
    "dp.accountant": (NODE, "how the node counts its own epsilon"),
    "dp.grad_sample_mode": (SERVER, "how per-sample gradients are computed: the same mechanism either way"),
    "dp.secure_mode": (NODE, "the node's random number generator"),
    "dp.noise_seed": (NODE, "reproducible noise would let whoever knows the seed replay the release"),
    "training.epochs": (SERVER, "local epochs per round (the noise is calibrated for them)"),
    "training.rounds": (SERVER, "planned rounds (the noise is calibrated for them; the ledger caps any more)"),
    "training.batch_size": (SERVER, "expected Poisson batch size"),
    "training.learning_rate": (SERVER, "optimisation"),
    "training.optimizer": (SERVER, "optimisation"),
    "training.weight_decay": (SERVER, "optimisation"),
    "training.seed": (SERVER, "LoRA init and splits, which every node must share; never the DP noise"),
    "training.precision": (SERVER, "fp32 or bf16 forward pass"),
    "training.physical_batch_size": (NODE, "the node's memory: the same DP-SGD step, run in chunks"),
    "data.dataset": (NODE, "the node's data is its own"),
    "data.path": (NODE, "the node's data is its own; a server may not name a path on the node"),
    "data.text_column": (NODE, "which column of the node's own file holds the text"),
    "data.label_column": (NODE, "which column of the node's own file holds the label"),
    "data.prompt_column": (NODE, "which column of the node's own file holds the prompt"),
    "data.response_column": (NODE, "which column of the node's own file holds the response"),
    "data.messages_column": (NODE, "which column of the node's own file holds chat messages"),
    "data.val_fraction": (SERVER, "the node's validation share (evaluation releases are charged anyway)"),
    "data.eval_path": (NODE, "the node's evaluation file; a server may not name a path on the node"),
    "data.max_examples": (NODE, "the node trains on the data it chose"),
    "data.labels": (SERVER, "the federation's label set, so ids agree on every node"),
    "federation.proximal_mu": (SERVER, "FedProx pull towards the global adapter: post-processing, privacy-free"),
    **{f"federation.{name}": (SERVER_ALONE, "the server's own round settings")
       for name in ("clients_per_round", "min_clients", "max_update_norm", "adaptive_norm_bound", "weight_cap",
                    "aggregator", "trim_fraction", "server_optimizer", "server_learning_rate",
                    "secure_aggregation", "secagg_threshold", "secagg_share_fraction", "secagg_clip",
                    "secagg_clipping_range", "secagg_quantization_range",
                    "user_dp_clip", "user_dp_noise", "cohort_sampling", "population", "user_dp_delta", "num_clients",
                    "partitioner", "dirichlet_alpha", "partition_column", "client_files", "ray_address",
                    "round_timeout", "central_eval_path", "central_holdout", "rows_per_client")},
    "node.labels": (NODE, "the labels the node's data may hold: a server's label list must include them (a check of "
                          "the request against the policy, never against the rows)"),
    **{f"node.{name}": (NODE, "the node's own policy")
       for name in ("max_epsilon", "budget_dir", "release_train_loss", "release_evaluation",
                    "metric_noise_multiplier", "metric_loss_clip", "max_evaluations_per_round", "max_unreleased_rounds",
                    "require_secure_aggregation", "secagg_max_clip", "distributed",
                    "distributed_min_contributors")},
}

# A deployed node's policy keys (SuperNode node config / `fedtune client` / a policy file).
NODE_CONFIG_KEYS: dict[str, str] = {
    "max-epsilon": "node.max_epsilon",
    "delta": "dp.delta",
    "accountant": "dp.accountant",
    "model-path": "model.path",
    "device": "model.device",
    "data-path": "data.path",
    "eval-path": "data.eval_path",
    "text-column": "data.text_column",
    "label-column": "data.label_column",
    "prompt-column": "data.prompt_column",
    "response-column": "data.response_column",
    "messages-column": "data.messages_column",
    "physical-batch-size": "training.physical_batch_size",
    "budget-dir": "node.budget_dir",
    "release-train-loss": "node.release_train_loss",
    "release-evaluation": "node.release_evaluation",
    "metric-noise-multiplier": "node.metric_noise_multiplier",
    "metric-loss-clip": "node.metric_loss_clip",
    "max-evaluations-per-round": "node.max_evaluations_per_round",
    "max-unreleased-rounds": "node.max_unreleased_rounds",
    "require-secure-aggregation": "node.require_secure_aggregation",
    "secagg-max-clip": "node.secagg_max_clip",
    "labels": "node.labels",
    "distributed": "node.distributed",
    "distributed-min-contributors": "node.distributed_min_contributors",
}
ALLOW_NON_PRIVATE_KEY = "allow-non-private"
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
        """A deployed node's policy from its SuperNode node config (or a policy file):
        keys of `NODE_CONFIG_KEYS`, `allow-non-private`, and `state-dir` (not policy)."""
        raw: dict[str, dict[str, Any]] = {"data": {"dataset": ""}}
        allow = False
        for key, value in node_config.items():
            if key == STATE_DIR_KEY:
                continue
            if key == ALLOW_NON_PRIVATE_KEY:
                if not isinstance(value, bool):
                    raise ConfigError(f"{source}: {key} = {value!r}: expected true or false")
                allow = value
                continue
            if key not in NODE_CONFIG_KEYS:
                raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(NODE_CONFIG_KEYS))}, "
                                  f"{ALLOW_NON_PRIVATE_KEY}, {STATE_DIR_KEY})")
            section, field = NODE_CONFIG_KEYS[key].split(".")
            if field == "labels" and isinstance(value, str):  # node config values are scalars: "neg,pos"
                value = [label.strip() for label in value.split(",") if label.strip()]
            raw.setdefault(section, {})[field] = value
        if "max_epsilon" not in raw.get("node", {}):
            raise ConfigError(f"{source}: max-epsilon is required: a deployed node refuses to start without its own "
                              "epsilon cap (fedtune client --max-epsilon)")
        if not raw["data"].get("path"):
            raise ConfigError(f"{source}: data-path is required: the node's own CSV / JSONL / Parquet file")
        cap = raw["node"]["max_epsilon"]
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf:
            raise ConfigError(f"{source}: max-epsilon = {cap!r}: expected a finite number > 0")
        raw.setdefault("dp", {})["target_epsilon"] = cap  # a request sets its own target, up to the cap
        config = build_config(raw, source=source)
        return cls(config.replace(dp=dataclasses.replace(config.dp, enabled=True)), allow_non_private=allow)

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
    return [(name, *OWNERS[name]) for name in _all_fields()]


def ownership_markdown() -> str:
    """The table docs/deployment.md shows (a test keeps the two identical)."""
    rows = ["| field | who decides | why |", "|---|---|---|"]
    rows += [f"| `{name}` | {owner} | {why} |" for name, owner, why in ownership_table()]
    return "\n".join(rows) + "\n"


def _all_fields() -> list[str]:
    return [f"{section}.{f.name}" for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)]
