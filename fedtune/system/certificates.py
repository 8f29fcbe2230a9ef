"""Development certificates and node keys for a TLS deployment (never for production).

Writes, into one folder:

    ca.crt / ca.key          a self-signed certificate authority (10 years)
    server.pem / server.key  the SuperLink's certificate for the given hosts, signed by the CA
    node-N / node-N.pub      one ECDSA P-384 key pair per SuperNode (OpenSSH format, what
                             `ssh-keygen -t ecdsa -b 384` makes and Flower's SuperNode auth reads)

A hospital gets `ca.crt` and its own `node-N` (private key: it never leaves the node); the
operator registers `node-N.pub`. Production deployments use the institution's own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedtune.system.atomic import atomic_write_bytes
from fedtune.errors import ConfigError


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_dev_certs(out: str | Path, hosts: list[str], nodes: int) -> list[Path]:
    """Create the CA, the SuperLink certificate for `hosts` and `nodes` node key pairs."""
    if nodes < 0:
        raise ConfigError(f"--nodes = {nodes}: expected a whole number >= 0")
    if not hosts:
        raise ConfigError("--host: give at least one host name or IP address the SuperLink is reached at")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a folder")
    in_use = [name for name in ("ca.key", "ca.crt", "server.key", "server.pem") if (out / name).exists()]
    if in_use:
        raise ConfigError(f"{out}: already holds {in_use[0]}; choose a new folder rather than replace keys in use")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fedtune dev CA")).issuer_name(_name("fedtune dev CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
                   .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .sign(ca_key, hashes.SHA384()))
    files = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": _pem_key(ca_key),
        "server.pem": server_cert.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(server_key),
    }
    for number in range(1, nodes + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        files[f"node-{number}"] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption())
        files[f"node-{number}.pub"] = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                    serialization.PublicFormat.OpenSSH) + b"\n"
    written = []
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
        (out / name).chmod(0o644 if name.endswith((".crt", ".pem", ".pub")) else 0o600)  # private keys: owner only
        written.append(out / name)
    return written
