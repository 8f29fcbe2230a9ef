"""Deployment commands without starting Flower: certificates, launch lines, export."""

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtune.cli import main
from fedtune.devcerts import make_dev_certs
from tests.conftest import tiny_config


def test_dev_certs_chain_and_node_keys(tmp_path):
    make_dev_certs(tmp_path / "c", ["127.0.0.1", "fl.example.org"], nodes=2)
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in names.get_values_for_type(x509.DNSName)
    for n in (1, 2):
        private = load_ssh_private_key((tmp_path / "c" / f"node-{n}").read_bytes(), password=None)
        public = load_ssh_public_key((tmp_path / "c" / f"node-{n}.pub").read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()
        assert stat.S_IMODE((tmp_path / "c" / f"node-{n}").stat().st_mode) == 0o600
    assert main(["certs", "--out", str(tmp_path / "c")]) == 2  # never overwrites keys in use


def test_server_and_client_launch_lines(tmp_path):
    from clients.supernode import supernode_command
    from server.superlink import superlink_command

    make_dev_certs(tmp_path / "c", ["127.0.0.1"], nodes=1)
    line = superlink_command(str(tmp_path / "c"), "127.0.0.1", 9092, str(tmp_path / "state"))
    assert "--enable-supernode-auth" in line and "--disable-runtime-dependency-installation" in line
    assert line[line.index("--ssl-certfile") + 1].endswith("server.pem")
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,b\n")
    line = supernode_command("fl.example.org:9092", str(data), str(tmp_path / "node"), str(tmp_path / "c" / "ca.crt"),
                             str(tmp_path / "c" / "node-1"), max_epsilon=3.0)
    config = line[line.index("--node-config") + 1]
    assert f'data-path="{data}"' in config and "max-epsilon=3.0" in config and "state-dir=" in config


@pytest.mark.parametrize("argv, message", [
    (["server", "--certs", "/nonexistent"], "missing ca.crt"),
    (["server", "--insecure"], "needs TLS"),
    (["client", "--superlink", "host", "--data", "x.csv", "--state-dir", "s"], "HOST:PORT"),
    (["client", "--superlink", "h:1", "--data", "/nonexistent.csv", "--state-dir", "s"], "--data /nonexistent.csv"),
    (["export", "/nonexistent", "--out", "x"], "no checkpoint.safetensors"),
])
def test_deployment_mistakes_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_export_checkpoint_as_adapter_and_merged(tiny_bert, sentiment_csv, tmp_path):
    import numpy as np
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification

    from fedtune.adapter import adapter_state, trainable_keys
    from fedtune.export import export_checkpoint
    from fedtune.federation import FederationServer
    from fedtune.local import build_model
    from fedtune.model import load_tokenizer

    config = tiny_config(tiny_bert, sentiment_csv, data={"labels": ["neg", "pos"]})
    model = build_model(config, load_tokenizer(tiny_bert), 2)
    state = adapter_state(model)
    server = FederationServer(config, tmp_path / "run", state, trainable_keys(model))
    server.adapter = type(state)((k, v + 0.01) for k, v in state.items())
    server.round_done = 3
    server.checkpoint()
    adapter_dir = export_checkpoint(tmp_path / "run", tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    loaded = PeftModel.from_pretrained(base, adapter_dir)
    key = next(k for k in state if "lora_B" in k)
    loaded_state = {k: v.numpy() for k, v in get_peft_model_state_dict(loaded).items()}
    assert np.allclose(loaded_state[key], state[key] + 0.01)
    merged = export_checkpoint(tmp_path / "run", tmp_path / "merged", merged=True)
    plain = AutoModelForSequenceClassification.from_pretrained(merged)
    ids = torch.tensor([[101, 2000, 102]])
    loaded.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4)
    assert (merged / "label_map.json").is_file()
