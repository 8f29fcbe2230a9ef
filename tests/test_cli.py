"""The `fedtune` command: end to end on a tiny model, and every user mistake as one line,
exit code 2, no traceback and no run directory."""

import json
import subprocess
import sys

import pytest

from fedtune.cli import main
from fedtune.privacy import PrivacyLedger, compute_epsilon, noise_for_budget


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tiny_args(model, data, out):
    return ["train-local", "--model", str(model), "--data", str(data), "--max-seq-len", "16",
            "--epochs", "1", "--batch-size", "16", "--out", str(out), "--no-progress"]


def test_train_local_writes_a_complete_run_dir(capsys, tiny_bert, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = _run(capsys, *_tiny_args(tiny_bert, sentiment_csv, out), "--epochs", "2", "--epsilon", "4")
    assert code == 0
    assert {"config.toml", "plan.json", "metrics.jsonl", "ledger.json", "label_map.json", "adapter"} <= {p.name for p in out.iterdir()}
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["private"] for r in records)
    ledger = PrivacyLedger.load(out / "ledger.json")
    assert records[-1]["epsilon"] == ledger.epsilon() <= 4.0
    # the printed epsilon is reproducible from the logged parameters with Opacus alone
    (sigma, q, steps), = ledger.history
    assert compute_epsilon(sigma, q, steps, ledger.delta) == ledger.epsilon()
    assert "epsilon=" in stdout and "majority-class baseline" in stdout
    assert "target_epsilon = 4.0" in (out / "config.toml").read_text()


def test_non_private_run_is_labelled_everywhere(capsys, tiny_bert, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = _run(capsys, *_tiny_args(tiny_bert, sentiment_csv, out), "--no-dp")
    assert code == 0 and "NON-PRIVATE" in stdout
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["private"] is False and record["epsilon"] == "inf" and "NON-PRIVATE" in record["privacy"]
    assert json.loads((out / "adapter" / "fedtune_privacy.json").read_text())["private"] is False


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epsilon", "0"], "dp.target_epsilon = 0.0"),
        (["--rank", "0"], "lora.rank = 0"),
        (["--lr", "-1"], "training.learning_rate = -1.0"),
        (["--batch-size", "5000"], "training.batch_size = 5000: expected at most the"),
        (["--delta", "0.5"], "dp.delta = 0.5: expected less than 1/n"),
        (["--set", "lora.rnk=4"], "unknown key lora.rnk"),
        (["--set", "nonsense"], "expected section.key=value"),
        (["--task", "translation"], "model.task = 'translation'"),
    ],
)
def test_bad_config_is_one_line(capsys, tiny_bert, sentiment_csv, tmp_path, extra, message):
    out = tmp_path / "run"
    code, _, err = _run(capsys, *_tiny_args(tiny_bert, sentiment_csv, out), *extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("fedtune: error:") and message in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("text,y\na,1\nb,2\n", "missing column 'label'"),
        ("text,label\n", "no rows"),
        ("text,label\n" + "same words,1\n" * 20, "only one class"),
    ],
)
def test_bad_data_is_one_line(capsys, tiny_bert, tmp_path, content, message):
    data, out = tmp_path / "d.csv", tmp_path / "run"
    data.write_text(content)
    code, _, err = _run(capsys, *_tiny_args(tiny_bert, data, out))
    assert code == 2 and err.count("\n") == 1 and message in err and not out.exists()


def test_not_utf8_unknown_eval_label_and_missing_model(capsys, tiny_bert, sentiment_csv, tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,1\nb,2\n".encode("latin-1"))
    code, _, err = _run(capsys, *_tiny_args(tiny_bert, latin, tmp_path / "r1"))
    assert code == 2 and "not UTF-8" in err and str(latin) in err
    evaluation = tmp_path / "eval.csv"
    evaluation.write_text("text,label\nsomething,pos\nother,maybe\n")
    code, _, err = _run(capsys, *_tiny_args(tiny_bert, sentiment_csv, tmp_path / "r2"), "--eval-data", str(evaluation))
    assert code == 2 and "unknown label 'maybe'" in err and "(evaluation)" in err
    code, _, err = _run(capsys, *_tiny_args(tmp_path / "no-model", sentiment_csv, tmp_path / "r3"))
    assert code == 2 and "not a transformers model folder" in err
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))


def test_console_script_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedtune", "train-local", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"fedtune: error: {tmp_path / 'none.csv'}: data file not found"]


def test_privacy_commands_print_inputs_and_match_the_library(capsys):
    code, out, _ = _run(capsys, "privacy", "epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.01",
                        "--steps", "500", "--delta", "1e-5")
    assert code == 0 and f"epsilon = {compute_epsilon(1.1, 0.01, 500, 1e-5):.6f}" in out
    assert "noise_multiplier=1.1" in out and "steps=500" in out and "accountant=rdp" in out
    code, out, _ = _run(capsys, "privacy", "plan", "--epsilon", "3", "--examples", "1000", "--batch-size", "50",
                        "--epochs", "2", "--rounds", "5", "--delta", "1e-5")
    assert code == 0 and f"noise_multiplier = {noise_for_budget(3, 1e-5, 1 / 20, 200):.6f}" in out
    code, _, err = _run(capsys, "privacy", "plan", "--epsilon", "-1", "--sample-rate", "0.1", "--steps", "5", "--delta", "1e-5")
    assert code == 2 and "target_epsilon = -1" in err


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_the_audit_help_shows_a_percent_sign_once(capsys):
    """argparse formats `help` strings with %, not descriptions: a doubled %% there shows as is."""
    text = _help(capsys, "audit")
    assert "95%" in text and "95%%" not in text


def test_the_privacy_help_names_every_subcommand(capsys):
    from fedtune.privacy_commands import PRIVACY_COMMANDS

    description = _help(capsys, "privacy").split("positional arguments")[0]
    assert all(name in description for name in PRIVACY_COMMANDS), description


def test_every_command_describes_itself_without_format_escapes(capsys):
    """`fedtune X --help` for every command and subcommand: a description, and no %% left
    over from escaping."""
    import argparse

    from fedtune.cli import build_parser

    def parsers(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, [*path, name])

    for path, parser in parsers(build_parser(), []):
        assert path == [] or parser.description, " ".join(path)
        assert "%%" not in parser.format_help(), " ".join(path)
    assert "budget" in _help(capsys)
