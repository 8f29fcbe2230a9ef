"""Finding the Flower commands fedtune starts (SuperLink, SuperNode): one neutral place that
the server and client packages both use, without importing Flower itself."""

from __future__ import annotations

import shutil

from fedtune.errors import ConfigError


def flower_executable(name: str) -> str:
    """The path of a Flower command installed with fedtune, or a one-line error."""
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name}: not found on PATH; install fedtune (it brings flwr) in this environment")
    return found
