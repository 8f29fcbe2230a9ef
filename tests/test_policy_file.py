"""A node's policy travels as a file, never on a command line: `fedtune client` writes the
resolved policy to STATE_DIR/policy.toml (owner-only) and hands flower-supernode only that
path and the state dir, because every local user can read a command line (`ps`). The keys
are the flags' names; the old spellings (data-path, model-path, eval-path) are still read,
with a notice; docs/node-policy.example.toml is a complete policy that resolves."""

import os
import re
import stat
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from clients.client_app import app, deployment_setup
from clients.supernode import read_policy_file, resolve_policy, supernode_command, write_policy_file
from fedtune.cli import main
from fedtune.config import build_config
from fedtune.errors import ConfigError
from fedtune.privacy.policy import NODE_KEYS, RENAMED, NodePolicy, request_text, server_request
from tests.conftest import delivered, make_texts, node_context, write_csv

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "node-policy.example.toml"
CAP = 3.75  # a cap no default or path could contain by chance


@pytest.fixture
def policy(tmp_path) -> dict:
    """A resolved policy with a data path, a cap and a few more keys, as `fedtune client` has it."""
    data = write_csv(tmp_path / "secret-ward-7.csv", make_texts(6))
    held_out = write_csv(tmp_path / "held-out.csv", make_texts(4, seed=1))
    return resolve_policy({}, {"data": str(data), "eval-data": str(held_out), "max-epsilon": CAP, "labels": "neg,pos",
                               "delta": 1e-6, "release-evaluation": "dp"}, "fedtune client")


def test_the_supernode_command_line_names_the_policy_file_never_a_policy_value(policy, tmp_path):
    state = tmp_path / "node-1"
    line = supernode_command("fl.example.org:9092", str(state), None, None, policy, insecure=True)
    shown = " ".join(line)  # what `ps` shows every local user
    assert policy["data"] not in shown and "secret-ward-7" not in shown and str(CAP) not in shown
    assert not any(key in shown for key in ("max-epsilon", "labels", "delta", "release-evaluation"))
    node_config = parse_config_args([line[line.index("--node-config") + 1]])  # as flower-supernode reads it
    assert node_config == {"state-dir": str(state.resolve()), "policy-file": str(state.resolve() / "policy.toml")}
    assert not state.exists()  # the command creates nothing; exec_supernode writes the file


def test_the_written_policy_is_owner_only_and_reads_back_as_the_same_policy(policy, tmp_path):
    state = tmp_path / "node-1"
    state.mkdir()
    (state / "policy.toml").write_text("max-epsilon = 99\n")
    (state / "policy.toml").chmod(0o644)  # a copy from an older start, readable by all
    old_umask = os.umask(0)  # a permissive umask must not widen the file
    try:
        path = write_policy_file(state, policy)
    finally:
        os.umask(old_umask)
    assert path == state.resolve() / "policy.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p.name for p in state.iterdir() if p.name != "policy.toml"]  # no temp file left behind
    assert read_policy_file(path) == policy
    from_file = NodePolicy.from_node_config({"state-dir": str(state), "policy-file": str(path)})
    assert from_file == NodePolicy.from_node_config(policy)
    assert from_file.max_epsilon == CAP and from_file.own.data.path == policy["data"]


def test_fedtune_client_writes_the_file_and_starts_the_supernode_with_its_path(policy, tmp_path, capsys,
                                                                               monkeypatch):
    """The whole command, up to the exec (the one call replaced: it would end the test process)."""
    started = []
    environments = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: (started.append(argv), environments.append(env)))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")  # restored after the test
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    state = tmp_path / "node-1"
    assert main(["client", "--superlink", "fl.example.org:9092", "--state-dir", str(state), "--insecure",
                 "--data", policy["data"], "--max-epsilon", str(CAP), "--labels", "neg,pos"]) == 0
    [argv] = started
    assert policy["data"] not in " ".join(argv) and str(CAP) not in " ".join(argv)
    node_config = parse_config_args([argv[argv.index("--node-config") + 1]])
    written = Path(node_config["policy-file"])
    assert written == state.resolve() / "policy.toml" and stat.S_IMODE(written.stat().st_mode) == 0o600
    assert read_policy_file(written) == {"data": policy["data"], "max-epsilon": CAP, "labels": "neg,pos"}
    out = capsys.readouterr().out
    assert f"node policy: max epsilon {CAP:g}" in out and "policy-file=" in out and policy["data"] not in out
    # the SuperNode's whole PATH is its shim folder (clients.pinned_clientapp); its own PATH kept aside
    [environment] = environments
    assert environment["PATH"] == str(state.resolve() / "bin") and environment["FEDTUNE_NODE_PATH"] == os.environ["PATH"]


def test_a_client_app_reads_the_policy_file_as_it_read_inline_values(policy, tmp_path):
    state = tmp_path / "state"
    path = write_policy_file(state, policy)
    from_file = deployment_setup(node_context({"state-dir": str(state), "policy-file": str(path)}))
    inline = deployment_setup(node_context({"state-dir": str(state), **policy}))
    assert from_file == inline and from_file.state_dir == state
    # the app itself, on a real message: the cap it enforces is the file's
    request = server_request(build_config({"data": {"labels": ["neg", "pos"]}, "dp": {"target_epsilon": 5.0}}))
    reply = app(delivered("train", 1, request_text(request), {}),
                node_context({"state-dir": str(state), "policy-file": str(path)}))
    status = dict(reply.content["status"])
    assert status["status"] == "policy-refused" and f"max_epsilon {CAP:g}" in status["message"], status


def test_a_policy_file_with_the_old_key_names_still_works_and_says_the_new_ones(tmp_path, capsys):
    data = write_csv(tmp_path / "ward.csv", make_texts(6))
    held_out = write_csv(tmp_path / "held-out.csv", make_texts(4, seed=1))
    old = tmp_path / "hospital-policy.toml"
    old.write_text(f'max-epsilon = 3\ndata-path = "{data}"\nmodel-path = "minilm"\neval_path = "{held_out}"\n')
    values = read_policy_file(old)
    assert values == {"max-epsilon": 3, "data": str(data), "eval-data": str(held_out), "model": "minilm"}
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 3 and all(str(old) in line for line in notices)
    for line, (was, now) in zip(notices, RENAMED.items()):  # the file's order is RENAMED's
        assert re.search(rf"\b{was}\b.*deprecated.*\b{now}\b", line), line
    resolved = resolve_policy(values, {}, str(old))
    assert NodePolicy.from_node_config(resolved).own.data.eval_path == str(held_out)
    # through `fedtune client` and a node config that names the old file, the same policy
    state = tmp_path / "state"
    from_node = NodePolicy.from_node_config({"state-dir": str(state), "policy-file": str(old)})
    assert from_node == NodePolicy.from_node_config(values)
    # a node config written by hand with the old keys is read as well
    inline = NodePolicy.from_node_config({"state-dir": str(state), "data-path": str(data), "max-epsilon": 3},
                                         source=f"node config {tmp_path}")
    assert inline.own.data.path == str(data)
    assert "data-path is deprecated; write data" in capsys.readouterr().err


def test_an_old_and_a_new_spelling_of_one_key_together_are_refused(tmp_path):
    both = tmp_path / "both.toml"
    both.write_text('max-epsilon = 3\ndata-path = "/a.csv"\ndata = "/b.csv"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(both))}: data-path and data both set"):
        read_policy_file(both)


def _one_line(error: ConfigError) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def test_a_policy_file_the_node_cannot_read_is_a_one_line_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "gone" / "policy.toml"
    folder = tmp_path / "a-folder.toml"
    folder.mkdir()
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"max-epsilon = 3\n\xff\xfe\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("max-epsilon = = 3\n")
    nested = tmp_path / "nested.toml"
    nested.write_text("[node]\nmax-epsilon = 3\n")
    cases = {missing: "policy file not found", folder: "policy file unreadable", binary: "not UTF-8 text",
             broken: "invalid TOML", nested: "[node]: a policy file has keys only"}
    if os.geteuid() != 0:  # root reads any file whatever its mode
        locked = tmp_path / "locked.toml"
        locked.write_text("max-epsilon = 3\n")
        locked.chmod(0)
        cases[locked] = "policy file unreadable (Permission denied)"
    for path, message in cases.items():
        with pytest.raises(ConfigError) as raised:
            read_policy_file(path)
        assert _one_line(raised.value).startswith(f"{path}: ") and message in str(raised.value)
        # the node, named by its node config, fails the same way (and answers node-error, training nothing)
        with pytest.raises(ConfigError, match=re.escape(f"{path}: ")):
            deployment_setup(node_context({"state-dir": str(tmp_path / "state"), "policy-file": str(path)}))
    capsys.readouterr()
    reply = app(delivered("train", 1, "", {}), node_context({"state-dir": str(tmp_path), "policy-file": str(missing)}))
    status = dict(reply.content["status"])
    # the server learns the kind; the node's paths (its policy's, its data's) stay in its own log
    assert status == {"status": "node-error", "message": "node-error: this node is misconfigured (see the node's log)",
                      "noise": ""}
    assert f"{missing}: policy file not found" in capsys.readouterr().err
    assert main(["client", "--superlink", "h:1", "--state-dir", str(tmp_path / "s"), "--policy", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{missing}: policy file not found" in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("node_config, message", [
    ({"policy-file": "policy.toml"}, "policy-file = 'policy.toml': expected the absolute path"),
    ({"policy-file": 3}, "policy-file = 3: expected the absolute path"),
    ({"policy-file": "/srv/policy.toml", "max-epsilon": 8.0}, "max-epsilon is set beside policy-file"),
])
def test_a_node_config_naming_the_file_holds_nothing_else_of_the_policy(node_config, message, tmp_path):
    with pytest.raises(ConfigError) as raised:
        NodePolicy.from_node_config({"state-dir": str(tmp_path), **node_config})
    assert message in _one_line(raised.value)


def test_a_policy_file_names_no_other_policy_file(tmp_path):
    chained = tmp_path / "chained.toml"
    chained.write_text(f'policy-file = "{tmp_path / "other.toml"}"\n')
    with pytest.raises(ConfigError, match="policy-file: a policy file holds the policy itself"):
        read_policy_file(chained)


def test_the_example_policy_names_every_key_in_order_and_resolves(tmp_path, capsys):
    values = read_policy_file(EXAMPLE)
    assert list(values) == [key.key for key in NODE_KEYS]  # every key, nothing else, in `fedtune client` order
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[number - 1].startswith("# "), f"{EXAMPLE.name}: {line!r} has no comment above it"
    assert values["max-epsilon"] == 3.0 and values["data"] == "/srv/fedtune/data/train.csv"
    assert "allow-non-private" not in tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    labels = values["labels"]
    rows = [(text, labels[i % len(labels)]) for i, (text, _) in enumerate(make_texts(8))]
    here = {"data": str(write_csv(tmp_path / "train.csv", rows)),
            "eval-data": str(write_csv(tmp_path / "eval.csv", rows[:4])),
            "model": "minilm", "budget-dir": str(tmp_path / "budgets")}
    resolved = resolve_policy({**values, **here}, {}, str(EXAMPLE))
    policy = NodePolicy.from_node_config(resolved)
    assert policy.max_epsilon == 3.0 and policy.own.node.labels == tuple(labels) and not policy.allow_non_private
    assert policy.own.data.path == here["data"] and policy.own.model.path == "minilm"
    assert "deprecated" not in capsys.readouterr().err
