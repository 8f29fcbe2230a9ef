"""The node runs its own ClientApp, never code the server sends.

A Flower SuperNode starts a `flwr-clientapp` process for each message; stock
`flwr-clientapp` installs the run's app bundle (FAB), which the party that submitted the run
built, and imports the ClientApp its pyproject.toml names, from the bundle's files. On a
node beside private data that would let a server (or anyone who can submit a run) replace
the node's code, and with it every check of the node's policy: its cap, its ledger, what
may leave. Flower's own defence (`--trusted-entities`, signed bundles) needs a SuperLink
that vouches for bundles, which the open-source SuperLink does not.

So `fedtune client` starts the SuperNode with this module in front of Flower's
`flwr-clientapp` on its PATH (`install_shim`). It is Flower's runner with three seams
replaced, kept here in one module as a contribution to Flower would keep them:

- the bundle is not installed (no file of it is written on this machine);
- nor are the dependencies it lists, even where runtime dependency installation was
  allowed (they would be packages of the submitter's choosing); and
- the ClientApp is always `clients.client_app:app` from fedtune as installed on this
  machine, whatever the bundle names. The run's config still comes from the bundle (the
  server's requests, checked by the node's policy as always).

Everything else (the token, the heartbeats, the reply path, exit codes) is Flower's code,
unchanged. Why a PATH shim: Flower 1.41's SuperNode launches the command `flwr-clientapp`
by name (`flwr.supercore.superexec.executor.subprocess_executor`) and has no option to name
another one or another app.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

SHIM_NAME = "flwr-clientapp"   # the command name Flower's SuperNode launches


def _installed_app_loader(*_args, **_kwargs):
    """Stand-in for `flwr.clientapp.utils.get_load_client_app_fn`: a loader that ignores the
    bundle's id, version and files and returns the ClientApp installed on this machine."""

    def load(*_ignored):
        from clients.client_app import app

        return app

    return load


def _no_install(*_args, **_kwargs) -> None:
    """Stand-in for `flwr.cli.install.install_from_fab` and for the runner's
    `install_app_dependencies`: neither the server's bundle nor the packages it names are
    installed here (None: no per-run environment to clean up)."""


def main() -> None:
    """`flwr-clientapp`, as Flower runs it, with the node's own app (module docstring)."""
    import flwr.supernode.runtime.run_clientapp as runtime

    runtime.get_load_client_app_fn = _installed_app_loader
    runtime.install_from_fab = _no_install
    runtime.install_app_dependencies = _no_install
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def shim_text(python: str) -> str:
    # -I: isolated mode: neither PYTHONPATH, the user's site folder nor the working directory
    # (where a file could shadow fedtune's modules) reaches sys.path.
    return f"#!{python} -I\nfrom clients.pinned_clientapp import main\nmain()\n"


def install_shim(folder: str | os.PathLike, python: str = sys.executable) -> Path:
    """Write `folder/flwr-clientapp` (owner-only) for the SuperNode's PATH; returns the folder."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    shim = folder / SHIM_NAME
    shim.write_text(shim_text(python))
    shim.chmod(stat.S_IRWXU)
    return folder


def path_with_shim(folder: str | os.PathLike, path: str | None = None) -> str:
    """PATH with the shim's folder first, then the rest, this Python's own bin folder included
    (a service's PATH may not hold it, and Flower needs its other commands there)."""
    rest = path if path is not None else os.environ.get("PATH", "")
    return os.pathsep.join([str(folder), str(Path(sys.executable).parent), *([rest] if rest else [])])
