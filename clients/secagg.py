"""The node's side of a SecAgg+ round: Flower's `secaggplus_mod` around fedtune's round,
with the checks that make it hold against a server that lies in the protocol.

The mod (Flower's own) runs the protocol's stages: key pairs, encrypted Shamir shares,
masking, unmasking shares. In the stage that collects masked vectors it calls the node's
training, here `_fit`, which runs the same `train_round` as any round (policy check, lock,
budget charged before the first step, DP-SGD) and hands the mod the node's *update*
(trained - global), clipped by the node itself to the declared L2 bound: the server cannot
check a masked update, so the node guarantees it, and the bound is the node's own
(`node.secagg_max_clip`; a server may only ask for a smaller one). The mod quantizes,
masks and sends it; the update's tensors never leave unmasked. The node's released scalars
(status, epsilon, mechanism parameters: `fedtune.privacy.releases`) travel as the fit
result's metrics.

Why more than Flower's mod. Each node masks its update with a private mask (seed b) and
pairwise masks (from its secret key sk1), and gives each neighbour a Shamir share of both.
At unmask the server lists which neighbours survived (their b shares remove their private
masks) and which dropped (their sk1 shares rebuild their pairwise masks). Flower's mod
answers whatever lists it is sent: a server listing a node as both alive and dropped gets
t shares of both secrets and strips every mask off that node's update. So, before the
mod answers, this node checks (`_check_lists`, `_check_unmask`): the two lists are
disjoint, without duplicates, hold only the neighbours whose shares it holds in this
protocol instance, list itself alive, and list at least the threshold t alive; it passed
the collect stage in this instance; and it never reveals the other kind of share for a
peer it already answered for (`fedtune-secagg` in `context.state` records, write-ahead,
which kind it revealed for whom). Flower's `setup` replaces both secrets and drops every
held share, so a restarted protocol cannot ask for old shares again; the record is reset
with it, and any stage that finds Flower's state belonging to another instance refuses.

Survivor-set consistency (Bonawitz et al., CCS 2017, the malicious-server variant).
Checks on one node's lists do not stop a server that tells *different* nodes different
survivor sets. Counting alone gives this much: each honest holder reveals one kind per
peer, and `check_setup` demands 2t > n (t = threshold, n = shares), so rebuilding both of
one node's secrets needs two disjoint groups of t holders among n, which do not exist
(with c colluding nodes among the holders: while c < 2t - n). It does not protect the
update itself: the server can instead rebuild b of the target and sk1 of every *other*
neighbour (each from different holders), which strips the target's masks without any one
node losing both secrets; with a sparse key graph (`secagg_share_fraction < 1`) that works
against honest nodes. Hence a consistency round before unmask (`SECAGG_CONFIRM_STAGE`):
the server tells each node its survivor lists; the node checks them as above, records
them as the only lists it will ever unmask with in this instance, and sends every
surviving neighbour a confirmation of them, encrypted under the pairwise key of the
share-keys stage (Flower's authenticated encryption; the server cannot forge or alter
one). At unmask the server relays them; the node answers only when its unmask lists are
the ones it confirmed, at least t surviving neighbours (itself included) confirmed lists
that agree with its own on every node both list, and none disagrees. With the full key
graph (the default) two honest nodes holding different lists would need two groups of t
confirmers among n with no honest node in both: impossible while c < 2t - n. All honest
nodes then unmask with the same lists, so the server learns the sum over the surviving
set (at least t nodes) and nothing finer. With a sparse graph confirmations are checked
among neighbours only; no proof is given here that this rules out every split.

Not covered (there is no PKI: Flower does not authenticate the public keys the server
relays): a server that fakes nodes (Sybil) or swaps public keys at share-keys is in the
middle of every pairwise channel and can learn an update; the node's SuperNode
authentication to the SuperLink does not reach the keys of this protocol.

A node that refuses (budget, policy, the checks above, its own state) or fails raises
here, so the server gets nothing from it in that stage: dropped after sharing keys, its
masks are removed with the others' shares; its DP charge, if any, stays.
"""

from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from clients.distributed_node import Protocol
from clients.node import TrainOutcome
from fedtune.federation.aggregate import clip_to
from fedtune.errors import FedtuneError
from fedtune.privacy.policy import (DISTRIBUTED_FIELD, SECAGG_CLIP_FIELD, SECAGG_CONFIRM_STAGE, SECAGG_CONFIRMATIONS_FIELD,
                                    SECAGG_CONFIRMERS_FIELD, SECAGG_KEYS_FIELD, SECAGG_UPDATE_KEYS_FIELD)

SECAGG_RECORD = RECORD_KEY_CONFIGS  # the ConfigRecord Flower's workflow puts in every SecAgg+ message
GUARD_RECORD = "fedtune-secagg"     # this node's own record of the protocol instance, in context.state
CONFIRM_STAGE, CONFIRMERS, CONFIRMATIONS = SECAGG_CONFIRM_STAGE, SECAGG_CONFIRMERS_FIELD, SECAGG_CONFIRMATIONS_FIELD
_STATEMENT = "fedtune-secagg-survivors"


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


def check_bound(declared, own: float) -> float:
    """The bound the node clips to: the server's declared `secagg-clip`, accepted only in
    (0, the node's own `node.secagg_max_clip`]. A larger one would let the server widen the
    sensitivity the node's update is released under."""
    if isinstance(declared, bool) or not isinstance(declared, (int, float)):
        raise SecAggRefusal(f"{SECAGG_CLIP_FIELD} = {declared!r}: not a number; this node clips its update to at "
                            f"most node.secagg_max_clip = {own:g}")
    bound = float(declared)
    if not (math.isfinite(bound) and 0 < bound <= own):
        raise SecAggRefusal(f"{SECAGG_CLIP_FIELD} = {bound:g} declared by the server is outside (0, node.secagg_max_clip"
                            f" = {own:g}]: this node clips its update to its own bound or a smaller one")
    return bound


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


# -- the protocol instance as this node records it ---------------------------------------

def _flower_state(context: Context) -> SecAggPlusState:
    if RECORD_KEY_STATE not in context.state.config_records:
        raise SecAggRefusal("no SecAgg+ round in progress on this node (setup never reached it)")
    return SecAggPlusState(**dict(context.state.config_records[RECORD_KEY_STATE]))


def _guard(context: Context, flower: SecAggPlusState) -> ConfigRecord:
    """This node's record of the current instance; refuses when Flower's state is not the
    instance the record was made for (the keys of a setup bind them)."""
    guard = context.state.config_records.get(GUARD_RECORD)
    if guard is None or guard.get("instance") != flower.pk1 or not flower.pk1:
        raise SecAggRefusal("this node's SecAgg+ state does not belong to this protocol instance: nothing is revealed")
    return guard


def _ids(configs, key: str, stage: str) -> list[int]:
    values = configs.get(key)
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise SecAggRefusal(f"{stage}: {key} is not a list of node ids")
    return list(values)


def _check_lists(active: list[int], dead: list[int], flower: SecAggPlusState, stage: str) -> None:
    """The survivor lists a server may send this node: each node once, alive or dropped
    but never both, only neighbours whose shares this node holds in this instance, this
    node itself alive, and at least the threshold alive."""
    for name, ids in (("active", active), ("dropped", dead)):
        if len(set(ids)) != len(ids):
            twice = sorted({n for n in ids if ids.count(n) > 1})
            raise SecAggRefusal(f"{stage}: the {name} list names nodes {twice} more than once")
    both = sorted(set(active) & set(dead))
    if both:
        raise SecAggRefusal(f"{stage}: nodes {both} are listed both active and dropped: answering would reveal both "
                            "shares of their masks")
    neighbours, held = set(flower.public_keys_dict), set(flower.rd_seed_share_dict)
    outside = sorted(set(active + dead) - neighbours)
    if outside:
        raise SecAggRefusal(f"{stage}: nodes {outside} are not this node's neighbours in this round")
    unheld = sorted(set(active + dead) - held)
    if unheld:
        raise SecAggRefusal(f"{stage}: this node holds no shares of nodes {unheld} in this round")
    if flower.nid in dead or flower.nid not in active:
        raise SecAggRefusal(f"{stage}: this node is answering, so it is active, not dropped")
    if len(active) < flower.threshold:
        raise SecAggRefusal(f"{stage}: {len(active)} active nodes listed, fewer than the threshold {flower.threshold}")


def _statement(src: int, dst: int, active: list[int], dead: list[int]) -> bytes:
    return json.dumps({"what": _STATEMENT, "src": src, "dst": dst, "active": sorted(active),
                       "dead": sorted(dead)}).encode()


def _confirm(msg: Message, context: Context) -> Message:
    """The consistency round: check the survivor lists, fix them as the only ones this
    node unmasks with in this instance, and confirm them to every surviving neighbour."""
    flower = _flower_state(context)
    guard = _guard(context, flower)
    if not guard["collected"]:
        raise SecAggRefusal("survivor set: this node sent no masked vector in this round")
    if guard["confirmed"]:
        raise SecAggRefusal("survivor set: this node already confirmed one in this round; it confirms one only")
    configs = msg.content.config_records[SECAGG_RECORD]
    active, dead = _ids(configs, Key.ACTIVE_NODE_ID_LIST, "survivor set"), _ids(configs, Key.DEAD_NODE_ID_LIST, "survivor set")
    _check_lists(active, dead, flower, "survivor set")
    missing = sorted(set(flower.rd_seed_share_dict) - set(active) - set(dead))
    if missing:
        raise SecAggRefusal(f"survivor set: nodes {missing}, whose shares this node holds, are listed neither active "
                            "nor dropped")
    guard["view-active"], guard["view-dead"], guard["confirmed"] = sorted(active), sorted(dead), True
    context.state.config_records[GUARD_RECORD] = guard  # before anything leaves: one set per instance
    peers = [n for n in sorted(active) if n != flower.nid]
    ciphertexts = [encrypt(flower.ss2_dict[n], _statement(flower.nid, n, active, dead)) for n in peers]
    reply = RecordDict({SECAGG_RECORD: ConfigRecord({Key.DESTINATION_LIST: peers, Key.CIPHERTEXT_LIST: ciphertexts})})
    return Message(reply, reply_to=msg)


def _agreeing(configs, flower: SecAggPlusState, active: list[int], dead: list[int]) -> set[int]:
    """The neighbours whose relayed confirmation is authentic (it decrypts under the pair's
    key and names them and this node) and agrees with this node's lists on every node both
    list. An authentic confirmation that disagrees is proof that the server told nodes
    different survivor sets: refused outright."""
    srcs, ciphertexts = configs.get(CONFIRMERS, []), configs.get(CONFIRMATIONS, [])
    if not isinstance(srcs, list) or not isinstance(ciphertexts, list):
        return {flower.nid}
    mine = {**{n: "active" for n in active}, **{n: "dropped" for n in dead}}
    agreeing = {flower.nid}
    for src, ciphertext in zip(srcs, ciphertexts):
        if src not in active or src == flower.nid or src not in flower.ss2_dict or not isinstance(ciphertext, bytes):
            continue
        try:
            statement = json.loads(decrypt(flower.ss2_dict[src], ciphertext))
            theirs = {**{int(n): "active" for n in statement["active"]}, **{int(n): "dropped" for n in statement["dead"]}}
            genuine = statement["what"] == _STATEMENT and statement["src"] == src and statement["dst"] == flower.nid
        except (InvalidToken, ValueError, KeyError, TypeError):
            continue  # not from that neighbour: counts for nothing
        if not genuine:
            continue
        differ = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
        if differ:
            raise SecAggRefusal(f"unmask: node {src} confirmed a different survivor set (nodes {differ} differ): the "
                                "server told nodes different survivor sets; nothing is revealed")
        agreeing.add(src)
    return agreeing


def _check_unmask(configs, context: Context) -> None:
    """Everything a node checks before Flower's mod answers an unmask request; then the
    kinds it is about to reveal are recorded (write-ahead: a crash refuses more, never
    reveals twice)."""
    flower = _flower_state(context)
    guard = _guard(context, flower)
    if not guard["collected"]:
        raise SecAggRefusal("unmask: this node sent no masked vector in this round: it reveals no shares")
    active, dead = _ids(configs, Key.ACTIVE_NODE_ID_LIST, "unmask"), _ids(configs, Key.DEAD_NODE_ID_LIST, "unmask")
    _check_lists(active, dead, flower, "unmask")
    flipped = sorted((set(active) & set(guard["revealed-sk"])) | (set(dead) & set(guard["revealed-b"])))
    if flipped:
        raise SecAggRefusal(f"unmask: this node already revealed the other kind of share for nodes {flipped} in this "
                            "round; it never reveals both")
    if not guard["confirmed"]:
        raise SecAggRefusal("unmask: no survivor set was confirmed in this round (the consistency round is missing)")
    if sorted(active) != list(guard["view-active"]) or sorted(dead) != list(guard["view-dead"]):
        raise SecAggRefusal("unmask: the lists differ from the survivor set this node confirmed in this round")
    agreeing = _agreeing(configs, flower, active, dead)
    if len(agreeing) < flower.threshold:
        raise SecAggRefusal(f"unmask: {len(agreeing)} nodes (this one included) confirmed this survivor set, fewer "
                            f"than the threshold {flower.threshold}")
    guard["revealed-b"] = sorted(set(guard["revealed-b"]) | set(active))
    guard["revealed-sk"] = sorted(set(guard["revealed-sk"]) | set(dead))
    context.state.config_records[GUARD_RECORD] = guard


def _check_fresh(context: Context) -> None:
    """Share-keys and collect happen once per instance, before anything was confirmed or
    revealed (Flower's stage order already says so; this record does not depend on it)."""
    guard = _guard(context, _flower_state(context))
    if guard["collected"] or guard["confirmed"] or guard["revealed-b"] or guard["revealed-sk"]:
        raise SecAggRefusal("this protocol instance is past that stage on this node: start a new round with setup")


def _check_collect(configs, context: Context) -> None:
    """The neighbours' shares the server forwards at collect, checked before the node trains:
    Flower's mod checks their number and origin only after training, so after the charge,
    and a server forwarding too few, repeated or forged shares would spend the node's budget
    on a round that cannot finish, never counted as abandoned (nothing was masked)."""
    flower = _flower_state(context)
    srcs, ciphertexts = configs.get(Key.SOURCE_LIST), configs.get(Key.CIPHERTEXT_LIST)
    if not isinstance(srcs, list) or not isinstance(ciphertexts, list) or len(srcs) != len(ciphertexts):
        raise SecAggRefusal("collect: the neighbours' shares are malformed: nothing is trained")
    if len(set(srcs)) != len(srcs):
        raise SecAggRefusal(f"collect: shares of nodes {sorted({n for n in srcs if srcs.count(n) > 1})} forwarded more "
                            "than once: nothing is trained")
    if len(srcs) + 1 < flower.threshold:
        raise SecAggRefusal(f"collect: shares from {len(srcs)} neighbours, fewer than the threshold {flower.threshold} "
                            "with this node: the round cannot finish; nothing is trained")
    for src, ciphertext in zip(srcs, ciphertexts):
        try:
            sender, dst, _, _ = share_keys_plaintext_separate(decrypt(flower.ss2_dict[src], ciphertext))
        except (KeyError, TypeError, ValueError, InvalidToken):
            sender = dst = None
        if sender != src or dst != flower.nid:
            raise SecAggRefusal(f"collect: what was forwarded as node {src}'s share is not a share from node {src} for "
                                "this node: nothing is trained")


def _new_instance(context: Context) -> None:
    """After setup: a new record bound to the instance's fresh keys (Flower's setup has just
    replaced both secrets and dropped every share this node held)."""
    flower = _flower_state(context)
    context.state.config_records[GUARD_RECORD] = ConfigRecord({
        "instance": flower.pk1, "collected": False, "confirmed": False, "view-active": [], "view-dead": [],
        "revealed-b": [], "revealed-sk": []})


def starts_instance(msg: Message) -> bool:
    return msg.content.config_records[SECAGG_RECORD].get(Key.STAGE) == Stage.SETUP


def _mark_released(context: Context, released: Callable[[], None] | None) -> None:
    guard = _guard(context, _flower_state(context))
    if guard.get("released"):
        return
    guard["released"] = True
    context.state.config_records[GUARD_RECORD] = guard
    if released is not None:
        released()


def _mark_collected(context: Context) -> None:
    guard = _guard(context, _flower_state(context))
    guard["collected"] = True
    context.state.config_records[GUARD_RECORD] = guard


def _protocol(ctx: Context) -> Protocol:
    state = ctx.state.config_records[RECORD_KEY_STATE]  # what the mod agreed to at setup
    return Protocol(int(state["sample_num"]), int(state["threshold"]), float(state["clipping_range"]),
                    int(state["target_range"]), int(state["mod_range"]), float(state["max_weight"]))


def _distributed_fit(fitins, ctx: Context, run_distributed, release) -> tuple[list[np.ndarray], dict]:
    """A distributed-DP round's collect stage: the node's integer vector v in [0, 2^bits),
    handed to the mod as v - 2^(bits-1), which its quantization (checked to be the exact
    shift back, `clients.distributed_node.check_protocol`) turns into v again."""
    keys = json.loads(str(fitins.config[SECAGG_KEYS_FIELD]))
    global_arrays = dict(zip(keys, parameters_to_ndarrays(fitins.parameters)))
    outcome, vector = run_distributed(global_arrays, dict(fitins.config), _protocol(ctx))
    if outcome.status != "ok" or vector is None:
        raise SecAggRefusal(outcome.message or outcome.status)
    offset = _protocol(ctx).clipping_range
    scalars = {k: v for k, v in release(outcome).items() if k != "arrays"}
    return [np.asarray(vector, dtype=np.float64) - offset], scalars


def secagg_train(msg: Message, context: Context, run_round: Callable[[dict, dict], TrainOutcome],
                 release: Callable[[TrainOutcome], dict], own_bound: Callable[[], float],
                 run_distributed: Callable | None = None, released: Callable[[], None] | None = None) -> Message:
    """One SecAgg+ stage. `run_round(global_arrays, fit_config)` trains; `release(outcome)`
    gives the scalars the node releases; `own_bound()` is the node's `secagg_max_clip`;
    `run_distributed(global_arrays, fit_config, protocol)` is a distributed-DP round's
    part (`clients.distributed_node.distributed_round`); `released()` is called once per
    instance when the node has answered the unmask stage (its charged round released the sum).

    A round counts against `node.max_unreleased_rounds` from before its training until the
    node answers unmask (node.json, on disk): a server that collects masked vectors and
    never unmasks, in this Flower run or in a new one, or a node restarted between the two,
    leaves the count standing."""

    def _fit(fit_msg: Message, ctx: Context) -> Message:
        fitins = recorddict_to_fitins(fit_msg.content, keep_input=True)
        if DISTRIBUTED_FIELD in fitins.config:
            if run_distributed is None:
                raise SecAggRefusal("this node takes part in no distributed-DP round")
            arrays, scalars = _distributed_fit(fitins, ctx, run_distributed, release)
            fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, scalars)
            return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=fit_msg)
        if SECAGG_CLIP_FIELD not in fitins.config:
            raise SecAggRefusal("no declared bound for the update: nothing is contributed unclipped")
        bound = check_bound(fitins.config[SECAGG_CLIP_FIELD], own_bound())  # before training: nothing charged
        keys = json.loads(str(fitins.config[SECAGG_KEYS_FIELD]))
        global_arrays = dict(zip(keys, parameters_to_ndarrays(fitins.parameters)))
        outcome = run_round(global_arrays, dict(fitins.config))
        if outcome.status != "ok" or outcome.arrays is None:
            raise SecAggRefusal(outcome.message or outcome.status)
        keys = json.loads(str(fitins.config[SECAGG_UPDATE_KEYS_FIELD]))  # what trains (FFA: not the frozen A)
        protocol = ctx.state.config_records[RECORD_KEY_STATE]  # what the mod agreed to at setup
        quantum = 2 * float(protocol["clipping_range"]) / int(protocol["target_range"])
        update = {k: outcome.arrays[k].astype(np.float64) - global_arrays[k] for k in keys}
        update = masked_update(update, bound, quantum)
        scalars = {k: v for k, v in release(outcome).items() if k != "arrays"}
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update[k] for k in keys]), 1, scalars)
        return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=fit_msg)

    configs = msg.content.config_records[SECAGG_RECORD]
    stage = configs.get(Key.STAGE)
    if stage == CONFIRM_STAGE:
        return _confirm(msg, context)
    if stage == Stage.SETUP:
        context.state.config_records.pop(GUARD_RECORD, None)  # a new setup ends the old instance, answered or not
        check_setup(configs)
    elif stage in (Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS):
        _check_fresh(context)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            _check_collect(configs, context)  # before the node's training and charge
    elif stage == Stage.UNMASK:
        _check_unmask(configs, context)
    reply = secaggplus_mod(msg, context, _fit)
    if stage == Stage.SETUP:
        _new_instance(context)
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        _mark_collected(context)
    elif stage == Stage.UNMASK:
        _mark_released(context, released)
    return reply
