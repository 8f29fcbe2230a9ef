"""A registered population that costs nothing until a node is sampled.

Flower 1.41's simulation engine (`flwr.server.superlink.fleet.vce.vce_api`) does three
things per registered virtual node, whether or not a round ever samples it:

  `_register_nodes`             a `NodeInfo` in the in-memory LinkState (with 32 random
                                bytes for a public key) and a node-to-partition entry;
  `_register_node_info_stores`  a `DeprecatedRunInfoStore` holding a `Context`;
  `add_messages_to_queue`       ten times a second, a `get_message_ins` call for every
                                registered node, each taking the state's lock, holding
                                the GIL while the clients train.

At 100,000 registered nodes that was 40 s before the first round and 1.3x the memory of
1,000 (measured on this 2-core host, tiny model, 10 clients a round); a million was out of
reach. Here the population is a contiguous range of node ids, `[base, base + N)`, and
partition id = node id - base:

  `VirtualNodes`            the LinkState's node table: a node's `NodeInfo` is made the
                            first time the state looks the node up (the server addressed
                            a message to it) and kept from then on;
  `PopulationLinkState`     the in-memory LinkState, answering `get_nodes` with the range
                            itself and tagging only looked-up nodes offline;
  `LazyInfoStores`          a node's `DeprecatedRunInfoStore` (its `Context`) made on
                            its first message;
  `pending_destinations`    the extractor asks the state only for the nodes that have a
                            message waiting, so its loop does not grow with the population,
                            and it wakes when the server stores a message instead of on
                            its next 0.1 s tick.

Every other part of Flower's engine (message validation and TTLs, the worker loop, the
backends, Ray or `simulations.in_process`) runs unchanged. `lazy_population()` puts the
three functions in Flower's module for one `run_simulation` call and restores them after,
as `simulations.in_process` does for the backend; it refuses to start when a Flower upgrade
moved a seam it replaces. A virtual node is online for the whole run (Flower's simulation
registers its nodes with an infinite heartbeat interval too), so nothing is lost by not
materialising it: the server samples from `range` and only the sampled nodes ever exist.

This is the change one would propose to Flower itself (lazy registration behind the
existing `num_supernodes` argument); until Flower has it, it lives in this one module.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from queue import Queue

from flwr.app import Message
from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, NUM_PARTITIONS_KEY, \
    PARTITION_ID_KEY
from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.supercore.constant import NodeStatus
from flwr.supercore.date import now
from flwr.supercore.run import Run

NODE_ID_BASE_BITS = 62  # ids below 2^63 (Flower's int64 columns), above 0 and Flower's SuperLink id (0)


class VirtualNodes(MutableMapping):
    """node id -> `NodeInfo` for a range of virtual node ids, made on first lookup.

    Membership, length and iteration are answered from the range without making
    anything; `get` / `[]` of a virtual id makes its record (online, infinite heartbeat,
    as Flower's `_register_nodes` would have left it) and keeps it. A node created the
    ordinary way (`create_node`) is stored as in Flower's dict."""

    def __init__(self, ids: range, registered_at: str) -> None:
        self.ids, self.registered_at = ids, registered_at
        self.made: dict[int, NodeInfo] = {}

    def _make(self, node_id: int) -> NodeInfo:
        return NodeInfo(node_id=node_id, owner_aid=NOOP_FLWR_AID, owner_name=NOOP_ACCOUNT_NAME,
                        status=NodeStatus.ONLINE, registered_at=self.registered_at,
                        last_activated_at=self.registered_at, online_until=math.inf,
                        heartbeat_interval=HEARTBEAT_INTERVAL_INF, public_key=secrets.token_bytes(32))

    def peek(self, node_id: int) -> NodeInfo | None:
        """The node's record without keeping a new one (a listing of every node)."""
        if node_id in self.made:
            return self.made[node_id]
        return self._make(node_id) if node_id in self.ids else None

    def __getitem__(self, node_id: int) -> NodeInfo:
        node = self.made.get(node_id)
        if node is None:
            if node_id not in self.ids:
                raise KeyError(node_id)
            node = self.made[node_id] = self._make(node_id)
        return node

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.made or node_id in self.ids

    def __setitem__(self, node_id: int, node: NodeInfo) -> None:
        self.made[node_id] = node

    def __delitem__(self, node_id: int) -> None:
        raise KeyError(f"node {node_id}: a simulated population's nodes are never deleted")

    def __iter__(self) -> Iterator[int]:
        yield from self.ids
        yield from (node_id for node_id in self.made if node_id not in self.ids)

    def __len__(self) -> int:
        return len(self.ids) + sum(1 for node_id in self.made if node_id not in self.ids)

    def all_online(self) -> bool:
        """Whether every node is online (none made has left that state)."""
        return all(node.status == NodeStatus.ONLINE for node in self.made.values()) and \
            all(node_id in self.ids for node_id in self.made)


class PopulationLinkState(InMemoryLinkState):
    """Flower's in-memory LinkState over `VirtualNodes`: the methods that would walk every
    registered node walk only the ones made, or answer from the range."""

    nodes: VirtualNodes
    message_waiting: threading.Event  # set when the server stores a message: the extractor wakes

    def store_message_ins(self, message: Message) -> str | None:
        message_id = super().store_message_ins(message)
        if message_id:
            self.message_waiting.set()
        return message_id

    def get_nodes(self, run_id: int):  # type: ignore[override]
        """The online nodes: the id range itself while every node is online (always, in a
        simulation), so the server can sample from a million nodes without a million ints."""
        with self.lock:
            if run_id not in self.run_ids:
                return set()
            if self.nodes.all_online():
                return self.nodes.ids
            return {node_id for node_id in self.nodes
                    if (node := self.nodes.peek(node_id)) is not None and node.status == NodeStatus.ONLINE}

    def get_node_info(self, *, node_ids=None, owner_aids=None, statuses=None):
        with self.lock:
            self._check_and_tag_offline_nodes()
            result = []
            for node_id in self.nodes if node_ids is None else node_ids:
                node = self.nodes.peek(node_id)
                if node is None or (owner_aids is not None and node.owner_aid not in owner_aids) or \
                        (statuses is not None and node.status not in statuses):
                    continue
                result.append(node)
            return result

    def _check_and_tag_offline_nodes(self, node_ids: list[int] | None = None) -> None:
        # a virtual node never looked up is online until infinity: only made ones can expire
        made = [node_id for node_id in node_ids or self.nodes.made if node_id in self.nodes.made]
        if made:  # (Flower's method reads an empty list as "every node")
            super()._check_and_tag_offline_nodes(made)


class LazyInfoStores(Mapping):
    """node id -> Flower's `DeprecatedRunInfoStore` (the node's `Context`), made on the
    node's first message with the node config Flower's engine gives every virtual node."""

    def __init__(self, ids: range, run: Run, app_dir: str | None) -> None:
        self.ids, self.run, self.app_dir = ids, run, app_dir
        self.made: dict[int, DeprecatedRunInfoStore] = {}
        self.lock = threading.Lock()  # the engine's workers may ask for two nodes at once

    def __getitem__(self, node_id: int) -> DeprecatedRunInfoStore:
        with self.lock:
            store = self.made.get(node_id)
            if store is None:
                if node_id not in self.ids:
                    raise KeyError(node_id)
                store = DeprecatedRunInfoStore(node_id=node_id, node_config={
                    PARTITION_ID_KEY: node_id - self.ids.start, NUM_PARTITIONS_KEY: len(self.ids)})
                store.register_context(run_id=self.run.run_id, run=self.run, app_dir=self.app_dir)
                self.made[node_id] = store
            return store

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


class NodePartitions(Mapping):
    """node id -> partition id over the range, without a dict of a million entries."""

    def __init__(self, ids: range) -> None:
        self.ids = ids

    def __getitem__(self, node_id: int) -> int:
        if node_id not in self.ids:
            raise KeyError(node_id)
        return node_id - self.ids.start

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def register_population(num_nodes: int, state_factory: LinkStateFactory) -> NodePartitions:
    """In place of Flower's `_register_nodes`: `num_nodes` virtual nodes, none of them made."""
    state = state_factory.state()
    if type(state) is not InMemoryLinkState or not isinstance(getattr(state, "nodes", None), dict):
        raise RuntimeError("fedtune's lazy population needs Flower's in-memory LinkState with its node table "
                           f"(found {type(state).__name__}); the installed Flower is not 1.41")
    base = (1 << 40) + secrets.randbelow((1 << NODE_ID_BASE_BITS) - (1 << 41))  # random-looking ids, as Flower's
    ids = range(base, base + num_nodes)
    with state.lock:
        registered = VirtualNodes(ids, now().isoformat())
        registered.made.update(state.nodes)
        state.nodes = registered
        state.message_waiting = threading.Event()
        state.__class__ = PopulationLinkState
    return NodePartitions(ids)


def register_info_stores(nodes_mapping: NodePartitions, run: Run, app_dir: str | None = None) -> LazyInfoStores:
    """In place of Flower's `_register_node_info_stores`: each made on first use."""
    return LazyInfoStores(nodes_mapping.ids, run, app_dir)


def pending_destinations(state: InMemoryLinkState, nodes: Mapping) -> list[int]:
    """The nodes of `nodes` with a message not yet delivered, oldest message first."""
    with state.lock:
        waiting = [m.metadata.dst_node_id for m in state.message_ins_store.values() if m.metadata.delivered_at == ""]
    return list(dict.fromkeys(node_id for node_id in waiting if node_id in nodes))


def add_messages_to_queue(state, queue: Queue[Message], nodes_mapping: Mapping, f_stop: threading.Event) -> None:
    """In place of Flower's extractor loop: the same one message per node per pass, asked
    only for the nodes that have one waiting; a pass starts when the server stores a
    message (Flower's loop sleeps 0.1 s between passes, which every round waited for)."""
    waiting = getattr(state, "message_waiting", None) or threading.Event()
    while not f_stop.is_set():
        waiting.clear()
        for node_id in pending_destinations(state, nodes_mapping):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        waiting.wait(0.1)


SEAMS = {"_register_nodes": register_population, "_register_node_info_stores": register_info_stores,
         "add_messages_to_queue": add_messages_to_queue}


@contextmanager
def lazy_population() -> Iterator[None]:
    """Within this block, Flower's simulation engine registers its virtual nodes lazily."""
    missing = [name for name in SEAMS if not callable(getattr(vce_api, name, None))]
    if missing or not hasattr(InMemoryLinkState, "_check_and_tag_offline_nodes"):
        raise RuntimeError(f"fedtune's lazy population: Flower's simulation engine has no {', '.join(missing)}; "
                           "the installed Flower is not the 1.41 this module replaces parts of")
    originals = {name: getattr(vce_api, name) for name in SEAMS}
    for name, replacement in SEAMS.items():
        setattr(vce_api, name, replacement)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(vce_api, name, original)
