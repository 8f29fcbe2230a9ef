"""The `fedtune` command line: the core's own commands, and those other packages register.

The core registers train-local, privacy, report, export and certs. The simulation harness,
the server and the client packages register theirs (simulate, sweep, server, client)
through the `fedtune.commands` entry-point group, so the core never imports them: each
entry point is a `register(subparsers)` that adds a parser whose `run(args)` does the work.

Every user mistake (a `FedtuneError`) is printed as one line, `fedtune: error: ...`, with
exit code 2 and no traceback. Anything else is a bug and keeps its traceback. Heavy
libraries (torch, Flower) are imported inside the commands, after the arguments parse.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError, FedtuneError
from fedtune.system.quiet import VERBOSE_ENV, quiet_libraries

if TYPE_CHECKING:
    from fedtune.config import Config

NODE_SECTIONS = ("model", "adapter", "lora", "dp", "training", "data", "node")  # what train-local reads


def config_flags(sections=NODE_SECTIONS) -> dict[str, tuple[str, str, type]]:
    """CLI flag -> (config key, help, type), generated from the config fields that name a
    flag in their metadata (`fedtune.config.opt`): the help and defaults are the fields'."""
    import dataclasses
    from typing import get_type_hints

    from fedtune.config import SECTIONS

    flags = {}
    for section in sections:
        kind = SECTIONS[section]
        hints = get_type_hints(kind)
        for f in dataclasses.fields(kind):
            name = f.metadata.get("flag")
            if name:
                help_text = f"{f.metadata['help']} ({section}.{f.name}; default {f.default!r})".replace("%", "%%")
                flags[name] = (f"{section}.{f.name}", help_text, hints[f.name])
    return flags


TRAIN_FLAGS = config_flags()


def add_config_flags(parser, flags: dict, config_help: str) -> None:
    """--config, one flag per config key in `flags`, and the switches every config-driven
    command shares; `config_from_args` reads them back."""
    parser.set_defaults(config_flags=flags)
    parser.add_argument("--config", help=config_help)
    for name, (key, text, kind) in flags.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)
    parser.add_argument("--ffa", action="store_true", default=None, help="FFA-LoRA: freeze A, train only B (lora.ffa)")
    parser.add_argument("--freeze-head", action="store_true", default=None, help="do not train the head (lora.train_head=false)")
    parser.add_argument("--no-dp", action="store_true", help="train WITHOUT differential privacy (a labelled baseline)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config key")


def _add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-local",
        help="fine-tune one node privately (DP-SGD + LoRA) on a file or a named dataset",
        description="Fine-tune a LoRA adapter under DP-SGD on local data. Defaults: bbc-news, "
        "bundled all-MiniLM-L6-v2, epsilon 8. Config precedence: defaults < --config < flags < --set.",
    )
    add_config_flags(parser, TRAIN_FLAGS, "TOML config file ([model] [lora] [dp] [training] [data] [node])")
    parser.add_argument("--out", help="run directory (default: runs/train-local-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_train_local)


def _add_audit_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "audit", help="one-run privacy audit: train once with canaries, print the epsilon lower bound beside the claim",
        description="Train this node's configuration once with canaries (each included by a fair coin), guess which "
        "were included and print the epsilon lower bound the guesses prove at 95%% confidence (Steinke, Nasr and "
        "Jagielski 2023) beside the claimed epsilon, with the noise multiplier the canaries measured. Charged to the "
        "data's budget like any training; the audited adapter is never written. Exit 1 when the run is not sound or "
        "a control failed.")
    add_config_flags(parser, TRAIN_FLAGS, "TOML config file ([model] [lora] [dp] [training] [data] [node])")
    parser.add_argument("--canaries", type=int, default=1000, help="gradient canaries (white-box), default 1000")
    parser.add_argument("--guesses", type=int, default=200,
                        help="guesses on gradient canaries, fixed before training: half 'in', half 'out' (default 200)")
    parser.add_argument("--input-canaries", type=int, default=0, help="random-token records (black-box), default 0")
    parser.add_argument("--input-guesses", type=int, default=0, help="guesses on input canaries")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the lower bound (default 0.95)")
    parser.add_argument("--controls", default="", help="comma list: noise-off (bundled public data only), no-canaries")
    parser.add_argument("--out", help="folder for audit.json and audit.md (default: runs/audit-<time>)")
    parser.set_defaults(run=_run_audit)


def _run_audit(args) -> int:
    config = config_from_args(args)
    from fedtune.audit.node_audit import AuditDesign, audit_node, overall

    design = AuditDesign(args.canaries, args.guesses, args.input_canaries, args.input_guesses, args.confidence)
    controls = tuple(c.strip() for c in args.controls.split(",") if c.strip())
    out = Path(args.out) if args.out else Path("runs") / time.strftime("audit-%Y%m%d-%H%M%S")
    sound, why = overall(audit_node(config, design, controls, out))
    print(f"fedtune audit: {why}; wrote {out}/audit.json and audit.md")
    return 0 if sound else 1


def _add_certs_parser(subparsers) -> None:
    certs = subparsers.add_parser("certs", help="make development TLS certificates and SuperNode keys (not for production)")
    certs.add_argument("--out", required=True, help="new folder for ca.crt, server.pem/.key and node-N key pairs")
    certs.add_argument("--host", action="append", help="name or IP the SuperLink is reached at (repeatable; default 127.0.0.1 and localhost)")
    certs.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make (default 2)")
    certs.set_defaults(run=_run_certs)


def _run_certs(args) -> int:
    from fedtune.system.certificates import make_dev_certs

    for path in make_dev_certs(args.out, args.host or ["127.0.0.1", "localhost"], args.nodes):
        print(path)
    print("development only: give each node ca.crt and its own node-N; register node-N.pub on the SuperLink")
    return 0


def _add_export_parser(subparsers) -> None:
    export = subparsers.add_parser("export", help="turn a server checkpoint into a PEFT adapter directory or a merged model")
    export.add_argument("source", help="federation run directory or its checkpoint.safetensors")
    export.add_argument("--out", required=True, help="new folder for the export")
    export.add_argument("--merged", action="store_true", help="merge LoRA into the base weights (a plain transformers model)")
    export.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from fedtune.reporting.export import export_checkpoint

    print(export_checkpoint(args.source, args.out, merged=args.merged))
    return 0


def _add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="answer prompts with an instruct adapter (greedy decoding)")
    parser.add_argument("adapter", help="a PEFT adapter directory (train-local's or simulate's adapter/, or an export)")
    parser.add_argument("prompt", nargs="?", help="the prompt (the user's turn)")
    parser.add_argument("--file", help="prompts, one per line (or a JSONL file with a \"prompt\" field)")
    parser.add_argument("--model", default="", help="the base model (a folder or bundled name); default: the one the "
                        "adapter names")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per answer (default 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from fedtune.models.generation import generate_answers, read_prompts

    if (args.prompt is None) == (args.file is None):
        raise FedtuneError("give a prompt or --file, not both and not neither")
    prompts = read_prompts(args.file) if args.file else [args.prompt]
    answers = generate_answers(args.adapter, prompts, args.max_new_tokens, args.model, args.device)
    if args.file:
        for prompt, answer in zip(prompts, answers):
            print(json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False))
    else:
        print(answers[0])
    return 0


def _add_report_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="rebuild a federation run's CSV tables, summary.md and plots from its raw records")
    parser.add_argument("run_dir", help="a run directory of fedtune simulate / fedtune server")
    parser.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from fedtune.reporting.run_report import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


def _add_privacy_parser(subparsers) -> None:
    parser = subparsers.add_parser("privacy", help="privacy accounting: epsilon of a mechanism, noise for a budget")
    sub = parser.add_subparsers(dest="privacy_command", required=True)
    eps = sub.add_parser("epsilon", help="epsilon of Poisson-subsampled Gaussian steps (Opacus accountant)")
    eps.add_argument("--noise-multiplier", type=float, required=True)
    plan = sub.add_parser("plan", help="smallest noise multiplier that fits a target epsilon")
    plan.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    sub.add_parser("owners", help="every config field and who decides it: the node, the server within the node's "
                                  "policy, or the server (the table of docs/deployment.md)")
    ledger = sub.add_parser("ledger", help="recompute a ledger's epsilon with Opacus and, independently, dp-accounting")
    ledger.add_argument("path", help="a ledger file (a budget folder's ledger-*.json, or a run's ledger.json)")
    advise = sub.add_parser("advise", help="before running: the mechanism a federation of this shape gets and whether "
                                           "its noise lets it learn (calibrated on measured runs)")
    advise.add_argument("--rows-per-client", type=int, required=True, help="training rows per client")
    advise.add_argument("--clients", type=int, required=True, help="clients averaged per round")
    advise.add_argument("--rounds", type=int, required=True)
    advise.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    advise.add_argument("--batch-size", type=int, required=True, help="expected Poisson batch size")
    advise.add_argument("--epsilon", type=float, required=True, help="target epsilon per client")
    advise.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4, the calibration recipe's)")
    advise.add_argument("--top-layers", type=int, default=1,
                        help="LoRA on the last N transformer blocks (default 1; 0 = every block)")
    advise.add_argument("--classes", type=int, default=2, help="classes of the classification head (default 2)")
    advise.add_argument("--ffa", action="store_true", help="FFA-LoRA: A frozen, only B trains")
    advise.add_argument("--model", default="", help="base model: a bundled name or a local folder (default: the "
                                                    "bundled all-MiniLM-L6-v2); only its config.json is read")
    advise.add_argument("--params", type=int, default=None,
                        help="trainable parameters, given instead of derived from --model, --rank, --top-layers "
                             "and --classes")
    advise.add_argument("--data", default="", help="probe the gradients' coherence on a sample of this node's rows: "
                                                   "a CSV/JSONL/Parquet file (text, label) or a built-in dataset name")
    advise.add_argument("--probe-rows", type=int, default=128, help="rows the probe samples (default 128)")
    advise.add_argument("--max-seq-len", type=int, default=32, help="the probe's tokens per row (default 32)")
    advise.add_argument("--max-grad-norm", type=float, default=1.0, help="the probe's clipping norm C (default 1)")
    advise.add_argument("--delta", type=float, default=0.0, help="default 1/(10 x rows per client)")
    advise.add_argument("--accountant", default="rdp", help="rdp, prv or pld")
    for p in (eps, plan):
        p.add_argument("--sample-rate", type=float, help="Poisson sample rate q (or give --examples and --batch-size)")
        p.add_argument("--examples", type=int, help="training examples n (q = 1/ceil(n/B))")
        p.add_argument("--batch-size", type=int, help="expected batch size B")
        p.add_argument("--steps", type=int, help="optimizer steps (or give --epochs [--rounds])")
        p.add_argument("--epochs", type=int, help="epochs per round")
        p.add_argument("--rounds", type=int, default=1, help="rounds (default 1)")
        p.add_argument("--delta", type=float, required=True)
        p.add_argument("--accountant", default="rdp", help="rdp or prv")
    parser.set_defaults(run=_run_privacy)


COMMAND_GROUP = "fedtune.commands"  # entry points: name = "package.module:register"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Private federated fine-tuning of LoRA adapters.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--verbose", action="store_true", help="show the library warnings fedtune filters as harmless")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(subparsers)
    _add_audit_parser(subparsers)
    for register in registered_commands():
        register(subparsers)
    _add_certs_parser(subparsers)
    _add_export_parser(subparsers)
    _add_report_parser(subparsers)
    _add_generate_parser(subparsers)
    _add_privacy_parser(subparsers)
    return parser


def registered_commands() -> list:
    """The `register(subparsers)` functions other packages declare in `fedtune.commands`."""
    from importlib.metadata import entry_points

    return [entry.load() for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name)]


def _version() -> str:
    from fedtune import __version__

    return f"fedtune {__version__}"


def config_from_args(args, default_file: str | None = None) -> "Config":
    """The validated config of a command built with `add_config_flags`: defaults < file <
    flags < --set."""
    from fedtune.config import load_config, parse_override

    overrides = []
    for name, (key, _, _) in args.config_flags.items():
        value = getattr(args, name, None)
        if value is not None:
            section, field = key.split(".")
            overrides.append((section, field, value))
    if getattr(args, "ffa", None):
        overrides.append(("lora", "ffa", True))
    if getattr(args, "freeze_head", None):
        overrides.append(("lora", "train_head", False))
    if getattr(args, "no_dp", False):
        overrides.append(("dp", "enabled", False))
    if getattr(args, "data", None):
        overrides.append(("data", "dataset", ""))
    overrides.extend(parse_override(text) for text in args.set)
    return load_config(args.config or default_file, overrides)


def _run_train_local(args) -> int:
    config = config_from_args(args)  # a config mistake is reported before torch is imported
    from fedtune.training.local import prepare_node, train_local

    node = prepare_node(config)  # every input check happens here, before any write
    out = Path(args.out) if args.out else Path("runs") / time.strftime("train-local-%Y%m%d-%H%M%S")
    train_local(node, out, progress=not args.no_progress)
    return 0


def _mechanism(args) -> tuple[float, int]:
    import math

    from fedtune.errors import ConfigError

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

    for name in ("rows_per_client", "clients", "rounds", "epochs", "batch_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)}: expected a whole number > 0")
    if not args.epsilon > 0:
        raise ConfigError(f"--epsilon = {args.epsilon:g}: expected a number > 0")
    params, source = _advise_parameters(args)
    coherence = None
    if args.data:
        coherence = _advise_probe(args)
    print(f"trainable parameters: {params:,} ({source})")
    a = advise(args.rows_per_client, args.clients, args.rounds, args.epochs, args.batch_size, args.epsilon,
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
    best = recommend(args.rows_per_client, args.clients, args.rounds, args.epochs, args.epsilon, params,
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


def _run_privacy(args) -> int:
    from opacus import __version__ as opacus_version

    from fedtune.privacy import PrivacyLedger, compute_epsilon, independent_epsilon, noise_for_budget

    if args.privacy_command == "owners":
        from fedtune.privacy.policy import ownership_markdown

        print(ownership_markdown(), end="")
        return 0
    if args.privacy_command == "advise":
        return _run_advise(args)
    if args.privacy_command == "ledger":
        ledger = PrivacyLedger.load(args.path)
        if not ledger.is_private:
            print(f"epsilon = inf: {ledger.non_private_steps} steps were taken WITHOUT differential privacy")
            return 0
        library, other = (("dp-accounting", f"Opacus {opacus_version} PRV") if ledger.accountant == "pld"
                          else (f"Opacus {opacus_version}", "dp-accounting"))
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

    q, steps = _mechanism(args)
    inputs = f"sample_rate={q:.6g} steps={steps} delta={args.delta:g} accountant={args.accountant} (opacus {opacus_version})"
    if args.privacy_command == "epsilon":
        eps = compute_epsilon(args.noise_multiplier, q, steps, args.delta, args.accountant)
        print(f"epsilon = {eps:.6f}  for noise_multiplier={args.noise_multiplier:g} {inputs}")
    else:
        sigma = noise_for_budget(args.epsilon, args.delta, q, steps, args.accountant)
        achieved = compute_epsilon(sigma, q, steps, args.delta, args.accountant)
        print(f"noise_multiplier = {sigma:.6f}  gives epsilon {achieved:.6f} <= target {args.epsilon:g} for {inputs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # inherited by the processes a command starts (Ray workers too)
    quiet_libraries()
    try:
        return args.run(args)
    except FedtuneError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
