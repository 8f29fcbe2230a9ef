"""Deployment commands without starting Flower: certificates, launch lines, export."""

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtune.cli import main
from fedtune.system.certificates import make_dev_certs
from fedtune.errors import ConfigError
from tests.conftest import make_texts, tiny_config, write_csv


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
    from clients.supernode import resolve_policy, supernode_command
    from server.superlink import superlink_command

    make_dev_certs(tmp_path / "c", ["127.0.0.1"], nodes=1)
    line = superlink_command(str(tmp_path / "c"), "127.0.0.1", 9092, str(tmp_path / "state"))
    assert "--enable-supernode-auth" in line and "--disable-runtime-dependency-installation" in line
    assert line[line.index("--ssl-certfile") + 1].endswith("server.pem")
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,b\n")
    policy = resolve_policy({}, {"data": str(data), "max-epsilon": 3.0, "delta": 1e-6}, "test")
    line = supernode_command("fl.example.org:9092", str(tmp_path / "node"), str(tmp_path / "c" / "ca.crt"),
                             str(tmp_path / "c" / "node-1"), policy)
    config = line[line.index("--node-config") + 1]
    assert config == f'state-dir="{tmp_path / "node"}" policy-file="{tmp_path / "node" / "policy.toml"}"'
    assert str(data) not in " ".join(line) and "max-epsilon" not in " ".join(line)  # `ps` shows every argument
    assert not (tmp_path / "node").exists()  # nothing is created before the process starts


@pytest.mark.parametrize("argv, message", [
    (["server", "--certs", "/nonexistent"], "missing ca.crt"),
    (["server", "--insecure"], "needs TLS"),
    (["client", "--superlink", "host", "--data", "x.csv", "--max-epsilon", "3", "--state-dir", "s"], "HOST:PORT"),
    (["client", "--superlink", "h:1", "--data", "/nonexistent.csv", "--max-epsilon", "3", "--state-dir", "s"],
     "data = /nonexistent.csv: file not found"),
    (["client", "--superlink", "h:1", "--data", "x.csv", "--state-dir", "s"], "max-epsilon is required"),
    (["client", "--superlink", "h:1", "--data", "x.csv", "--max-epsilon", "0", "--state-dir", "s"], "max-epsilon = 0"),
    (["client", "--superlink", "h:1", "--data", "x.csv", "--max-epsilon", "3", "--release-evaluation", "all",
      "--state-dir", "s"], "node.release_evaluation = 'all'"),
    (["client", "--superlink", "h:1", "--policy", "/nonexistent.toml", "--state-dir", "s"],
     "/nonexistent.toml: policy file not found"),
    (["export", "/nonexistent", "--out", "x"], "no checkpoint.safetensors"),
])
def test_deployment_mistakes_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("text,label\na,b\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "s").exists()  # nothing half-made


def test_client_policy_file_with_flag_override(tmp_path):
    from clients.supernode import read_policy_file, resolve_policy
    from fedtune.privacy.policy import NodePolicy

    data = tmp_path / "notes.csv"
    data.write_text("text,label\na,b\n")
    (tmp_path / "policy.toml").write_text(f'max-epsilon = 3\ndata = "{data}"\nrelease-evaluation = "dp"\n')
    values = resolve_policy(read_policy_file(str(tmp_path / "policy.toml")), {"max-epsilon": 1.0}, "policy.toml")
    policy = NodePolicy.from_node_config({**values, "state-dir": str(tmp_path)})
    assert policy.max_epsilon == 1.0 and policy.own.node.release_evaluation == "dp" and not policy.allow_non_private
    assert policy.own.data.path == str(data)


def test_export_checkpoint_as_adapter_and_merged(tiny_bert, sentiment_csv, tmp_path):
    import numpy as np
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification

    from fedtune.models.adapter_io import adapter_state, trainable_keys
    from fedtune.reporting.export import export_checkpoint
    from fedtune.federation.server import FederationServer
    from fedtune.training.local import build_model
    from fedtune.models.base import load_tokenizer

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


def test_a_node_may_name_a_bundled_model_in_its_policy(tmp_path):
    """`fedtune client --model smollm2-135m-instruct` names the bundled LLM, not a folder."""
    from clients.supernode import resolve_policy

    data = write_csv(tmp_path / "ward.csv", make_texts(4))
    policy = resolve_policy({}, {"data": str(data), "max-epsilon": 3.0, "model": "smollm2-135m-instruct"},
                            source="fedtune client")
    assert policy["model"] == "smollm2-135m-instruct"
    with pytest.raises(ConfigError, match="model = .*no-such-model: folder not found"):
        resolve_policy({}, {"data": str(data), "max-epsilon": 3.0, "model": "no-such-model"},
                       source="fedtune client")
