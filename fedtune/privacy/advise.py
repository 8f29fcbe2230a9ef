"""`fedtune privacy advise`: can a federation of this shape learn under this budget?

Before anything runs, from the shape alone (rows per client, clients per round, rounds,
local epochs, batch size, trainable parameters) and the target epsilon, it gives the
DP-SGD mechanism fedtune would use (noise multiplier, sample rate, steps: the same
planning code as training) and the expected noise-to-signal ratio of the update:

    per step, one node:     sigma * sqrt(d) / B
    per round, averaged:    sigma * sqrt(d) / (B * sqrt(T_round * K))
    over the run:           sigma * sqrt(d) / (B * sqrt(T * K))

for d trainable parameters, expected batch B, T_round local steps per round, K clients
averaged, T steps in all: the L2 norm of the Gaussian noise (sigma C per coordinate, over
the batch) against the largest possible signal (the clipped mean gradient, norm C, all
steps and clients pointing the same way). A ratio well above 1 means the noise can drown
even a perfectly consistent gradient; real gradients are less consistent, so the
thresholds below are conservative readings, to be checked against measured runs
(issue 14's results report).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fedtune.privacy.accountants import noise_for_budget
from fedtune.privacy.planning import poisson_schedule


@dataclass(frozen=True)
class Advice:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    steps: int
    delta: float
    nsr_step: float
    nsr_round: float
    nsr_run: float
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(nsr_run: float) -> str:
    if nsr_run < 1:
        return "the noise is below the largest possible signal over the run: the regime can learn"
    if nsr_run < 3:
        return "borderline: expect a large gap to non-private; more rows per client or fewer parameters help most"
    return ("noise dominates: expect little beyond the class prior; bring more rows per client (a larger batch "
            "at the same sample rate), fewer trainable parameters (FFA-LoRA halves them) or a larger epsilon")


def advise(rows: int, clients: int, rounds: int, epochs: int, batch_size: int, epsilon: float, params: int,
           delta: float = 0.0, accountant: str = "rdp") -> Advice:
    q, per_epoch = poisson_schedule(rows, batch_size)
    per_round = per_epoch * epochs
    steps = per_round * rounds
    delta = delta or 1.0 / (10 * rows)
    sigma = noise_for_budget(epsilon, delta, q, steps, accountant)
    expected_batch = q * rows
    step = sigma * math.sqrt(params) / expected_batch
    return Advice(sigma, q, per_round, steps, delta, step, step / math.sqrt(per_round * clients),
                  step / math.sqrt(steps * clients), verdict(step / math.sqrt(steps * clients)))
