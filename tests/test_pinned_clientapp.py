"""A node runs its own ClientApp, never the one a run's app bundle names: the `flwr-clientapp`
that `fedtune client` puts first on its SuperNode's PATH (clients.pinned_clientapp). The
end-to-end attack (a bundle whose ClientApp would mark the disk and send the node's policy
file back) is in tests/test_deployment_e2e.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from clients import pinned_clientapp
from clients.pinned_clientapp import SHIM_NAME, install_shim, node_environment


def test_the_loader_returns_the_installed_app_whatever_the_bundle_says():
    from clients.client_app import app

    load = pinned_clientapp._installed_app_loader(default_app_ref="grab:app", app_path="/tmp/bundle", multi_app=True)
    assert load("operator/innocent", "1.0.0", "f" * 64) is app


def test_the_runner_is_flowers_with_the_three_seams_replaced(monkeypatch):
    import flwr.supernode.runtime.run_clientapp as runtime

    monkeypatch.setattr(runtime, "get_load_client_app_fn", runtime.get_load_client_app_fn)
    monkeypatch.setattr(runtime, "install_from_fab", runtime.install_from_fab)
    monkeypatch.setattr(runtime, "install_app_dependencies", runtime.install_app_dependencies)
    monkeypatch.setattr(sys, "argv", [SHIM_NAME, "--help"])
    with pytest.raises(SystemExit) as done:
        pinned_clientapp.main()
    assert done.value.code == 0
    assert runtime.get_load_client_app_fn is pinned_clientapp._installed_app_loader
    assert runtime.install_from_fab is pinned_clientapp._no_install
    assert runtime.install_app_dependencies is pinned_clientapp._no_install


def test_the_supernodes_path_reaches_only_the_pin_and_refusals(tmp_path):
    """STATE_DIR/bin is the SuperNode's whole PATH: Flower's superexec, the pinned runner,
    and a refusal for every other task Flower can launch (an AgentApp run would run the
    submitter's code). Owner-only, POSIX sh with quoted absolute paths."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    folder = install_shim(tmp_path / "state" / "bin")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    launched = set(TASK_TYPE_TO_COMMAND.values()) | {"flower-superexec"}
    assert {p.name for p in folder.iterdir()} == launched  # every command Flower 1.41 launches by name
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 and p.read_text().startswith("#!/bin/sh\n")
               for p in folder.iterdir())
    env = node_environment(folder, {"PATH": "/usr/bin:/bin", "HOME": "/h"})
    assert env["PATH"] == str(folder) and env["FEDTUNE_NODE_PATH"] == "/usr/bin:/bin" and env["HOME"] == "/h"
    for task in sorted(launched - {SHIM_NAME, "flower-superexec"}):
        refused = subprocess.run([task, "--runtime-api-address", "127.0.0.1:1", "--token", "t"], env=env,
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1 and f"refused a {task} task" in refused.stderr


def test_the_pinned_runner_starts_isolated_from_a_folder_with_a_decoy(tmp_path):
    """`-I` keeps a decoy `clients` package in the working directory or PYTHONPATH off
    sys.path: the runner that starts is fedtune's installed one."""
    folder = install_shim(tmp_path / "state" / "bin")
    decoy = tmp_path / "cwd" / "clients"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit('decoy imported')\n")
    (decoy / "pinned_clientapp.py").write_text("raise SystemExit('decoy imported')\n")
    env = {**node_environment(folder), "PYTHONPATH": str(decoy.parent)}
    found = subprocess.run([SHIM_NAME, "--help"], capture_output=True, text=True, timeout=120, cwd=decoy.parent,
                           env=env)
    assert found.returncode == 0 and "Run a Flower ClientApp" in found.stdout, found.stdout + found.stderr


def test_an_interpreter_path_with_a_space_and_the_arguments_pass_whole(tmp_path):
    """A `#!python` line would split at the space; the sh script passes the path and every
    argument Flower gives (here to a stand-in interpreter that prints them)."""
    spaced = tmp_path / "a python" / "python"
    spaced.parent.mkdir()
    spaced.write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
    spaced.chmod(0o700)
    folder = install_shim(tmp_path / "state" / "bin", python=str(spaced))
    ran = subprocess.run([SHIM_NAME, "--token", "a b"], capture_output=True, text=True, timeout=30,
                         env=node_environment(folder))
    assert ran.stdout.splitlines() == ["[-I]", "[-c]", "[from clients.pinned_clientapp import main; main()]",
                                       "[--token]", "[a b]"]


def test_a_shim_that_cannot_run_fails_closed(tmp_path):
    """An interpreter gone (a venv moved): the runner fails; nothing on PATH stands in for it."""
    folder = install_shim(tmp_path / "state" / "bin", python=str(tmp_path / "gone" / "python"))
    failed = subprocess.run([SHIM_NAME, "--help"], capture_output=True, text=True, timeout=30,
                            env=node_environment(folder))
    assert failed.returncode != 0 and "Run a Flower ClientApp" not in failed.stdout
