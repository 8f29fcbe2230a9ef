"""fedtune's benchmark scripts, and the generator of docs/benchmarks.md (`python -m benchmarks.report`).

A regular package on purpose: opacus installs a top-level package also named `benchmarks`,
and a folder without this file would lose to it, so `python -m benchmarks.report` would
not find the generator. The scripts still run as files (`python benchmarks/run_all.py`).
"""
