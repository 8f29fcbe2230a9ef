"""Run a federation of virtual clients on this host with Flower's simulation engine (Ray).

Every virtual client is a real Flower ClientApp (`clients.client_app.app`); each keeps
its ledger in `RUN_DIR/clients/client-NNNNN/`, exactly as a deployed node keeps its
`state-dir`, so privacy state persists across the ephemeral ClientApps. Ray runs locally
unless `simulation.ray_address` names a running cluster to attach to. The harness's own
settings (clients, partitioning, Ray, held-out share) are the config's [simulation] table
(`simulations.settings`); every run records the table resolved, defaults included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.system.atomic import atomic_write_json
from fedtune.config import Config, build_config, load_config, load_toml
from fedtune.data.tables import LabelMap
from fedtune.errors import ConfigError
from fedtune.federation.server import FederationServer
from fedtune.privacy.budget import remember_budget_folder
from fedtune.privacy.policy import NODE, OWNERS, WITHIN_POLICY, NodePolicy
from fedtune.system.processes import flower_environment
from fedtune.privacy.randomness import GENERATOR_NOTE, REPRODUCIBLE_LABEL
from fedtune.reporting.run_report import DATA_SUMMARY_FILE
from fedtune.run_config import CONFIG_KEY, FIELD_OF_KEY, RUN_DIR_KEY, UNSET, config_from_run_config
from fedtune.reporting.tracking import parse_log_to
from simulations.defaults import default_config_path
from simulations.settings import RUN_CONFIG_FIELDS, simulation_settings, with_simulation

flower_environment()  # before Flower's modules load (this module imports them lazily)

if TYPE_CHECKING:
    from clients.node import NodeSetup




def with_labels(config: Config) -> Config:
    """Fix the federation's label set from the whole dataset when not configured."""
    from simulations.partition import source_table

    if not config.task_is_classification or config.data.labels:
        return config
    table = source_table(config)
    labels = tuple(str(x) for x in LabelMap.from_labels(table.labels, source=table.source).labels)
    return config.replace(data=dataclasses.replace(config.data, labels=labels))


def prepare_simulation(config: Config) -> Config:
    """Resolve the [simulation] table (every field written, so the run's config.toml says
    what ran), what the data decides (labels, client count) and the population every
    virtual client belongs to, before anything runs."""
    from simulations.partition import with_partition_count

    config = with_simulation(config)  # validated here, before any data loads
    if config.data.path == "" and not config.data.dataset and simulation_settings(config).partitioner != "files":
        raise ConfigError("data.dataset: a simulation needs a dataset to partition")
    config = with_partition_count(with_labels(config))
    if not config.federation.population:
        clients = simulation_settings(config).num_clients
        config = config.replace(federation=dataclasses.replace(config.federation, population=clients))
    return with_distributed_noise(config)


def with_distributed_noise(config: Config) -> Config:
    """Distributed DP in `fedtune simulate`, where one config is every node's policy too:
    the nodes join distributed rounds, and the federation's noise multiplier, when not set,
    is the smallest whose planned rounds keep the smallest node (the largest Poisson rate
    q = B / n) within dp.target_epsilon at its delta, by the nodes' own accountant
    (`fedtune.privacy.ddgauss_accounting`)."""
    if config.dp.mode != "distributed":
        return config
    from fedtune.privacy import ddgauss_accounting
    from simulations.partition import held_out_table, smallest_partition

    config = config.replace(node=dataclasses.replace(config.node, distributed=True))
    if config.dp.noise_multiplier > 0:
        return config
    smallest = smallest_partition(config)
    # the rows a node trains on: all of them when the server evaluates centrally, else all
    # but its validation split (as `fedtune.data.tables.train_val_split` cuts it)
    central = held_out_table(config) is not None or bool(config.federation.central_eval_path)
    training = smallest if central or config.data.eval_path else \
        smallest - max(1, int(round(smallest * config.data.val_fraction)))
    rate = min(1.0, config.training.batch_size / max(1, training))
    noise = ddgauss_accounting.noise_for_budget(config.dp.target_epsilon, config.dp.resolved_delta(smallest), rate,
                                                config.training.rounds, dim=1)
    return config.replace(dp=dataclasses.replace(config.dp, noise_multiplier=round(noise * 1.0001, 6)))


@dataclass(frozen=True)
class SimulationNodes:
    """The node side of every virtual client, injected into the deployment ClientApp:
    its policy, its rows (its partition of the simulation config's data) and its state dir
    (and budget), `RUN_DIR/clients/client-NNNNN`. `policy` is what every virtual node
    enforces; None = the simulation config's own (`fedtune simulate`: one researcher's
    config plays both sides). Picklable, so Ray ships it."""

    config: Config
    run_dir: str
    policy: NodePolicy | None = None

    def __call__(self, context) -> "NodeSetup":
        from clients.node import NodeSetup
        from simulations.partition import client_table

        pid = int(context.node_config["partition-id"])
        state_dir = Path(self.run_dir).resolve() / "clients" / f"client-{pid:05d}"
        policy = self.policy or NodePolicy.from_config(self.config)
        own = policy.own.replace(node=dataclasses.replace(policy.own.node, budget_dir=str(state_dir)))
        return NodeSetup(dataclasses.replace(policy, own=own), state_dir, client_table(self.config, pid))


# -- `flwr run simulations/flwr_app`: the run config is the server side's ------------------
#
# Whoever submits a `flwr run` (its run config, and the `config` TOML it names) configures
# the server side only, as an operator does in deployment. Each virtual node's policy comes
# from the side of the process that runs the simulation: a fedtune config TOML named by
# FEDTUNE_SIMULATION_POLICY, else the built-in default. (Flower 1.41's simulation sets no
# per-node node config: its federation config takes only sizes and resources, and each
# virtual node's node config is its partition-id and num-partitions.)

POLICY_ENV = "FEDTUNE_SIMULATION_POLICY"

# Node-owned fields that say what a virtual node holds rather than what it allows: its rows
# (the partition) and the labels they may hold, its copy of the base model, its device and
# memory chunking, and its budget folder (its state dir). The harness gives every virtual
# node these from the simulation config, as it decides the partition; the ServerApp loads
# the same model path in the same process, and none of them changes the DP mechanism a
# node's policy bounds.
HARNESS_NODE_FIELDS = frozenset(
    [name for name, (owner, _) in OWNERS.items() if owner == NODE and name.startswith("data.")]
    + ["node.labels", "model.path", "model.device", "training.physical_batch_size", "node.budget_dir"])

# What each virtual node's policy takes from the node side: every other node-owned field
# (cap, accountant, noise seed, secure mode, metric releases, ...) and the node's own values
# of the fields a server may request only within the policy (dp.enabled: false allows
# non-private training; dp.delta; dp.target_epsilon, the cap when node.max_epsilon is 0).
POLICY_FIELDS = tuple(name for name, (owner, _) in OWNERS.items()
                      if (owner == NODE and name not in HARNESS_NODE_FIELDS) or owner == WITHIN_POLICY)


def simulation_policy_source() -> str:
    """The virtual nodes' policy file: $FEDTUNE_SIMULATION_POLICY, else the built-in default.
    Absolute only: the SuperLink, the simulation process and its Ray workers need not share
    the directory `flwr run` was typed in."""
    path = os.environ.get(POLICY_ENV, "")
    if not path:
        return default_config_path()
    if not Path(path).is_absolute():
        raise ConfigError(f"{POLICY_ENV} = {path!r}: give an absolute path to the virtual nodes' policy TOML "
                          "(the simulation's processes may not run where `flwr run` was typed)")
    if not Path(path).is_file():
        raise ConfigError(f"{POLICY_ENV} = {path}: file not found (the virtual nodes' policy, a fedtune config TOML)")
    return path


def node_side_config(source: str) -> Config:
    """The node-side TOML as a config. A file that caps epsilon (`node.max_epsilon`) but
    names no `dp.target_epsilon` targets its cap, as a deployed node's policy does, instead
    of failing on the default target being above it."""
    raw = load_toml(source)
    cap = raw["node"]["max_epsilon"] if _sets(raw, "node.max_epsilon") else 0
    targets = _sets(raw, "dp.target_epsilon") or not isinstance(raw.get("dp", {}), dict)
    if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0 and not targets:
        raw.setdefault("dp", {})["target_epsilon"] = cap
    return build_config(raw, source=f"{POLICY_ENV} {source}")


def simulation_policy(config: Config, source: str) -> NodePolicy:
    """Each virtual node's policy: `config` (the simulation: rows, model, what the server
    decides) with every `POLICY_FIELDS` value, and the resolved cap, from the node-side
    TOML `source`."""
    node_side = node_side_config(source)
    raw, side = config.to_dict(), node_side.to_dict()
    for name in POLICY_FIELDS:
        section, key = name.split(".")
        raw[section][key] = side[section][key]
    raw["node"]["max_epsilon"] = node_side.max_epsilon
    return NodePolicy.from_config(build_config(raw, source=f"{POLICY_ENV} {source}"))


def _refuse_node_fields(run_config, config_path: str, source: str) -> None:
    """A run config is the server side's: a node-owned field in it, or in the `config` TOML
    it names (unless the node side's policy says the same), is refused in one line naming
    where to set it, before anything runs, rather than silently ignored by the nodes."""
    where = (f"set it in the virtual nodes' policy file ({POLICY_ENV}=/abs/policy.toml, a fedtune config TOML; "
             f"now {source})")
    for key, value in run_config.items():
        field = FIELD_OF_KEY.get(key) or (key if key in OWNERS else None)
        if field and OWNERS[field][0] == NODE and not (isinstance(value, str) and value == UNSET):
            instead = ("set it in the simulation's `config` TOML, which gives every virtual node its rows, model and "
                       "device" if field in HARNESS_NODE_FIELDS else where)
            raise ConfigError(f"run config: {key} = {value!r}: refused, each virtual node decides this "
                              f"({OWNERS[field][1]}); {instead}, never in the run config")
    if not config_path:
        return
    written = load_toml(config_path)
    named = [name for name in POLICY_FIELDS if OWNERS[name][0] == NODE and _sets(written, name)]
    if not named:
        return
    theirs, node_side = load_config(config_path).to_dict(), node_side_config(source).to_dict()
    for name in named:
        section, key = name.split(".")
        if theirs[section][key] != node_side[section][key]:
            raise ConfigError(f"run config: config = {config_path} sets {name} = {theirs[section][key]!r}: refused, "
                              f"each virtual node decides this ({OWNERS[name][1]}); {where}")


def _sets(raw: dict, name: str) -> bool:
    """Whether a TOML's tables write the field `section.key`."""
    section, key = name.split(".")
    return isinstance(raw.get(section), dict) and key in raw[section]


@lru_cache(maxsize=4)
def _flwr_run_nodes(run_config: tuple, source: str, stamp: int) -> SimulationNodes:
    """Cached per process (a Ray worker answers many messages): keyed by the run config and
    the policy file with its modification time, so an edited file is read again."""
    values = dict(run_config)
    config = flwr_run_config(values)
    return SimulationNodes(config, str(values.get(RUN_DIR_KEY) or "runs/flwr-simulation"),
                           simulation_policy(config, source))


def flwr_run_config(run_config) -> Config:
    """The simulation a `flwr run simulations/flwr_app` run config describes (the server
    side): its `config` TOML (else the built-in default) with every `--run-config` value
    applied and checked (the [simulation] table's fields too: `simulation.num-clients=10`).
    Node-owned fields are refused (`_refuse_node_fields`)."""
    _refuse_node_fields(run_config, str(run_config.get(CONFIG_KEY) or ""), simulation_policy_source())
    return prepare_simulation(config_from_run_config(run_config, default_config_path(), extra=RUN_CONFIG_FIELDS))


def flwr_run_setup(context) -> "NodeSetup":
    """`flwr run` on the local simulation engine: the run config names the simulation
    (its data, partition and model, as for the ServerApp), each virtual node its partition,
    and the node side (`simulation_policy_source`) the policy every virtual node enforces;
    the server's configuration reaches the nodes only as each round's request."""
    source = simulation_policy_source()
    return _flwr_run_nodes(tuple(sorted(context.run_config.items())), source, os.stat(source).st_mtime_ns)(context)


GPU_SHARE = 0.25  # four virtual clients per GPU: a LoRA client on MiniLM-sized models uses a sliver of one


def default_gpus_per_client() -> float:
    """Ray's GPU fraction per virtual client: several clients share each GPU when CUDA exists.

    Ray hides GPUs from actors that ask for none, so without this a GPU host would train
    every client on the CPU."""
    import torch

    return GPU_SHARE if torch.cuda.is_available() else 0.0


def ray_backend(config: Config, num_cpus_per_client: float, num_gpus_per_client: float) -> dict:
    """Flower's Ray backend config: client resources, and a local Ray or a cluster address."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-"))
    init_args: dict = {"include_dashboard": False}
    address = simulation_settings(config).ray_address
    if address:
        check_ray_address(address)
        init_args["address"] = address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client},
            "init_args": init_args}


WARM_CONFIG_ENV = "FEDTUNE_WARM_CONFIG"  # the simulation's config (TOML) for the workers' warm-up


def start_ray(config: Config, backend: dict) -> None:
    """Start Ray once, before Flower would, with what the workers need: the import path,
    and a setup hook (`warm_worker`) that imports torch, transformers, peft and Opacus and
    loads the base model as each worker process starts, while the server is still loading
    its own model, instead of on the round's first message. Flower's backend sees Ray
    running and uses it as it is (it shuts it down at the end)."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join([str(Path(__file__).resolve().parent.parent), *sys.path,
                                  *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    os.environ["PYTHONPATH"] = pythonpath  # what Flower's backend would set: workers import like this process
    env = {"PYTHONPATH": pythonpath}
    if not backend["client_resources"]["num_gpus"]:  # a GPU worker learns its device only when its actor starts
        env[WARM_CONFIG_ENV] = config.to_toml()
    init_args = {"logging_level": "WARNING", "log_to_driver": True, **backend["init_args"]}  # Flower's defaults
    ray.init(runtime_env={"env_vars": env, "worker_process_setup_hook": "simulations.run.warm_worker"}, **init_args)


def warm_worker() -> None:
    """Ray's setup hook in each worker process: the imports and the base-model load the
    first ClientApp call would otherwise wait for. Best effort: a failure here only means
    the first call pays for it, as it would have."""
    from fedtune.system.quiet import quiet_libraries

    quiet_libraries()  # the driver's filters do not reach a worker process
    try:
        importlib.import_module("clients.client_app")  # torch, transformers, peft, Opacus

        text = os.environ.get(WARM_CONFIG_ENV)
        if text:
            from fedtune.config import config_from_toml_text
            from fedtune.training.model_cache import MODELS

            config = config_from_toml_text(text, source=WARM_CONFIG_ENV)
            MODELS.get(config, len(config.data.labels) if config.task_is_classification else None)
    except Exception:  # noqa: BLE001  (never fail a worker over a warm-up)
        pass


def node_time_share(config: Config, at_once: int) -> float:
    """Each virtual node's share of a round's timeout: the cohort queues for the W clients
    that train at once (`clients_at_once`), so with a cohort of K a node gets 1 / ceil(K / W)
    of the timeout, and a slow node stops before the others it queues ahead of time out."""
    return 1.0 / math.ceil(config.federation.clients_per_round / max(1, at_once))


def workers(backend: dict) -> int:
    """How many virtual clients run at once: the CPUs over each client's CPUs (on a Ray
    cluster, this host's CPUs: a lower bound)."""
    cpus = backend["init_args"].get("num_cpus") or os.cpu_count() or 1
    return max(1, int(cpus // max(backend["client_resources"]["num_cpus"], 1e-9)))


def check_ray_address(address: str, timeout: float = 10.0) -> None:
    """A Ray cluster's HOST:PORT that nothing answers at is a one-line error now, not a
    round that waits for its timeout (an hour by default) and ends in tracebacks."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"simulation.ray_address = {address!r}: expected \"auto\" or HOST:PORT of a Ray head")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"simulation.ray_address = {address!r}: no Ray head answers there ({exc.strerror or exc}); "
                          "start one with `ray start --head` or leave the address empty for a local Ray") from None


def cpus_per_client(requested: float | None, gpus: float) -> float:
    """The Ray CPUs per client. Default: every core when no GPU is shared, so that `auto`
    runs clients one at a time in this process with all cores each, which measured faster
    than parallel Ray workers of one core each on the default run of a small CPU host
    (benchmarks/default_run.py, docs/benchmarks.md); one core per client when clients
    share a GPU, so that several run at once on it."""
    if requested is None:
        return 1.0 if gpus > 0 else float(os.cpu_count() or 1)
    if not requested > 0:
        raise ConfigError(f"--cpus-per-client = {requested}: expected a number of CPUs > 0")
    return requested


def gpus_per_client(requested: float | None) -> float:
    """The Ray GPU share per client: the default when None, else a checked fraction or count."""
    gpus = default_gpus_per_client() if requested is None else requested
    if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise ConfigError(f"--gpus-per-client = {gpus}: expected a fraction in [0, 1] or a whole number of GPUs")
    return gpus


def instruct_data_summary(config: Config) -> dict:
    """How many instruct rows fit `model.max_seq_len`, over every client's rows and the
    held-out set: the run's data summary (each node also logs its own skips)."""
    from fedtune.data.instruct import encode_instruct
    from fedtune.models.base import load_tokenizer, resolve_model_path
    from simulations.partition import held_out_table, training_pool

    tokenizer = load_tokenizer(resolve_model_path(config.model))
    parts = {"training rows (all clients)": training_pool(config), "held-out rows": held_out_table(config)}
    return {name: encode_instruct(tokenizer, table.texts, table.labels, config.model.max_seq_len,
                                  bool(config.data.messages_column)).summary()
            for name, table in parts.items() if table is not None}


PARTITIONS_DESCRIBED = 1000  # partitions.json: a cross-device population is described by its first clients

ENGINES = ("auto", "in-process", "ray")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_engine(engine: str, config: Config, backend: dict, gpus: int | None = None) -> str:
    """`auto`: in this process when Ray would run one client at a time on this host (every
    core per client, no GPU share, no cluster) or when clients share this host's one GPU
    (several at once, one CUDA stream each); Ray otherwise (several GPUs, a cluster, several
    CPU workers). `simulations.in_process` says why."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine = {engine!r}: expected one of {', '.join(ENGINES)}")
    address = simulation_settings(config).ray_address
    if engine == "in-process" and address:
        raise ConfigError(f"--engine in-process: simulation.ray_address = {address!r} "
                          "names a Ray cluster; leave it empty or use --engine ray")
    if engine != "auto":
        return engine
    if address:
        return "ray"
    share = backend["client_resources"]["num_gpus"]
    if share:
        return "in-process" if (gpu_count() if gpus is None else gpus) == 1 and share < 1 else "ray"
    return "in-process" if workers(backend) == 1 else "ray"


def clients_at_once(engine: str, backend: dict) -> int:
    """How many virtual clients train at once: Ray's workers, or the in-process engine's
    slots (1 / the GPU share per client on a GPU; the CPUs over the CPUs per client on a CPU,
    which is 1 unless --cpus-per-client asked for less than every core)."""
    share = backend["client_resources"]["num_gpus"]
    if engine == "in-process" and share:
        return max(1, int(1 / share)) if share < 1 else 1
    return workers(backend)


def simulate(config: Config, run_dir: str | Path, num_cpus_per_client: float | None = None, num_gpus_per_client: float | None = None,
             log=print, log_to: str | tuple[str, ...] = (), engine: str = "auto") -> Path:
    """Run the federation `config` describes with virtual clients on this host, writing
    `run_dir`. `engine`: "ray" (Flower's Ray backend: parallel workers, GPU shares,
    clusters), "in-process" (`simulations.in_process`: one worker, no Ray), or "auto"."""
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from server.server_app import make_server_app
    from simulations.in_process import in_process_engine
    from simulations.lazy_population import lazy_population
    from simulations.partition import held_out_table, partition_report

    num_gpus_per_client = gpus_per_client(num_gpus_per_client)
    num_cpus_per_client = cpus_per_client(num_cpus_per_client, num_gpus_per_client)
    log_to = parse_log_to(log_to if isinstance(log_to, str) else ",".join(log_to))  # fails before anything runs
    config = prepare_simulation(config)
    run_dir = Path(run_dir)
    FederationServer.check_run_dir(config, run_dir)  # a resume that cannot work fails before any write
    backend = ray_backend(config, num_cpus_per_client, num_gpus_per_client)  # so does an unreachable Ray cluster
    engine = choose_engine(engine, config, backend)
    if engine == "ray":
        start_ray(config, backend)  # the workers warm up while the rest of the set-up runs
    run_dir.mkdir(parents=True, exist_ok=True)
    remember_budget_folder(run_dir)  # `fedtune budget` lists each virtual node's budget below it
    clients = simulation_settings(config).num_clients
    atomic_write_json(run_dir / "partitions.json", partition_report(config, limit=PARTITIONS_DESCRIBED))
    if clients > PARTITIONS_DESCRIBED:
        log(f"partitions.json describes the first {PARTITIONS_DESCRIBED:,} of {clients:,} clients "
            "(each client's rows are cut when it is first sampled)")
    if config.model.task == "instruct":
        atomic_write_json(run_dir / DATA_SUMMARY_FILE, instruct_data_summary(config))
    if config.dp.noise_seed >= 0:
        log(f"dp.noise_seed = {config.dp.noise_seed}: {REPRODUCIBLE_LABEL}")
    at_once = clients_at_once(engine, backend)
    if engine == "ray":
        where = f"{at_once} Ray worker(s)"
    elif at_once == 1:
        where = "one client at a time, in this process"
    else:
        where = (f"{at_once} clients at a time in this process, "
                 f"{'one CUDA stream each' if backend['client_resources']['num_gpus'] else 'one thread each'}")
    log(f"simulation engine: {engine} ({where})")
    if config.dp.enabled and not config.dp.secure_mode:
        log(GENERATOR_NOTE)
    client_app = make_client_app(SimulationNodes(config, str(run_dir)))
    share = node_time_share(config, at_once)
    with lazy_population(), \
            in_process_engine(at_once) if engine == "in-process" else contextlib.nullcontext() as compute:
        run_simulation(server_app=make_server_app(config, run_dir, eval_table=held_out_table(config), log=log,
                                                  node_time_share=share, log_to=log_to, compute=compute),
                       client_app=client_app, num_supernodes=simulation_settings(config).num_clients,
                       backend_config=backend)
    return run_dir
