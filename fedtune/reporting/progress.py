"""A federation's progress on the console: a bar over rounds, and one logged line a round.

The bar shows where a long run is (and, inside a round, how many nodes have answered); the
logged line is what stays in a terminal or a log file once the bar is gone, so it carries
each round's figures: accuracy, loss, perplexity, the largest epsilon, who was left out.
"""

from __future__ import annotations


class RoundProgress:
    """Live display: a bar over rounds with accuracy, loss and epsilon, plus one line a round."""

    def __init__(self, rounds: int, done: int, log):
        from tqdm.auto import tqdm  # only a run that shows progress needs it

        self.log = log
        self.bar = tqdm(total=rounds, initial=done, desc="rounds", unit="round", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        """A round is done: advance the bar and log its line (`round_line`)."""
        self.bar.set_description_str("rounds", refresh=False)
        self.bar.update(1)
        shown = {k: f"{record[k]:.4f}" for k in ("accuracy", "loss") if isinstance(record.get(k), float)}
        if record.get("epsilon_max") is not None:
            eps = record["epsilon_max"]
            shown["eps"] = eps if isinstance(eps, str) else f"{eps:.3f}"
        self.bar.set_postfix(shown, refresh=True)
        self.bar.clear()  # the logged line goes above the bar, not through it
        self.log(round_line(record))
        self.bar.refresh()

    def inside(self, text: str) -> None:
        """Progress within a round: shown on the bar, not logged."""
        self.bar.set_description_str(text, refresh=True)

    def close(self) -> None:
        self.bar.close()


def round_line(record: dict) -> str:
    """One round's record (a metrics.jsonl line) as the line a log keeps of it."""
    parts = [f"round {record['round']}"]
    for key in ("accuracy", "loss", "perplexity"):
        if isinstance(record.get(key), float):
            parts.append(f"{key} {record[key]:.4f}")
    if record.get("epsilon_max") is not None:
        eps = record["epsilon_max"]
        parts.append(f"epsilon max {eps if isinstance(eps, str) else round(eps, 3)}")
    if record["clients_rejected"] or record["clients_refused"]:
        parts.append(f"rejected {len(record['clients_rejected'])}, refused {len(record['clients_refused'])}")
    parts.append(f"{record['seconds']:.1f}s")
    return ", ".join(parts)
