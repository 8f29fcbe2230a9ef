"""`fedtune server`: start Flower's SuperLink the way a federation operator should.

TLS on (the CA, the SuperLink certificate and its key from one folder), SuperNode
authentication on (only registered node keys may join), no runtime dependency
installation (a SuperLink would otherwise `uv sync` the app's dependencies from the
registry, CUDA torch included), and state in a database file, so a restarted SuperLink
keeps its registered nodes. The process is replaced by `flower-superlink` (signals reach it).
"""

from __future__ import annotations

import os
from pathlib import Path

from fedtune.errors import ConfigError
from fedtune.system.processes import flower_environment, flower_executable

CERT_FILES = {"ca": "ca.crt", "certificate": "server.pem", "key": "server.key"}


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
        _check_tls_files(folder)
        command += ["--ssl-ca-certfile", str(folder / "ca.crt"), "--ssl-certfile", str(folder / "server.pem"),
                    "--ssl-keyfile", str(folder / "server.key")]
    if auth:
        if insecure:
            raise ConfigError("--insecure: SuperNode authentication needs TLS; add --no-auth for an insecure local test")
        command.append("--enable-supernode-auth")
    state_dir = Path(state)
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"--state {state}: a file, not a folder")
    command += ["--database", str(state_dir / "superlink.db")]
    return command


def _check_tls_files(folder: Path) -> None:
    """Unreadable certificates or keys are a one-line error here, not a traceback later."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    for name in ("ca.crt", "server.pem"):
        try:
            x509.load_pem_x509_certificate((folder / name).read_bytes())
        except ValueError:
            raise ConfigError(f"{folder / name}: not a PEM certificate") from None
    try:
        load_pem_private_key((folder / "server.key").read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{folder / 'server.key'}: not an unencrypted PEM private key") from None


def exec_superlink(command: list[str], state: str) -> None:
    Path(state).mkdir(parents=True, exist_ok=True)  # only now: every check has passed
    flower_environment()
    print("starting: " + " ".join(command), flush=True)
    os.execv(command[0], command)
