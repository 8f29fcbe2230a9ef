"""Finding the Flower commands fedtune starts (SuperLink, SuperNode): one neutral place that
the server and client packages both use, without importing Flower itself."""

from __future__ import annotations

import os
import shutil

from fedtune.errors import ConfigError


def flower_environment() -> None:
    """Defaults for the Flower processes fedtune runs or starts (SuperLink, SuperNode, the
    simulation engine), unless the operator set them: apps come from this installation,
    never from a runtime `uv sync`; and no usage reports to telemetry.flower.ai from a
    machine beside private data (Flower reads this when its telemetry module loads)."""
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def flower_executable(name: str) -> str:
    """The path of a Flower command installed with fedtune, or a one-line error."""
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name}: not found on PATH; install fedtune (it brings flwr) in this environment")
    return found
