"""Throwaway test PKI made with the ``openssl`` command line: a CA, a server and a client cert.

The server cert carries SANs ``DNS:localhost`` and ``IP:127.0.0.1`` so clients can dial
``127.0.0.1:PORT`` without a target-name override. EC P-256 keys keep generation fast.
``cryptography`` is not installed in the project venv, so openssl is used.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PKI:
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path          # a CA that signed nothing the server trusts
    other_client_cert: Path  # client cert signed by other_ca (must be rejected under mTLS)
    other_client_key: Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key(cwd: Path, name: str) -> None:
    _run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", name, cwd=cwd)


def _ca(cwd: Path, stem: str, cn: str) -> None:
    _key(cwd, f"{stem}.key")
    _run("req", "-x509", "-new", "-key", f"{stem}.key", "-sha256", "-days", "2",
         "-subj", f"/CN={cn}", "-out", f"{stem}.pem", cwd=cwd)


def _leaf(cwd: Path, stem: str, cn: str, ca: str, ext: str) -> None:
    _key(cwd, f"{stem}.key")
    _run("req", "-new", "-key", f"{stem}.key", "-subj", f"/CN={cn}", "-out", f"{stem}.csr", cwd=cwd)
    (cwd / f"{stem}.ext").write_text(ext)
    _run("x509", "-req", "-in", f"{stem}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
         "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{stem}.ext",
         "-out", f"{stem}.pem", cwd=cwd)


def make_pki(folder: Path) -> PKI:
    """Create every file under ``folder`` (about 0.1 s)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl command not found; needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca", "edgecloud test CA")
    _ca(folder, "other_ca", "untrusted test CA")
    _leaf(folder, "server", "localhost", "ca",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
          "basicConstraints=CA:FALSE\n")
    client_ext = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"
    _leaf(folder, "client", "edge-1", "ca", client_ext)
    _leaf(folder, "other_client", "intruder", "other_ca", client_ext)
    f = folder
    return PKI(
        ca=f / "ca.pem", ca_key=f / "ca.key",
        server_cert=f / "server.pem", server_key=f / "server.key",
        client_cert=f / "client.pem", client_key=f / "client.key",
        other_ca=f / "other_ca.pem",
        other_client_cert=f / "other_client.pem", other_client_key=f / "other_client.key",
    )
