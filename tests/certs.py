"""
Certificates made at test time, so that no test depends on files that expire
or on keys checked into the repository.

L{CertificateAuthority} is a throw-away CA; L{CertificateAuthority.issue}
makes leaf certificates with whatever names, validity and key a test needs
(SAN lists, wildcard SANs, CN-only, expired, not yet valid).  L{Issued.write}
and L{CertificateAuthority.write} put PEM files into a directory, normally a
trial temporary directory (C{self.mktemp()}).

Keys are ECDSA P-256: generating them takes microseconds, where RSA keys
would make the test module noticeably slower.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Optional, Sequence, Tuple

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ONE_DAY = datetime.timedelta(days=1)


def utc_now() -> datetime.datetime:
    """The current time, as an aware UTC datetime."""
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    """C{key} as an unencrypted PKCS#8 PEM block."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """C{cert} as a PEM block."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


@attr.s(frozen=True, auto_attribs=True)
class Issued:
    """
    A certificate and its private key.

    @ivar certificate: the L{x509.Certificate}.
    @ivar key: its private key.
    @ivar issuer: the L{CertificateAuthority} that signed it, or L{None} for a
        CA's own certificate.
    """

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    issuer: Optional["CertificateAuthority"] = None

    def write(self, directory: str, basename: str) -> Tuple[str, str]:
        """
        Write C{<basename>.pem} (the certificate) and C{<basename>.key} into
        C{directory}, creating it if needed.

        @return: the certificate's path and the key's path.
        """
        os.makedirs(directory, exist_ok=True)
        cert = _write(os.path.join(directory, basename + ".pem"), cert_pem(self.certificate))
        key = _write(os.path.join(directory, basename + ".key"), key_pem(self.key))
        return cert, key


class CertificateAuthority:
    """
    A self-signed CA that issues leaf certificates.

    @ivar name: the CA's common name.
    @ivar key: the CA's private key.
    @ivar certificate: the CA's self-signed certificate.
    """

    def __init__(self, name: str = "twisted_slb test CA") -> None:
        self.name = name
        self.key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = utc_now()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - ONE_DAY)
            .not_valid_after(now + 30 * ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        names: Sequence[str] = (),
        common_name: Optional[str] = None,
        ip_addresses: Sequence[str] = (),
        not_before: Optional[datetime.datetime] = None,
        not_after: Optional[datetime.datetime] = None,
        key=None,
    ) -> Issued:
        """
        Issue a server certificate.

        @param names: DNS names for the subjectAltName extension (wildcards
            such as C{"*.example.com"} allowed).  With neither C{names} nor
            C{ip_addresses}, the certificate has no subjectAltName at all.
        @param common_name: the subject's CN; defaults to the first name, or
            C{"no name"} when there is none.
        @param ip_addresses: IP addresses for the subjectAltName extension.
        @param not_before: start of validity; default: a day ago.
        @param not_after: end of validity; default: thirty days from now.
        @param key: the private key to certify; default: a new one.
        """
        if key is None:
            key = new_key()
        if common_name is None:
            common_name = names[0] if names else "no name"
        now = utc_now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before if not_before is not None else now - ONE_DAY)
            .not_valid_after(not_after if not_after is not None else now + 30 * ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        alt_names = [x509.DNSName(n) for n in names] + [
            x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses
        ]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key, self)

    def write(self, directory: str, basename: str = "ca") -> str:
        """
        Write the CA certificate as C{<basename>.pem} into C{directory}.

        @return: its path.
        """
        os.makedirs(directory, exist_ok=True)
        return _write(os.path.join(directory, basename + ".pem"), cert_pem(self.certificate))
