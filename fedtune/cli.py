"""The `fedtune` command line: the core's own commands, and those other packages register.

The core registers train-local, audit, privacy, budget, report, export, generate and
certs. The simulation harness, the server and the client packages register theirs
(simulate, sweep, server, client)
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

from fedtune.budget_commands import add_budget_parser
from fedtune.errors import FedtuneError
from fedtune.privacy_commands import add_privacy_parser
from fedtune.system.quiet import VERBOSE_ENV, quiet_libraries

if TYPE_CHECKING:
    from fedtune.config import Config

NODE_SECTIONS = ("model", "adapter", "lora", "dp", "training", "data", "node")  # what train-local reads


def config_flags(sections=NODE_SECTIONS) -> dict[str, tuple[str, str, type]]:
    """CLI flag -> (config key, help, type), generated from the config fields that name a
    flag in their metadata (`fedtune.config.opt`): the help and defaults are the fields'."""
    from fedtune.config import SECTIONS

    flags = {}
    for section in sections:
        flags.update(section_flags(section, SECTIONS[section]))
    return flags


def section_flags(section: str, kind: type) -> dict[str, tuple[str, str, type]]:
    """The flags of one dataclass of fields whose metadata holds "help" and "flag": a core
    section, or a harness table (`fedtune.config.HARNESS_TABLES`) whose fields the harness
    declares the same way. `config_from_args` turns each into a `section.key` override."""
    import dataclasses
    from typing import get_type_hints

    hints = get_type_hints(kind)
    flags = {}
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
        description="Train this node's configuration once with canaries (each included by a fair coin), read which "
        "were included from their scores and print, at 95% confidence and beside the claimed epsilon, the Steinke "
        "bound (Steinke, Nasr and Jagielski 2023), the f-DP one-run bound (Mahloujifar, Melis and Chaudhuri 2025), "
        "the curve test (the planned mechanism's own trade-off curve) and a Gaussian DP estimate, each with the most "
        "its design can show, the planned mechanism's tight (PLD) epsilon, and the noise multiplier the canaries "
        "measured. Charged to the data's budget like any training; the audited adapter is never written. Exit 1 when "
        "the run is not sound or a control failed.")
    add_config_flags(parser, TRAIN_FLAGS, "TOML config file ([model] [lora] [dp] [training] [data] [node])")
    parser.add_argument("--canaries", type=int, default=10000,
                        help="gradient canaries (white-box, one adapter coordinate each), default 10000")
    parser.add_argument("--guesses", type=int, default=1000, help="the Steinke bound's guesses on gradient canaries, "
                        "fixed before training: half 'in', half 'out' (default 1000)")
    parser.add_argument("--input-canaries", type=int, default=0, help="random-token records (black-box), default 0")
    parser.add_argument("--input-guesses", type=int, default=0, help="guesses on input canaries")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the lower bound (default 0.95)")
    parser.add_argument("--controls", default="", help="comma list: noise-off, noise-halved, unnoised-step, public-sample "
                        "(each leaks by design: bundled public data only), no-canaries")
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
    certs = subparsers.add_parser(
        "certs", help="make development TLS certificates and SuperNode keys (not for production)",
        description="Make a development certificate authority, a SuperLink certificate for the names in --host and "
        "one key pair per SuperNode, for trying a TLS deployment on one machine or a test network. Not for "
        "production: use your organisation's certificate authority there.")
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
    export = subparsers.add_parser(
        "export", help="turn a server checkpoint into a PEFT adapter directory or a merged model",
        description="Turn a federation's server checkpoint into a stock PEFT adapter directory that "
        "transformers and peft load without fedtune, or with --merged into a plain transformers model with the "
        "adapter merged into the base weights.")
    export.add_argument("source", help="federation run directory or its checkpoint.safetensors")
    export.add_argument("--out", required=True, help="new folder for the export")
    export.add_argument("--merged", action="store_true", help="merge LoRA into the base weights (a plain transformers model)")
    export.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from fedtune.reporting.export import export_checkpoint

    print(export_checkpoint(args.source, args.out, merged=args.merged))
    return 0


def _add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="answer prompts with an instruct adapter (greedy decoding)",
        description="Answer a prompt, or every prompt of --file, with an instruct adapter on its base model, "
        "by greedy decoding. With --file, prints one JSON line per prompt.")
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
        "report", help="rebuild a federation run's CSV tables, summary.md and plots from its raw records",
        description="Rebuild a federation run's CSV tables, summary.md and figures from its raw records "
        "(metrics.jsonl and the ledgers); nothing is trained, and the records are not changed.")
    parser.add_argument("run_dir", help="a run directory of fedtune simulate / fedtune server")
    parser.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from fedtune.reporting.run_report import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


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
    add_privacy_parser(subparsers)
    add_budget_parser(subparsers)
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
    if config.node.budget_dir:
        from fedtune.privacy.budget import remember_budget_folder

        remember_budget_folder(config.node.budget_dir)  # `fedtune budget` lists it with no --dir
    out = Path(args.out) if args.out else Path("runs") / time.strftime("train-local-%Y%m%d-%H%M%S")
    train_local(node, out, progress=not args.no_progress)
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
