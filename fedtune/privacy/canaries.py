"""Canaries for a one-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023).

Two kinds, both included in the training by an independent fair coin each:

* **Gradient canaries** (white-box): canary i is a record whose clipped gradient is
  C * e_j for its own adapter coordinate j (a Dirac canary: distinct coordinates, so the
  canaries never interfere). In every DP-SGD step an included canary joins the batch
  with the records' Poisson rate q, its gradient is added to the clipped sum before the
  noise, exactly where a record's would be. The auditor is the node itself, so it scores
  each canary by what the noised sum put on its coordinate beyond the records' own
  clipped contribution, summed over every step: q * (steps) + noise for an included
  canary, noise alone for an excluded one. That score is independent of the private
  rows (their contribution is subtracted exactly), which is the strongest auditor the
  add/remove-one-record guarantee is about: one that knows every other record.
* **Input canaries** (black-box): records of random tokens with random labels, added
  to the node's training rows; scored by how much their loss fell between the initial
  and the trained model. Weak against DP-SGD (as the paper reports), but it audits the
  whole pipeline a record goes through, data loader included.

The canaries never touch a normal run: only `fedtune audit` builds them, and `train_call`
receives them as an explicit argument that every other caller leaves at None.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedtune.errors import ConfigError
from fedtune.privacy.randomness import Randomness


def coin_flips(count: int, rng: np.random.Generator, include: str = "coin") -> np.ndarray:
    """Which canaries are included: a fair coin each ("coin"), or none ("none": the
    no-canary control, whose bound must come out at about zero)."""
    if include == "none":
        return np.zeros(count, dtype=bool)
    return rng.random(count) < 0.5


class GradientCanaries:
    """m Dirac gradient canaries on distinct trainable coordinates of `parameters`, with
    their coins, their per-step Poisson draws and their accumulated white-box scores."""

    def __init__(self, parameters: list[torch.Tensor], count: int, randomness: Randomness, include: str = "coin",
                 inject: bool = True):
        sizes = [p.numel() for p in parameters]
        total = sum(sizes)
        if not 1 <= count <= total:
            raise ConfigError(f"audit --canaries {count}: expected 1 to {total:,} (one distinct trainable adapter "
                              "coordinate per gradient canary)")
        rng = randomness.numpy_generator("audit", "gradient canaries")
        self.count = count
        self.coordinates = np.sort(rng.choice(total, size=count, replace=False))
        self.included = coin_flips(count, rng, include)
        self.inject = inject  # False: the no-canary control (coins drawn, nothing inserted)
        self.scores = np.zeros(count)
        self.likelihood_scores = np.zeros(count)  # the white-box likelihood-ratio scores (see `attach`)
        # what an auditor who also saw each canary's Poisson draws would score (the
        # public-sample control): the likelihood ratio over the steps that drew it, unsubsampled
        self.public_sample_scores = np.zeros(count)
        self.unnoised_step: int | None = None  # a leaking control: this step's noise left out
        self.steps = 0
        self._draws = randomness.torch_generator("audit", "gradient canary sampling")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        self._by_parameter = []  # (parameter index, canary ids, flat offsets in that parameter)
        for index in range(len(parameters)):
            ids = np.nonzero((self.coordinates >= starts[index]) & (self.coordinates < starts[index + 1]))[0]
            if len(ids):
                self._by_parameter.append((index, torch.as_tensor(ids),
                                           torch.as_tensor(self.coordinates[ids] - starts[index])))

    def attach(self, dp_optimizer, sample_rate: float) -> None:
        """Insert the canaries into `dp_optimizer`'s noise step for this training call.

        Opacus's `add_noise` turns each parameter's clipped sum (`summed_grad`) into
        `grad = summed_grad + N(0, (sigma C)^2)`, once per logical step (after the last
        physical chunk). The wrapper adds the sampled included canaries to the clipped sum
        first, then reads off, per canary coordinate, the released value minus the
        records' clipped sum."""
        parameters = dp_optimizer.params
        noise_step = dp_optimizer.add_noise
        sampled_rate = float(sample_rate)

        def add_noise_with_canaries():
            clip = dp_optimizer.max_grad_norm
            drawn = torch.rand(self.count, generator=self._draws) < sampled_rate
            sampled = drawn & torch.as_tensor(self.included)
            sampled &= self.inject
            records = []
            for index, ids, offsets in self._by_parameter:
                flat = parameters[index].summed_grad.view(-1)
                records.append(flat[offsets].clone())
                contribution = sampled[ids].to(flat.dtype) * clip
                flat.index_add_(0, offsets.to(flat.device), contribution.to(flat.device))
            planned_sigma = dp_optimizer.noise_multiplier
            if self.steps == self.unnoised_step:
                dp_optimizer.noise_multiplier = 0.0
            try:
                sigma = float(dp_optimizer.noise_multiplier)
                noise_step()
            finally:
                dp_optimizer.noise_multiplier = planned_sigma
            for (index, ids, offsets), own in zip(self._by_parameter, records):
                released = parameters[index].grad.reshape(-1)[offsets.to(own.device)]
                observed = ((released - own) / clip).double().cpu().numpy()
                self.scores[ids.numpy()] += observed
                self.likelihood_scores[ids.numpy()] += step_log_likelihood_ratio(observed, sampled_rate, sigma)
                self.public_sample_scores[ids.numpy()] += np.where(
                    drawn[ids].numpy(), step_log_likelihood_ratio(observed, 1.0, sigma), 0.0)
            self.steps += 1

        dp_optimizer.add_noise = add_noise_with_canaries


def step_log_likelihood_ratio(observed: np.ndarray, rate: float, sigma: float) -> np.ndarray:
    """log P(x | canary included) / P(x | excluded) for one step's observation x of each
    canary's coordinate (in clipping norms): x ~ N(0, sigma^2) excluded, the mixture
    (1 - q) N(0, sigma^2) + q N(1, sigma^2) included. Summed over the steps, the most
    powerful test of included against excluded (Neyman-Pearson): the white-box score whose
    trade-off is the mechanism's own, where the plain sum of x throws the sampling away.
    Without noise (sigma 0) an observation is 0 or 1 exactly: +inf for 1, log(1 - q) for 0."""
    if sigma <= 0:
        return np.where(observed > 0.5, np.inf, math.log1p(-rate) if rate < 1 else -np.inf)
    shifted = (2 * observed - 1) / (2 * sigma ** 2)
    return np.logaddexp(math.log1p(-rate) if rate < 1 else -np.inf, math.log(rate) + shifted)


def input_canaries(count: int, length: int, vocab: tuple[int, int], num_labels: int, randomness: Randomness,
                   include: str = "coin") -> tuple[TensorDataset, np.ndarray]:
    """`count` records of `length` random token ids in [vocab[0], vocab[1]) with random
    labels, and their coins. Full attention: every token is content."""
    if count < 1:
        raise ConfigError(f"audit --input-canaries {count}: expected a whole number >= 1")
    rng = randomness.numpy_generator("audit", "input canaries")
    ids = torch.as_tensor(rng.integers(vocab[0], vocab[1], size=(count, length)), dtype=torch.long)
    labels = torch.as_tensor(rng.integers(0, num_labels, size=count), dtype=torch.long)
    return TensorDataset(ids, torch.ones_like(ids), labels), coin_flips(count, rng, include)


def guess(scores: np.ndarray, included: np.ndarray, guesses: int) -> tuple[int, int]:
    """The one-run audit's guesses, their number fixed before training: "included" for the
    `guesses // 2` highest scores, "excluded" for the `guesses - guesses // 2` lowest,
    abstain on the rest. Returns (r guesses made, v of them right)."""
    count = len(scores)
    if not 1 <= guesses <= count:
        raise ConfigError(f"audit --guesses {guesses}: expected 1 to the {count} canaries")
    order = np.argsort(scores, kind="stable")
    positive = order[count - guesses // 2:] if guesses // 2 else order[:0]
    negative = order[:guesses - guesses // 2]
    right = int(included[positive].sum()) + int((~included[negative]).sum())
    return guesses, right


class UpdateCanaries:
    """Canary clients for auditing user-level DP-FedAvg (`fedtune.federation.strategy.Strategy`).

    Canary client i's update is S * e_j for its own coordinate j of the travelling adapter
    (S the user-level clipping norm): already clipped, so it moves the sum exactly as much
    as one real node may. An included canary client joins each round with the cohort's
    accounted sampling rate, as a node would; the server's released noisy sum, minus the
    real nodes' clipped sum (which the auditing server holds), scores it."""

    def __init__(self, reference: dict[str, np.ndarray], count: int, randomness: Randomness, include: str = "coin",
                 inject: bool = True):
        self.keys = list(reference)
        sizes = [int(np.asarray(reference[k]).size) for k in self.keys]
        total = sum(sizes)
        if not 1 <= count <= total:
            raise ConfigError(f"federated audit: {count} canary clients; expected 1 to {total:,} (one distinct "
                              "coordinate of the travelling adapter each)")
        rng = randomness.numpy_generator("audit", "canary clients")
        self.count, self.inject, self.rounds = count, inject, 0
        self.coordinates = np.sort(rng.choice(total, size=count, replace=False))
        self.included = coin_flips(count, rng, include)
        self.scores = np.zeros(count)  # the plain sum of each round's observation (the noise check reads it)
        self.likelihood_scores = np.zeros(count)  # the white-box likelihood-ratio score (the estimators read it)
        self._draws = randomness.numpy_generator("audit", "canary client sampling")
        self._starts = np.concatenate([[0], np.cumsum(sizes)])

    def _locate(self):
        for index, key in enumerate(self.keys):
            ids = np.nonzero((self.coordinates >= self._starts[index]) & (self.coordinates < self._starts[index + 1]))[0]
            if len(ids):
                yield key, ids, self.coordinates[ids] - self._starts[index]

    def updates(self, reference: dict[str, np.ndarray], clip: float, sample_rate: float) -> list[dict[str, np.ndarray]]:
        """This round's participating canary clients, summed into one update (the sum is all
        the mechanism sees)."""
        joined = (self._draws.random(self.count) < sample_rate) & self.included & self.inject
        total = {k: np.zeros(np.asarray(v).shape, np.float64) for k, v in reference.items()}
        for key, ids, offsets in self._locate():
            flat = total[key].reshape(-1)
            flat[offsets] += joined[ids] * clip
        return [total]

    def score(self, released_sum: dict[str, np.ndarray], nodes_sum: dict[str, np.ndarray], clip: float,
              sample_rate: float = 1.0, noise_multiplier: float = 0.0) -> None:
        """Add this round's released noisy sum minus the real nodes' clipped sum, per canary
        (in clipping norms: 1 if the canary joined, plus N(0, z^2)), and its log likelihood
        ratio under the planned rate and noise multiplier (`step_log_likelihood_ratio`)."""
        for key, ids, offsets in self._locate():
            released = np.asarray(released_sum[key], np.float64).reshape(-1)[offsets]
            own = np.asarray(nodes_sum[key], np.float64).reshape(-1)[offsets]
            observed = (released - own) / clip
            self.scores[ids] += observed
            self.likelihood_scores[ids] += step_log_likelihood_ratio(observed, sample_rate, noise_multiplier)
        self.rounds += 1
