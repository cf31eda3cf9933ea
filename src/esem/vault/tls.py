"""TLS for the vault: a self-signed certificate made at first start, and pinning.

The server generates an ECDSA P-256 key and a self-signed certificate for 127.0.0.1 in
its directory the first time it starts (key mode 0600, written with ``O_EXCL``). There
is no CA: a client trusts exactly that certificate, loaded from the file it was given,
as its only trust anchor, and additionally compares the SHA-256 fingerprint of what the
server presented (defence in depth: the pin holds even if the trust store were
widened). TLS 1.3 only: both ends are ours, so there is nothing older to talk to.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from esem.vault.errors import CertificateMismatch

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
HOST = "127.0.0.1"  # the vault listens on loopback only
CERT_VALID_DAYS = 3650  # self-signed and pinned: expiry would only break clients


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never overwrite: a second start must not race
    the first into two keys), write and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_certificate(directory: Path) -> tuple[Path, Path]:
    """The certificate and key paths in ``directory``, generating them if absent."""
    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    if cert_path.exists() or key_path.exists():
        raise ValueError(f"{directory} has only one of {CERT_NAME} and {KEY_NAME}; "
                         "remove the other to generate a new pair (clients must re-pin)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "esem vault")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, hex."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def client_context(cert_pem: bytes) -> ssl.SSLContext:
    """A context that trusts only ``cert_pem`` and checks the server's name is 127.0.0.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=cert_pem.decode("ascii"))
    return ctx


def check_pin(sock: ssl.SSLSocket, expected_fingerprint: str) -> None:
    der = sock.getpeercert(binary_form=True)
    got = hashlib.sha256(der or b"").hexdigest()
    if not hmac.compare_digest(got, expected_fingerprint):
        raise CertificateMismatch(f"server certificate {got[:16]}.. is not the pinned "
                                  f"{expected_fingerprint[:16]}..")
