"""The console display of a federation's rounds (`fedtune.reporting.progress`) and the
memory probe recorded with each round (`fedtune.system.memory`), in their core homes."""

import math

from fedtune.reporting.progress import RoundProgress, round_line
from fedtune.system.memory import resident_memory_mb


def _record(**values) -> dict:
    return {"round": 3, "clients_rejected": [], "clients_refused": [], "seconds": 12.34, **values}


def test_a_round_line_carries_the_rounds_figures():
    line = round_line(_record(accuracy=0.81234, loss=0.456789, epsilon_max=2.71828,
                              clients_rejected=[{"node": 1}], clients_refused=[{"node": 2}, {"node": 3}]))
    assert line == "round 3, accuracy 0.8123, loss 0.4568, epsilon max 2.718, rejected 1, refused 2, 12.3s"


def test_a_round_line_leaves_out_what_the_round_did_not_measure():
    line = round_line(_record(perplexity=7.0, epsilon_max="inf (no DP)"))
    assert line == "round 3, perplexity 7.0000, epsilon max inf (no DP), 12.3s"


def test_the_display_logs_one_line_a_round_and_nothing_within_one():
    logged = []
    progress = RoundProgress(rounds=4, done=2, log=logged.append)
    progress.inside("round 3: 1/2 nodes trained")
    progress.update(_record(accuracy=0.5, loss=1.25))
    progress.close()
    assert logged == ["round 3, accuracy 0.5000, loss 1.2500, 12.3s"]
    assert progress.bar.n == 3  # a resumed run's bar starts at the rounds already done


def test_the_memory_probe_measures_this_process():
    resident = resident_memory_mb()
    assert math.isfinite(resident) and resident > 10  # a Python interpreter alone holds more than 10 MiB
    assert resident == round(resident, 1)
