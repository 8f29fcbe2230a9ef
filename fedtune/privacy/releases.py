"""Everything that leaves a node, in one list, with what each value costs.

A node's reply to the server holds these values and nothing else; `checked` enforces it
(the ClientApp builds every reply through it). Each value is either covered by the
node's ledger (released through a DP mechanism that was charged before release) or a
function of what the node's policy makes public: the example counts and the mechanism's
parameters. Raw records and base-model weights never leave.
"""

from __future__ import annotations

from typing import Any, Mapping

# key -> what it is, and what it costs. Keys are the Flower record keys.
TRAIN_RELEASES: dict[str, str] = {
    "arrays": "the trainable adapter tensors (LoRA, head) after local DP-SGD: covered by the ledger, charged "
              "(and fsynced) before the first training step",
    "status": "ok | budget-exhausted | policy-refused | node-error: a function of the policy, the ledger and "
              "the request, not of the rows",
    "message": "why a round was refused (names a field, a cap, a file of the node's own): no row content",
    "noise": "where the noise came from ('noise seeded from OS entropy per call', or 'reproducible noise: not "
             "for production')",
    "num-examples": "training rows n: public by design (the FedAvg weight; it also fixes the sample rate "
                    "q = 1/ceil(n/B) and so the noise of every step)",
    "epsilon": "epsilon spent on this data so far: post-processing of the ledger's mechanism parameters",
    "delta": "the delta the ledger accounts at: a parameter of the policy and of n",
    "noise-multiplier": "sigma of every DP-SGD step: fixed by the plan from the request and n",
    "sample-rate": "Poisson rate q of every step: fixed by n and the batch size",
    "steps": "DP-SGD steps this round: fixed by the plan",
    "private": "1 with DP-SGD, 0 for a node whose policy allows non-private training (epsilon = inf)",
    "ledger": "the ledger's history of (sigma, q, steps) as JSON, so anyone can recompute epsilon: mechanism "
              "parameters only",
    "train-seconds": "wall time of the local training: observable anyway (the server sees when the reply arrives)",
    "secaggplus_configs": "only with secure aggregation (Flower's SecAgg+ record, written by its mod): the node's "
                          "update clipped by the node to the declared L2 bound, quantized and masked (only the "
                          "cohort's sum can be unmasked), the protocol's public keys and its encrypted key shares; "
                          "the update itself is covered by the ledger like the adapter tensors",
    "train-loss": "only with node.release_train_loss = dp: the final adapter's clipped mean loss on the "
                  "training rows, Gaussian-noised (fedtune.privacy.metric_release), charged to the ledger before release; "
                  "exact only when the ledger is already non-private",
}

EVALUATE_RELEASES: dict[str, str] = {
    "status": TRAIN_RELEASES["status"],
    "message": TRAIN_RELEASES["message"],
    "noise": TRAIN_RELEASES["noise"],
    "num-examples": "validation rows n: public by design (a share of the node's rows)",
    "epsilon": TRAIN_RELEASES["epsilon"],
    "ledger": TRAIN_RELEASES["ledger"],
    "accuracy": "only with node.release_evaluation = dp: noised count of correct predictions / n, charged before "
                "release, at most node.max_evaluations_per_round requests a round",
    "loss": "only with node.release_evaluation = dp: noised clipped loss sum / n, in the same charged release",
}


def checked(values: Mapping[str, Any], allowed: Mapping[str, str], what: str) -> dict[str, Any]:
    """`values` unchanged if every key is a listed release; anything else is a bug that
    would leak an unaccounted value, so it raises instead of leaving the node."""
    unlisted = sorted(set(values) - set(allowed))
    if unlisted:
        raise RuntimeError(f"{what} reply would release unlisted values {unlisted}: add them to fedtune.privacy.releases "
                           "with their cost, or do not send them")
    return dict(values)
