"""Where the harness's default configs live, in one place every harness module can import
without reaching up to the command line."""

from __future__ import annotations

from pathlib import Path


def default_config_path(task: str | None = None) -> str:
    """What `fedtune simulate` runs with no --config: `simulations/default.toml`, or
    `simulations/instruct.toml` (SmolLM2 on tweets-instruct) with `--task instruct`."""
    return str(Path(__file__).resolve().parent / ("instruct.toml" if task == "instruct" else "default.toml"))
