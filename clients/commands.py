"""`fedtune client`: a hospital's (or bank's) command, registered with the core CLI through
the `fedtune.commands` entry points (pyproject.toml)."""

from __future__ import annotations

# `fedtune client` policy flags -> node-config keys of fedtune.privacy.policy.NODE_CONFIG_KEYS.
CLIENT_POLICY_FLAGS: dict[str, tuple[type, str]] = {
    "data": (str, "this node's training data (CSV / JSONL / Parquet): data-path"),
    "text-column": (str, "the column of --data that holds the text (default text)"),
    "label-column": (str, "the column of --data that holds the label (default label)"),
    "prompt-column": (str, "instruct: the column of --data that holds the prompt (default prompt)"),
    "response-column": (str, "instruct: the column of --data that holds the response (default response)"),
    "messages-column": (str, "instruct: a column of chat messages instead of prompt / response"),
    "physical-batch-size": (int, "rows per forward/backward pass (a larger Poisson batch runs in chunks, one DP step)"),
    "max-epsilon": (float, "REQUIRED: this node's hard epsilon cap over everything it releases from its data"),
    "labels": (str, "classification: every label --data may hold, comma-separated (checked against the rows now; "
                    "the server's label list must include them)"),
    "delta": (float, "this node's delta (default 1/(10 n)); a server may only ask for a smaller one"),
    "accountant": (str, "rdp (default) or prv"),
    "model": (str, "local base-model folder or bundled name (default: the task's bundled model)"),
    "device": (str, "auto, cpu or cuda[:N]"),
    "eval-data": (str, "this node's own evaluation file (default: a split of --data)"),
    "budget-dir": (str, "folder of per-data privacy budgets (default ~/.fedtune/budgets)"),
    "release-train-loss": (str, "off (default) or dp: noised, charged to the ledger"),
    "release-evaluation": (str, "off (default) or dp: noised, charged to the ledger"),
    "metric-noise-multiplier": (float, "noise multiplier of each metric release (default 5)"),
    "max-evaluations-per-round": (int, "evaluation requests answered per round the node trains (default 1)"),
    "max-unreleased-rounds": (int, "rounds the node may charge and release nothing for (a server that stops waiting) "
                                   "before it refuses to train until you look (default 3)"),
    "secagg-max-clip": (float, "largest L2 bound this node clips its update to in a SecAgg+ round (default 8); "
                               "a server may only ask for a smaller one"),
    "distributed-min-contributors": (int, "distributed DP: the fewest contributors this node trusts to add their noise "
                                          "shares (default 5); its share is calibrated to it"),
}
CLIENT_FLAG_KEYS = {"data": "data-path", "model": "model-path", "eval-data": "eval-path"}


def register_client(subparsers) -> None:
    client = subparsers.add_parser(
        "client", help="hospital / bank: start a SuperNode on this machine's private data",
        description="Starts flower-supernode with TLS and this node's key. The node's privacy policy "
        "(its epsilon cap, delta, data, model and evaluation files, budget folder, which metrics may leave) "
        "stays on this machine: the server can only request within it. --max-epsilon is required.")
    client.add_argument("--superlink", required=True, help="HOST:PORT of the operator's SuperLink (e.g. fl.example.org:9092)")
    client.add_argument("--state-dir", required=True, help="folder for this node's state and lock (node.json)")
    client.add_argument("--ca", help="the federation's ca.crt")
    client.add_argument("--key", help="this node's private key (its .pub is registered by the operator)")
    client.add_argument("--port", type=int, default=9094, help="local port for the node's ClientApp runtime (default 9094)")
    client.add_argument("--insecure", action="store_true", help="no TLS, no key (a local test only)")
    policy = client.add_argument_group("node privacy policy (the server can only request within it)")
    policy.add_argument("--policy", help="TOML file of policy keys (max-epsilon = 3, data-path = ..., ...); flags override it")
    for flag, (kind, text) in CLIENT_POLICY_FLAGS.items():
        policy.add_argument("--" + flag, dest="policy_" + flag.replace("-", "_"), type=kind, help=text)
    policy.add_argument("--allow-non-private", dest="policy_allow_non_private", action="store_const", const=True,
                        help="let the server ask for training WITHOUT DP (never by default)")
    policy.add_argument("--require-secure-aggregation", dest="policy_require_secure_aggregation", action="store_const",
                        const=True, help="refuse every round that is not a SecAgg+ round")
    policy.add_argument("--distributed", dest="policy_distributed", action="store_const", const=True,
                        help="join distributed-DP rounds: add only this node's share of the noise, the rest from the "
                             "other contributors through secure aggregation")
    client.set_defaults(run=run_client)


def client_policy(args) -> dict:
    """The node's policy from --policy and the flags, validated whole (one-line errors)."""
    from clients.supernode import read_policy_file, resolve_policy

    flags = {CLIENT_FLAG_KEYS.get(flag, flag): getattr(args, "policy_" + flag.replace("-", "_"))
             for flag in CLIENT_POLICY_FLAGS}
    flags["allow-non-private"] = args.policy_allow_non_private
    flags["require-secure-aggregation"] = args.policy_require_secure_aggregation
    flags["distributed"] = args.policy_distributed
    file_values = read_policy_file(args.policy) if args.policy else {}
    return resolve_policy(file_values, flags, source=args.policy or "fedtune client")


def run_client(args) -> int:
    from clients.supernode import exec_supernode, supernode_command
    from fedtune.privacy.policy import NodePolicy

    policy = client_policy(args)
    command = supernode_command(args.superlink, args.state_dir, args.ca, args.key, policy, args.port, args.insecure)
    exec_supernode(command, args.state_dir, NodePolicy.from_node_config(policy).describe())
    return 0  # not reached: the process became flower-supernode
