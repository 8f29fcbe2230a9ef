"""Where the randomness of every DP mechanism comes from: secret unless asked otherwise.

Seeded noise is no noise. If the party that receives a DP release knows the generator's
seed, it can replay the computation on a candidate dataset and match the release bit for
bit (fedtune's own early code seeded DP-SGD from `training.seed` and the step count, both
known to the server: perfect membership inference at a reported epsilon of 5.5). So:

* By default every generator is seeded, per call, with 64 fresh bits from the operating
  system's entropy pool (`secrets`), never from anything in a message or a config. torch
  draws the Gaussian noise and the Poisson batches from a Mersenne Twister (CPU) or Philox
  (CUDA) generator with that seed: to replay a release, an adversary would have to search
  2^64 seeds per training call. This is not a cryptographically secure generator in the
  sense of Opacus's `secure_mode` (which needs torchcsprng, not installable here), and
  Opacus's own "Secure RNG turned off" warning says so; it is secret, which is what the
  replay attack needs.
* Reproducible randomness exists for simulations and tests only, when a config asks for
  it (`dp.noise_seed >= 0`). Streams are derived from that seed and a stream key (which
  client, which call), and every output of such a run carries `REPRODUCIBLE_LABEL`.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch

REPRODUCIBLE_LABEL = "reproducible noise: not for production"
SECRET_LABEL = "noise seeded from OS entropy per call"
# What Opacus's "Secure RNG turned off" says (once per training call, so fedtune filters it),
# said once per run in fedtune's words; `secure_mode` runs need no such note.
GENERATOR_NOTE = ("DP noise and Poisson batches come from torch's generator, seeded per call from OS entropy: "
                  "secret, but not a cryptographically secure generator (Opacus's dp.secure_mode needs torchcsprng, "
                  "which does not install for current torch)")


class Randomness:
    """A factory of generators: secret (`seed is None`) or reproducible from `seed`."""

    def __init__(self, seed: int | None = None):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"noise seed {seed!r}: expected a whole number >= 0, or None for OS entropy")
        self.seed = seed

    @classmethod
    def from_setting(cls, noise_seed: int) -> "Randomness":
        """`dp.noise_seed`: -1 (the default) means secret; >= 0 means reproducible."""
        return cls(None if noise_seed < 0 else noise_seed)

    @property
    def reproducible(self) -> bool:
        return self.seed is not None

    @property
    def label(self) -> str:
        return REPRODUCIBLE_LABEL if self.reproducible else SECRET_LABEL

    def seed_for(self, *stream: object) -> int:
        """A 64-bit seed: fresh OS entropy, or a hash of (seed, stream) when reproducible."""
        if self.seed is None:
            return secrets.randbits(64)
        digest = hashlib.sha256(repr((self.seed,) + tuple(stream)).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "little")

    def torch_generator(self, *stream: object, device: torch.device | str = "cpu") -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed_for(*stream))
        return generator

    def numpy_generator(self, *stream: object) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng(self.seed_for(*stream))

    def __repr__(self) -> str:
        return f"Randomness({'secret' if self.seed is None else f'seed={self.seed}'})"
