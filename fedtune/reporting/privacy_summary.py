"""A federation run's privacy, both levels side by side, each with what reproduces it.

Record-level: every node's ledger (in simulation the ledger files; in deployment the
history each node released with its replies), DP-SGD as Poisson-subsampled Gaussian
steps plus any Gaussian metric releases (q = 1). User-level: the server's DP-FedAvg
ledger, Gaussian on the clipped sum, at the cohort sampling actually used. Every epsilon
is computed twice, by Opacus and by Google's dp-accounting, from the logged parameters
alone (`privacy.json` holds them, so anyone can recompute them). Fixed-size cohorts drawn
from more nodes than they hold are sampling without replacement, a bound only dp-accounting
implements: both columns are then dp-accounting's, the ledger's and a fresh recomputation.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedtune.privacy import PrivacyLedger, ddgauss_accounting, independent_epsilon

RECORD_MECHANISM = "DP-SGD: Poisson-subsampled Gaussian per step (+ Gaussian metric releases, q = 1)"
DISTRIBUTED_MECHANISM = ("distributed DP: one DP-SGD step per round over the union of the contributors' Poisson "
                         "batches, each node adding a discrete Gaussian share calibrated to its own t (distributed "
                         "discrete Gaussian, Kairouz, Liu and Steinke 2021), summed inside SecAgg+; accounted per record "
                         "at its node's rate q with Zhu and Wang's Poisson-subsampling bound on Proposition 14's Renyi "
                         "bound (z, tau, d, q, steps)")


def _entry(level: str, who: str, mechanism: str, accountant: str, delta: float, history: list,
           non_private_steps: int = 0, extra: dict | None = None, without_replacement: list = (),
           distributed: list = (), contributors: int | None = None, local_stddev: float | None = None) -> dict:
    history = [[float(s), float(q), int(n)] for s, q, n in history]
    cohorts = [[float(s), int(big), int(m), int(r)] for s, big, m, r in without_replacement]
    steps = [tuple(e) for e in distributed]
    ledger = PrivacyLedger(accountant, delta, None, [tuple(h) for h in history], non_private_steps,
                           without_replacement=[tuple(c) for c in cohorts], distributed=steps)
    opacus = ledger.epsilon()
    if non_private_steps:
        independent = math.inf
    elif steps:  # recomputed from the logged parameters alone
        independent = ddgauss_accounting.epsilon(steps, delta, history)
    else:
        independent = independent_epsilon(accountant, history, delta, cohorts)
    sampled = ({"without_replacement": cohorts, "neighboring_relation": "replace-one"} if cohorts else {})
    if steps:
        sampled.update({"distributed": [list(e) for e in steps], "mechanism_detail": DISTRIBUTED_MECHANISM,
                        "contributors": contributors})
        if contributors and local_stddev and not non_private_steps:
            colluding = ddgauss_accounting.colluding_epsilons(steps, int(contributors), float(local_stddev), delta,
                                                              history)
            sampled["epsilon_if_colluding"] = {str(c): _number(e) for c, e in colluding.items()}
    return {"level": level, "who": who, "mechanism": mechanism, "accountant": accountant, "delta": delta,
            "history": history, "non_private_steps": non_private_steps, **sampled,
            "epsilon_opacus": _number(opacus), "epsilon_dp_accounting": _number(independent), **(extra or {})}


def node_entries(ledgers: dict[str, PrivacyLedger], released: dict[str, dict]) -> list[dict]:
    """Record-level entries: full ledgers where the run holds them, else what nodes released."""
    entries = [_entry("record", name, DISTRIBUTED_MECHANISM if ledger.distributed else RECORD_MECHANISM,
                      ledger.accountant, ledger.delta, ledger.history, ledger.non_private_steps,
                      {"source": "ledger file", "max_epsilon": ledger.max_epsilon},
                      distributed=ledger.distributed, **ledger.distributed_parameters())
               for name, ledger in ledgers.items()]
    if not ledgers:
        for node, privacy in sorted(released.items()):
            try:
                distributed = privacy.get("distributed") or []
                entries.append(_entry("record", f"node {node}", DISTRIBUTED_MECHANISM if distributed else RECORD_MECHANISM,
                                      str(privacy["accountant"]), float(privacy["delta"]), privacy["history"],
                                      int(privacy.get("non_private_steps", 0)), {"source": "as released by the node"},
                                      distributed=distributed, contributors=privacy.get("contributors"),
                                      local_stddev=privacy.get("local_stddev")))
            except (KeyError, TypeError, ValueError):
                continue  # a malformed release is reported by its absence, never trusted
    return entries


def user_entry(user_ledger: dict | None, fed: dict) -> dict | None:
    if not user_ledger:
        return None
    ledger = PrivacyLedger.from_dict(user_ledger, source="checkpoint user ledger")
    sampling = fed.get("cohort_sampling", "fixed")
    mechanism = (f"DP-FedAvg: each update clipped to {fed.get('user_dp_clip')}, Gaussian noise "
                 f"{fed.get('user_dp_noise')} x clip on the sum, fixed denominator; cohorts "
                 + ("Poisson-sampled from secret randomness (amplification at the drawn rate)" if sampling == "poisson"
                    else "of fixed size, drawn from secret randomness: m of the N nodes registered that round is "
                         "sampling without replacement (replace-one: noise multiplier / 2 for the Gaussian, as one "
                         "replaced node moves the sum by twice the clip), all N is full participation (q = 1)"))
    return _entry("user", "server", mechanism, ledger.accountant, ledger.delta, ledger.history,
                  ledger.non_private_steps, extra={"population": fed.get("population")},
                  without_replacement=ledger.without_replacement)


def privacy_markdown(entries: list[dict], noise: str) -> list[str]:
    lines = ["## Privacy", "",
             f"Noise: {noise or 'unknown'}. Each epsilon is recomputed from the logged (noise multiplier, sample rate, "
             "steps) history twice: by the ledger's accountant (Opacus for rdp and prv, dp-accounting for pld) and, "
             "independently, by the other library; `privacy.json` holds the parameters.", "",
             "| level | who | accountant | delta | epsilon (ledger's accountant) | epsilon (other library) "
             "| history (sigma, q, steps) |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        history = "; ".join(f"({s:.4g}, {q:.4g}, {n})" for s, q, n in e["history"][:4])
        if len(e["history"]) > 4:
            history += f"; ... ({len(e['history'])} entries)"
        if e.get("without_replacement"):
            cohorts = "; ".join(f"({s:.4g}, {big}, {m}, {r})" for s, big, m, r in e["without_replacement"][:4])
            if len(e["without_replacement"]) > 4:
                cohorts += f"; ... ({len(e['without_replacement'])} entries)"
            history = "; ".join(filter(None, [history, "without replacement (sigma, N, m, rounds): " + cohorts]))
        if e.get("distributed"):
            shown = "; ".join(f"({z:.4g}, {q:.4g}, {n})" for z, _, _, q, n in e["distributed"][:4])
            history = "; ".join(filter(None, [history, "distributed (z, q, steps): " + shown]))
        lines.append(f"| {e['level']} | {e['who']} | {e['accountant']} | {e['delta']:.3g} | {_shown(e['epsilon_opacus'])} "
                     f"| {_shown(e['epsilon_dp_accounting'])} | {history} |")
    mechanisms = sorted({(e["level"], e["mechanism"]) for e in entries})
    lines += [""] + [f"- {level}-level mechanism: {text}" for level, text in mechanisms]
    if any(e.get("without_replacement") for e in entries):
        lines.append("- sampling without replacement is a bound only dp-accounting implements, so both columns are "
                     "its own (the ledger's and a fresh recomputation): `rdp.RdpAccountant(neighboring_relation="
                     "NeighboringRelation.REPLACE_ONE)` composing `SampledWithoutReplacementDpEvent(N, m, "
                     "GaussianDpEvent(sigma / 2))` for each (sigma, N, m, rounds) and `GaussianDpEvent(sigma / 2)` for "
                     "each (sigma, q, steps)")
    colluding = [e for e in entries if e.get("epsilon_if_colluding")]
    if colluding:
        lines.append(f"- distributed DP: each node's share is calibrated to its own t; if c of the t contributors "
                     "collude with the server, the noise of t - c shares remains. Epsilon then (c = 0, 1, t/2):")
        lines += [f"  - {e['who']} (t = {e['contributors']}): " + ", ".join(
            f"c = {c}: {_shown(v)}" for c, v in e["epsilon_if_colluding"].items()) for e in colluding]
        lines.append("- distributed steps are recomputed by `fedtune.privacy.ddgauss_accounting.epsilon` from the "
                     "logged (z, tau, d, q, steps); the test suite checks that code against a term-by-term "
                     "computation in 60-digit arithmetic")
    return lines + [""]


def _number(value: float):
    return "inf" if math.isinf(value) else round(value, 6)


def _shown(value) -> str:
    return value if isinstance(value, str) else f"{value:.4g}"


def read_released(run_dir: Path) -> tuple[dict[str, dict], dict | None]:
    """(node histories as released, the user-level ledger) from the run's checkpoint."""
    from fedtune.federation.checkpoint import load_checkpoint

    path = run_dir / "checkpoint.safetensors"
    if not path.is_file():
        return {}, None
    meta = load_checkpoint(path).meta
    return dict(meta.get("node_privacy", {})), meta.get("user_ledger")
