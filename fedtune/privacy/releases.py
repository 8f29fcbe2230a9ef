"""Everything that leaves a node, in one list, with what each value costs.

A node's reply to the server holds these values and nothing else; `checked` enforces it
(the ClientApp builds every reply through it). Each entry says which of two kinds it is:

* "charged: ..." — released through a DP mechanism that was charged to the ledger (and
  written to disk) before the release;
* "row-independent: ..." — the same for a data set D and D plus one row, and why: a function
  of the node's policy, the request, the ledger's mechanism parameters and the row count
  (public by design: it is the FedAvg weight and fixes the Poisson rate of every step). Every
  check whose outcome depends on the rows' contents runs when the node starts, against its
  own policy, never in answer to a request (tests/test_row_independence.py tries each
  refusal path with paired data sets);
* "observable: ..." — what the server sees of any reply whatever it holds (its timing),
  said here so that nobody mistakes it for hidden.

Raw records and base-model weights never leave.
"""

from __future__ import annotations

from typing import Any, Mapping

CHARGED = "charged: "
ROW_INDEPENDENT = "row-independent: "
OBSERVABLE = "observable: "

# key -> what it is, and what it costs. Keys are the Flower record keys.
TRAIN_RELEASES: dict[str, str] = {
    "arrays": CHARGED + "the trainable adapter tensors (LoRA, head) after local DP-SGD, covered by the ledger, charged "
              "(and fsynced) before the first training step",
    "status": ROW_INDEPENDENT + "ok | budget-exhausted | policy-refused | node-error: the request checked against the "
              "policy (labels against the node's declared labels, never against its rows), the ledger's state, the "
              "row count (a batch larger than the rows, a delta of 1/n or more) and the node's own health (its state "
              "in use, a lost ledger, a data file that broke its policy at start, which answers every request alike)",
    "message": ROW_INDEPENDENT + "why a round was refused: names a field, a cap, the policy's own values; a node error "
               "says only its kind (the detail, which can quote a row, stays in the node's log)",
    "noise": ROW_INDEPENDENT + "where the noise came from ('noise seeded from OS entropy per call', or 'reproducible "
             "noise: not for production'): the node's policy",
    "num-examples": ROW_INDEPENDENT + "training rows n, public by design (the FedAvg weight; it also fixes the sample "
                    "rate q = 1/ceil(n/B) and so the noise of every step): the node's row count and the requested "
                    "validation share, never the rows' contents (an instruct row whose answer does not fit the "
                    "requested length is kept, teaching nothing, so lengths cannot be probed)",
    "epsilon": ROW_INDEPENDENT + "epsilon spent on these records so far: post-processing of the ledger's mechanism "
               "parameters",
    "delta": ROW_INDEPENDENT + "the delta the ledger accounts at: the node's policy, the request and n",
    "noise-multiplier": ROW_INDEPENDENT + "sigma of every DP-SGD step: fixed by the plan from the request and n",
    "sample-rate": ROW_INDEPENDENT + "Poisson rate q of every step: fixed by n and the batch size",
    "steps": ROW_INDEPENDENT + "DP-SGD steps this round: fixed by the plan",
    "private": ROW_INDEPENDENT + "1 with DP-SGD, 0 for a node whose policy allows non-private training "
               "(epsilon = inf): the policy and the request",
    "ledger": ROW_INDEPENDENT + "the ledger's history of (sigma, q, steps) as JSON, so anyone can recompute epsilon: "
              "mechanism parameters only",
    "train-seconds": OBSERVABLE + "wall time of the local training, which the server sees anyway (when the reply "
                     "arrives). Not hidden: it follows the steps, the Poisson batch sizes and the rows' token lengths "
                     "(batches are trimmed to their longest row); a node that must hide timing pads replies itself",
    "secaggplus_configs": CHARGED + "only with secure aggregation (Flower's SecAgg+ record, written by its mod): the "
                          "node's update clipped by the node to its own L2 bound (a server may only ask for a smaller "
                          "one), quantized and masked (only the cohort's sum can be unmasked), the protocol's public "
                          "keys and its encrypted key shares; the update itself is covered by the ledger like the "
                          "adapter tensors",
    "train-loss": CHARGED + "only with node.release_train_loss = dp: the final adapter's clipped mean loss on the "
                  "training rows, Gaussian-noised (fedtune.training.metric_release), charged to the ledger before release; "
                  "exact only when the ledger is already non-private",
}

EVALUATE_RELEASES: dict[str, str] = {
    "status": TRAIN_RELEASES["status"],
    "message": TRAIN_RELEASES["message"],
    "noise": TRAIN_RELEASES["noise"],
    "num-examples": ROW_INDEPENDENT + "validation rows n: public by design (the row count's validation share)",
    "epsilon": TRAIN_RELEASES["epsilon"],
    "ledger": TRAIN_RELEASES["ledger"],
    "accuracy": CHARGED + "only with node.release_evaluation = dp: noised count of correct predictions / n, charged "
                "before release, at most node.max_evaluations_per_round requests a round",
    "loss": CHARGED + "only with node.release_evaluation = dp: noised clipped loss sum / n, in the same charged release",
}


def checked(values: Mapping[str, Any], allowed: Mapping[str, str], what: str) -> dict[str, Any]:
    """`values` unchanged if every key is a listed release; anything else is a bug that
    would leak an unaccounted value, so it raises instead of leaving the node."""
    unlisted = sorted(set(values) - set(allowed))
    if unlisted:
        raise RuntimeError(f"{what} reply would release unlisted values {unlisted}: add them to fedtune.privacy.releases "
                           "with their cost, or do not send them")
    return dict(values)
