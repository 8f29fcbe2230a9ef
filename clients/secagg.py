"""The node's side of a SecAgg+ round: Flower's `secaggplus_mod` around fedtune's round.

The mod (Flower's own) runs the protocol's stages: key pairs, encrypted Shamir shares,
masking, unmasking shares. In the stage that collects masked vectors it calls the node's
training, here `_fit`, which runs the same `train_round` as any round (policy check, lock,
budget charged before the first step, DP-SGD) and hands the mod the node's *update*
(trained - global), clipped by the node itself to the declared L2 bound: the server cannot
check a masked update, so the node guarantees it. The mod quantizes, masks and sends it;
the update's tensors never leave unmasked. The node's released scalars (status, epsilon,
mechanism parameters: `fedtune.privacy.releases`) travel as the fit result's metrics.

A node that refuses (budget, policy, its own state) or fails raises here, so the server
counts it as dropped after sharing keys: the others' shares remove its masks, and its
charge, if any, stays.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from clients.node import TrainOutcome
from fedtune.aggregate import clip_to
from fedtune.errors import FedtuneError
from fedtune.privacy.policy import SECAGG_CLIP_FIELD, SECAGG_KEYS_FIELD, SECAGG_UPDATE_KEYS_FIELD

SECAGG_RECORD = RECORD_KEY_CONFIGS  # the ConfigRecord Flower's workflow puts in every SecAgg+ message


class SecAggRefusal(FedtuneError):
    """The node will not contribute to this round (the reason is its own)."""


def is_secagg(msg: Message) -> bool:
    return SECAGG_RECORD in msg.content.config_records


def masked_update(update: dict[str, np.ndarray], bound: float, quantum: float = 0.0) -> dict[str, np.ndarray]:
    """The update the node lets the mod mask: finite, and clipped so that even after the
    mod's stochastic rounding (at most one `quantum` per coordinate) its L2 norm stays
    within the declared bound, which user-level DP takes as the sensitivity."""
    if not all(np.all(np.isfinite(v)) for v in update.values()):
        raise SecAggRefusal("the update has non-finite values: nothing is contributed")
    size = sum(v.size for v in update.values())
    margin = quantum * float(np.sqrt(size))
    if not bound > margin:
        raise SecAggRefusal(f"the declared bound {bound:g} leaves no room above the rounding error {margin:.3g}")
    return {k: v.astype(np.float64) for k, v in clip_to(update, bound - margin).items()}


def check_setup(configs) -> None:
    """What a node accepts from a server at setup: a cohort of 3 or more (with 2, each node
    could subtract its own update from the published mean and read the other's), and a
    threshold above half the shares (else two disjoint halves of the neighbours could each
    rebuild one of a node's two mask secrets)."""
    sample, shares, threshold = int(configs[Key.SAMPLE_NUMBER]), int(configs[Key.SHARE_NUMBER]), int(configs[Key.THRESHOLD])
    if sample < 3:
        raise SecAggRefusal(f"a secure round of {sample} nodes: at least 3 are needed for the mean to hide each update")
    if 2 * threshold <= shares:
        raise SecAggRefusal(f"threshold {threshold} of {shares} shares: it must exceed half of them")


def secagg_train(msg: Message, context: Context, run_round: Callable[[dict, dict], TrainOutcome],
                 release: Callable[[TrainOutcome], dict]) -> Message:
    """One SecAgg+ stage. `run_round(global_arrays, fit_config)` trains; `release(outcome)`
    gives the scalars the node releases."""

    def _fit(fit_msg: Message, ctx: Context) -> Message:
        fitins = recorddict_to_fitins(fit_msg.content, keep_input=True)
        keys = json.loads(str(fitins.config[SECAGG_KEYS_FIELD]))
        global_arrays = dict(zip(keys, parameters_to_ndarrays(fitins.parameters)))
        outcome = run_round(global_arrays, dict(fitins.config))
        if outcome.status != "ok" or outcome.arrays is None:
            raise SecAggRefusal(outcome.message or outcome.status)
        keys = json.loads(str(fitins.config[SECAGG_UPDATE_KEYS_FIELD]))  # what trains (FFA: not the frozen A)
        if SECAGG_CLIP_FIELD not in fitins.config:
            raise SecAggRefusal("no declared bound for the update: nothing is contributed unclipped")
        protocol = ctx.state.config_records[RECORD_KEY_STATE]  # what the mod agreed to at setup
        quantum = 2 * float(protocol["clipping_range"]) / int(protocol["target_range"])
        update = {k: outcome.arrays[k].astype(np.float64) - global_arrays[k] for k in keys}
        update = masked_update(update, float(fitins.config[SECAGG_CLIP_FIELD]), quantum)
        scalars = {k: v for k, v in release(outcome).items() if k != "arrays"}
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update[k] for k in keys]), 1, scalars)
        return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=fit_msg)

    configs = msg.content.config_records[SECAGG_RECORD]
    if configs.get(Key.STAGE) == Stage.SETUP:
        check_setup(configs)
    return secaggplus_mod(msg, context, _fit)
