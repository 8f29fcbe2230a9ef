"""The mistakes a new user makes, and the files they bring: each mistake is one line on
stderr, exit code 2 and nothing left behind; awkward but valid files read right."""

import json
import os

import pytest

from fedtune.cli import main
from fedtune.data.tables import read_table


def _one_line_error(argv, capsys, expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err


def test_csv_fields_spanning_lines_and_huge_cells_and_jsonl_line_separators(tmp_path):
    (tmp_path / "notes.csv").write_text('text,label\n"line one\nline two",pos\n"' + "x" * 200_000 + '",neg\n')
    table = read_table(tmp_path / "notes.csv", "text", "label")
    assert table.texts[0] == "line one\nline two" and len(table.texts[1]) == 200_000 and table.labels == ["pos", "neg"]
    rows = [{"text": "before\u2028after", "label": "pos"}, {"text": "second", "label": "neg"}]
    (tmp_path / "notes.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    assert read_table(tmp_path / "notes.jsonl", "text", "label").texts == ["before\u2028after", "second"]


@pytest.mark.parametrize("content", [os.urandom(2000), b"\x10\x00\x00\x00\x00\x00\x00\x00{}", b""])
def test_export_of_a_truncated_or_foreign_checkpoint(content, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.safetensors").write_bytes(content)
    _one_line_error(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")], capsys, "not a fedtune checkpoint")
    assert not (tmp_path / "out").exists()


def test_export_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.safetensors").write_bytes(b"x")
    (tmp_path / "taken").write_text("mine")
    _one_line_error(["export", str(tmp_path / "run"), "--out", str(tmp_path / "taken")], capsys, "not an empty folder")
    assert (tmp_path / "taken").read_text() == "mine"


def test_certs_never_replace_a_ca_certificate(tmp_path, capsys):
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.crt").write_text("the federation's CA")
    _one_line_error(["certs", "--out", str(tmp_path / "certs")], capsys, "already holds ca.crt")
    assert (tmp_path / "certs" / "ca.crt").read_text() == "the federation's CA"


def test_a_garbage_server_key_is_refused_before_any_folder_is_made(tmp_path, capsys):
    from fedtune.system.certificates import make_dev_certs

    make_dev_certs(tmp_path / "certs", ["127.0.0.1"], nodes=0)
    (tmp_path / "certs" / "server.key").write_text("not a key")
    _one_line_error(["server", "--certs", str(tmp_path / "certs"), "--state", str(tmp_path / "state")], capsys,
                    "server.key: not an unencrypted PEM private key")
    assert not (tmp_path / "state").exists()


def test_simulate_out_naming_a_file_and_a_resume_with_another_lora(tiny_bert, sentiment_csv, tmp_path, capsys):
    from fedtune.models.adapter_io import adapter_state, trainable_keys
    from fedtune.federation.server import FederationServer
    from fedtune.training.local import build_model
    from fedtune.models.base import load_tokenizer
    from tests.conftest import tiny_config

    (tmp_path / "taken").write_text("mine")
    base = ["simulate", "--model", str(tiny_bert), "--data", str(sentiment_csv), "--max-seq-len", "16",
            "--num-clients", "2", "--clients-per-round", "2", "--min-clients", "2"]
    _one_line_error(base + ["--out", str(tmp_path / "taken")], capsys, "a file, not a run folder")
    config = tiny_config(tiny_bert, sentiment_csv, data={"labels": ["neg", "pos"]})
    model = build_model(config, load_tokenizer(tiny_bert), 2)
    server = FederationServer(config, tmp_path / "run", adapter_state(model), trainable_keys(model))
    server.round_done = 1
    server.checkpoint()
    _one_line_error(base + ["--out", str(tmp_path / "run"), "--rank", "4"], capsys, "another model or LoRA config")
    assert not (tmp_path / "run" / "partitions.json").exists()


def test_the_exported_adapter_carries_a_model_card_and_a_portable_base(tiny_bert, sentiment_csv, tmp_path):
    from fedtune.models.adapter_io import adapter_state, trainable_keys
    from fedtune.reporting.export import export_checkpoint
    from fedtune.federation.server import FederationServer
    from fedtune.training.local import build_model
    from fedtune.models.base import load_tokenizer
    from tests.conftest import tiny_config

    config = tiny_config(tiny_bert, sentiment_csv, data={"labels": ["neg", "pos"]}, dp={"target_epsilon": 3.0})
    model = build_model(config, load_tokenizer(tiny_bert), 2)
    server = FederationServer(config, tmp_path / "run", adapter_state(model), trainable_keys(model))
    server.round_done = 1
    server.node_epsilon = {"1": 2.5, "2": 2.9}
    server.node_privacy = {"1": {"delta": 1e-5}, "2": {"delta": 1e-5}}
    server.checkpoint()
    out = export_checkpoint(tmp_path / "run", tmp_path / "adapter")
    card = (out / "README.md").read_text()
    assert "epsilon at most 2.900 over 2 nodes, delta 1e-05" in card and "labels: neg, pos" in card
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == tiny_bert.name and not os.path.isabs(base)


def test_reasons_are_short_and_plain():
    from fedtune.federation.strategy import short_reason

    ray_failure = "\x1b[36mclient error: RayTaskError\x1b[0m\n" + "  frame\n" * 400 + "ValueError: the real cause"
    reason = short_reason(ray_failure)
    assert "\x1b" not in reason and reason.endswith("ValueError: the real cause") and len(reason) <= 300


def test_a_ray_address_nobody_answers_at_is_a_one_line_error_at_once(tiny_bert, sentiment_csv, tmp_path, capsys):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    _one_line_error(["simulate", "--model", str(tiny_bert), "--data", str(sentiment_csv), "--max-seq-len", "16",
                     "--num-clients", "2", "--clients-per-round", "2", "--min-clients", "2",
                     "--set", f'simulation.ray_address="127.0.0.1:{port}"', "--out", str(tmp_path / "run")],
                    capsys, "no Ray head answers there")
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()


def test_simulated_nodes_share_a_rounds_timeout_with_those_queued_behind_them():
    from fedtune.config import build_config
    from simulations.run import node_time_share

    config = build_config({"federation": {"clients_per_round": 5, "min_clients": 2}, "simulation": {"num_clients": 5}})
    assert node_time_share(config, 2) == 1 / 3  # 5 nodes on 2 workers: 3 in a row at most
    assert node_time_share(config, 8) == 1.0
