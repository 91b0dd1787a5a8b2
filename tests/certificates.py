"""Certificates made at run time for TLS tests: CAs (and intermediates), server certificates for
127.0.0.1 and localhost, and client certificates, written as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Pem:
    """A certificate and its key, as files."""

    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        """(certificate, key) bytes, as grpc's credentials take them."""
        return self.cert.read_bytes(), self.key.read_bytes()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """A private key as PKCS#8 PEM, encrypted with `passphrase` when one is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def cert_pem(*certificates: x509.Certificate) -> bytes:
    """Certificates as one PEM chain, in the order given."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


class Authority:
    """A key and a certificate that signs others, issuing into `folder`: a self-signed CA, an
    intermediate (`parent`), or, for attacks, a leaf (`ca=False`) or a look-alike whose subject
    is another CA's (`subject`)."""

    cert: x509.Certificate

    def __init__(
        self,
        folder: Path,
        name: str,
        *,
        parent: Authority | None = None,
        ca: bool = True,
        subject: str | None = None,
    ) -> None:
        self.folder = folder
        self.name = name
        self.parent = parent
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject_name = _name(subject or f"{name} test CA")
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject_name)
            .issuer_name(parent.cert.subject if parent else subject_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        self.cert = builder.sign(parent.key if parent else self.key, hashes.SHA256())
        self.cert_file = folder / f"{name}-ca.pem"
        self.cert_file.write_bytes(cert_pem(self.cert))

    @property
    def pem(self) -> bytes:
        """The CA certificate."""
        return self.cert_file.read_bytes()

    def issue(
        self,
        common_name: str,
        *,
        server: bool,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        usage: x509.ObjectIdentifier | None = None,
        with_chain: bool = False,
        key: PrivateKey | None = None,
    ) -> Pem:
        """A leaf certificate signed by this authority (for 127.0.0.1 and localhost when
        `server`, else a client certificate), valid from `not_before` to `not_after` (by default:
        from 5 minutes ago for a day), for `usage` (by default: server or client authentication);
        `with_chain` adds this authority's certificate (and its parents' but the root) after the
        leaf; `key` is the leaf's key (by default a new EC key)."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        default_usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or _now() - datetime.timedelta(minutes=5))
            .not_valid_after(not_after or _now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage or default_usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        chain = [cert]
        if with_chain:
            authority: Authority | None = self
            while authority is not None and authority.parent is not None:
                chain.append(authority.cert)
                authority = authority.parent
        stem = self.folder / f"{self.name}-{common_name}"
        pem = Pem(Path(f"{stem}.pem"), Path(f"{stem}-key.pem"))
        pem.cert.write_bytes(cert_pem(*chain))
        pem.key.write_bytes(key_pem(key))
        return pem
