"""SecAgg+ and distributed-DP overhead, measured side by side in one run: round time and
bytes per node with secure aggregation on vs off, and (`--variants`) distributed DP over
SecAgg+ (full key graph and SecAgg+'s sparse graph, `secagg_share_fraction` 0.5) against
plain local DP, for cohorts of 5, 10 and 50 virtual nodes.

Each variant is a real Flower simulation (Ray) of the same workload, the same seeds and
the same partitions (tweets, all-MiniLM-L6-v2 + LoRA r8, DP-SGD at epsilon 8, 20 rows per
node, sequence 32, 2 rounds, every node in every round); only `federation.secure_aggregation`
differs. Round time is round 2's wall time (round 1 includes Ray's start and the first model
load). Bytes are counted on the server's grid, every message both ways (tensors, and the
protocol's keys, shares and masked vectors), per node per round. For each cohort size the
two variants run back to back, off then on.

    python benchmarks/secagg_overhead.py [--nodes 5,10,50] [--json out.json]
    python benchmarks/secagg_overhead.py --nodes 10,50 --variants local,secagg,distributed,distributed-sparse \
        --json docs/benchmark-runs/distributed_cost.json

Distributed DP changes what a round is (one DP-SGD step over the union of the nodes'
batches instead of each node's local epoch): its round time is that of the protocol plus
one batch's per-example gradients, the noise share and the encoding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedtune.system.machine import machine, machine_description  # noqa: E402

ROWS_PER_NODE = 20
ROUNDS = 2


def content_bytes(content) -> int:
    """Bytes a message's content carries: tensors, byte strings and text, 8 per number."""
    total = sum(record.count_bytes() for record in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, (bytes, str)) else 8
    return total + 8 * sum(len(record) for record in content.metric_records.values())


class CountingGrid:
    """The server's grid, counting the bytes of every message it sends and receives."""

    def __init__(self, grid):
        self._grid, self.sent, self.received = grid, 0, 0

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += sum(content_bytes(m.content) for m in messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        self.received += sum(content_bytes(m.content) for m in replies if m.has_content())
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += sum(content_bytes(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.received += sum(content_bytes(m.content) for m in replies if m.has_content())
        return replies


VARIANTS = {
    "local": {},
    "secagg": {"federation": {"secure_aggregation": True}},
    "distributed": {"federation": {"secure_aggregation": True}, "dp": {"mode": "distributed"},
                    "node": {"distributed_min_contributors": 3}},
    "distributed-sparse": {"federation": {"secure_aggregation": True, "secagg_share_fraction": 0.5},
                           "dp": {"mode": "distributed"}, "node": {"distributed_min_contributors": 3}},
}


def run(nodes: int, variant: str | bool, workdir: Path) -> dict:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from fedtune.config import build_config
    from server.server_app import run_federation
    from simulations.run import SimulationNodes, prepare_simulation, ray_backend

    if isinstance(variant, bool):  # the original pair: SecAgg+ off / on
        variant = "secagg" if variant else "local"
    sections = {
        "data": {"dataset": "tweets", "max_examples": nodes * ROWS_PER_NODE},
        "model": {"max_seq_len": 32}, "training": {"epochs": 1, "rounds": ROUNDS, "batch_size": 8},
        "dp": {"target_epsilon": 8.0, "noise_seed": 0},
        "federation": {"clients_per_round": nodes, "min_clients": nodes},
        "simulation": {"num_clients": nodes},
    }
    for name, values in VARIANTS[variant].items():
        sections.setdefault(name, {}).update(values)
    config = prepare_simulation(build_config(sections))
    secure = config.federation.secure_aggregation
    run_dir = workdir / f"{variant}-{nodes}"
    counted = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        counted["grid"] = CountingGrid(grid)
        run_federation(counted["grid"], config, run_dir, log=lambda *_: None)

    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=make_client_app(SimulationNodes(config, str(run_dir))),
                   num_supernodes=nodes, backend_config=ray_backend(config, 1.0, 0.0))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    grid = counted["grid"]
    return {"nodes": nodes, "variant": variant, "secure": secure, "process_seconds": round(time.perf_counter() - started, 2),
            "round_seconds": [r["seconds"] for r in records], "accuracy": records[-1].get("accuracy"),
            "bytes_sent_per_node_round": grid.sent / (nodes * ROUNDS),
            "bytes_received_per_node_round": grid.received / (nodes * ROUNDS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="5,10,50", help="cohort sizes (default 5,10,50)")
    parser.add_argument("--variants", default="local,secagg",
                        help=f"what runs per cohort size, side by side (default local,secagg; any of {', '.join(VARIANTS)})")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"--variants: {', '.join(unknown)}: expected any of {', '.join(VARIANTS)}", file=sys.stderr)
        raise SystemExit(2)
    from fedtune.system.quiet import quiet_libraries

    quiet_libraries()
    results = []
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp:
        for nodes in (int(n) for n in args.nodes.split(",")):
            row = [run(nodes, variant, Path(tmp)) for variant in variants]
            results += row
            base = row[0]
            for result in row:
                ratio = result["round_seconds"][-1] / base["round_seconds"][-1]
                print(f"{nodes} nodes, {result['variant']}: round 2 {result['round_seconds'][-1]:.1f} s ({ratio:.2f}x "
                      f"{base['variant']}); bytes per node per round up "
                      f"{result['bytes_received_per_node_round'] / 1e3:.0f} kB, down "
                      f"{result['bytes_sent_per_node_round'] / 1e3:.0f} kB", flush=True)
    summary = {"machine": machine(), "machine_line": machine_description(), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
