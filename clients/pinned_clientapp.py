"""The node runs its own ClientApp, never code the server sends.

A Flower SuperNode starts a `flwr-clientapp` process for each message; stock
`flwr-clientapp` installs the run's app bundle (FAB), which the party that submitted the run
built, and imports the ClientApp its pyproject.toml names, from the bundle's files. On a
node beside private data that would let a server (or anyone who can submit a run) replace
the node's code, and with it every check of the node's policy: its cap, its ledger, what
may leave. Flower's own defence (`--trusted-entities`, signed bundles) needs a SuperLink
that vouches for bundles, which the open-source SuperLink does not.

So `fedtune client` starts the SuperNode with a PATH that holds one folder only,
STATE_DIR/bin (`install_shim`): `flower-superexec` (Flower's, by its absolute path),
`flwr-clientapp` (this module) and, for every other kind of task Flower 1.41 can launch
(`flwr-agentapp`, `flwr-serverapp`, ...), a command that refuses: an AgentApp run would
otherwise install and run the submitter's code as stock Flower does. No stock Flower
command is reachable by name, so a shim that cannot run (a moved interpreter, a noexec
mount) fails closed instead of falling through to Flower's own. The runner is Flower's with
three seams replaced, kept here in one module as a contribution to Flower would keep them:

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
import shlex
import stat
import sys
from pathlib import Path

from fedtune.system.atomic import atomic_write_text

SHIM_NAME = "flwr-clientapp"     # the command Flower's SuperExec launches for a ClientApp task
SUPEREXEC = "flower-superexec"   # the command the SuperNode launches first, by name too
REFUSED_TASKS = ("flwr-serverapp", "flwr-simulation", "flwr-agentapp", "flwr-model", "flwr-connector")
ORIGINAL_PATH = "FEDTUNE_NODE_PATH"  # the PATH the node was started with, for fedtune's own code
SEAMS = ("get_load_client_app_fn", "install_from_fab", "install_app_dependencies")


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

    missing = [name for name in SEAMS if not hasattr(runtime, name)]
    if missing:  # a Flower that moved them: refuse to run rather than run its stock loader
        raise SystemExit(f"fedtune node: this Flower's ClientApp runner has no {', '.join(missing)}; "
                         "the node cannot pin its own ClientApp and runs none")
    runtime.get_load_client_app_fn = _installed_app_loader
    runtime.install_from_fab = _no_install
    runtime.install_app_dependencies = _no_install
    if ORIGINAL_PATH in os.environ:  # fedtune's own code runs with the node's PATH
        os.environ["PATH"] = os.environ[ORIGINAL_PATH]
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def _script(body: str) -> str:
    return f"#!/bin/sh\n{body}\n"


def commands(python: str, superexec: str) -> dict[str, str]:
    """STATE_DIR/bin's files: POSIX sh scripts with absolute, quoted paths (a Python path with a
    space would break a `#!python` line, and a shim that cannot start must not fall through)."""
    runner = f"exec {shlex.quote(python)} -I -c 'from clients.pinned_clientapp import main; main()' \"$@\""
    scripts = {SUPEREXEC: _script(f'exec {shlex.quote(superexec)} "$@"'), SHIM_NAME: _script(runner)}
    for name in REFUSED_TASKS:
        scripts[name] = _script(f"echo 'fedtune node: refused a {name} task: this node runs only its own ClientApp' "
                                ">&2\nexit 1")
    return scripts


def install_shim(folder: str | os.PathLike, python: str = sys.executable, superexec: str | None = None) -> Path:
    """Write STATE_DIR/bin (owner-only) and return it, resolved: the SuperNode's whole PATH."""
    folder = Path(folder).resolve()
    if os.pathsep in str(folder):
        raise ValueError(f"{folder}: a PATH entry cannot hold {os.pathsep!r}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    superexec = superexec or str(Path(python).parent / SUPEREXEC)
    for name, text in commands(python, superexec).items():
        atomic_write_text(folder / name, text)
        (folder / name).chmod(stat.S_IRWXU)
    return folder


def node_environment(folder: Path, environ: dict | None = None) -> dict:
    """The SuperNode's environment: PATH is the shim folder alone; the PATH it had is kept
    for fedtune's own code (`main` restores it inside the pinned runner)."""
    environ = dict(os.environ if environ is None else environ)
    return {**environ, ORIGINAL_PATH: environ.get("PATH", os.defpath), "PATH": str(folder)}
