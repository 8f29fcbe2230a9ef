"""`fedtune audit`: measure the privacy a node's DP training actually gave, in one run.

Every epsilon fedtune prints is an upper bound computed from parameters. An audit asks
the training itself: it inserts canaries (`fedtune.privacy.canaries`), each included by a
fair coin, trains once with the node's own configuration and data, and reads which
canaries were included from their scores, four ways side by side at 95% confidence: the
Steinke bound on a number of guesses fixed before training (`fedtune.audit.bounds`), the
f-DP one-run bound and the Gaussian DP estimate at the best threshold
(`fedtune.audit.estimators`), and the curve test (`curve_test`: the planned mechanism's own
trade-off curve held against the scores, a proof because they are independent). Each design's ceilings are printed before training. If the
mechanism ran as accounted, the bounds stay below the claimed epsilon, and below the
planned mechanism's tight epsilon (the privacy loss distribution's, `tight_epsilon`) where
the node's accountant is looser: a proven epsilon above that is a leak.

Beside the bound, the white-box gradient canaries measure the mechanism directly: the
scores of the excluded canaries are pure DP noise, N(0, sigma^2 * steps) in units of the
clipping norm, so their spread is a measured noise multiplier; the included canaries'
mean score minus the excluded ones' is q * steps, a measured sample rate. The Steinke bound
can only grow like log(guesses) (a claim of 8 is beyond its reach at a node's delta); the
f-DP bound and the curve test reach it. The measured noise multiplier shows a missing or
too small noise at once, a leak by another route not at all; the verdict uses all of them.

Controls (`--controls`). Leaking ones, each on bundled public data only and charged to a
scratch ledger, whose claim stays the planned one while the mechanism leaks by a known
route; a proof must catch it (an epsilon lower bound above the claim, or the tight epsilon
where that is lower, or the curve test ruling the planned mechanism out): `noise-off`
(noise multiplier 0),
`noise-halved` (half the planned noise), `unnoised-step` (the last step released without
noise, an uncharged step) and `public-sample` (the canaries' Poisson draws known to the
auditor, as a logged batch composition would make them: no amplification by sampling).
And `no-canaries` (coins drawn, nothing inserted: the bound must be about zero and the
noise must measure as planned).

An audit trains on the node's data under DP, so it is charged to that data's budget like
any training (the ledger never under-counts); its adapter is never written or released.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.stats import chi2
from torch.utils.data import TensorDataset

from fedtune.training.dp_train import train_call
from fedtune.errors import ConfigError
from fedtune.training.losses import PerExampleLoss
from fedtune.models.base import trainable_named_parameters
from fedtune.privacy.accountants import compute_epsilon, subsampled_gaussian_pld
from fedtune.audit.bounds import best_possible_bound, epsilon_lower_bound
from fedtune.audit.estimators import ScoreAudit, encode_scores, least_private_ruled_out, tradeoff_from_pld
from fedtune.privacy.canaries import GradientCanaries, guess, input_canaries
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.planning import DPPlan, plan_training
from fedtune.privacy.randomness import Randomness
from fedtune.privacy.spending import require_fit as fits

# Controls whose mechanism leaks by a known route while the claim stays the planned one: the
# audit must catch each. They train on a bundled public dataset only, charged to a scratch
# ledger (what they really spend is more than the claim, by design).
LEAKING = ("noise-off", "noise-halved", "unnoised-step", "public-sample")
CONTROLS = LEAKING + ("no-canaries",)
NOISE_CHECK_CONFIDENCE = 0.999  # the measured noise multiplier's acceptance interval (chi-square)
ABOUT_ZERO = 0.5  # the no-canary control's bound must stay below this
# the curve test's loss discretisation: pessimistic, so coarser only lowers the curve (a
# mechanism is ruled out less readily); 3e-3 keeps a test to a fraction of a second
CURVE_INTERVAL = 3e-3


@dataclass(frozen=True)
class AuditDesign:
    """What an audit inserts and how many guesses it makes, fixed before training."""

    canaries: int = 10000  # gradient canaries (white-box), one adapter coordinate each
    guesses: int = 1000  # of the gradient canaries (Steinke): half "included" (top scores), half "excluded"
    input_canaries: int = 0  # random-token records (black-box); 0 = none
    input_guesses: int = 0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 1 <= self.guesses <= self.canaries:
            raise ConfigError(f"audit --guesses {self.guesses}: expected 1 to --canaries ({self.canaries})")
        if self.input_canaries < 0 or not 0 <= self.input_guesses <= self.input_canaries:
            raise ConfigError(f"audit --input-guesses {self.input_guesses}: expected 0 to --input-canaries "
                              f"({self.input_canaries}), and --input-canaries >= 0")
        if self.input_canaries and not self.input_guesses:
            raise ConfigError("audit --input-canaries needs --input-guesses (how many to guess, fixed before training)")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"audit --confidence {self.confidence}: expected a number in (0, 1), e.g. 0.95")


@dataclass(frozen=True)
class CanaryFinding:
    """One kind of canary's result: the guesses and the bound they prove."""

    kind: str  # "gradient (white-box)" or "input (black-box)"
    canaries: int
    included: int
    guesses: int
    correct: int
    lower_bound: float  # epsilon, at the audit's confidence (Steinke et al., the design's guesses)
    best_possible: float  # the bound if every guess were right: what this design can ever prove
    # the tighter estimators (`fedtune.audit.estimators`), from the scores at the best
    # threshold; NaN in a record written before they existed
    fdp_bound: float = math.nan  # f-DP one-run epsilon lower bound (Gaussian trade-off curve claimed)
    fdp_ceiling: float = math.nan  # the f-DP bound if every included canary outscored every excluded one
    gdp_mu: float = math.nan  # Gaussian DP: lower confidence bound on mu (Clopper-Pearson, all thresholds)
    gdp_epsilon: float = math.nan  # that mu's epsilon at the audit's delta: an estimate (assumes a Gaussian curve)
    gdp_ceiling: float = math.nan
    # the curve test (`curve_test`, independent scores only): whether the scores rule out the
    # planned mechanism itself (a proof of a leak), the smallest noise multiplier of the
    # planned shape they rule out, and that mechanism's epsilon (a lower bound on epsilon
    # among mechanisms of the planned shape: an estimate for any other)
    curve_rejects_planned: bool | None = None
    curve_noise: float = math.nan
    curve_epsilon: float = math.nan
    curve_ceiling: float = math.nan
    # the raw scores (`fedtune.audit.estimators.encode_scores`) of the included and the
    # excluded canaries: a report recomputes every estimator from them
    scores_included: str = dataclasses.field(default="", repr=False)
    scores_excluded: str = dataclasses.field(default="", repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.guesses

    @property
    def tightest_bound(self) -> float:
        """The larger of the two proofs of an epsilon (Steinke's and the f-DP bound); not the
        curve test's figure nor the Gaussian DP estimate, which hold within a family only."""
        return max(self.lower_bound, 0.0 if math.isnan(self.fdp_bound) else self.fdp_bound)


@dataclass(frozen=True)
class NoiseCheck:
    """The mechanism as the gradient canaries measured it, against the plan."""

    planned_noise: float
    measured_noise: float  # std of the excluded canaries' scores / sqrt(steps)
    low: float  # acceptance interval of the measured noise for the planned one
    high: float
    planned_rate: float
    measured_rate: float  # (mean included - mean excluded score) / steps; nan without included canaries
    noise_floor: float = math.nan  # one-sided lower confidence bound on the noise multiplier, from the measurement
    epsilon_as_measured: float = math.nan  # the accountant's epsilon at that floor (planned q, steps, delta)

    @property
    def as_planned(self) -> bool:
        return self.low <= self.measured_noise <= self.high


@dataclass(frozen=True)
class AuditResult:
    control: str  # "" for the audit itself, else the control's name
    claimed_epsilon: float  # this training's own epsilon by the node's accountant (what the node claims for it)
    delta: float
    steps: int
    findings: tuple[CanaryFinding, ...]
    noise: NoiseCheck
    # the planned mechanism's epsilon by the tightest accountant (`tight_epsilon`): the
    # smallest upper bound fedtune can prove for it; nan where none is computed
    tight_epsilon: float = math.nan

    @property
    def lower_bound(self) -> float:
        return max(f.tightest_bound for f in self.findings)

    @property
    def curve_finding(self) -> CanaryFinding | None:
        """The finding whose curve test ran (the white-box canaries'), if any."""
        return next((f for f in self.findings if f.curve_rejects_planned is not None), None)

    @property
    def reference(self) -> tuple[float, str]:
        """What a proven lower bound must stay below: the planned mechanism's tight epsilon
        where it is below the claim (a leak beyond it is a leak, whatever the node's
        accountant printed), else the claim; with the words that name it."""
        claim, tight = self.claimed_epsilon, self.tight_epsilon
        if math.isfinite(tight) and tight < claim:
            return tight, f"the planned mechanism's tight epsilon {tight:.3f} (claimed {claim:.3f})"
        return claim, f"claimed {claim:.3f}"

    def _curve_text(self) -> tuple[bool, str]:
        """(ruled out, words): the curve test's verdict on the planned mechanism."""
        finding = self.curve_finding
        if finding is None:
            return False, ""
        if finding.curve_rejects_planned:
            return True, (f"the planned mechanism is ruled out (noise <= {finding.curve_noise:.3f} vs planned "
                          f"{self.noise.planned_noise:.3f}; that mechanism's epsilon {finding.curve_epsilon:.3f})")
        return False, f"the planned mechanism is not ruled out (curve test epsilon {finding.curve_epsilon:.3f})"

    def verdict(self) -> tuple[bool, str]:
        """(passed, why): for the audit, sound; for a control, the audit behaved as it must.
        A leak is shown by a proof: an epsilon lower bound (Steinke, f-DP) above the limit,
        or the curve test ruling the planned mechanism out; the noise check beside them."""
        bound = self.lower_bound
        limit, named = self.reference
        ruled_out, curve = self._curve_text()
        proven = bound > limit or ruled_out
        proofs = f"lower bound {bound:.3f} {'>' if bound > limit else '<='} {named}" + (f"; {curve}" if curve else "")
        noise = (f"measured noise multiplier {self.noise.measured_noise:.3f} vs planned {self.noise.planned_noise:.3f} "
                 f"(accepted {self.noise.low:.3f}-{self.noise.high:.3f}; epsilon of the mechanism as measured "
                 f"{self.noise.epsilon_as_measured:.3f})")
        if self.control in LEAKING:  # caught by a proof: a leak need not show in the measured noise
            return proven, ("the audit caught the broken mechanism: " if proven
                            else f"control FAILED: no proof caught the {self.control} leak: ") + f"{proofs}; {noise}"
        if self.control == "no-canaries":
            ok = bound < ABOUT_ZERO and not ruled_out and self.noise.as_planned
            return ok, ((f"about zero as it must be: lower bound {bound:.3f}; " if ok else
                         f"control FAILED: with nothing inserted the audit reported lower bound {bound:.3f}"
                         f"{'; ' + curve if curve else ''}; ") + noise)
        if not proven and self.noise.as_planned:
            return True, f"sound: {proofs}; {noise}"
        return False, f"NOT sound: {proofs if proven else 'the noise did not measure as planned'}; {noise}"

    def to_dict(self) -> dict:
        passed, why = self.verdict()
        return {"control": self.control or "none", "claimed_epsilon": self.claimed_epsilon,
                "tight_epsilon": self.tight_epsilon, "delta": self.delta,
                "steps": self.steps, "lower_bound": self.lower_bound, "passed": passed, "verdict": why,
                "findings": [{**dataclasses.asdict(f), "accuracy": f.accuracy} for f in self.findings],
                "noise": dataclasses.asdict(self.noise)}


def claimed_epsilon(config, plan: DPPlan) -> float:
    """The epsilon the node's accountant gives this training alone (every planned call)."""
    return compute_epsilon(plan.noise_multiplier, plan.sample_rate, plan.steps_per_call * plan.planned_calls,
                           plan.delta, config.dp.accountant)


def tight_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The planned mechanism's epsilon by the privacy loss distribution (dp-accounting, with
    pessimistic discretisation: still an upper bound), the tightest accountant fedtune has.
    A node's claim may come from a looser one (RDP by default: 8.0 where the PLD says 6.7 at
    the default node); an audit holds the mechanism to the tight figure, since any proven
    epsilon above it is a leak the accountant does not model."""
    if noise_multiplier <= 0:
        return math.inf
    return compute_epsilon(noise_multiplier, sample_rate, steps, delta, "pld")


def noise_check(scores: np.ndarray, included: np.ndarray, steps: int, plan: DPPlan, accountant: str = "rdp",
                confidence: float = 0.95) -> NoiseCheck:
    """Measured noise multiplier and sample rate from the gradient canaries' scores: an
    excluded canary's score is a sum of `steps` N(0, sigma^2) draws, so sum(score^2) /
    (sigma^2 steps) is chi-square with one degree per excluded canary (the mean is known
    to be 0). The measurement's lower confidence bound on sigma, put through the same
    accountant with the planned q and steps, is the epsilon of the mechanism as measured:
    the claim, re-derived from what the noise actually was (infinite when it was off)."""
    out = scores[~included]
    count = len(out)
    measured = math.sqrt(float(np.mean(out ** 2)) / steps) if count else float("nan")
    tail = (1 - NOISE_CHECK_CONFIDENCE) / 2
    low = plan.noise_multiplier * math.sqrt(chi2.ppf(tail, count) / count) if count else 0.0
    high = plan.noise_multiplier * math.sqrt(chi2.ppf(1 - tail, count) / count) if count else math.inf
    rate = (float(np.mean(scores[included]) - np.mean(out)) / steps) if included.any() and count else float("nan")
    floor = measured * math.sqrt(count / chi2.ppf(confidence, count)) if count else 0.0
    measured_epsilon = (compute_epsilon(floor, plan.sample_rate, steps, plan.delta, accountant)
                        if floor > 1e-6 else math.inf)
    return NoiseCheck(plan.noise_multiplier, measured, low, high, plan.sample_rate, rate, floor, measured_epsilon)


def curve_test(game: ScoreAudit, mechanism: tuple[float, float, int], delta: float,
               confidence: float) -> tuple[bool, float, float]:
    """(ruled out, noise, epsilon) for `mechanism` = (planned sigma, q, steps) of
    Poisson-subsampled Gaussian steps. The trade-off curve of such a mechanism comes from
    its privacy loss distribution (`fedtune.audit.estimators.tradeoff_from_pld`), and the
    scores are held to it at every threshold; valid where the canaries' scores are
    independent, which the white-box canaries' are by construction (each on a coordinate
    of its own, with its own noise, coin and Poisson draws, the records' clipped sum taken
    out).

    * ruled out: whether the scores rule out the planned mechanism itself at `confidence`:
      a proof that the mechanism that ran leaks more than the planned one (false alarm at
      most 1 - confidence, up to the thresholds being read off the same scores);
    * noise: the smallest sigma of the planned shape the scores rule out (inf if none);
    * epsilon: that mechanism's epsilon at `delta` (PLD): a lower bound on the epsilon of
      any mechanism of the planned shape that could have given these scores. For a
      mechanism of another shape (a leak) it is an estimate, not a bound."""
    planned, rate, steps = mechanism

    def rejects(sigma: float) -> bool:
        distribution = subsampled_gaussian_pld(sigma, rate, steps, CURVE_INTERVAL)
        return game.rejects_curve(tradeoff_from_pld(distribution), confidence)

    sigma = least_private_ruled_out(rejects, planned)
    epsilon = 0.0 if math.isinf(sigma) else compute_epsilon(sigma, rate, steps, delta, "pld")
    return rejects(planned), sigma, epsilon


def design_ceilings(included: int, excluded: int, guesses: int, delta: float, confidence: float,
                    mechanism: tuple[float, float, int] | None = None) -> dict[str, float]:
    """What each estimator can ever show with this many canaries in and out: the figure if
    every included canary outscored every excluded one. Known before training."""
    perfect = ScoreAudit(np.ones(max(included, 1)), np.zeros(max(excluded, 1)))
    ceilings = {"steinke": best_possible_bound(included + excluded, guesses, delta, confidence),
                "fdp": perfect.fdp(confidence, delta), "gdp": perfect.gdp(confidence, delta)[1], "curve": math.nan}
    if mechanism is not None and mechanism[0] > 0:
        ceilings["curve"] = curve_test(perfect, mechanism, delta, confidence)[2]
    return ceilings


def canary_finding(kind: str, scores: np.ndarray, included: np.ndarray, guesses: int, delta: float,
                   confidence: float, mechanism: tuple[float, float, int] | None = None,
                   ceilings: dict[str, float] | None = None) -> CanaryFinding:
    """What `scores` prove about the canaries' coins, every estimator side by side with its
    ceiling, the raw scores kept (also the federated audit's finding). `mechanism`: the
    planned (sigma, q, steps), for the curve test, where the scores are independent."""
    r, v = guess(scores, included, guesses)
    if ceilings is None:  # `design_ceilings` of this finding, where the caller has not printed them already
        ceilings = design_ceilings(int(included.sum()), int((~included).sum()), guesses, delta, confidence, mechanism)
    estimates = dict(fdp_bound=math.nan, gdp_mu=math.nan, gdp_epsilon=math.nan)
    if included.any() and (~included).any():
        game = ScoreAudit(scores[included], scores[~included])
        mu, epsilon = game.gdp(confidence, delta)
        estimates = dict(fdp_bound=game.fdp(confidence, delta), gdp_mu=mu, gdp_epsilon=epsilon)
        if mechanism is not None and mechanism[0] > 0:
            (estimates["curve_rejects_planned"], estimates["curve_noise"],
             estimates["curve_epsilon"]) = curve_test(game, mechanism, delta, confidence)
    estimates.update(scores_included=encode_scores(scores[included]), scores_excluded=encode_scores(scores[~included]))
    return CanaryFinding(kind, len(scores), int(included.sum()), r, v,
                         epsilon_lower_bound(len(scores), r, v, delta, confidence), ceilings["steinke"],
                         fdp_ceiling=ceilings["fdp"], gdp_ceiling=ceilings["gdp"], curve_ceiling=ceilings["curve"],
                         **estimates)


def _vocabulary(tokenizer) -> tuple[int, int]:
    """A token id range without special tokens, for random-token canaries."""
    size = len(tokenizer)
    special = max(tokenizer.all_special_ids or [0])
    return (special + 1, size) if special + 1 < size - 100 else (0, size)


@torch.no_grad()
def _losses(model, dataset: TensorDataset, task: str) -> np.ndarray:
    """Per-example loss of every row of `dataset` (eval mode), to score input canaries."""
    criterion, device, out = PerExampleLoss(task), next(model.parameters()).device, []
    was_training = model.training
    model.eval()
    ids, mask, labels = dataset.tensors
    for start in range(0, len(ids), 64):
        logits = model(input_ids=ids[start:start + 64].to(device), attention_mask=mask[start:start + 64].to(device)).logits
        out.append(criterion.per_example(logits.float(), labels[start:start + 64].to(device)).cpu())
    model.train(was_training)
    return torch.cat(out).double().numpy()


def run_audit(node, design: AuditDesign, ledger: PrivacyLedger, persist: Callable[[PrivacyLedger], None] | None,
              control: str = "", echo: Callable[[str], None] = print, randomness: Randomness | None = None,
              require_fit: Callable[[float, float, int, str], None] | None = None) -> AuditResult:
    """Train `node`'s model once with canaries and return what the audit proves.

    `node` is a prepared node (`fedtune.training.local.prepare_node`) whose model is fresh; the
    training follows its config's plan (rounds x epochs of DP-SGD on its rows), charged to
    `ledger` before each call. `control` is "" (the audit), "noise-off" or "no-canaries".
    `require_fit` (an open budget's `Spending.require_fit`) refuses a training that would pass
    the cap before it starts; the ledger's own charge refuses it at the latest."""
    if control not in ("",) + CONTROLS:
        raise ConfigError(f"audit control {control!r}: expected one of {', '.join(CONTROLS)}")
    config, model = node.config, node.model
    if not config.dp.enabled:
        raise ConfigError("dp.enabled = false: an audit measures a DP training; there is no claim to audit")
    randomness = randomness or Randomness.from_setting(config.dp.noise_seed)
    train = node.data.train
    canary_rows = canary_coins = None
    if design.input_canaries:
        if config.model.task != "classification":
            raise ConfigError(f"audit --input-canaries: random-label canaries need model.task = classification "
                              f"(this node's task is {config.model.task}); use gradient canaries only")
        canary_rows, canary_coins = input_canaries(design.input_canaries, train.tensors[0].shape[1],
                                                   _vocabulary(node.tokenizer), len(node.data.label_map), randomness)
        if control != "no-canaries":
            keep = torch.as_tensor(canary_coins)
            train = TensorDataset(*(torch.cat([a, b[keep]]) for a, b in zip(train.tensors, canary_rows.tensors)))
    planned = plan_training(config, len(train), delta=ledger.delta)
    claim = claimed_epsilon(config, planned)
    noise = {"noise-off": 0.0, "noise-halved": planned.noise_multiplier / 2}.get(control, planned.noise_multiplier)
    plan = dataclasses.replace(planned, noise_multiplier=noise)
    total = plan.steps_per_call * plan.planned_calls
    tight = tight_epsilon(planned.noise_multiplier, planned.sample_rate, total, planned.delta)
    require_fit = require_fit or (lambda *mechanism: fits(ledger, *mechanism))
    require_fit(plan.noise_multiplier, plan.sample_rate, total,
                f"the audit{' control ' + control if control else ''} (it trains on the data and is charged like any "
                "training; audit a copy of the data's shape to spend nothing of it)")
    parameters = [p for _, p in trainable_named_parameters(model)]
    canaries = GradientCanaries(parameters, design.canaries, randomness, inject=control != "no-canaries")
    if control == "unnoised-step":
        canaries.unnoised_step = plan.steps_per_call * plan.planned_calls - 1  # the last step, released without noise
    before = _losses(model, canary_rows, config.model.task) if canary_rows is not None else None
    echo(f"fedtune audit{' (control: ' + control + ')' if control else ''}: {design.canaries} gradient canaries "
         f"({int(canaries.included.sum())} included), {design.guesses} guesses"
         + (f"; {design.input_canaries} input canaries ({int(canary_coins.sum())} included), "
            f"{design.input_guesses} guesses" if design.input_canaries else "")
         + f"; {len(train)} training rows, sigma {plan.noise_multiplier:.4f}, q {plan.sample_rate:.4g}, "
         f"{total} steps, claimed epsilon {claim:.3f} (the planned mechanism's tight epsilon {tight:.3f}) at delta "
         f"{plan.delta:.3g}")
    mechanism = (planned.noise_multiplier, planned.sample_rate, total)  # the planned one: the curve test's shape
    reach = design_ceilings(int(canaries.included.sum()), int((~canaries.included).sum()), design.guesses, plan.delta,
                            design.confidence, mechanism)
    echo(f"  what this design can show at most ({design.confidence:.0%} confidence): Steinke bound {reach['steinke']:.3f}, "
         f"f-DP bound {reach['fdp']:.3f}, curve test {reach['curve']:.3f}, Gaussian DP estimate {reach['gdp']:.3f} "
         f"(claimed {claim:.3f})")
    for call in range(1, plan.planned_calls + 1):
        train_call(model, train, config, plan, ledger, persist, label=f"audit{'-' + control if control else ''} "
                   f"call {call}", randomness=randomness, canaries=canaries)
    steps = canaries.steps
    white_box = canaries.public_sample_scores if control == "public-sample" else canaries.likelihood_scores
    findings = [canary_finding("gradient (white-box)", white_box, canaries.included, design.guesses, plan.delta,
                               design.confidence, mechanism, ceilings=reach)]
    if canary_rows is not None:
        scores = before - _losses(model, canary_rows, config.model.task)  # how far each canary's loss fell
        findings.append(canary_finding("input (black-box)", scores, canary_coins, design.input_guesses, plan.delta,
                                     design.confidence))
    # nothing inserted: every canary's score is noise alone
    scored_as_included = canaries.included if canaries.inject else np.zeros(design.canaries, dtype=bool)
    check = noise_check(canaries.scores, scored_as_included, steps, planned, config.dp.accountant, design.confidence)
    return AuditResult(control, claim, plan.delta, steps, tuple(findings), check, tight)


def audit_node(config, design: AuditDesign, controls: tuple[str, ...], out, echo: Callable[[str], None] = print,
               table=None) -> list[AuditResult]:
    """What `fedtune audit` runs: the audit of this node's configuration and data, then the
    controls asked for, each on a fresh model; writes `audit.json` and `audit.md` to `out`.

    The audit and the no-canary control train on the node's rows under DP and are charged
    to that data's budget (the node's budget folder), like any training. The noise-off
    control trains without noise, so it runs only on a bundled public dataset and is
    charged to a scratch ledger in `out` (its epsilon is infinite, and recorded as such)."""
    from pathlib import Path

    from fedtune.system.atomic import atomic_write_json, atomic_write_text
    from fedtune.errors import FedtuneError
    from fedtune.training.local import prepare_node
    from fedtune.privacy.planning import new_ledger
    from fedtune.privacy.spending import spend

    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ConfigError(f"audit --controls {','.join(controls)}: unknown {unknown[0]!r}; expected "
                          f"{' and/or '.join(CONTROLS)}")
    leaking = [c for c in controls if c in LEAKING]
    if leaking and (config.data.path or table is not None and not config.data.dataset):
        raise ConfigError(f"audit --controls {leaking[0]}: leaks by design, so only on a bundled public dataset "
                          f"(data.path is {config.data.path!r}); run it on e.g. --dataset bbc-news")
    out = Path(out)
    if (out / "audit.json").exists():
        raise FedtuneError(f"{out}: already holds an audit (audit.json); choose a new --out")
    results = []
    for control in ("",) + tuple(controls):
        node = prepare_node(config, table)
        if control in LEAKING:
            scratch = new_ledger(config, node.plan, node.data.fingerprint)
            scratch.max_epsilon = None
            out.mkdir(parents=True, exist_ok=True)
            results.append(run_audit(node, design, scratch,
                                     lambda ledger, name=control: ledger.save(out / f"{name}-ledger.json"), control, echo))
        else:
            with spend(config, node.data.record_set, node.plan.delta, f"audit{' control ' + control if control else ''}") \
                    as spending:
                results.append(run_audit(node, design, spending.ledger, spending.persist, control, echo,
                                         require_fit=spending.require_fit))
        echo(report_line(results[-1]))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "audit.json", {"design": dataclasses.asdict(design), "results": [r.to_dict() for r in results]})
    atomic_write_text(out / "audit.md", audit_markdown(results))
    return results


def _estimates(f: CanaryFinding) -> str:
    """The tighter estimators of one finding, each with its design's ceiling."""
    if math.isnan(f.fdp_bound):
        return ""
    curve = ("" if math.isnan(f.curve_epsilon) else
             f"; curve test: planned mechanism {'RULED OUT' if f.curve_rejects_planned else 'not ruled out'}, "
             f"epsilon {f.curve_epsilon:.3f} (noise <= {f.curve_noise:.3f}; at most {f.curve_ceiling:.3f})")
    return (f"; f-DP bound {f.fdp_bound:.3f} (at most {f.fdp_ceiling:.3f}){curve}; Gaussian DP estimate mu >= "
            f"{f.gdp_mu:.3f}, epsilon {f.gdp_epsilon:.3f} (at most {f.gdp_ceiling:.3f})")


def report_line(result: AuditResult) -> str:
    findings = "; ".join(f"{f.kind}: {f.correct}/{f.guesses} right ({f.accuracy:.1%}) of {f.canaries} canaries, "
                         f"Steinke bound {f.lower_bound:.3f} (this design proves at most {f.best_possible:.3f})"
                         + _estimates(f) for f in result.findings)
    name = f"control {result.control}" if result.control else "audit"
    tight = f", tight {result.tight_epsilon:.3f}" if math.isfinite(result.tight_epsilon) else ""
    return f"{name}: claimed epsilon {result.claimed_epsilon:.3f}{tight} (delta {result.delta:.3g}); {findings}; " \
           f"{result.verdict()[1]}"


TABLE_HEADER = ("| run | claimed epsilon (tight) | delta | canaries | guesses right | Steinke bound / max | "
                "f-DP bound / max | curve test / max | Gaussian DP mu, epsilon estimate / max | noise measured / "
                "planned | epsilon as measured | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def _figure(finding: dict, value: str, ceiling: str) -> str:
    """'value / ceiling' for an estimator the record carries, '-' where it predates it."""
    if any(finding.get(key) is None or math.isnan(float(finding[key])) for key in (value, ceiling)):
        return "-"
    return f"{float(finding[value]):.3f} / {float(finding[ceiling]):.3f}"


def _gdp(finding: dict) -> str:
    if finding.get("gdp_mu") is None or finding.get("gdp_epsilon") is None:
        return "-"
    return f"{float(finding['gdp_mu']):.3f}, {float(finding['gdp_epsilon']):.3f} / {float(finding['gdp_ceiling']):.3f}"


def markdown_row(result: dict, finding: dict) -> str:
    """One finding of an audit run (`AuditResult.to_dict`, or a committed record of one) as a
    row of `TABLE_HEADER`."""
    noise, run = result["noise"], "audit" if result["control"] in ("", "none") else result["control"]
    verdict = f"{'pass' if result['passed'] else 'FAIL'}: {result['verdict'].split(':')[0]}"
    tight = result.get("tight_epsilon")
    claimed = f"{float(result['claimed_epsilon']):.3f}" + (f" ({float(tight):.3f})" if tight is not None else "")
    return (f"| {run} ({finding['kind']}) | {claimed} | {float(result['delta']):.3g} | "
            f"{finding['canaries']} ({finding['included']} in) | {finding['correct']}/{finding['guesses']} "
            f"({finding['correct'] / finding['guesses']:.1%}) | {_figure(finding, 'lower_bound', 'best_possible')} | "
            f"{_figure(finding, 'fdp_bound', 'fdp_ceiling')} | {_figure(finding, 'curve_epsilon', 'curve_ceiling')} | "
            f"{_gdp(finding)} | {float(noise['measured_noise']):.3f} / "
            f"{float(noise['planned_noise']):.3f} | {float(noise['epsilon_as_measured']):.3f} | {verdict} |")


def audit_markdown(results: list[AuditResult]) -> str:
    """The audit's table: every estimator beside the claim, for the audit and each control."""
    rows = [markdown_row(r.to_dict(), f) for r in results for f in r.to_dict()["findings"]]
    return "\n".join([TABLE_HEADER, *rows]) + "\n"


def overall(results: list[AuditResult]) -> tuple[bool, str]:
    """Sound only if the audit is sound and every control behaved; else which failed."""
    failed = [r for r in results if not r.verdict()[0]]
    if not failed:
        return True, "audit sound" + (f"; controls passed: {', '.join(r.control for r in results if r.control)}"
                                      if len(results) > 1 else "")
    first = failed[0]
    what = f"control {first.control} failed" if first.control else "the audit is NOT sound"
    return False, f"{what}: {first.verdict()[1]}"
