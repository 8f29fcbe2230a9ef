"""`fedtune privacy ...`: the accounting commands, one registry entry each.

`PRIVACY_COMMANDS` maps a subcommand to its help, its arguments and what it runs; the
parser is built from it, so a new subcommand is one entry here (and its test). Heavy
libraries (Opacus, dp-accounting, torch) load inside the commands, after the arguments
parse. Accountant choices come from `fedtune.privacy.accountants.ACCOUNTANTS`, so the help
never drifts from what the ledger accepts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, NamedTuple

from fedtune.errors import ConfigError
from fedtune.privacy.accountants import ACCOUNTANTS


class PrivacyCommand(NamedTuple):
    help: str
    add_arguments: Callable  # (subparser) -> None
    run: Callable            # (args) -> exit code


def _add_accountant(parser) -> None:
    parser.add_argument("--accountant", default="rdp", choices=list(ACCOUNTANTS),
                        help="; ".join(f"{name}: {entry.help}" for name, entry in ACCOUNTANTS.items())
                        + " (default rdp)")


def _add_mechanism(parser) -> None:
    parser.add_argument("--sample-rate", type=float, help="Poisson sample rate q (or give --examples and --batch-size)")
    parser.add_argument("--examples", type=int, help="training examples n (q = 1/ceil(n/B))")
    parser.add_argument("--batch-size", type=int, help="expected batch size B")
    parser.add_argument("--steps", type=int, help="optimizer steps (or give --epochs [--rounds])")
    parser.add_argument("--epochs", type=int, help="epochs per round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (default 1)")
    parser.add_argument("--delta", type=float, required=True)
    _add_accountant(parser)


def _mechanism(args) -> tuple[float, int]:
    """(sample rate, steps) from --sample-rate or --examples/--batch-size, and --steps or
    --epochs/--rounds: the schedule training itself runs."""
    if args.sample_rate is not None:
        q = args.sample_rate
        steps_per_epoch = math.ceil(1 / q) if q and q > 0 else 0
    elif args.examples and args.batch_size:
        if args.batch_size <= 0 or args.examples < args.batch_size:
            raise ConfigError(f"--batch-size = {args.batch_size}: expected 1 to --examples = {args.examples}")
        from fedtune.privacy.planning import poisson_schedule

        q, steps_per_epoch = poisson_schedule(args.examples, args.batch_size)  # exactly what training runs
    else:
        raise ConfigError("give --sample-rate, or --examples and --batch-size")
    if args.steps is not None:
        steps = args.steps
    elif args.epochs:
        steps = steps_per_epoch * args.epochs * args.rounds
    else:
        raise ConfigError("give --steps, or --epochs (and --rounds)")
    return q, steps


def _inputs(args, q: float, steps: int) -> str:
    from opacus import __version__ as opacus_version

    return f"sample_rate={q:.6g} steps={steps} delta={args.delta:g} accountant={args.accountant} (opacus {opacus_version})"


# -- epsilon, plan -------------------------------------------------------------------------
def _epsilon_arguments(parser) -> None:
    parser.add_argument("--noise-multiplier", type=float, required=True)
    _add_mechanism(parser)


def _run_epsilon(args) -> int:
    from fedtune.privacy import compute_epsilon

    q, steps = _mechanism(args)
    eps = compute_epsilon(args.noise_multiplier, q, steps, args.delta, args.accountant)
    print(f"epsilon = {eps:.6f}  for noise_multiplier={args.noise_multiplier:g} {_inputs(args, q, steps)}")
    return 0


def _plan_arguments(parser) -> None:
    parser.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    _add_mechanism(parser)


def _run_plan(args) -> int:
    from fedtune.privacy import compute_epsilon, noise_for_budget

    q, steps = _mechanism(args)
    sigma = noise_for_budget(args.epsilon, args.delta, q, steps, args.accountant)
    achieved = compute_epsilon(sigma, q, steps, args.delta, args.accountant)
    print(f"noise_multiplier = {sigma:.6f}  gives epsilon {achieved:.6f} <= target {args.epsilon:g} for "
          f"{_inputs(args, q, steps)}")
    return 0


# -- owners, ledger ------------------------------------------------------------------------
def _run_owners(args) -> int:
    from fedtune.privacy.policy import ownership_markdown

    print(ownership_markdown(), end="")
    return 0


def _ledger_arguments(parser) -> None:
    parser.add_argument("path", help="a ledger file (a budget folder's ledger-*.json, or a run's ledger.json; "
                        "`fedtune budget` lists a budget folder's ledgers with the data each protects)")


def _run_ledger(args) -> int:
    from opacus import __version__ as opacus_version

    from fedtune.privacy import PrivacyLedger, independent_epsilon
    from fedtune.privacy.accountants import accountant_named

    ledger = PrivacyLedger.load(args.path)
    if not ledger.is_private:
        print(f"epsilon = inf: {ledger.non_private_steps} steps were taken WITHOUT differential privacy")
        return 0
    entry = accountant_named(ledger.accountant)
    library, other = (name.replace("Opacus", f"Opacus {opacus_version}") for name in (entry.library, entry.check_library))
    if ledger.without_replacement:  # only dp-accounting implements sampling without replacement
        library, other = "dp-accounting rdp, replace-one", "dp-accounting, recomputed"
    print(f"epsilon = {ledger.epsilon():.6f} ({library}, {ledger.accountant}), "
          f"{independent_epsilon(ledger.accountant, ledger.history, ledger.delta, ledger.without_replacement):.6f}"
          f" ({other}) at delta {ledger.delta:g}; cap {ledger.max_epsilon}; history (sigma, q, steps): "
          + "; ".join(f"({s:g}, {q:.6g}, {n})" for s, q, n in ledger.history)
          + ("; without replacement (sigma, N, m, rounds): "
             + "; ".join(f"({s:g}, {big}, {m}, {r})" for s, big, m, r in ledger.without_replacement)
             if ledger.without_replacement else ""))
    return 0


# -- advise --------------------------------------------------------------------------------
def _advise_arguments(parser) -> None:
    parser.add_argument("--rows-per-client", dest="rows", type=int, required=True, help="training rows per client")
    parser.add_argument("--clients", type=int, required=True, help="clients averaged per round")
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    parser.add_argument("--batch-size", type=int, required=True, help="expected Poisson batch size")
    parser.add_argument("--epsilon", type=float, required=True, help="target epsilon per client")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4, the calibration recipe's)")
    parser.add_argument("--top-layers", type=int, default=1,
                        help="LoRA on the last N transformer blocks (default 1; 0 = every block)")
    parser.add_argument("--classes", type=int, default=2, help="classes of the classification head (default 2)")
    parser.add_argument("--ffa", action="store_true", help="FFA-LoRA: A frozen, only B trains")
    parser.add_argument("--model", default="", help="base model: a bundled name or a local folder (default: the "
                                                    "bundled all-MiniLM-L6-v2); only its config.json is read")
    parser.add_argument("--params", type=int, default=None,
                        help="trainable parameters, given instead of derived from --model, --rank, --top-layers "
                             "and --classes")
    parser.add_argument("--data", default="", help="probe the gradients' coherence on a sample of this node's rows: "
                                                   "a CSV/JSONL/Parquet file (text, label) or a built-in dataset name")
    parser.add_argument("--probe-rows", type=int, default=128, help="rows the probe samples (default 128)")
    parser.add_argument("--max-seq-len", type=int, default=32, help="the probe's tokens per row (default 32)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="the probe's clipping norm C (default 1)")
    parser.add_argument("--delta", type=float, default=0.0, help="default 1/(10 x rows per client)")
    _add_accountant(parser)


def _advise_parameters(args) -> tuple[int, str]:
    """The trainable parameters advise counts and where the number came from."""
    from fedtune.privacy.advise import model_config_json, trainable_parameters

    if args.params is not None:
        if args.params <= 0:
            raise ConfigError(f"--params = {args.params}: expected a whole number > 0")
        return args.params, "given by --params"
    model_config = model_config_json(args.model)  # trainable_parameters checks --rank, --top-layers, --classes
    count = trainable_parameters(model_config, args.rank, args.top_layers, args.classes, args.ffa)
    blocks = model_config.get("num_hidden_layers")
    where = f"the last {args.top_layers} of {blocks} blocks" if args.top_layers else f"all {blocks} blocks"
    return count, (f"{'FFA-' if args.ffa else ''}LoRA rank {args.rank} on query/value of {where} of "
                   f"{args.model or 'all-MiniLM-L6-v2 (bundled)'} + a {args.classes}-class head")


def _run_advise(args) -> int:
    from fedtune.privacy.advise import advise, recommend

    for flag, value in (("rows-per-client", args.rows), ("clients", args.clients), ("rounds", args.rounds),
                        ("epochs", args.epochs), ("batch-size", args.batch_size)):
        if value <= 0:
            raise ConfigError(f"--{flag} = {value}: expected a whole number > 0")
    if not args.epsilon > 0:
        raise ConfigError(f"--epsilon = {args.epsilon:g}: expected a number > 0")
    params, source = _advise_parameters(args)
    coherence = None
    if args.data:
        coherence = _advise_probe(args)
    print(f"trainable parameters: {params:,} ({source})")
    a = advise(args.rows, args.clients, args.rounds, args.epochs, args.batch_size, args.epsilon,
               params, args.delta, args.accountant, coherence.coherence if coherence else None)
    print(f"mechanism: noise multiplier {a.noise_multiplier:.4f}, sample rate {a.sample_rate:.4g}, "
          f"{a.steps_per_round} steps per round, {a.steps} in all, delta {a.delta:.3g} ({args.accountant})")
    print(f"noise-to-signal (vs the largest possible signal): per step {a.nsr_step:.2f}, per averaged round "
          f"{a.nsr_round:.2f}, over the run {a.nsr_run:.2f}")
    if coherence is not None:
        measured = f"{a.nsr_run_probed:.2f}" if a.nsr_run_probed is not None else "unbounded (no shared direction)"
        print(f"gradient coherence (probe, {coherence.rows} rows of {args.data}, initial model): the mean clipped "
              f"gradient fills {coherence.coherence:.3f} of the clipping norm (sample mean {coherence.raw:.3f}, "
              f"{coherence.clipped_share:.0%} of rows clipped, {coherence.seconds:.1f} s); noise-to-signal over the "
              f"run against that signal: {measured}. Reported only: on the measured points it did not make the "
              "verdict more often right (docs/results/records/advise/calibration.json)")
    print(f"verdict: {a.verdict}")
    best = recommend(args.rows, args.clients, args.rounds, args.epochs, args.epsilon, params,
                     args.delta, args.accountant)
    if best is not None and best.batch_size != a.batch_size:
        print(f"recommended: batch size {best.batch_size} for the same rounds and epochs (noise multiplier "
              f"{best.noise_multiplier:.4f}, {best.steps} steps): noise-to-signal over the run {best.nsr_run:.2f}, "
              f"{best.verdict.split(':')[0]}")
    elif best is not None:
        print(f"recommended: batch size {a.batch_size} is already the least noisy for these rounds and epochs")
    print("fewer trainable parameters lower every ratio by sqrt(d): a smaller --rank, fewer --top-layers or --ffa "
          "(half the LoRA tensors)")
    return 0


def _advise_probe(args):
    from fedtune.config import build_config
    from fedtune.training.gradient_coherence import gradient_coherence

    if args.probe_rows < 2:
        raise ConfigError(f"--probe-rows = {args.probe_rows}: expected a whole number >= 2")
    data = {"path": args.data} if Path(args.data).is_file() else {"dataset": args.data}  # else a built-in name
    config = build_config({"model": {"path": args.model, "max_seq_len": args.max_seq_len},
                           "lora": {"rank": args.rank, "top_layers": args.top_layers, "ffa": args.ffa},
                           "dp": {"max_grad_norm": args.max_grad_norm}, "data": data}, source="fedtune privacy advise")
    return gradient_coherence(config, rows=args.probe_rows)


PRIVACY_COMMANDS: dict[str, PrivacyCommand] = {
    "epsilon": PrivacyCommand("epsilon of Poisson-subsampled Gaussian steps", _epsilon_arguments, _run_epsilon),
    "plan": PrivacyCommand("smallest noise multiplier that fits a target epsilon", _plan_arguments, _run_plan),
    "owners": PrivacyCommand("every config field and who decides it: the node, the server within the node's "
                             "policy, or the server (the table of docs/deployment.md)", lambda parser: None, _run_owners),
    "ledger": PrivacyCommand("recompute a ledger's epsilon with its accountant and, independently, the other library",
                             _ledger_arguments, _run_ledger),
    "advise": PrivacyCommand("before running: the mechanism a federation of this shape gets and whether its noise "
                             "lets it learn (calibrated on measured runs)", _advise_arguments, _run_advise),
}


def add_privacy_parser(subparsers) -> None:
    """`fedtune privacy`, with one subparser per entry of PRIVACY_COMMANDS."""
    parser = subparsers.add_parser(
        "privacy", help="privacy accounting: epsilon, noise for a budget, ledgers, field owners, advice",
        description=f"Privacy accounting without training: {_listed(list(PRIVACY_COMMANDS))} (each has its own "
        "--help). `fedtune budget` lists a node's budgets by the data they protect.")
    sub = parser.add_subparsers(dest="privacy_command", required=True)
    for name, command in PRIVACY_COMMANDS.items():  # a description: each subcommand's --help says what it does
        command.add_arguments(sub.add_parser(name, help=command.help, description=_sentence(command.help)))
    parser.set_defaults(run=lambda args: PRIVACY_COMMANDS[args.privacy_command].run(args))


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _listed(names: list[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)
