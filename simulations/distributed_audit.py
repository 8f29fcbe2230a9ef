"""Empirical privacy audit of distributed DP: one step of the distributed discrete Gaussian
mechanism, end to end, with canaries.

Every epsilon the distributed mode prints comes from its accountant
(`fedtune.privacy.ddgauss_accounting`), computed from the announced parameters. This audit
asks the mechanism itself, through the code a real round runs (`fedtune.privacy.ddgauss`):
each node clips, rotates, scales and conditionally rounds its rows (`encode_examples`),
adds its own discrete Gaussian noise share (`noise_share`, OpenDP's exact sampler), the
integer vectors are summed modulo 2^bits as secure aggregation sums them, and the server
decodes the sum (`decode`). It is the one-run audit of Steinke, Nasr and Jagielski
(NeurIPS 2023; `fedtune.audit.bounds`), as `fedtune audit` runs it on a node's
DP-SGD.

    python -m simulations.distributed_audit                       # the audit (exit 1 if not sound)
    python -m simulations.distributed_audit --control noise-off   # one control (exit 1 if not caught)
    python -m simulations.distributed_audit --all                 # audit + every control, as a table
    python -m simulations.distributed_audit --all --record        # ... and write the record and the report
    python -m simulations.distributed_audit --report-only         # the report from the committed record

Design (defaults; every number is fixed before the mechanism runs):

* One distributed step with sampling rate q = 1 and t = 16 contributing nodes. Node 0
  holds m = 1000 canaries; each is included by its own fair coin (`coin_flips`). Canary i
  is a gradient row of L2 norm C along its own random unit direction u_i in dimension
  d = 16 m rounded up to a power of two (16,384): independent random directions are then
  nearly orthogonal, |<u_i, u_j>| ~ 1/sqrt(d) = 0.008, so the ~500 included canaries leak
  into each other's scores only a standard deviation of sqrt(500 / d) C = 0.17 C, small
  next to one canary's C (a power of two is the Hadamard rotation's own length: no padding).
  Every node, node 0 included, also holds 4 random non-canary rows.
* The noise multiplier z is calibrated by bisection so that the accountant's epsilon of
  this one step, `epsilon([steps_for(spec, 1.0, 1)], delta)`, is the claimed epsilon:
  2 at delta 1e-5 (z = 2.150). The granularity is the server's own choice
  (`choose_granularity`: C / 1000, far from wrapping the 20-bit modulus).
* The auditor sees only the released sum: each canary's score is <decoded sum, u_i> / C.
  The other nodes' rows are unknown to it and act as a little more noise. It guesses
  "included" for the r / 2 = 100 highest scores and "excluded" for the 100 lowest, and the
  v right guesses give a lower bound on epsilon at 95% confidence.
* Verdict: the audit passes (PASS) when the lower bound does not exceed the claimed
  epsilon and fails (FAIL) when it does. The command exits 0 when every run came out as it
  must (the audit PASS, noise-off and dropped-noise FAIL, no-canary near zero), 1 if not,
  2 on a bad flag.

Controls, which show that the audit can see what it must:

* noise-off: no node adds its share. The audit must FAIL (bound above the claim).
* dropped-noise: only 1 of the t nodes adds its share (`--shares-kept`): the failure
  distributed DP has to guard against, since each share alone is sized for t of them. The
  audit must catch it: FAIL, bound above the claim.
* no-canary: the coins are drawn but no canary is inserted; the guesses are scored
  against the coins and are at chance, so the bound must be about zero (below 0.5).

Power (why t = 16 and epsilon 2 at the default m and r). In units of C, an included
canary scores N(1, s^2) and an excluded one N(0, s^2), with s^2 = (noise std / C)^2 +
(m / 2) / d + (rows of the other nodes) / d; the noise std of k of the t shares is
z Delta2 gamma sqrt(k / t), and Delta2 gamma = 1.003 C here. With k = t (honest),
s = 2.16: the bound comes out near 0.56, rarely above 1 (a one-run audit is loose, and it
must be: it proves a lower bound). With k = 1 the noise std shrinks by sqrt(t): z / sqrt(t)
is the noise multiplier of the step as it ran, and the epsilon it really has grows a little
more than sqrt(t)-fold (the Renyi divergence, alpha / (2 z^2), grows t-fold): 10.0, not 2, for
t = 16. Then s = 0.57 and the bound is 3.0 on average, above 2.3 in 99.9% of simulated
audits (1000 Gaussian draws of the scores); 25 runs of the real mechanism (seeds 0-24) gave
2.57 to 3.71, mean 3.1, every one above 2. With t = 5 the dropped share leaves s = 0.98
and the bound is about 1.5 (1.30 to 1.62 in 8 real runs): the audit cannot tell that failure
from a sound claim of 2 with m = 1000 and r = 200, which is why the default is t = 16.
With the noise off, s = 0.18 and every guess is right: the bound is 4.17, the most 200
guesses can prove at delta 1e-5 with 1000 canaries (a claim above 4.17 cannot be refuted by
an audit of this size at all).

Noise shares come from OpenDP's cryptographically secure sampler and cannot be seeded; the
rounding draws fresh OS entropy as in a real round. `--seed` fixes the rest: the canary
directions and coins, the other rows and the public rotation seed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedtune.system.atomic import atomic_write_json, atomic_write_text
from fedtune.errors import ConfigError, FedtuneError

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "docs" / "results" / "records" / "audit-distributed.json"
REPORT = ROOT / "docs" / "audit-distributed.md"

ROW_KEYS = ("control", "claimed_epsilon", "delta", "m", "included", "r", "v", "lower_bound", "best_possible",
            "epsilon_as_run", "d", "t", "shares", "z", "granularity", "bits", "score_spread", "seconds", "verdict",
            "as_expected")
CONTROLS = ("honest", "noise-off", "dropped-noise", "no-canary")
ABOUT_ZERO = 0.5  # the no-canary control's bound must stay below this (as `fedtune audit`'s)
DIM_PER_CANARY = 16  # d = 16 m, rounded up to a power of two: nearly orthogonal canaries


@dataclass(frozen=True)
class Design:
    """Everything the audit fixes before the mechanism runs."""

    canaries: int = 1000  # m, all on node 0
    guesses: int = 200  # r: r // 2 "included" (top scores), the rest "excluded" (bottom)
    contributors: int = 16  # t: nodes in the step, each adding its share of the noise
    target_epsilon: float = 2.0  # the claim z is calibrated to
    delta: float = 1e-5
    confidence: float = 0.95
    clip: float = 1.0  # C
    bits: int = 20  # the modular sum's width (fedtune's default)
    dim: int = 0  # d; 0: DIM_PER_CANARY * m rounded up to a power of two
    rows_per_node: int = 4  # random non-canary rows on every node
    shares_kept: int = 1  # dropped-noise: how many of the t nodes still add their share
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.canaries, int) and self.canaries >= 2):
            raise ConfigError(f"--canaries {self.canaries}: expected a whole number >= 2")
        if not (isinstance(self.guesses, int) and 1 <= self.guesses <= self.canaries):
            raise ConfigError(f"--guesses {self.guesses}: expected 1 to --canaries ({self.canaries})")
        if not (isinstance(self.contributors, int) and self.contributors >= 2):
            raise ConfigError(f"--contributors {self.contributors}: expected a whole number >= 2 (distributed noise "
                              "needs at least two shares)")
        if not (math.isfinite(self.target_epsilon) and 0 < self.target_epsilon <= 50):
            raise ConfigError(f"--epsilon {self.target_epsilon}: expected a number in (0, 50]")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--delta {self.delta}: expected a number in (0, 1), e.g. 1e-5")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"--confidence {self.confidence}: expected a number in (0, 1), e.g. 0.95")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"--clip {self.clip}: expected a number > 0")
        if not (isinstance(self.bits, int) and 8 <= self.bits <= 26):
            raise ConfigError(f"--bits {self.bits}: expected a whole number in [8, 26]")
        if not (isinstance(self.dim, int) and self.dim >= 0):
            raise ConfigError(f"--dim {self.dim}: expected a whole number >= 1 (or 0 for {DIM_PER_CANARY} x canaries)")
        if not (isinstance(self.rows_per_node, int) and self.rows_per_node >= 0):
            raise ConfigError(f"--rows-per-node {self.rows_per_node}: expected a whole number >= 0")
        if not (isinstance(self.shares_kept, int) and 1 <= self.shares_kept < self.contributors):
            raise ConfigError(f"--shares-kept {self.shares_kept}: expected 1 to --contributors - 1 "
                              f"({self.contributors - 1}): the dropped-noise control keeps fewer than t shares")

    @property
    def resolved_dim(self) -> int:
        from fedtune.privacy.ddgauss import padded_dim

        return self.dim or padded_dim(DIM_PER_CANARY * self.canaries)

    def shares_added(self, control: str) -> int:
        return {"honest": self.contributors, "no-canary": self.contributors, "noise-off": 0,
                "dropped-noise": self.shares_kept}[control]


def calibrate(design: Design):
    """(spec, claimed epsilon): the smallest noise multiplier z (bisection, 40 halvings)
    whose one step at q = 1 the accountant puts at no more than the target epsilon, with
    the server's granularity for it."""
    from fedtune.privacy import ddgauss
    from fedtune.privacy import ddgauss_accounting as accounting

    dim = design.resolved_dim
    rows = design.canaries + design.contributors * design.rows_per_node  # at most this many in the sum

    def spec_at(z: float):
        gamma = ddgauss.choose_granularity(design.clip, design.bits, dim, rows, z)
        return ddgauss.DDGaussSpec(float(design.clip), float(gamma), design.bits, design.contributors, float(z), dim)

    def claim(z: float) -> float:
        return accounting.epsilon([accounting.steps_for(spec_at(z), 1.0, 1).as_tuple()], design.delta)

    low, high = 0.01, 1.0
    while claim(high) > design.target_epsilon:
        high *= 2
        if high > 1e5:
            raise ConfigError(f"--epsilon {design.target_epsilon} at delta {design.delta:g}: no noise multiplier "
                              "reaches it")
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if claim(middle) <= design.target_epsilon else (middle, high)
    return spec_at(high), claim(high)


def _random_rows(rng: np.random.Generator, count: int, dim: int, clip: float) -> np.ndarray:
    """Non-canary rows: random directions, norms from C/2 to 2C (the encoder clips them)."""
    rows = rng.standard_normal((count, dim))
    rows *= (clip * rng.uniform(0.5, 2.0, size=count) / np.linalg.norm(rows, axis=1))[:, None]
    return rows


def run_audit(design: Design, control: str = "honest", calibrated=None) -> dict:
    """One distributed step with the canaries, audited; returns the record's row.
    `control`: honest (the audit), noise-off, dropped-noise or no-canary. `calibrated`: the
    (spec, claim) of `calibrate(design)`, to skip recomputing it."""
    from fedtune.privacy import ddgauss
    from fedtune.privacy import ddgauss_accounting as accounting
    from fedtune.audit.bounds import best_possible_bound, epsilon_lower_bound
    from fedtune.privacy.canaries import coin_flips, guess

    if control not in CONTROLS:
        raise ConfigError(f"--control {control!r}: expected one of {', '.join(CONTROLS)}")
    started = time.monotonic()
    spec, claimed = calibrated or calibrate(design)
    m, t, dim = design.canaries, design.contributors, spec.dim
    rng = np.random.default_rng(design.seed)
    rotation_seed = int(rng.integers(2 ** 62))  # public, announced by the server
    directions = rng.standard_normal((m, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    included = coin_flips(m, rng)  # drawn in every run, the no-canary control too
    inserted = included if control != "no-canary" else np.zeros(m, dtype=bool)
    shares = design.shares_added(control)

    modulus = 1 << spec.bits
    released = np.zeros(spec.padded_dim, dtype=np.int64)
    for node in range(t):
        rows = _random_rows(rng, design.rows_per_node, dim, design.clip)
        if node == 0:
            rows = np.vstack([design.clip * directions[inserted], rows])
        encoded = ddgauss.encode_examples(rows, spec, rotation_seed)
        noise = ddgauss.noise_share(spec) if node < shares else 0  # the first `shares` nodes add theirs
        released = np.mod(released + ddgauss.to_modular(encoded + noise, spec.bits), modulus)  # secure aggregation
    decoded = ddgauss.decode(released, spec, rotation_seed)
    scores = directions @ decoded / design.clip

    r, v = guess(scores, included, design.guesses)
    bound = epsilon_lower_bound(m, r, v, design.delta, design.confidence)
    if shares == 0:
        as_run = None  # no noise: no finite epsilon
    else:
        as_run = accounting.epsilon([accounting.steps_for(spec, 1.0, 1, colluders=t - shares).as_tuple()],
                                    design.delta)
    row = {"control": control, "claimed_epsilon": claimed, "delta": design.delta, "m": m,
           "included": int(inserted.sum()), "r": r, "v": v, "lower_bound": bound,
           "best_possible": best_possible_bound(m, r, design.delta, design.confidence),
           "epsilon_as_run": as_run, "d": dim, "t": t, "shares": shares, "z": spec.noise_multiplier,
           "granularity": spec.granularity, "bits": spec.bits,
           "score_spread": float(np.std(scores[~inserted])),  # in units of C: noise + cross-talk
           "wrapped": ddgauss.wrapped_share(released, spec.bits),
           "seconds": round(time.monotonic() - started, 1)}
    # the audit's own verdict, the same rule for every run; the controls must fail it (or, with
    # no canary, stay near zero), which `as_expected` records
    row["verdict"] = "PASS" if bound <= claimed else "FAIL"
    row["as_expected"], row["why"] = verdict(row)
    return row


def verdict(row: dict) -> tuple[bool, str]:
    """(as expected, why): for the audit, sound (PASS); for a control, the audit behaved as
    it must (noise-off and dropped-noise FAIL the audit, no-canary stays near zero)."""
    bound, claim, control = row["lower_bound"], row["claimed_epsilon"], row["control"]
    if control == "honest":
        if bound <= claim:
            return True, f"sound: lower bound {bound:.3f} <= claimed epsilon {claim:.3f}"
        return False, f"NOT sound: lower bound {bound:.3f} > claimed epsilon {claim:.3f}"
    if control in ("noise-off", "dropped-noise"):
        if bound > claim:
            return True, f"caught: lower bound {bound:.3f} > claimed epsilon {claim:.3f}"
        return False, (f"control FAILED: the audit did not notice ({control}): lower bound {bound:.3f} <= claimed "
                       f"epsilon {claim:.3f}")
    if bound < ABOUT_ZERO:
        return True, f"about zero as it must be: lower bound {bound:.3f}"
    return False, f"control FAILED: with no canary inserted the audit reported lower bound {bound:.3f}"


def run_all(design: Design, echo=print) -> dict:
    """The audit and every control on one calibration; returns the record."""
    calibrated = calibrate(design)
    spec, claimed = calibrated
    echo(f"distributed audit: {design.canaries} canaries, {design.guesses} guesses, t = {design.contributors}, "
         f"d = {spec.dim}, z = {spec.noise_multiplier:.4f}, claimed epsilon {claimed:.3f} at delta {design.delta:g}")
    rows = []
    for control in CONTROLS:
        rows.append(run_audit(design, control, calibrated))
        echo(line(rows[-1]))
    return record_of(design, rows)


def record_of(design: Design, rows: list[dict]) -> dict:
    from fedtune.system.machine import machine_description

    return {"what": "one-run privacy audit of one distributed discrete Gaussian step",
            "command": "python -m simulations.distributed_audit --all --record", "design": asdict(design),
            "machine": machine_description(), "rows": rows}


def line(row: dict) -> str:
    return (f"{row['control']:>13}: {row['shares']}/{row['t']} noise shares, {row['included']} canaries included, "
            f"{row['v']}/{row['r']} right, lower bound {row['lower_bound']:.3f} vs claimed "
            f"{row['claimed_epsilon']:.3f}: audit {row['verdict']}, "
            f"{'as expected' if row['as_expected'] else 'NOT as expected'} ({row['why']}) [{row['seconds']:.0f} s]")


def _number(value, digits: int = 3) -> str:
    return "infinite" if value is None else f"{value:.{digits}f}"


RUN_NAMES = {"honest": "the audit (every node adds its share)", "noise-off": "control: noise off (no share added)",
             "dropped-noise": "control: dropped noise", "no-canary": "control: no canary inserted"}
EXPECTED = {"honest": "PASS", "noise-off": "FAIL (caught)", "dropped-noise": "FAIL (caught)",
            "no-canary": f"bound < {ABOUT_ZERO}"}


def audit_markdown(record: dict, heading: str = "##") -> str:
    """The report section for `record` (what `run_all` returns or the committed JSON), under a
    heading of level `heading` ("#" for a page of its own)."""
    rows = record["rows"]
    first = rows[0]
    design = record["design"]
    lines = [f"{heading} Privacy audit of distributed DP", "",
             "Written by `python -m simulations.distributed_audit --all --record` from "
             "`docs/results/records/audit-distributed.json` (regenerate with `--report-only`; do not edit by hand).", "",
             "The epsilon that distributed DP reports comes from its accountant. This audit tests the mechanism "
             "itself, through the same code a real round runs: every node clips, rotates, scales and rounds its "
             "gradient rows, adds its own share of discrete Gaussian noise, the integer vectors are summed modulo "
             f"2^{first['bits']} as secure aggregation sums them, and the server decodes the sum. It is the one-run "
             "audit of Steinke, Nasr and Jagielski (NeurIPS 2023): a lower bound on epsilon at "
             f"{design['confidence']:.0%} confidence from one run, which a sound mechanism keeps at or below the "
             "epsilon it claims.", "",
             f"Design, fixed before the run: one distributed step (every row used, q = 1) with {first['t']} nodes. "
             f"Node 0 holds {first['m']:,} canaries, each included by a fair coin: a gradient row of norm C "
             f"(the clipping norm) along its own random direction in dimension {first['d']:,}, where random "
             "directions are nearly orthogonal. Every node also holds "
             f"{design['rows_per_node']} ordinary rows the auditor does not know. The noise multiplier "
             f"z = {first['z']:.3f} makes the accountant's epsilon of the step {first['claimed_epsilon']:.3f} at "
             f"delta {first['delta']:g}; granularity {first['granularity']:.3g}, so nothing wraps. The auditor sees "
             "only the decoded sum and scores each canary by its projection on the canary's direction; it guesses "
             f"\"included\" for the {first['r'] // 2} highest scores and \"excluded\" for the "
             f"{first['r'] - first['r'] // 2} lowest.", "",
             "| run | noise shares added | canaries included | right guesses | lower bound | claimed epsilon "
             "| epsilon of the step as it ran | score spread (in C) | audit verdict | must be | as it must be |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        name = RUN_NAMES.get(row["control"], row["control"])
        if row["control"] == "dropped-noise":
            name = (f"control: dropped noise (only {row['shares']} of {row['t']} nodes "
                    f"{'adds its' if row['shares'] == 1 else 'add their'} share)")
        lines.append(f"| {name} | {row['shares']} of {row['t']} | {row['included']:,} of {row['m']:,} | "
                     f"{row['v']} of {row['r']} | {row['lower_bound']:.3f} | {row['claimed_epsilon']:.3f} | "
                     f"{_number(row['epsilon_as_run'], 2)} | {row['score_spread']:.3f} | {row['verdict']} | "
                     f"{EXPECTED.get(row['control'], '')} | {'yes' if row['as_expected'] else 'NO'} |")
    best = max(row["best_possible"] for row in rows)
    seconds = sum(row["seconds"] for row in rows)
    lines += ["", "How to read it:", "",
              f"- The audit passes (PASS) when its lower bound stays at or below the claimed epsilon, and fails "
              "(FAIL) when the bound proves the claim wrong. A one-run bound is "
              f"evidence against a broken mechanism, not an estimate of the true epsilon: even if every guess were "
              f"right, {first['r']} guesses with {first['m']:,} canaries could prove at most {best:.2f}, and a sound "
              "mechanism gives a bound well below its claim.",
              "- Noise off: no node adds noise, the canaries stand out, and the audit must fail: its bound must "
              "exceed the claim. It shows the audit can see a mechanism that gives no privacy.",
              "- Dropped noise: each node's share is sized so that the shares of all the nodes together carry the "
              "noise. If only some add theirs, the noise is smaller by the square root of the share of nodes "
              "that did, and the step's real epsilon is far above the claim (the 'as it ran' column). The audit "
              "must fail it: this is the failure distributed DP relies on enough honest nodes to prevent.",
              "- No canary: the coins are drawn but nothing is inserted, so the guesses are at chance and the bound "
              "must be about zero: a positive bound elsewhere is not an artefact of the guessing.",
              "- Score spread: the standard deviation of the scores of canaries not inserted, in units of C. It "
              "measures the noise the released sum carried along a canary's direction (plus a little crosstalk "
              "from the other canaries and rows): about z with every share, about z / sqrt(t) when one node of t "
              "adds its share, near zero with none.",
              "- The noise shares come from OpenDP's cryptographically secure sampler and cannot be seeded, so a "
              "rerun gives other bounds; the verdicts hold with high probability at this design.", "",
              f"Machine: {record.get('machine', 'not recorded')}. Time: {seconds:.0f} s for the "
              f"{len(rows)} runs.", ""]
    return "\n".join(lines)


def write_record(record: dict, record_path: Path = RECORD) -> None:
    atomic_write_json(record_path, record)


def write_report(record_path: Path = RECORD, report_path: Path = REPORT) -> Path:
    """Render `report_path` from the record at `record_path`."""
    import json

    try:
        record = json.loads(Path(record_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{record_path}: no audit record (run with --all --record first)") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{record_path}: not a JSON audit record ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list) or not record["rows"]:
        raise ConfigError(f"{record_path}: not a distributed audit record (no rows)")
    missing = sorted({key for row in record["rows"] for key in ROW_KEYS if key not in row})
    if missing or not isinstance(record.get("design"), dict):
        raise ConfigError(f"{record_path}: an incomplete audit record (missing {', '.join(missing) or 'design'}); "
                          "rerun with --all --record")
    atomic_write_text(report_path, audit_markdown(record, heading="#"))
    return Path(report_path)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"distributed audit: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    defaults = Design()
    parser = _Parser(prog="python -m simulations.distributed_audit",
                     description="One-run privacy audit of one distributed discrete Gaussian step, with controls.")
    parser.add_argument("--canaries", type=int, default=defaults.canaries, help="m canaries on node 0")
    parser.add_argument("--guesses", type=int, default=defaults.guesses, help="r guesses (half included, half not)")
    parser.add_argument("--contributors", type=int, default=defaults.contributors, help="t nodes in the step")
    parser.add_argument("--epsilon", type=float, default=defaults.target_epsilon, help="the claimed epsilon")
    parser.add_argument("--delta", type=float, default=defaults.delta)
    parser.add_argument("--confidence", type=float, default=defaults.confidence)
    parser.add_argument("--bits", type=int, default=defaults.bits)
    parser.add_argument("--dim", type=int, default=0, help=f"d (default {DIM_PER_CANARY} x canaries, rounded up to a "
                                                           "power of two)")
    parser.add_argument("--rows-per-node", type=int, default=defaults.rows_per_node)
    parser.add_argument("--shares-kept", type=int, default=defaults.shares_kept,
                        help="dropped-noise control: how many nodes still add their share")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="canary directions and coins, other rows")
    parser.add_argument("--control", choices=CONTROLS, default="honest")
    parser.add_argument("--all", action="store_true", help="the audit and every control, as a table")
    parser.add_argument("--record", action="store_true", help="with --all: write the record and the report")
    parser.add_argument("--report-only", action="store_true", help="write the report from the record; run nothing")
    parser.add_argument("--record-file", type=Path, default=RECORD)
    parser.add_argument("--report-file", type=Path, default=REPORT)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.record and not args.all:
        parser.error("--record needs --all (the record holds the audit and every control)")
    if args.report_only and (args.all or args.record):
        parser.error("--report-only runs nothing: leave out --all and --record")
    try:
        if args.report_only:
            print(f"wrote {write_report(args.record_file, args.report_file)}")
            return 0
        design = Design(canaries=args.canaries, guesses=args.guesses, contributors=args.contributors,
                        target_epsilon=args.epsilon, delta=args.delta, confidence=args.confidence, bits=args.bits,
                        dim=args.dim, rows_per_node=args.rows_per_node, shares_kept=args.shares_kept, seed=args.seed)
        if args.all:
            record = run_all(design)
            rows = record["rows"]
            if args.record:
                write_record(record, args.record_file)
                write_report(args.record_file, args.report_file)
                print(f"wrote {args.record_file} and {args.report_file}")
        else:
            rows = [run_audit(design, args.control)]
            print(line(rows[0]))
    except FedtuneError as error:
        print(f"distributed audit: error: {error}", file=sys.stderr)
        return 2
    return 0 if all(row["as_expected"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
