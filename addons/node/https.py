"""`.https CERT`: the mirror serves TLS with CERT, a PEM file holding the key and the certificate.

`acr mirror start` hands the file to mitmproxy's `certs` option (`*=CERT`), and the hosts.toml
entries become `https://ADDR` with `ca` naming a copy of the certificate(s) alone, written to
`.work/https/ca.pem`: containerd trusts exactly the certificate the mirror serves, and the key
never leaves its file. A relative CERT is read from the runmd's folder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from addons.core.files import atomic_write
from addons.registry.auth import insecure_permissions
from addons.runmd.compile import Compiled
from addons.runmd.runtime import RuntimePlugin
from addons.runmd.runtime import Runtime, StepError

logger = logging.getLogger(__name__)

_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_KEY_RE = re.compile(rb"-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----.+?-----END (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----", re.S)


def ca_path(work: Path) -> Path:
    """Where the certificate containerd must trust is written (named by hosts.toml `ca`)."""
    return work / "https" / "ca.pem"


def cert_file(compiled: Compiled) -> Path | None:
    """The PEM of the last `.https` step, resolved against the runmd's folder; None without one."""
    steps = [s for _, s in compiled.document.steps("https")]
    if not steps:
        return None
    path = Path(compiled.config(steps[-1]))
    return path if path.is_absolute() else compiled.home / path


def certs_option(compiled: Compiled) -> list[str]:
    """mitmproxy's `certs` option value that serves the `.https` certificate for every name."""
    path = cert_file(compiled)
    return [f"*={path}"] if path else []


def load_pem(path: Path) -> list[bytes]:
    """Check that `path` holds a private key and the certificate of that key; return the certs.

    mitmproxy wants both in one file. ValueError says what is wrong without quoting the key.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"no file {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    certs = _CERT_RE.findall(data)
    keys = _KEY_RE.findall(data)
    if not certs:
        raise ValueError(f"{path} holds no PEM certificate (expected the key and the certificate in one file)")
    if not keys:
        raise ValueError(f"{path} holds no PEM private key (expected the key and the certificate in one file)")
    try:
        cert = x509.load_pem_x509_certificate(certs[0])
        key = serialization.load_pem_private_key(keys[0], password=None)
    except (ValueError, TypeError) as e:
        reason = "the key is encrypted" if "encrypted" in str(e).lower() or "password" in str(e).lower() else "malformed PEM"
        raise ValueError(f"{path}: {reason}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, public) != cert.public_key().public_bytes(enc, public):
        raise ValueError(f"{path}: the private key does not belong to the first certificate")
    return certs


class HttpsError(Exception):
    """The `.https` file cannot give containerd a CA to trust; the message says why."""


def write_ca(compiled: Compiled, work: Path) -> Path:
    """Write the certificate(s) of the `.https` file, without the key, to `ca_path(work)`."""
    path = cert_file(compiled)
    if path is None:
        raise HttpsError("no '.https' step: nothing to trust")
    try:
        certs = load_pem(path)
    except ValueError as e:
        raise HttpsError(f".https: {e}") from None
    dest = ca_path(work)
    try:
        atomic_write(dest, b"\n".join(certs) + b"\n", 0o644)
    except OSError as e:
        raise HttpsError(f"cannot write {dest}: {e.strerror or e}") from None
    return dest


class Https(RuntimePlugin):
    plugin = "https"

    @classmethod
    def parse(cls, text: str) -> str:
        if not text or any(c.isspace() for c in text):
            raise ValueError(f"expected one PEM file with the key and the certificate, e.g. '.https mirror.pem', got '{text}'")
        return text

    def run(self, runtime: Runtime) -> None:
        try:
            dest = write_ca(runtime.compiled, runtime.work)
        except HttpsError as e:
            raise StepError(str(e).removeprefix(".https: ")) from None
        path = cert_file(runtime.compiled)
        assert path is not None
        if insecure_permissions(path):
            logger.warning("%s holds a private key and is readable by group or others: chmod 600 it", path)
        logger.info("serving TLS with %s; containerd trusts %s", path, dest)
