"""fedtune: private federated fine-tuning of LoRA adapters.

The core library, one package per concern, lowest first: `system`, `data`, `models`,
`privacy`, `training`, `federation`, `reporting`, `audit`; `config` and `errors` are shared
by all, `cli` sits on top (tests/test_layers.py keeps the arrows pointing down). It never
imports Flower: everything that decides a privacy guarantee or an aggregate is plain
torch / numpy, testable without a federation.
"""

__version__ = "0.1.0"

API_GROUP = "fedtune.api"  # entry points other packages provide for the functions below


def simulate(config=None, overrides=None, **options):
    """Run a simulation on this host and return its tables: `RunResult` with `metrics`
    (one row per round), `ledger` (every client's ledger entries), `clients` (pandas
    DataFrames) and `run_dir`. `config`: a TOML path, a `Config`, or a mapping of overrides
    such as `{"dp.target_epsilon": 3}` on the default simulation; `overrides` go on top;
    options: `out`, `cpus_per_client`, `gpus_per_client`, `log_to`, `engine`, `log`.

    The harness lives in the `simulations` package; the core finds it through the
    `fedtune.api` entry point, as the CLI finds its commands, and never imports it."""
    from importlib.metadata import entry_points

    from fedtune.errors import FedtuneError

    found = [e for e in entry_points(group=API_GROUP) if e.name == "simulate"]
    if not found:
        raise FedtuneError("fedtune.simulate: the simulation harness is not installed (pip install -e . from the "
                           "repository installs the simulations package with the core)")
    return found[0].load()(config, overrides, **options)


def load_run(run_dir):
    """A run directory's tables (`fedtune.reporting.frames.load_run`), e.g. of an earlier simulation."""
    from fedtune.reporting.frames import load_run as load

    return load(run_dir)
