"""`serve --tls-self-signed`: a self-signed certificate made once and kept in the data dir.

The official Python client speaks https only, so a local server needs a certificate. This makes one
with `cryptography` (ECDSA P-256, valid for localhost, 127.0.0.1, ::1, this machine's host name and the
--host address), keeps it as `<data-dir>/tls/cert.pem` + `key.pem` (the key mode 0600) and reuses it
on later starts; it is re-made when it expires within a week or does not cover the host asked for.
Clients trust it with `SSL_CERT_FILE=<cert.pem>` (Python: httpx, fal-client, openai) or
`NODE_EXTRA_CA_CERTS=<cert.pem>` (Node: @fal-ai/client).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TLS_DIR = "tls"
VALID_DAYS = 825  # the longest validity Apple's clients accept for a server certificate
RENEW_BEFORE = _dt.timedelta(days=7)


@dataclass(frozen=True)
class SelfSignedCert:
    cert_path: Path
    key_path: Path
    hosts: tuple[str, ...]
    created: bool  # made by this call (False: reused)


def default_hosts(bind_host: str) -> list[str]:
    hosts = ["localhost", "127.0.0.1", "::1"]
    name = socket.gethostname()
    if name and name not in hosts:
        hosts.append(name)
    if bind_host and bind_host not in ("0.0.0.0", "::") and bind_host not in hosts:
        hosts.append(bind_host)
    return hosts


def _general_names(hosts: Iterable[str]):
    from cryptography import x509

    names: list = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def _covers(cert_path: Path, hosts: Iterable[str]) -> bool:
    """Whether the certificate exists, is valid for another week and names every host."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < _dt.datetime.now(_dt.timezone.utc):
        return False
    have = {str(n.value) for n in san}
    return all(str(n.value) in have for n in _general_names(hosts))


def ensure_self_signed(data_dir: Path, bind_host: str = "127.0.0.1") -> SelfSignedCert:
    """The data dir's self-signed certificate for `bind_host`, made now when missing or stale."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(data_dir) / TLS_DIR
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    hosts = tuple(default_hosts(bind_host))
    if key_path.is_file() and _covers(cert_path, hosts):
        return SelfSignedCert(cert_path, key_path, hosts, created=False)

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kleinserve self-signed")])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_general_names(hosts)), critical=False)
        # Its own CA, so SSL_CERT_FILE / NODE_EXTRA_CA_CERTS can name it as the trust anchor.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=True,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    tmp_key = key_path.with_name("key.pem.tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key_bytes)
    finally:
        os.close(fd)
    os.chmod(tmp_key, 0o600)
    os.replace(tmp_key, key_path)
    tmp_cert = cert_path.with_name("cert.pem.tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert_path)
    return SelfSignedCert(cert_path, key_path, hosts, created=True)
