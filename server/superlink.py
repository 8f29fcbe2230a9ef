"""`fedtune server`: start Flower's SuperLink the way a federation operator should.

TLS on (the CA, the SuperLink certificate and its key from one folder), SuperNode
authentication on (only registered node keys may join), no runtime dependency
installation (a SuperLink would otherwise `uv sync` the app's dependencies from the
registry, CUDA torch included), and state in a database file, so a restarted SuperLink
keeps its registered nodes. The process is replaced by `flower-superlink` (signals reach it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedtune.errors import ConfigError

CERT_FILES = {"ca": "ca.crt", "certificate": "server.pem", "key": "server.key"}


def flower_executable(name: str) -> str:
    """The path of a Flower command installed with fedtune, or a one-line error."""
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name}: not found on PATH; install fedtune (it brings flwr) in this environment")
    return found


def superlink_command(certs: str | None, host: str, port: int, state: str, insecure: bool = False,
                      auth: bool = True) -> list[str]:
    """flwr 1.41 serves the Fleet (SuperNodes), Control (`flwr` CLI) and ServerApp APIs
    over HTTPS on one address."""
    command = [flower_executable("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if insecure:
        command.append("--insecure")
    else:
        if not certs:
            raise ConfigError("--certs: a folder with ca.crt, server.pem and server.key (or --insecure for local tests)")
        folder = Path(certs)
        for name in CERT_FILES.values():
            if not (folder / name).is_file():
                raise ConfigError(f"--certs {certs}: missing {name} (make development ones with `fedtune certs`)")
        command += ["--ssl-ca-certfile", str(folder / "ca.crt"), "--ssl-certfile", str(folder / "server.pem"),
                    "--ssl-keyfile", str(folder / "server.key")]
    if auth:
        if insecure:
            raise ConfigError("--insecure: SuperNode authentication needs TLS; add --no-auth for an insecure local test")
        command.append("--enable-supernode-auth")
    state_dir = Path(state)
    state_dir.mkdir(parents=True, exist_ok=True)
    command += ["--database", str(state_dir / "superlink.db")]
    return command


def exec_superlink(command: list[str]) -> None:
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    print("starting: " + " ".join(command), flush=True)
    os.execv(command[0], command)
