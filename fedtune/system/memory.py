"""How much memory this run holds, so that a leak across rounds shows in metrics.jsonl.

A federation's server records the figure with each round: growth from round to round (in
simulation, of the Ray workers that host the virtual clients) is a leak that a long run
would otherwise only reveal when the host runs out.
"""

from __future__ import annotations


def resident_memory_mb() -> float:
    """Resident memory of this process and its descendants (in simulation: the Ray
    workers that host the virtual clients), in MiB to one decimal."""
    import psutil  # only a server that measures needs it

    total = 0
    for process in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            total += process.memory_info().rss
        except psutil.Error:  # a worker that exited meanwhile
            pass
    return round(total / 2**20, 1)
