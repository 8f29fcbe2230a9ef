"""`fedtune client`: a hospital's (or bank's) command, registered with the core CLI through
the `fedtune.commands` entry points (pyproject.toml).

Its policy flags are generated, one per key of the node's policy, from the config fields that
declare a `node_key` (`fedtune.config.opt`, `fedtune.privacy.policy.NODE_KEYS`): a flag and its
policy-file key are one name (`--data` and `data = "..."`), they and the field they set cannot
disagree, and a new policy key is a flag at once."""

from __future__ import annotations

from typing import TYPE_CHECKING, get_origin

if TYPE_CHECKING:
    from fedtune.privacy.policy import NodeKey


def _dest(flag: str) -> str:
    return "policy_" + flag.replace("-", "_")


def _flag_help(key: "NodeKey") -> str:
    """A policy flag's help: the field's own (or its `client_help`), the field it sets, and the
    default the node keeps without it. Its policy-file key is its own name."""
    notes = [key.field]
    if not key.client_help:  # a client_help says these itself, where they matter
        if get_origin(key.kind) is tuple:
            notes.append("comma-separated")
        if key.default not in ("", (), False, None):
            notes.append(f"default {key.default!r}")
    return f"{key.client_help or key.help} ({'; '.join(notes)})".replace("%", "%%")  # argparse formats help with %


def register_client(subparsers) -> None:
    from fedtune.privacy.policy import NODE_KEYS

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
    policy.add_argument("--policy", help="TOML file of policy keys, named as the flags (max-epsilon = 3, "
                        "data = \"...\", ...; see docs/node-policy.example.toml); flags override it")
    for key in NODE_KEYS:
        name, dest, text = "--" + key.flag, _dest(key.flag), _flag_help(key)
        if key.kind is bool:  # a switch that turns the policy on; absent leaves the policy file's value
            policy.add_argument(name, dest=dest, action="store_const", const=True, help=text)
        else:  # a list (labels) travels as comma-separated text, as in a node config
            kind = str if get_origin(key.kind) is tuple else key.kind
            policy.add_argument(name, dest=dest, type=kind, metavar=key.flag.upper().replace("-", "_"), help=text)
    policy.add_argument("--allow-non-private", dest="policy_allow_non_private", action="store_const", const=True,
                        help="let the server ask for training WITHOUT DP (never by default)")
    client.set_defaults(run=run_client)


def client_policy(args) -> dict:
    """The node's policy from --policy and the flags, validated whole (one-line errors)."""
    from clients.supernode import read_policy_file, resolve_policy
    from fedtune.privacy.policy import ALLOW_NON_PRIVATE_KEY, NODE_KEYS

    flags = {key.key: getattr(args, _dest(key.flag)) for key in NODE_KEYS}  # None: not given
    flags[ALLOW_NON_PRIVATE_KEY] = args.policy_allow_non_private
    file_values = read_policy_file(args.policy) if args.policy else {}
    return resolve_policy(file_values, flags, source=args.policy or "fedtune client")


def run_client(args) -> int:
    """Validate the policy, write it to STATE_DIR/policy.toml (owner-only) and start the SuperNode
    with only the file's path and the state dir in its node config: its command line is `ps`-visible."""
    from clients.supernode import exec_supernode, supernode_command

    policy = client_policy(args)
    command = supernode_command(args.superlink, args.state_dir, args.ca, args.key, policy, args.port, args.insecure)
    exec_supernode(command, args.state_dir, policy)
    return 0  # not reached: the process became flower-supernode
