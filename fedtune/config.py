"""Typed, validated configuration: model, LoRA, DP, training and data.

One frozen dataclass per section; every field's comment says what it means and why the
default is what it is. A config is validated once, on construction; checks that need the
data (delta < 1/n, batch <= n) run in `check_against_data`. Every error names the key and
the value, in one line.

Sources, later wins: built-in defaults < TOML file < CLI `--set section.key=value`.

A config also carries the tables of the layers above the core (`HARNESS_TABLES`: the
simulation harness's [simulation]) as written, so that they travel with it; the core never
reads their keys.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from fedtune.errors import ConfigError
from fedtune.privacy.accountants import ACCOUNTANTS  # the one registry: a new accountant is one entry there
from fedtune.federation.aggregate import AGGREGATORS  # the one registry: a new aggregator is one entry there
from fedtune.federation.server_optimizers import SERVER_OPTIMIZERS  # likewise a new server optimizer

TASKS = ("classification", "causal-lm", "instruct")
OPTIMIZERS = ("adamw", "sgd")
GRAD_SAMPLE_MODES = ("hooks", "ghost", "loop")
DP_MODES = ("local", "distributed")


# Who decides a field (`opt(owner=...)`): a deployed node takes a server's config only as a
# request, checked against these (fedtune.privacy.policy).
NODE = "node"
SERVER = "server"
WITHIN_POLICY = "server, within the node's policy"
SERVER_ALONE = "server alone (never sent to nodes)"
OWNER_KINDS = (NODE, SERVER, WITHIN_POLICY, SERVER_ALONE)
# The reasons shared by sections whose fields all have one owner and one reason.
ROUND_SETTINGS = "the server's own round settings"
OWN_POLICY = "the node's own policy"


def opt(default: Any, help: str, flag: str | None = None, *, owner: str, why: str, node_key: str | None = None,
        client_help: str | None = None) -> Any:
    """A config field that carries its own help (as peft's configs do), optionally the name
    of its command-line flag, and its place in the node's privacy policy, declared here once:
    `owner` (who decides it, one of `OWNER_KINDS`) and `why` make the ownership table and what
    a node refuses from a server; `node_key` (only for fields a deployed node sets itself)
    makes its policy key and its `fedtune client` flag, one name for both (`client_help`
    where the flag needs other words than `help`).
    `fedtune --help`, `fedtune client --help` and docs/deployment.md are generated from
    these, so none of them drifts from the fields."""
    if owner not in OWNER_KINDS:
        raise ValueError(f"owner = {owner!r}: expected one of {', '.join(map(repr, OWNER_KINDS))}")
    if not why:
        raise ValueError("why: every field says why its owner decides it (the ownership table shows it)")
    if node_key and owner not in (NODE, WITHIN_POLICY):
        raise ValueError(f"node_key = {node_key!r}: only a field the node decides (owner NODE or WITHIN_POLICY) "
                         f"has a key in the node's policy, not one owned by {owner!r}")
    if client_help and not node_key:
        raise ValueError("client_help: only a field with a node_key has a `fedtune client` flag")
    return field(default=default, metadata={"help": help, "flag": flag, "owner": owner, "why": why,
                                            "node_key": node_key, "client_help": client_help})


def config_error(key: str, value: Any, expected: str) -> ConfigError:
    """The one-line error of a bad value: `key = value: expected ...`, carrying the key
    (a node refusing a request names the field). Public so that the harness's own tables
    (`HARNESS_TABLES`) fail in the same words."""
    error = ConfigError(f"{key} = {value!r}: expected {expected}")
    error.key = key
    return error


def _fail(key: str, value: Any, expected: str) -> None:
    raise config_error(key, value, expected)


@dataclass(frozen=True)
class ModelConfig:
    path: str = opt(
        "",
        "Local directory of a transformers model, or a bundled model's name (minilm, smollm2-135m-instruct); \"\" "
        "means the task's default: minilm (all-MiniLM-L6-v2) for classification and causal-lm, "
        "smollm2-135m-instruct for instruct.",
        flag="model", owner=NODE, why="the node loads its own local copy; a server may not name a path on the node",
        node_key="model")
    task: str = opt(
        "classification",
        "\"classification\" (sequence classification), \"causal-lm\" (next-token loss on one text column) or "
        "\"instruct\" (prompt -> response, loss on the response tokens only, scored by generation).",
        flag="task", owner=SERVER, why="the federation's task")
    max_seq_len: int = opt(
        64,
        "Tokens per example. 64 keeps a CPU node fast (a news lead, a tweet, most of a review); raise it for long "
        "documents: time per step grows about linearly.",
        flag="max_seq_len", owner=SERVER, why="tokens per example: compute, not privacy")
    device: str = opt(
        "auto", "\"auto\" picks CUDA when present, else CPU.", flag="device", owner=NODE, why="the node's hardware",
        node_key="device", client_help="auto, cpu or cuda[:N]")
    max_new_tokens: int = opt(
        0,
        "Instruct: tokens generated per answer when scoring by generation (greedy); 0 = the longest expected "
        "answer plus 4.",
        flag="max_new_tokens", owner=SERVER, why="answer length when scoring by generation: compute, not privacy")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            _fail("model.task", self.task, f"one of {', '.join(TASKS)}")
        if not 8 <= self.max_seq_len <= 8192:
            _fail("model.max_seq_len", self.max_seq_len, "a whole number in [8, 8192]")
        if not 0 <= self.max_new_tokens <= 4096:
            _fail("model.max_new_tokens", self.max_new_tokens, "a whole number in [0, 4096] (0 = automatic)")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            _fail("model.device", self.device, "'auto', 'cpu' or 'cuda[:N]'")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = opt(
        8, "LoRA rank. 8 is the common default for BERT-size encoders (Hu et al. 2021).", flag="rank", owner=SERVER,
        why="adapter shape: every node must match to be averaged")
    alpha: float = opt(
        16.0, "Scaling numerator: the update is scaled by alpha / rank.", flag="lora_alpha", owner=SERVER,
        why="adapter scaling, federation-wide")
    dropout: float = opt(
        0.0, "Dropout on the LoRA input. 0 by default: DP noise already regularises.", owner=SERVER,
        why="regularisation, federation-wide")
    target_modules: tuple[str, ...] = opt(
        (), "Module names to adapt; empty means peft's default for the architecture.", owner=SERVER,
        why="adapter shape, federation-wide")
    train_head: bool = opt(
        True,
        "Train the classification head (classification only). A fresh head must train unless it was trained "
        "before; freezing it is for ablations.",
        owner=SERVER, why="what trains, federation-wide")
    ffa: bool = opt(
        False,
        "FFA-LoRA (Sun et al. 2024): A frozen at its seeded init, only B trains, so federated averaging is exact "
        "and half the tensors travel.",
        owner=SERVER, why="FFA-LoRA: A frozen on every node")
    top_layers: int = opt(
        0,
        "Adapt only the last N transformer blocks (0 = every block). Fewer adapted blocks mean fewer noised "
        "coordinates under DP and a backward pass that stops at the lowest adapted block.",
        flag="top_layers", owner=SERVER, why="adapter shape: which blocks carry adapters, federation-wide")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            _fail("lora.rank", self.rank, "a whole number > 0")
        if not self.alpha > 0:
            _fail("lora.alpha", self.alpha, "a number > 0")
        if not 0 <= self.dropout < 1:
            _fail("lora.dropout", self.dropout, "a number in [0, 1)")
        if self.top_layers < 0:
            _fail("lora.top_layers", self.top_layers, "a whole number >= 0 (0 = every block)")


@dataclass(frozen=True)
class AdapterConfig:
    method: str = opt(
        "lora",
        "The PEFT method (an entry of fedtune.models.adapter_methods.ADAPTER_METHODS): \"lora\" (options in "
        "[lora]; FFA-LoRA is one of them), \"ia3\" (learned scaling vectors, peft's default targets; needs "
        "dp.grad_sample_mode = \"loop\" under DP) or \"prefix\" (prefix tuning, causal LM / instruct).",
        flag="adapter", owner=SERVER, why="the PEFT method every node attaches (fedtune.models.adapter_methods)")
    num_virtual_tokens: int = opt(
        8, "Prefix tuning: the number of virtual tokens whose keys and values train in every layer.", owner=SERVER,
        why="prefix-tuning adapter shape, federation-wide")

    def __post_init__(self) -> None:
        from fedtune.models.adapter_methods import ADAPTER_METHODS  # the one registry: a new method is one entry there

        if self.method not in ADAPTER_METHODS:
            _fail("adapter.method", self.method, f"one of {', '.join(ADAPTER_METHODS)}")
        if not 1 <= self.num_virtual_tokens <= 512:
            _fail("adapter.num_virtual_tokens", self.num_virtual_tokens, "a whole number in [1, 512]")


@dataclass(frozen=True)
class DPConfig:
    enabled: bool = opt(
        True,
        "DP-SGD on (true) or a NON-PRIVATE baseline (false). Non-private runs must be asked for explicitly and are "
        "labelled NON-PRIVATE in every output.",
        owner=WITHIN_POLICY,
        why="false is honoured only where the node's policy allows non-private training (never by default)")
    target_epsilon: float = opt(
        8.0,
        "The target of this training (all its planned rounds x local epochs): the noise is calibrated for it. The "
        "hard cap over every run on the data is node.max_epsilon.",
        flag="epsilon", owner=WITHIN_POLICY,
        why="calibration target of this training: at most the node's max_epsilon")
    delta: float = opt(
        0.0, "0 means automatic: 1 / (10 n) for n training examples, well under 1/n.", flag="delta",
        owner=WITHIN_POLICY, why="0 = the node's own; a stricter (smaller) delta is honoured, a larger one refused",
        node_key="delta",
        client_help="this node's delta (default 1/(10 n)); a server may only ask for a smaller one")
    noise_multiplier: float = opt(
        0.0, "Fixed noise multiplier; 0 means calibrate it from target_epsilon for the planned run.",
        flag="noise_multiplier", owner=SERVER,
        why="a fixed sigma: any value is safe, the ledger refuses what would pass the cap")
    max_grad_norm: float = opt(
        1.0, "Per-example clipping norm C (Opacus max_grad_norm).", flag="max_grad_norm", owner=SERVER,
        why="clipping norm C: the noise is sigma x C, privacy does not depend on C")
    accountant: str = opt(
        "rdp",
        "\"rdp\" or \"prv\" (Opacus accountants), or \"pld\" (Google dp-accounting's privacy loss distribution, "
        "pessimistic discretization: an upper bound on the true epsilon, about 10% below RDP's).",
        flag="accountant", owner=NODE, why="how the node counts its own epsilon", node_key="accountant")
    grad_sample_mode: str = opt(
        "hooks",
        "\"hooks\" (default; Opacus's per-layer rules, cheapest for LoRA), \"ghost\" (ghost clipping, two "
        "backwards; less memory on large models) or \"loop\" (exact per-example gradients one example at a time, "
        "handed to Opacus's DP optimizer: any adapter, e.g. IA3, whose layers Opacus has no rule for; the slowest).",
        flag="grad_sample_mode", owner=SERVER,
        why="how per-sample gradients are computed: the same mechanism either way")
    secure_mode: bool = opt(
        False,
        "Opacus secure_mode: noise and sampling from torchcsprng's CSPRNG (and Opacus's floating-point-attack "
        "mitigation). Needs the torchcsprng package, which does not install for current torch; without it the "
        "noise is already secret (`noise_seed`).",
        owner=NODE, why="the node's random number generator")
    mode: str = opt(
        "local",
        "Where the DP noise goes on: \"local\" (default; each node runs DP-SGD on its own rows and its update is "
        "private by itself) or \"distributed\" (each round is ONE DP-SGD step over the union of the sampled nodes' "
        "Poisson batches: each node clips its examples' gradients, adds only its share of the noise, and sends the "
        "integer-encoded sum through SecAgg+, so that the unmasked sum carries the whole noise; needs "
        "federation.secure_aggregation and a node policy that joins such rounds, node.distributed).",
        owner=WITHIN_POLICY,
        why="\"distributed\" is honoured only where the node's policy joins distributed rounds (node.distributed); "
            "the node adds only its share of the noise, calibrated to its own t")
    distributed_bits: int = opt(
        20,
        "Distributed DP: the nodes' integer vectors are summed modulo 2^bits (the distributed discrete Gaussian "
        "mechanism's modulus). 20 leaves room for about a hundred rows' gradients and the noise without wrapping; "
        "at most 26 (Flower's SecAgg+ masks modulo 2^32).",
        owner=SERVER,
        why="the modulus of the integer sum: utility, not privacy (the node checks that secure aggregation carries "
            "its integers exactly)")
    noise_seed: int = opt(
        -1,
        "-1 (default): DP noise, Poisson batches, cohort sampling and user-level noise draw from generators seeded "
        "per call from OS entropy, so nobody can replay them. >= 0: reproducible from this seed, for simulations "
        "and tests only; every output of such a run says \"reproducible noise: not for production\". A node never "
        "takes it from a server.",
        flag="noise_seed", owner=NODE, why="reproducible noise would let whoever knows the seed replay the release")

    def __post_init__(self) -> None:
        # bounded, so that no value (sent by a server, say) can hang the accountant
        if not 1e-3 <= self.target_epsilon <= 1e3:
            _fail("dp.target_epsilon", self.target_epsilon, "a number in [0.001, 1000]")
        if not (self.delta == 0 or 1e-30 <= self.delta < 1):
            _fail("dp.delta", self.delta, "a number in [1e-30, 1/n), or 0 for automatic")
        if not 0 <= self.noise_multiplier <= 1e4:
            _fail("dp.noise_multiplier", self.noise_multiplier, "a number in (0, 10000], or 0 to calibrate")
        if not self.max_grad_norm > 0:
            _fail("dp.max_grad_norm", self.max_grad_norm, "a number > 0")
        if self.accountant not in ACCOUNTANTS:
            _fail("dp.accountant", self.accountant, f"one of {', '.join(ACCOUNTANTS)}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            _fail("dp.grad_sample_mode", self.grad_sample_mode, f"one of {', '.join(GRAD_SAMPLE_MODES)}")
        if self.mode not in DP_MODES:
            _fail("dp.mode", self.mode, f"one of {', '.join(DP_MODES)}")
        if not 8 <= self.distributed_bits <= 26:
            _fail("dp.distributed_bits", self.distributed_bits, "a whole number in [8, 26]")
        if self.noise_seed < -1:
            _fail("dp.noise_seed", self.noise_seed,
                  "-1 (secret noise from OS entropy) or a seed >= 0 (reproducible, not for production)")
        if self.secure_mode and importlib.util.find_spec("torchcsprng") is None:
            _fail("dp.secure_mode", self.secure_mode, "false: secure mode needs the torchcsprng package, which is not "
                  "installed (the noise is secret without it: dp.noise_seed = -1)")

    def resolved_delta(self, records: int) -> float:
        """The delta to account at: this one, or 1 / (10 n) for the n records a budget
        protects (all the node's rows, never a request-dependent share of them)."""
        return self.delta if self.delta > 0 else 1.0 / (10.0 * records)


PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = opt(
        3, "Local epochs per training call (per federated round).", flag="epochs", owner=SERVER,
        why="local epochs per round (the noise is calibrated for them)")
    rounds: int = opt(
        1, "Planned training calls (federated rounds); the noise is calibrated for all of them.", flag="rounds",
        owner=SERVER, why="planned rounds (the noise is calibrated for them; the ledger caps any more)")
    batch_size: int = opt(
        32, "Expected batch size; with Poisson sampling the real size varies around it.", flag="batch_size",
        owner=SERVER, why="expected Poisson batch size")
    learning_rate: float = opt(
        1e-2, "AdamW / SGD learning rate. LoRA under DP likes large rates (Yu et al. 2022).", flag="lr",
        owner=SERVER, why="optimisation")
    optimizer: str = opt("adamw", "\"adamw\" or \"sgd\".", flag="optimizer", owner=SERVER, why="optimisation")
    weight_decay: float = opt(0.0, "Weight decay of the local optimizer.", owner=SERVER, why="optimisation")
    seed: int = opt(
        0,
        "Seeds what the whole federation must share or may know: LoRA init (FFA-LoRA's frozen A must be the same "
        "on every node), the validation split, simulation partitions. Never the DP noise or the Poisson batches "
        "(see dp.noise_seed).",
        flag="seed", owner=SERVER, why="LoRA init and splits, which every node must share; never the DP noise")
    physical_batch_size: int = opt(
        0,
        "Rows per forward/backward pass; a larger Poisson batch is processed in chunks of this size and takes one "
        "DP-SGD step (as Opacus's BatchMemoryManager), so the privacy is that of the whole batch and memory that "
        "of a chunk. 0 = the whole batch at once.",
        flag="physical_batch_size", owner=NODE, why="the node's memory: the same DP-SGD step, run in chunks",
        node_key="physical-batch-size")
    precision: str = opt(
        "fp32",
        "\"fp32\", or \"bf16\": the forward pass under torch.autocast (weights, gradients, Opacus's per-sample "
        "clipping and noise stay fp32). No \"fp16\": it needs loss scaling, and a scaled loss scales every "
        "per-sample gradient before DP-SGD clips it.",
        flag="precision", owner=SERVER, why="fp32 or bf16 forward pass")

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            _fail("training.epochs", self.epochs, "a whole number > 0")
        if self.rounds <= 0:
            _fail("training.rounds", self.rounds, "a whole number > 0")
        if self.batch_size <= 0:
            _fail("training.batch_size", self.batch_size, "a whole number > 0")
        if not self.learning_rate > 0:
            _fail("training.learning_rate", self.learning_rate, "a number > 0")
        if self.optimizer not in OPTIMIZERS:
            _fail("training.optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
        if self.physical_batch_size < 0:
            _fail("training.physical_batch_size", self.physical_batch_size, "a whole number >= 0 (0 = whole batch)")
        if self.weight_decay < 0:
            _fail("training.weight_decay", self.weight_decay, "a number >= 0")
        if self.precision not in PRECISIONS:
            _fail("training.precision", self.precision,
                  "'fp32' or 'bf16' (fp16 needs loss scaling, which breaks DP-SGD's per-sample clipping)")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt(
        "bbc-news",
        "A named built-in dataset (bbc-news, tweets, drug-reviews, rotten-tomatoes; for instruct: tweets-instruct, "
        "bbc-news-instruct, drug-reviews-instruct) ...",
        flag="dataset", owner=NODE, why="the node's data is its own")
    path: str = opt(
        "", "... or a local CSV / JSONL / Parquet file (takes precedence when set).", flag="data", owner=NODE,
        why="the node's data is its own; a server may not name a path on the node", node_key="data",
        client_help="this node's training data (CSV / JSONL / Parquet)")
    text_column: str = opt(
        "text", "The column of the node's file that holds the text.", flag="text_column", owner=NODE,
        why="which column of the node's own file holds the text", node_key="text-column")
    label_column: str = opt(
        "label", "The column of the node's file that holds the label (ignored for causal-lm).", flag="label_column",
        owner=NODE, why="which column of the node's own file holds the label", node_key="label-column")
    prompt_column: str = opt(
        "prompt", "Instruct: the column that holds the prompt (the user's turn).", flag="prompt_column", owner=NODE,
        why="which column of the node's own file holds the prompt", node_key="prompt-column")
    response_column: str = opt(
        "response", "Instruct: the column that holds the expected response (the only tokens the loss sees).",
        flag="response_column", owner=NODE, why="which column of the node's own file holds the response",
        node_key="response-column")
    messages_column: str = opt(
        "",
        "Instruct, instead of prompt/response: a column of chat messages ([{role, content}, ...], a JSON string in "
        "CSV) whose last message is the assistant's response.",
        flag="messages_column", owner=NODE, why="which column of the node's own file holds chat messages",
        node_key="messages-column")
    val_fraction: float = opt(
        0.15, "Held-out share for validation, split with training.seed.", owner=SERVER,
        why="the node's validation share (evaluation releases are charged anyway)")
    eval_path: str = opt(
        "", "Optional separate evaluation file (same columns); replaces the split when set.", flag="eval_data",
        owner=NODE, why="the node's evaluation file; a server may not name a path on the node",
        node_key="eval-data")
    max_examples: int = opt(
        0, "Use at most this many examples (seeded sample), 0 for all. Keeps CPU runs short.", flag="max_examples",
        owner=NODE, why="the node trains on the data it chose")
    labels: tuple[str, ...] = opt(
        (),
        "The label set, in id order. Empty: inferred from the training data (one node). A federation must fix it "
        "so that every node maps labels to the same ids.",
        owner=SERVER, why="the federation's label set, so ids agree on every node")

    def __post_init__(self) -> None:
        if not self.dataset and not self.path:
            _fail("data.dataset", self.dataset, "a dataset name, or data.path set to a file")
        if not self.text_column:
            _fail("data.text_column", self.text_column, "a column name")
        if not 0 < self.val_fraction < 1:
            _fail("data.val_fraction", self.val_fraction, "a number in (0, 1)")
        if self.max_examples < 0:
            _fail("data.max_examples", self.max_examples, "a whole number >= 0 (0 = all)")


RELEASE_MODES = ("off", "dp")


@dataclass(frozen=True)
class NodeConfig:
    """What a node decides about its own privacy beyond the [dp] mechanism.

    In deployment these come from the node's own policy (`fedtune client` flags or a
    policy file), never from the server; in train-local and simulation this section is
    the policy of the node (of every virtual client)."""

    max_epsilon: float = opt(
        0.0,
        "Hard cap on epsilon over everything ever released from this data: every run, every round, released "
        "metrics included. 0 = dp.target_epsilon (train-local, simulation); a deployed node must set it (`fedtune "
        "client --max-epsilon`).",
        flag="max_epsilon", owner=NODE, why=OWN_POLICY, node_key="max-epsilon",
        client_help="REQUIRED: this node's hard epsilon cap over everything it releases from its data")
    budget_dir: str = opt(
        "",
        "Where this node's budgets live: one ledger per data fingerprint, so the same data continues the same "
        "budget whatever the run folder or state dir. \"\" = $FEDTUNE_HOME/ budgets (~/.fedtune/budgets); a "
        "simulation keeps each virtual client's in its state dir.",
        flag="budget_dir", owner=NODE, why=OWN_POLICY, node_key="budget-dir")
    release_train_loss: str = opt(
        "off",
        "The training loss on private batches leaves the node \"off\" (default) or \"dp\": the final adapter's "
        "mean loss on the training rows, clipped and noised (Gaussian, charged).",
        owner=NODE, why=OWN_POLICY, node_key="release-train-loss")
    release_evaluation: str = opt(
        "off",
        "Federated evaluation metrics: \"off\" (default; the node refuses evaluation requests) or \"dp\": a noised "
        "count of correct predictions and a noised clipped loss sum, charged.",
        owner=NODE, why=OWN_POLICY, node_key="release-evaluation")
    metric_noise_multiplier: float = opt(
        5.0,
        "Noise multiplier of each metric release (Gaussian mechanism, sensitivity-normalised). 5 costs little next "
        "to DP-SGD but leaves a +-7 example error on a count of correct predictions: metrics on small validation "
        "sets are rough under DP.",
        owner=NODE, why=OWN_POLICY, node_key="metric-noise-multiplier")
    metric_loss_clip: float = opt(
        5.0, "Per-example loss is clipped to [0, this] before a release (bounds the sensitivity).", owner=NODE,
        why=OWN_POLICY, node_key="metric-loss-clip")
    require_secure_aggregation: bool = opt(
        False,
        "Refuse every training round that is not a SecAgg+ round (the node's update then never reaches the server "
        "unmasked).",
        owner=NODE, why=OWN_POLICY, node_key="require-secure-aggregation")
    secagg_max_clip: float = opt(
        8.0,
        "The largest L2 bound this node clips its own update to in a SecAgg+ round: a server may declare a smaller "
        "bound (`federation.secagg_clip`), never a larger one (the server cannot check a masked update, so the "
        "bound is the node's). 8 is the bound a server with the default settings declares (the quantization's "
        "clipping range).",
        owner=NODE, why=OWN_POLICY, node_key="secagg-max-clip")
    labels: tuple[str, ...] = opt(
        (),
        "Classification: every label this node's data may hold (its operator declares them; `fedtune client "
        "--labels`). A server's label list must include them all, and the node checks its own rows against them "
        "when it starts, never in answer to a request: a refusal that depended on the rows would tell the server "
        "what they hold. Empty: data.labels (train-local, simulation); a deployed node without it refuses "
        "classification.",
        owner=NODE,
        why="the labels the node's data may hold: a server's label list must include them (a check of the request "
            "against the policy, never against the rows)",
        node_key="labels",
        client_help="classification: every label --data may hold, comma-separated (checked against the rows now; "
                    "the server's label list must include them)")
    max_evaluations_per_round: int = opt(
        1,
        "Evaluation requests the node answers per round it trains (counted by the node, not by the round number a "
        "message claims); more are refused.",
        owner=NODE, why=OWN_POLICY, node_key="max-evaluations-per-round")
    distributed: bool = opt(
        False,
        "Join distributed-DP rounds (dp.mode = \"distributed\"): this node then adds only its share of the noise "
        "and relies on secure aggregation and at least node.distributed_min_contributors honest contributors for "
        "the rest. Off by default: a node must choose to trust the crowd.",
        owner=NODE, why=OWN_POLICY, node_key="distributed")
    distributed_min_contributors: int = opt(
        5,
        "Distributed DP: t, the fewest contributors this node trusts to add their noise shares. Its own share is "
        "calibrated to t (variance 1/t of the whole noise, never to the cohort a server claims), and it refuses a "
        "round whose SecAgg+ threshold or cohort is below t. If c of the t collude with the server, the noise of t "
        "- c shares remains: the privacy report shows that epsilon.",
        owner=NODE, why=OWN_POLICY, node_key="distributed-min-contributors")
    max_unreleased_rounds: int = opt(
        3,
        "Rounds the node may charge and then release nothing for (the server stopped waiting, a failure after the "
        "charge, a killed process) over its whole life; past it the node refuses to train until its operator "
        "raises this. A server that cuts rounds short on purpose would otherwise spend the budget for nothing.",
        owner=NODE, why=OWN_POLICY, node_key="max-unreleased-rounds")

    def __post_init__(self) -> None:
        if self.max_epsilon < 0 or math.isinf(self.max_epsilon) or math.isnan(self.max_epsilon):
            _fail("node.max_epsilon", self.max_epsilon, "a finite number > 0 (0 = dp.target_epsilon)")
        for key in ("release_train_loss", "release_evaluation"):
            if getattr(self, key) not in RELEASE_MODES:
                _fail(f"node.{key}", getattr(self, key), "'off' or 'dp' (a Gaussian release charged to the ledger)")
        if not self.metric_noise_multiplier > 0:
            _fail("node.metric_noise_multiplier", self.metric_noise_multiplier, "a number > 0")
        if not self.metric_loss_clip > 0:
            _fail("node.metric_loss_clip", self.metric_loss_clip, "a number > 0")
        if not 0 < self.secagg_max_clip < math.inf:
            _fail("node.secagg_max_clip", self.secagg_max_clip, "a finite number > 0")
        if self.max_evaluations_per_round < 0:
            _fail("node.max_evaluations_per_round", self.max_evaluations_per_round, "a whole number >= 0")
        if self.distributed_min_contributors < 2:
            _fail("node.distributed_min_contributors", self.distributed_min_contributors, "a whole number >= 2 (one "
                  "contributor's share alone would be the whole noise on one node's gradients)")
        if self.max_unreleased_rounds < 0:
            _fail("node.max_unreleased_rounds", self.max_unreleased_rounds, "a whole number >= 0")


COHORT_SAMPLINGS = ("fixed", "poisson")


@dataclass(frozen=True)
class FederationConfig:
    clients_per_round: int = opt(
        3, "Nodes sampled per round (the expected number under Poisson cohorts).", flag="clients_per_round",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    min_clients: int = opt(
        2, "The fewest valid replies a round may aggregate.", flag="min_clients", owner=SERVER_ALONE,
        why=ROUND_SETTINGS)
    max_update_norm: float = opt(
        100.0, "Reject replies whose update (reply - global) has a larger L2 norm; 0 = no bound.",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    adaptive_norm_bound: float = opt(
        3.0,
        "Clip every update to this multiple of the round's median update norm (adaptive, as adaptive-clipping DP "
        "does); 0 = off. Needs 3+ replies to mean anything.",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    weight_cap: float = opt(
        4.0,
        "No reply weighs more than this multiple of the round's median claimed example count (a node claiming a "
        "billion rows counts like this many typical nodes); 0 = no cap. Honest silos of very different sizes are "
        "capped too: raise it for natural partitions.",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    aggregator: str = opt(
        "mean",
        "How updates combine: \"mean\" (FedAvg, weighted), \"median\" or \"trimmed-mean\" (coordinate-wise, "
        "unweighted, as Flower's FedMedian / FedTrimmedAvg).",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    trim_fraction: float = opt(
        0.2, "Share cut at each end per coordinate by \"trimmed-mean\".", owner=SERVER_ALONE, why=ROUND_SETTINGS)
    # Secure aggregation (SecAgg+, Flower's implementation): the server learns only the mean
    # of the cohort's updates. Each node clips its update to secagg_clip before it is
    # quantized and masked; weights are uniform (a count inside a masked vector is uncheckable).
    secure_aggregation: bool = opt(
        False, "SecAgg+: the server sees only the cohort's summed update, never one node's.", owner=SERVER_ALONE,
        why=ROUND_SETTINGS)
    secagg_threshold: float = opt(
        0.6,
        "Share of a node's neighbours whose shares rebuild its masks (Flower's reconstruction_threshold); fewer "
        "surviving nodes fail the round.",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    secagg_share_fraction: float = opt(
        1.0,
        "Share of the cohort each node shares keys with (1.0 = everyone: SecAgg; less = SecAgg+'s sparse graph).",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    secagg_clip: float = opt(
        0.0,
        "L2 bound each node clips its own update to before masking; 0 = user_dp_clip when user-level DP is on, "
        "else max_update_norm.",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    secagg_clipping_range: float = opt(
        8.0, "Coordinate range [-r, r] of the quantization (Flower's clipping_range).", owner=SERVER_ALONE,
        why=ROUND_SETTINGS)
    secagg_quantization_range: int = opt(
        4194304, "Quantization levels over that range (Flower's quantization_range, 2^22).", owner=SERVER_ALONE,
        why=ROUND_SETTINGS)
    server_optimizer: str = opt(
        "fedavg", "\"fedavg\", or a server optimizer on the averaged update (Reddi et al. 2021).",
        flag="server_optimizer", owner=SERVER_ALONE, why=ROUND_SETTINGS)
    server_learning_rate: float = opt(
        0.01, "Learning rate of the server optimizer (FedAdam / FedYogi).", owner=SERVER_ALONE, why=ROUND_SETTINGS)
    proximal_mu: float = opt(
        0.0,
        "FedProx mu: after each local step, pull the adapter towards the round's global (a decoupled proximal "
        "step: post-processing of the DP gradient, privacy-free).",
        owner=SERVER, why="FedProx pull towards the global adapter: post-processing, privacy-free")
    user_dp_clip: float = opt(
        0.0, "User-level DP (DP-FedAvg): clip each client update to this norm (0 = off) ...", owner=SERVER_ALONE,
        why=ROUND_SETTINGS)
    user_dp_noise: float = opt(
        0.0, "... and add Gaussian noise of this multiplier x clip to the sum.", owner=SERVER_ALONE,
        why=ROUND_SETTINGS)
    cohort_sampling: str = opt(
        "fixed",
        "How the server picks each round's cohort from the nodes actually registered: \"fixed\" (clients_per_round "
        "of them, without replacement) or \"poisson\" (each node independently with rate clients_per_round / "
        "registered nodes). Both from secret randomness. User-level DP is accounted for the sampling used: Poisson "
        "with amplification at that rate; a fixed cohort of fewer nodes than registered as sampling without "
        "replacement (replace-one: one node replaced moves the sum by twice the clip), one of every registered "
        "node as full participation (q = 1).",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    population: int = opt(
        0,
        "How many nodes (users) the federation has, as the operator declares it; user-level delta defaults to 1 / "
        "(10 x population). A simulation uses its number of clients when 0.",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    user_dp_delta: float = opt(
        0.0, "User-level delta; 0 = 1 / (10 x population).", owner=SERVER_ALONE, why=ROUND_SETTINGS)
    user_dp_accountant: str = opt(
        "rdp",
        "How the server counts user-level epsilon: \"rdp\" (default; the only accountant of fixed-size cohorts "
        "drawn without replacement, so the only one with cohort_sampling = \"fixed\"), or with Poisson cohorts any "
        "accountant dp.accountant names (\"prv\", \"pld\").",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)
    round_timeout: float = opt(
        3600.0, "Seconds the server waits for a round's replies.", owner=SERVER_ALONE, why=ROUND_SETTINGS)
    central_eval_path: str = opt(
        "",
        "Central evaluation (the server scores each new global adapter on one held-out set): a file the operator "
        "owns (same columns as the clients' data). A simulation may instead keep back a share of its dataset "
        "([simulation]). With neither, evaluation is federated (sampled clients' validation splits).",
        owner=SERVER_ALONE, why=ROUND_SETTINGS)

    def __post_init__(self) -> None:
        if self.clients_per_round <= 0:
            _fail("federation.clients_per_round", self.clients_per_round, "a whole number > 0")
        if not 0 < self.min_clients <= self.clients_per_round:
            _fail("federation.min_clients", self.min_clients,
                  f"a whole number in [1, clients_per_round = {self.clients_per_round}]")
        if self.max_update_norm < 0:
            _fail("federation.max_update_norm", self.max_update_norm, "a number >= 0 (0 = no bound)")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            _fail("federation.server_optimizer", self.server_optimizer, f"one of {', '.join(SERVER_OPTIMIZERS)}")
        if not self.server_learning_rate > 0:
            _fail("federation.server_learning_rate", self.server_learning_rate, "a number > 0")
        if self.proximal_mu < 0:
            _fail("federation.proximal_mu", self.proximal_mu, "a number >= 0")
        if self.user_dp_clip < 0 or self.user_dp_noise < 0 or (self.user_dp_noise > 0 and self.user_dp_clip == 0):
            _fail("federation.user_dp_noise", self.user_dp_noise,
                  "a number >= 0, with user_dp_clip > 0 when noise is on")
        if self.adaptive_norm_bound < 0 or (0 < self.adaptive_norm_bound < 1):
            _fail("federation.adaptive_norm_bound", self.adaptive_norm_bound,
                  "0 (off) or a multiple >= 1 of the median norm")
        if self.weight_cap < 0 or (0 < self.weight_cap < 1):
            _fail("federation.weight_cap", self.weight_cap, "0 (no cap) or a multiple >= 1 of the median example count")
        if self.aggregator not in AGGREGATORS:
            _fail("federation.aggregator", self.aggregator, f"one of {', '.join(AGGREGATORS)}")
        if not 0 <= self.trim_fraction < 0.5:
            _fail("federation.trim_fraction", self.trim_fraction, "a number in [0, 0.5)")
        if self.secure_aggregation and self.aggregator != "mean":
            _fail("federation.aggregator", self.aggregator, "'mean' with secure aggregation (robust aggregation needs "
                  "to see each update, which the masks hide)")
        if not 0.5 < self.secagg_threshold <= 1:
            _fail("federation.secagg_threshold", self.secagg_threshold,
                  "a share in (0.5, 1]: more than half the shares")
        if not 0 < self.secagg_share_fraction <= 1:
            _fail("federation.secagg_share_fraction", self.secagg_share_fraction, "a share in (0, 1]")
        if self.secure_aggregation and self.user_dp_noise > 0 and self.secagg_clip > self.user_dp_clip:
            _fail("federation.secagg_clip", self.secagg_clip, f"at most user_dp_clip = {self.user_dp_clip:g} (the "
                  "sensitivity user-level noise is calibrated to), or 0")
        if not self.secagg_clipping_range > 0:
            _fail("federation.secagg_clipping_range", self.secagg_clipping_range, "a number > 0")
        if not 0 <= self.secagg_clip <= self.secagg_clipping_range:
            _fail("federation.secagg_clip", self.secagg_clip, f"a bound in [0, secagg_clipping_range = "
                  f"{self.secagg_clipping_range:g}] (0 = user_dp_clip, or the clipping range)")
        if not 2 <= self.secagg_quantization_range <= 2**31:
            _fail("federation.secagg_quantization_range", self.secagg_quantization_range, "a whole number in [2, 2^31]")
        if self.secure_aggregation:
            largest = max(self.clients_per_round, self.population)
            if largest * self.secagg_quantization_range >= 2**32:
                _fail("federation.secagg_quantization_range", self.secagg_quantization_range,
                      f"below 2^32 / {largest} nodes, or the masked sum overflows Flower's 32-bit modulus")
            if self.user_dp_noise == 0 and (self.min_clients < 3 or self.clients_per_round < 3):
                _fail("federation.min_clients", self.min_clients, "3 or more with secure aggregation (of a mean of 2, "
                      "each node can subtract its own update and read the other's)")
        if self.user_dp_noise > 0 and self.aggregator != "mean":
            _fail("federation.aggregator", self.aggregator,
                  "'mean' with user-level DP (its noise is calibrated to a clipped sum)")
        if self.cohort_sampling not in COHORT_SAMPLINGS:
            _fail("federation.cohort_sampling", self.cohort_sampling, f"one of {', '.join(COHORT_SAMPLINGS)}")
        if self.population < 0:
            _fail("federation.population", self.population,
                  "a whole number >= 0 (0 = a simulation's number of clients)")
        if not 0 <= self.user_dp_delta < 1:
            _fail("federation.user_dp_delta", self.user_dp_delta, "a number in (0, 1), or 0 for 1 / (10 x population)")
        if self.user_dp_accountant not in ACCOUNTANTS:
            _fail("federation.user_dp_accountant", self.user_dp_accountant, f"one of {', '.join(ACCOUNTANTS)}")
        if self.cohort_sampling == "fixed" and self.user_dp_accountant != "rdp":
            _fail("federation.user_dp_accountant", self.user_dp_accountant,
                  "'rdp' with cohort_sampling = 'fixed' (only "
                  "dp-accounting's RDP accounts a fixed-size cohort drawn without replacement)")
        if not self.round_timeout > 0:
            _fail("federation.round_timeout", self.round_timeout, "a number of seconds > 0")


def secagg_bound(fed: "FederationConfig") -> float:
    """The L2 bound every node clips its update to under secure aggregation: the declared
    one, else user_dp_clip (the user-level sensitivity), else the quantization's range."""
    if fed.secagg_clip:
        return fed.secagg_clip
    if fed.user_dp_noise > 0:
        return min(fed.user_dp_clip, fed.secagg_clipping_range)
    return fed.secagg_clipping_range  # a larger update would be cut coordinate by coordinate anyway


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dp: DPConfig = field(default_factory=DPConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    # The simulation harness's [simulation] table, kept as written (`HARNESS_TABLES`). Left out
    # of the hash, so a Config stays a cache key (simulations.partition), and compared as a
    # value, so configs that differ only here are different configs.
    simulation: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in HARNESS_TABLES:  # a private copy, arrays as tuples: the table is as frozen as the rest
            object.__setattr__(self, name, _harness_table(name, getattr(self, name)))
        from fedtune.models.adapter_methods import ADAPTER_METHODS

        method = ADAPTER_METHODS[self.adapter.method]
        if self.dp.enabled and self.dp.grad_sample_mode not in method.grad_sample_modes:
            _fail("dp.grad_sample_mode", self.dp.grad_sample_mode, f"one of {', '.join(method.grad_sample_modes)} with "
                  f"adapter.method = {self.adapter.method!r} ({method.why_modes})")
        if self.model.task not in method.tasks:
            _fail("adapter.method", self.adapter.method, f"one for task {self.model.task!r}: "
                  f"{', '.join(m for m, a in ADAPTER_METHODS.items() if self.model.task in a.tasks)}")
        if self.node.max_epsilon and self.dp.enabled and self.dp.target_epsilon > self.node.max_epsilon:
            _fail("dp.target_epsilon", self.dp.target_epsilon, f"at most node.max_epsilon = {self.node.max_epsilon:g}")

    @property
    def max_epsilon(self) -> float:
        """The node's hard cap: node.max_epsilon, or the target when it is not set."""
        return self.node.max_epsilon or self.dp.target_epsilon

    @property
    def task_is_classification(self) -> bool:
        return self.model.task == "classification"

    def to_dict(self) -> dict:
        """{section: {key: value}}, lists for tuples; a harness table only when it holds keys,
        so a deployment's config.toml shows no empty [simulation]."""
        sections = {name: _section_dict(getattr(self, name)) for name in SECTIONS}
        tables = {name: {key: list(v) if isinstance(v, tuple) else v for key, v in getattr(self, name).items()}
                  for name in HARNESS_TABLES if getattr(self, name)}
        return sections | tables

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
            lines.append("")
        return "\n".join(lines)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


def _section_dict(section: Any) -> dict:
    return {f.name: list(v) if isinstance(v := getattr(section, f.name), tuple) else v for f in fields(section)}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


# Tables of a config that belong to a layer above the core: the core keeps them so that they
# travel with a config (a run directory's config.toml, a sweep cell, a record) and round-trip
# through TOML, but never reads their keys; the harness that owns a table owns its fields,
# defaults and validation (`simulations.settings` for [simulation]). Not sections: no flags,
# no node policy (a node is never sent them), no Flower run-config keys of the core's own.
HARNESS_TABLES = ("simulation",)

SECTIONS: dict[str, type] = {name: kind for name, kind in get_type_hints(Config).items()
                             if name not in HARNESS_TABLES}  # section name -> its dataclass

_TABLE_SCALARS = (str, int, float, bool)


def _harness_table(name: str, values: Any) -> dict:
    """A harness table as the core keeps it: TOML scalars and arrays of them, checked only so
    that `to_toml` can write them back; what they mean is the harness's to check."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table of key = value, not {type(values).__name__}")
    table = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)) and all(isinstance(v, _TABLE_SCALARS) for v in value):
            value = tuple(value)
        elif not isinstance(value, _TABLE_SCALARS):
            _fail(f"{name}.{key}", value, "a string, number, true / false or an array of them")
        table[str(key)] = value
    return table


# scalar type -> (does a raw TOML value stand for it, what the error says is expected);
# a bool is an int to Python, never to a config
_SCALARS: dict[type, tuple[Any, str]] = {
    bool: (lambda value: isinstance(value, bool), "true or false"),
    int: (lambda value: isinstance(value, int) and not isinstance(value, bool), "a whole number"),
    float: (lambda value: isinstance(value, (int, float)) and not isinstance(value, bool), "a number"),
    str: (lambda value: isinstance(value, str), "a string"),
}


def coerce_value(key: str, value: Any, annotation: Any) -> Any:
    """Check one raw value against its field's type; ints may stand for floats. Public so
    that a harness table (`HARNESS_TABLES`) is checked with the same one-line errors."""
    origin = get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            _fail(key, value, "a list of strings")
        return tuple(value)
    if annotation in _SCALARS:
        accepts, expected = _SCALARS[annotation]
        if not accepts(value):
            _fail(key, value, expected)
        return float(value) if annotation is float else value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")  # a bug, not user input


def build_config(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested {section: {key: value}} mapping into a `Config`."""
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS and name not in HARNESS_TABLES:
            raise ConfigError(f"{source}: unknown section [{name}] (expected one of "
                              f"{', '.join([*SECTIONS, *HARNESS_TABLES])})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of key = value")
        if name in HARNESS_TABLES:
            sections[name] = values  # kept as written; its harness validates it
            continue
        section_type = SECTIONS[name]
        hints = get_type_hints(section_type)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                moved = "; a simulation's own settings (its clients and their data) live in [simulation]" \
                    if name == "federation" else ""
                raise ConfigError(f"{source}: unknown key {name}.{key} (known: {', '.join(hints)}){moved}")
            kwargs[key] = coerce_value(f"{name}.{key}", value, hints[key])
        sections[name] = section_type(**kwargs)
    return Config(**sections)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse `section.key=value`; the value is read as TOML, else taken as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. dp.target_epsilon=3")
    dotted, raw_value = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return section, key, value


def merge_overrides(raw: dict[str, Any], overrides: list[tuple[str, str, Any]]) -> dict[str, Any]:
    merged = {name: dict(values) if isinstance(values, dict) else values for name, values in raw.items()}
    for section, key, value in overrides:
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise ConfigError(f"[{section}] must be a table of key = value")
        merged[section][key] = value
    return merged


def config_from_toml_text(text: str, source: str = "config") -> Config:
    try:
        return build_config(tomllib.loads(text), source=source)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML ({exc})") from None


def load_config(path: str | Path | None = None, overrides: list[tuple[str, str, Any]] = ()) -> Config:
    raw = load_toml(path) if path else {}
    return build_config(merge_overrides(raw, list(overrides)), source=str(path) if path else "config")


def check_against_data(config: Config, n_train: int) -> None:
    """Checks that need the training-set size."""
    if config.training.batch_size > n_train:
        _fail("training.batch_size", config.training.batch_size, f"at most the {n_train} training examples")
    if config.dp.enabled and config.dp.delta > 0 and config.dp.delta >= 1.0 / n_train:
        _fail("dp.delta", config.dp.delta, f"less than 1/n = {1.0 / n_train:.3g} for n = {n_train} training examples")
