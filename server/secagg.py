"""SecAgg+ rounds on fedtune's federation path, run by Flower's own implementation.

Flower 1.41 ships SecAgg+ (Bell et al. 2020) only for its legacy fit workflow:
`SecAggPlusWorkflow` on the server and `secaggplus_mod` on the client, built on the
primitives under `flwr.common.secure_aggregation` (key agreement, Shamir sharing,
quantization). fedtune drives that workflow unchanged, one round at a time, through a thin
legacy `Strategy` (`_OneRound`): it hands the workflow the round's cohort and what each
node must receive, and takes back the unmasked result. No cryptography is written here.

The four stages, all Flower's: setup (each node makes two key pairs), share keys (public
keys broadcast; Shamir shares of each node's mask seed and secret key, encrypted for its
neighbours), collect masked vectors (each node trains, fedtune's node clips and sends its
*update*, which Flower's mod quantizes and masks), unmask (survivors send the shares that
remove the masks; dropped nodes' pairwise masks are rebuilt from theirs). Before unmask
fedtune adds one round of its own: each node confirms its survivor lists to its surviving
neighbours, and unmasks only with lists enough of them confirmed (`_Workflow`; the node's
side and why it is needed: clients/secagg.py). The server learns
the mean of the quantized updates and nothing about any one of them; below the threshold
the round halts and fedtune fails it with the reason.

Weights are uniform (each node weighs 1): an example count inside the masked vector could
not be checked, and a node claiming a billion rows would set the sum.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedtune.config import FederationConfig
from fedtune.privacy.policy import (SECAGG_CONFIRM_STAGE, SECAGG_CONFIRMATIONS_FIELD, SECAGG_CONFIRMERS_FIELD,
                                    SECAGG_KEYS_FIELD, SECAGG_UPDATE_KEYS_FIELD)



@dataclass
class SecureRound:
    """What a SecAgg+ round gives the server: the mean update (None when it halted), the
    nodes whose updates it holds, and each node's released scalars."""

    mean_update: dict | None
    contributors: list[int]
    metrics: dict[int, dict] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    reason: str = ""
    modular_sum: np.ndarray | None = None  # distributed DP: the integer sum modulo 2^bits


class _OneRound(Strategy):
    """The legacy interface SecAggPlusWorkflow drives, for one round of fedtune's loop."""

    def __init__(self, grid: Grid, cohort: list[int], fit_config: dict):
        self.grid, self.cohort, self.fit_config = grid, cohort, fit_config
        self.result: tuple[list, list[int], dict[int, dict]] | None = None
        self.failures: list[str] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, 0), FitIns(parameters, dict(self.fit_config))) for node in self.cohort]

    def aggregate_fit(self, server_round, results, failures):
        self.failures = [str(getattr(f, "args", [f])[0]) for f in failures]
        if not results:
            return None, {}
        self.result = (parameters_to_ndarrays(results[0][1].parameters), [proxy.node_id for proxy, _ in results],
                       {proxy.node_id: dict(fitres.metrics) for proxy, fitres in results})
        return results[0][1].parameters, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's workflow, with one repair and one added round.

    The repair: a node lost before it shared its keys (at setup or while sharing them)
    holds no shares anyone could use and masked nothing, so it is taken out of the round
    entirely. Flower's own workflow keeps it among the sampled nodes, asks the survivors
    for shares they never received, and halts the round.

    The round: before unmask, each surviving node is told its survivor lists (exactly the
    lists the unmask stage will send it) and confirms them to its surviving neighbours;
    the unmask messages carry those confirmations to their addressees. fedtune's nodes
    unmask only with lists that at least the threshold of neighbours confirmed, so a
    server cannot tell different nodes different survivor sets (clients/secagg.py)."""

    def share_keys_stage(self, grid, context, state) -> bool:
        carry_on = super().share_keys_stage(grid, context, state)
        lost = set(state.sampled_node_ids) - set(state.active_node_ids)
        if lost:
            state.sampled_node_ids = set(state.active_node_ids)
            for node in state.sampled_node_ids:
                state.nid_to_neighbours[node] = set(state.nid_to_neighbours[node]) - lost
        return carry_on

    def unmask_stage(self, grid, context, state) -> bool:
        active = set(state.active_node_ids)
        dead = set(state.sampled_node_ids) - active
        group = str(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])

        def ask(node: int) -> Message:
            neighbours = state.nid_to_neighbours[node]
            lists = ConfigRecord({Key.STAGE: SECAGG_CONFIRM_STAGE, Key.ACTIVE_NODE_ID_LIST: sorted(neighbours & active),
                                  Key.DEAD_NODE_ID_LIST: sorted(neighbours & dead)})
            return Message(content=RecordDict({RECORD_KEY_CONFIGS: lists}), dst_node_id=node,
                           message_type=MessageType.TRAIN, group_id=group)

        relay: dict[int, tuple[list[int], list[bytes]]] = {node: ([], []) for node in active}
        for reply in grid.send_and_receive([ask(node) for node in sorted(active)], timeout=self.timeout):
            if reply.has_error():  # such a node has no confirmed set: its unmask will fail and be counted then
                continue
            answer = reply.content.config_records[RECORD_KEY_CONFIGS]
            for dst, ciphertext in zip(answer[Key.DESTINATION_LIST], answer[Key.CIPHERTEXT_LIST]):
                if dst in relay:
                    relay[dst][0].append(reply.metadata.src_node_id)
                    relay[dst][1].append(ciphertext)
        return super().unmask_stage(_Relaying(grid, relay), context, state)


class _Relaying:
    """The grid, adding to each unmask message the confirmations addressed to its node."""

    def __init__(self, grid: Grid, relay: dict[int, tuple[list[int], list[bytes]]]):
        self._grid, self._relay = grid, relay

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        for message in messages:
            srcs, ciphertexts = self._relay.get(message.metadata.dst_node_id, ([], []))
            configs = message.content.config_records[RECORD_KEY_CONFIGS]
            configs[SECAGG_CONFIRMERS_FIELD], configs[SECAGG_CONFIRMATIONS_FIELD] = list(srcs), list(ciphertexts)
        return self._grid.send_and_receive(messages, timeout=timeout)


def workflow(fed: FederationConfig, timeout: float, integer_bits: int = 0) -> SecAggPlusWorkflow:
    """Flower's workflow with fedtune's additions. `integer_bits` (distributed DP): the
    quantization is the exact shift x -> x + 2^(bits-1) that carries the nodes' integers
    (range 2^(bits-1), 2^bits levels), which each node checks before it contributes."""
    clipping, levels = ((float(1 << (integer_bits - 1)), 1 << integer_bits) if integer_bits else
                        (fed.secagg_clipping_range, fed.secagg_quantization_range))
    return _Workflow(num_shares=fed.secagg_share_fraction, reconstruction_threshold=fed.secagg_threshold,
                     max_weight=1.0, clipping_range=clipping, quantization_range=levels, timeout=timeout)


def integer_sum(mean: np.ndarray, contributors: int, bits: int) -> np.ndarray:
    """The nodes' integer vectors' sum modulo 2^bits, from the mean Flower's workflow hands
    back: each node sent v - 2^(bits-1), so the sum is k x mean + k x 2^(bits-1) (exact in
    float64 far beyond 2^32; rounded to undo the division's last bit)."""
    total = np.rint(np.asarray(mean, dtype=np.float64) * contributors + contributors * float(1 << (bits - 1)))
    return np.mod(total.astype(np.int64), 1 << bits)


def secure_round(grid: Grid, cohort: list[int], payload: dict[str, np.ndarray], update_keys: list[str],
                 fit_config: dict, fed: FederationConfig, server_round: int, integer_bits: int = 0) -> SecureRound:
    """Run one SecAgg+ round over `cohort`: every node receives `payload` and `fit_config`,
    and the server gets back only the mean of their clipped, quantized updates of the
    `update_keys` tensors (those that train); with `integer_bits`, the modular sum of the
    integer vectors of a distributed-DP round (`modular_sum`)."""
    keys = list(payload)
    strategy = _OneRound(grid, cohort, {**fit_config, SECAGG_KEYS_FIELD: json.dumps(keys),
                                        SECAGG_UPDATE_KEYS_FIELD: json.dumps(update_keys)})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
        ndarrays_to_parameters([payload[k] for k in keys]), keep_input=True)
    workflow(fed, fed.round_timeout, integer_bits)(grid, context)
    if strategy.result is None:
        return SecureRound(None, [], reason=f"secure aggregation halted: fewer than the threshold of the {len(cohort)} "
                                            "sampled nodes completed the protocol (see the SuperLink log)")
    mean, contributors, metrics = strategy.result
    if integer_bits:
        return SecureRound({}, contributors, metrics, strategy.failures,
                           modular_sum=integer_sum(mean[0], len(contributors), integer_bits))
    return SecureRound(dict(zip(update_keys, mean)), contributors, metrics, strategy.failures)
