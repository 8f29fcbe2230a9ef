"""`fedtune server`: the operator's command, registered with the core CLI through the
`fedtune.commands` entry points (pyproject.toml)."""

from __future__ import annotations


def register_server(subparsers) -> None:
    server = subparsers.add_parser(
        "server", help="operator: start the SuperLink with TLS and SuperNode authentication",
        description="Starts flower-superlink with TLS and node authentication on, runtime dependency "
        "installation off and its state in --state. Then register node keys with `flwr supernode register` "
        "and start a run with `flwr run` (see docs/deployment.md).")
    server.add_argument("--certs", help="folder with ca.crt, server.pem, server.key")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    server.add_argument("--port", type=int, default=9092, help="port for SuperNodes and `flwr` commands (default 9092)")
    server.add_argument("--state", default="superlink-state", help="folder for the SuperLink database (default superlink-state)")
    server.add_argument("--insecure", action="store_true", help="no TLS (a local test only; needs --no-auth)")
    server.add_argument("--no-auth", action="store_true", help="let any SuperNode join (a local test only)")
    server.set_defaults(run=run_server)


def run_server(args) -> int:
    from server.superlink import exec_superlink, superlink_command

    exec_superlink(superlink_command(args.certs, args.host, args.port, args.state,
                                     insecure=args.insecure, auth=not args.no_auth), args.state)
    return 0  # not reached: the process became flower-superlink
