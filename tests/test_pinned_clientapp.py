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
from clients.pinned_clientapp import SHIM_NAME, install_shim, path_with_shim


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


def test_the_shim_is_owner_only_isolated_and_first_on_path(tmp_path):
    folder = install_shim(tmp_path / "state" / "bin")
    shim = folder / SHIM_NAME
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(shim.stat().st_mode) == 0o700
    assert shim.read_text().splitlines()[0] == f"#!{sys.executable} -I"
    path = path_with_shim(folder, "/usr/bin:/bin")
    assert path.split(os.pathsep)[0] == str(folder) and path.endswith("/usr/bin:/bin")
    # run from a folder holding a decoy `clients` package: -I keeps it off sys.path
    decoy = tmp_path / "cwd" / "clients"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit('decoy imported')\n")
    (decoy / "pinned_clientapp.py").write_text("raise SystemExit('decoy imported')\n")
    found = subprocess.run(["flwr-clientapp", "--help"], capture_output=True, text=True, timeout=120,
                           cwd=decoy.parent, env={**os.environ, "PATH": path, "PYTHONPATH": str(decoy.parent)})
    assert found.returncode == 0 and "Run a Flower ClientApp" in found.stdout, found.stdout + found.stderr
