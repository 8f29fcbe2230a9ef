"""The machine a measurement ran on: CPU model, cores, GPU, library versions.

Every benchmark table and results report names its machine, because a ratio measured on a
2-core CPU and one measured on an H100 answer different questions.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

LIBRARIES = ("torch", "opacus", "peft", "transformers", "flwr", "pfl")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """A JSON-ready description of this host and the library versions installed."""
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1)}
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        **{name: _version(name) for name in LIBRARIES},
    }


def machine_description(info: dict | None = None) -> str:
    """One line for a report: 'Intel Xeon ..., 2 cores, no GPU; torch 2.13.0, ...'."""
    info = info or machine()
    gpu = f"GPU {info['gpu']['name']} x{info['gpu']['count']}" if info.get("gpu") else "no GPU"
    versions = ", ".join(f"{name} {info[name]}" for name in LIBRARIES if info.get(name))
    return f"{info['cpu']}, {info['cores']} cores, {gpu}; Python {info['python']}, {versions}"
