"""The machine a benchmark ran on: CPU model, cores, GPU, library versions."""

import platform
from pathlib import Path

import torch


def machine() -> dict:
    import opacus
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }
