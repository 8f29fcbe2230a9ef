"""The warnings known to be harmless here, filtered where they arise, unless asked for.

A run on this stack prints pages of chatter that says nothing about the run: PyTorch's
"Full backward hook is firing" for every Opacus step on a frozen base, Opacus's "Optimal
order is the largest alpha", transformers' deprecation notes, Flower's "DEPRECATED
FEATURE" for the simulation entry point and its DEBUG lines. Each is filtered in every
process (Ray workers included), so a real warning stands out. `fedtune --verbose` (or
FEDTUNE_VERBOSE=1) shows them all.

Opacus's "Secure RNG turned off" is true (torch's generator, secretly seeded, is not a
cryptographically secure generator), but Opacus says it once per training call: 25 times
in a default simulation. It is filtered here and said once per run in fedtune's own words
(`fedtune.privacy.randomness.GENERATOR_NOTE`), on the console and in summary.md.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Iterator

VERBOSE_ENV = "FEDTUNE_VERBOSE"
_HARMLESS = ("Full backward hook", "Using a non-full backward hook", "Optimal order", "is_gradient_checkpointing",
             "First batch is empty", "Secure RNG turned off", "Ray will no longer override accelerator")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


@contextmanager
def harmless_warnings_filtered() -> Iterator[None]:
    """Around a block that calls into Opacus / torch / transformers."""
    if verbose():
        yield
        return
    with warnings.catch_warnings():
        for pattern in _HARMLESS:
            warnings.filterwarnings("ignore", message=f".*{pattern}.*")
        yield


class _DropMatching(logging.Filter):
    """Drops records below `level` and those whose message holds one of `patterns`. A
    filter, not a level: Flower sets its logger to DEBUG when it is imported, which may be
    after this runs, and a filter stays."""

    def __init__(self, *patterns: str, level: int = logging.INFO):
        super().__init__()
        self.patterns = patterns
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level and not any(p in record.getMessage() for p in self.patterns)


def quiet_libraries() -> None:
    """Library loggers (Opacus's chatter, Flower's deprecation notices and DEBUG lines) and
    the harmless warnings, for the whole process."""
    if verbose():
        return
    # Each change only when needed: this runs at every training call, and setting a logger's
    # level or adding a warnings filter clears process-wide caches (~10 ms a call measured).
    opacus = logging.getLogger("opacus")
    if opacus.level != logging.ERROR:
        opacus.setLevel(logging.ERROR)
    flower = logging.getLogger("flwr")
    if flower.level != logging.INFO:
        flower.setLevel(logging.INFO)
    if not any(isinstance(f, _DropMatching) for f in flower.filters):
        flower.addFilter(_DropMatching("DEPRECATED FEATURE", "deprecated feature", "entirely in future versions",
                                       "Manually terminating ClientAppActor"))  # Flower's own end of a Ray run
    present = {getattr(f[1], "pattern", None) for f in warnings.filters if f[0] == "ignore"}
    for pattern in _HARMLESS:  # also where no `harmless_warnings_filtered` block is open (accountants, planning)
        if f".*{pattern}.*" not in present:
            warnings.filterwarnings("ignore", message=f".*{pattern}.*")
