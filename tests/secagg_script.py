"""A SecAgg+ server scripted stage by stage against the real ClientApp (and Flower's mod
inside it), so that a test can play an honest server or a malicious one: what it sends
each node at each stage is the test's choice, what comes back is what a server would get.
Shared by tests/test_secagg_malicious.py; not a test module itself."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from itertools import count

import numpy as np
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (factor_extract, parameters_addition, parameters_mod,
                                                                parameters_subtraction)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.compat.common.recorddict_compat import fitins_to_recorddict
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from clients.secagg import CONFIRMATIONS, CONFIRMERS, CONFIRM_STAGE
from fedtune.privacy.policy import REQUEST_KEY, SECAGG_CLIP_FIELD, SECAGG_KEYS_FIELD, SECAGG_UPDATE_KEYS_FIELD

CLIPPING_RANGE, TARGET_RANGE, MOD_RANGE = 8.0, 2**22, 2**32
_ids = count()


@dataclass
class ScriptedRound:
    """One protocol instance over real nodes: `app` is the ClientApp, `contexts` each node's
    Context (kept across messages, as a SuperNode keeps it)."""

    app: object
    contexts: dict[int, Context]
    payload: dict[str, np.ndarray]
    fit_config: dict
    threshold: int = 2
    server_round: int = 1
    clipping_range: float = CLIPPING_RANGE  # the quantization setup announces (distributed DP: 2^(bits-1), 2^bits)
    target_range: int = TARGET_RANGE
    mod_range: int = MOD_RANGE
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    forwards: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)
    masked: dict[int, list[np.ndarray]] = field(default_factory=dict)
    confirmations: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)

    @property
    def nids(self) -> list[int]:
        return sorted(self.contexts)

    def send(self, nid: int, configs: dict, content: RecordDict | None = None) -> Message:
        content = content if content is not None else RecordDict()
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
        metadata = Metadata(run_id=1, message_id=f"s{next(_ids)}", src_node_id=0, dst_node_id=nid,
                            reply_to_message_id="", group_id=str(self.server_round), created_at=time.time(),
                            ttl=3600, message_type="train")
        return self.app(Message(content=content, metadata=metadata), self.contexts[nid])

    @staticmethod
    def configs(reply: Message) -> dict:
        return dict(reply.content.config_records[RECORD_KEY_CONFIGS])

    def setup(self, **overrides) -> None:
        params = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(self.nids), Key.SHARE_NUMBER: len(self.nids),
                  Key.THRESHOLD: self.threshold, Key.CLIPPING_RANGE: self.clipping_range,
                  Key.TARGET_RANGE: self.target_range, Key.MOD_RANGE: self.mod_range, Key.MAX_WEIGHT: 1.0, **overrides}
        for nid in self.nids:
            reply = self.configs(self.send(nid, dict(params)))
            self.keys[nid] = (reply[Key.PUBLIC_KEY_1], reply[Key.PUBLIC_KEY_2])

    def share_keys(self) -> None:
        self.forwards = {nid: ([], []) for nid in self.nids}
        for nid in self.nids:
            reply = self.configs(self.send(nid, {Key.STAGE: Stage.SHARE_KEYS,
                                                 **{str(n): list(self.keys[n]) for n in self.nids}}))
            for dst, ciphertext in zip(reply[Key.DESTINATION_LIST], reply[Key.CIPHERTEXT_LIST]):
                self.forwards[dst][0].append(nid)
                self.forwards[dst][1].append(ciphertext)

    def collect(self, fit_config: dict | None = None, nids=None) -> None:
        config = {**self.fit_config, **(fit_config or {}), SECAGG_KEYS_FIELD: json.dumps(list(self.payload)),
                  SECAGG_UPDATE_KEYS_FIELD: json.dumps(list(self.payload))}
        for nid in nids or self.nids:
            content = fitins_to_recorddict(FitIns(ndarrays_to_parameters(list(self.payload.values())), config), True)
            srcs, ciphertexts = self.forwards[nid]
            reply = self.send(nid, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: list(ciphertexts),
                                    Key.SOURCE_LIST: list(srcs)}, content)
            self.masked[nid] = [bytes_to_ndarray(b) for b in self.configs(reply)[Key.MASKED_PARAMETERS]]

    def confirm(self, views: dict[int, tuple[list[int], list[bytes]]]) -> None:
        """The consistency round: each node is told its (active, dropped) lists and answers
        with its confirmations, one per neighbour, which the server relays at unmask."""
        self.confirmations = {nid: ([], []) for nid in self.nids}
        for nid, (active, dead) in views.items():
            reply = self.configs(self.send(nid, {Key.STAGE: CONFIRM_STAGE, Key.ACTIVE_NODE_ID_LIST: list(active),
                                                 Key.DEAD_NODE_ID_LIST: list(dead)}))
            for dst, ciphertext in zip(reply[Key.DESTINATION_LIST], reply[Key.CIPHERTEXT_LIST]):
                self.confirmations[dst][0].append(nid)
                self.confirmations[dst][1].append(ciphertext)

    def unmask(self, nid: int, active, dead, relay: bool = True) -> dict[int, list[tuple[str, bytes]]]:
        """One node's unmask answer as {owner: [(kind, share)]}: kind "b" for an owner the
        request listed active, "sk" for one it listed dropped."""
        configs = {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: list(active), Key.DEAD_NODE_ID_LIST: list(dead)}
        if relay and nid in self.confirmations:
            configs[CONFIRMERS], configs[CONFIRMATIONS] = (list(v) for v in self.confirmations[nid])
        reply = self.configs(self.send(nid, configs))
        kinds = ["b"] * len(active) + ["sk"] * len(dead)
        shares: dict[int, list[tuple[str, bytes]]] = {}
        for owner, kind, share in zip(reply[Key.NODE_ID_LIST], kinds, reply[Key.SHARE_LIST]):
            shares.setdefault(owner, []).append((kind, share))
        return shares

    def honest(self) -> dict[int, list[tuple[str, bytes]]]:
        """The whole round as an honest server runs it, every node active."""
        self.setup()
        self.share_keys()
        self.collect()
        self.confirm({nid: (self.nids, []) for nid in self.nids})
        shares: dict[int, list[tuple[str, bytes]]] = {}
        for nid in self.nids:
            for owner, got in self.unmask(nid, self.nids, []).items():
                shares.setdefault(owner, []).extend(got)
        return shares

    def unmasked_mean(self, shares, active) -> list[np.ndarray]:
        """What the server computes from the masked vectors of `active` and the shares it
        holds (Flower's workflow arithmetic): every active node's private mask removed with
        its rebuilt seed, every dropped neighbour's pairwise masks with its rebuilt key; the
        quantized sum then divided by the weights' sum (each node weighs 1)."""
        vector = None
        for nid in active:
            vector = self.masked[nid] if vector is None else parameters_addition(vector, self.masked[nid])
        shapes = [a.shape for a in vector]
        for owner in self.nids:
            if owner in active:
                seed = combine_shares([s for kind, s in shares[owner] if kind == "b"])
                vector = parameters_subtraction(vector, pseudo_rand_gen(seed, self.mod_range, shapes))
                continue
            secret = bytes_to_private_key(combine_shares([s for kind, s in shares[owner] if kind == "sk"]))
            for other in active:
                mask = pseudo_rand_gen(generate_shared_key(secret, bytes_to_public_key(self.keys[other][0])),
                                       self.mod_range, shapes)
                # `other` added the mask when other > owner: take it back out
                vector = (parameters_subtraction if other > owner else parameters_addition)(vector, mask)
        factor, quantized = factor_extract(parameters_mod(vector, self.mod_range))
        values = dequantize(quantized, self.clipping_range, self.target_range)
        return [(v - (len(active) - 1) * self.clipping_range) * self.target_range / factor for v in values]

    def strip_one(self, target: int, shares) -> list[np.ndarray]:
        """The attack's last step: `target`'s own masked vector with its private mask (from
        its seed) and all its pairwise masks (from its secret key) removed."""
        vector = self.masked[target]
        shapes = [a.shape for a in vector]
        seed = combine_shares([s for kind, s in shares[target] if kind == "b"])
        vector = parameters_subtraction(vector, pseudo_rand_gen(seed, self.mod_range, shapes))
        secret = bytes_to_private_key(combine_shares([s for kind, s in shares[target] if kind == "sk"]))
        for other in self.nids:
            if other != target:
                mask = pseudo_rand_gen(generate_shared_key(secret, bytes_to_public_key(self.keys[other][0])),
                                       self.mod_range, shapes)
                vector = (parameters_subtraction if target > other else parameters_addition)(vector, mask)
        factor, quantized = factor_extract(parameters_mod(vector, self.mod_range))
        return [v * self.target_range / factor for v in dequantize(quantized, self.clipping_range, self.target_range)]


def kinds_revealed(shares: dict[int, list[tuple[str, bytes]]], owner: int) -> dict[str, int]:
    got = shares.get(owner, [])
    return {"b": sum(kind == "b" for kind, _ in got), "sk": sum(kind == "sk" for kind, _ in got)}


def fit_config(request_toml: str, clip: float = 4.0) -> dict:
    return {"server-round": 1, REQUEST_KEY: request_toml, "evaluation": "federated", SECAGG_CLIP_FIELD: clip}
