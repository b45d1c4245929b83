"""
Loading the certificates and CAs a configuration names: PEM files to
checked L{CertificateSet}s (an https listener's C{certificates}) and trust
roots (a backend group's C{tls.ca}).

This is what configuration validation needs (L{twisted_slb.config} imports
it to check the files at load); it imports neither the server contexts nor
the client options.

L{load_certificate_set} reads an https listener's C{certificates} (PEM
certificate, key and optional chain files), checks them and finds the names
each one serves.  L{load_trust_root} reads a CA file.
"""

from __future__ import annotations

import datetime
import re
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import attr
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger

from twisted_slb.errors import ConfigError

if TYPE_CHECKING:
    # Only for annotations: the interface of trust roots is not re-exported
    # by a public module (twisted.internet.ssl documents it but does not
    # export it).
    from twisted_slb._io.twisted_private import IOpenSSLTrustRoot
    from twisted_slb.config import CertificateConfig

log = Logger(namespace="twisted_slb.tls")

#: A certificate that expires sooner than this gets a warning at every load.
EXPIRY_WARNING = datetime.timedelta(days=14)

_PRIVATE_KEY_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL
)


# --- loading certificates ---------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class LoadedCertificate:
    """
    One checked entry of an https listener's C{certificates}.

    @ivar where: the entry's field path, e.g.
        C{"listeners.secure.certificates[1]"}.
    @ivar config: the L{CertificateConfig} it was read from.
    @ivar certificate: the leaf certificate.
    @ivar key: the leaf's private key (a C{cryptography} private key).
    @ivar chain: intermediate certificates sent after the leaf: those that
        follow the leaf in its own file, then those of the C{chain} file.
    @ivar names: the lowercased DNS names it serves, from its subjectAltName
        extension or, only when it has none, its subject's common name.
        Wildcards look like C{"*.example.com"}.
    @ivar not_before: start of validity (aware UTC datetime).
    @ivar not_after: end of validity (aware UTC datetime).
    """

    where: str
    config: CertificateConfig
    certificate: x509.Certificate
    key: object
    chain: Tuple[x509.Certificate, ...]
    names: Tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime

    def summary(self) -> str:
        """
        One line for a person (C{--check}): the file, the names it serves and
        when it expires.
        """
        names = ", ".join(self.names) or "(no DNS names)"
        return f"{self.config.cert}: {names} (valid until {_when(self.not_after)})"


class CertificateSet:
    """
    The checked certificates of one https listener, and which one serves
    which name.

    The first certificate is the default: it serves clients that send no SNI
    name or a name no certificate has.  When two certificates claim the same
    name, the first one in the configuration serves it (and a warning says
    so).

    @ivar entries: the L{LoadedCertificate}s, in configuration order.
    @ivar warnings: problems that do not stop the listener (an expired
        certificate, a name claimed twice...), each a complete sentence
        naming the field and file; C{--check} prints them.
    """

    def __init__(
        self, entries: Sequence[LoadedCertificate], warnings: Sequence[str] = ()
    ) -> None:
        if not entries:
            raise ValueError("a CertificateSet needs at least one certificate")
        self.entries: Tuple[LoadedCertificate, ...] = tuple(entries)
        found: List[str] = list(warnings)
        self._exact: Dict[str, int] = {}
        self._wildcard: Dict[str, int] = {}
        for index, entry in enumerate(self.entries):
            for name in entry.names:
                if name.startswith("*."):
                    table, key = self._wildcard, name[2:]
                elif "*" in name:
                    found.append(
                        f"{entry.where}.cert: {entry.config.cert} has the name {name!r}; "
                        f"only a whole leftmost label can be a wildcard (*.example.com), "
                        f"so this name is not used to choose a certificate"
                    )
                    continue
                else:
                    table, key = self._exact, name
                first = table.setdefault(key, index)
                if first != index:
                    found.append(
                        f"{entry.where}.cert: the name {name!r} of {entry.config.cert} is "
                        f"also in {self.entries[first].where} "
                        f"({self.entries[first].config.cert}), which serves it"
                    )
        self.warnings: Tuple[str, ...] = tuple(found)

    @property
    def default(self) -> LoadedCertificate:
        """The certificate for clients without a known SNI name."""
        return self.entries[0]

    def index_for(self, server_name: Union[str, bytes, None]) -> Optional[int]:
        """
        Which certificate serves C{server_name}: exact name first, then a
        wildcard (C{*.example.com} matches exactly one more label:
        C{a.example.com} but neither C{example.com} nor C{a.b.example.com}).
        Names compare case-insensitively; a trailing dot is ignored.

        @param server_name: the client's SNI name, as OpenSSL gives it
            (ASCII bytes, IDNA-encoded) or text; L{None} when the client sent
            none.
        @return: an index into L{entries}, or L{None} when no certificate
            claims the name (the caller then uses the default, index 0).
        """
        if server_name is None:
            return None
        if isinstance(server_name, bytes):
            try:
                server_name = server_name.decode("ascii")
            except UnicodeDecodeError:
                return None
        name = server_name.lower().rstrip(".")
        index = self._exact.get(name)
        if index is None:
            label, dot, parent = name.partition(".")
            if label and parent:
                index = self._wildcard.get(parent)
        return index

    def certificate_for(self, server_name: Union[str, bytes, None]) -> LoadedCertificate:
        """The L{LoadedCertificate} that a client sending C{server_name} gets."""
        index = self.index_for(server_name)
        return self.entries[0 if index is None else index]


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path}: {e.strerror or e}") from None


def _read_certificates(path: str, field: str) -> List[x509.Certificate]:
    data = _read(path, field)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            f"{field}: {path} is not a PEM certificate file "
            f"(no -----BEGIN CERTIFICATE----- block)"
        )
    try:
        return list(x509.load_pem_x509_certificates(data))
    except ValueError as e:
        raise ConfigError(f"{field}: {path} has a PEM certificate that cannot be parsed ({e})") from None


def _read_key(path: str, field: str):
    data = _read(path, field)
    # The key may share its file with certificates (a combined PEM): take the
    # key's own block.
    match = _PRIVATE_KEY_BLOCK.search(data)
    if match is None:
        raise ConfigError(
            f"{field}: {path} is not a PEM private key (no -----BEGIN ... PRIVATE KEY----- block)"
        )
    try:
        return serialization.load_pem_private_key(match.group(0), password=None)
    except TypeError:
        raise ConfigError(
            f"{field}: {path} is an encrypted private key; twisted_slb cannot ask for a "
            f"passphrase, so give it an unencrypted key readable only by its user"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{field}: {path} has a private key that cannot be parsed ({e})") from None


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _names(certificate: x509.Certificate) -> Tuple[str, ...]:
    """
    The DNS names a certificate serves: its subjectAltName DNS names, or only
    when it has no subjectAltName extension at all, its subject's CN (as
    browsers and RFC 6125 do).
    """
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        names = [
            a.value
            for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if isinstance(a.value, str)
        ]
    else:
        names = san.value.get_values_for_type(x509.DNSName)
    unique: Dict[str, None] = {}
    for n in names:
        unique[n.strip().lower().rstrip(".")] = None
    return tuple(n for n in unique if n)


def _validity(certificate: x509.Certificate) -> Tuple[datetime.datetime, datetime.datetime]:
    # cryptography >= 42 has the aware *_utc properties; older ones (PyPy's
    # pinned version) give naive datetimes that are UTC.
    before = getattr(certificate, "not_valid_before_utc", None)
    after = getattr(certificate, "not_valid_after_utc", None)
    if before is None or after is None:
        utc = datetime.timezone.utc
        before = certificate.not_valid_before.replace(tzinfo=utc)
        after = certificate.not_valid_after.replace(tzinfo=utc)
    return before, after


def _when(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_certificate(
    config: CertificateConfig, where: str, now: Optional[datetime.datetime] = None
) -> Tuple[LoadedCertificate, List[str]]:
    """
    Read and check one certificate entry.

    @param config: the entry.
    @param where: its field path, e.g. C{"listeners.secure.certificates[1]"}.
    @param now: the time validity is judged at (aware datetime); default: now.
    @return: the L{LoadedCertificate} and a list of warnings about it.
    @raise ConfigError: a file is missing or unreadable, is not PEM, or the
        key does not match the certificate.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    certificates = _read_certificates(config.cert, f"{where}.cert")
    leaf, chain = certificates[0], certificates[1:]
    key = _read_key(config.key, f"{where}.key")
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise ConfigError(
            f"{where}.key: {config.key} does not match certificate {config.cert}"
        )
    if config.chain is not None:
        chain = chain + _read_certificates(config.chain, f"{where}.chain")
    warnings: List[str] = []
    if chain and chain[0].subject != leaf.issuer:
        warnings.append(
            f"{where}.chain: the chain of {config.cert} does not start with the certificate "
            f"of its issuer ({leaf.issuer.rfc4514_string()}); clients may not be able to "
            f"verify it"
        )
    not_before, not_after = _validity(leaf)
    # Expired and not-yet-valid certificates are loaded with a loud warning,
    # not refused.  Refusing would make a routine SIGHUP reload (or a restart
    # at 3 a.m.) take every name of the listener down because one certificate
    # lapsed, where serving it only breaks the clients of that one name, who
    # see a clear browser error; HAProxy and nginx serve such certificates too.
    # The warning is logged at every load and reload, and --check prints it.
    if not_after < now:
        warnings.append(
            f"{where}.cert: {config.cert} expired on {_when(not_after)}; it is still served, "
            f"but clients will refuse it: renew it and reload"
        )
    elif not_before > now:
        warnings.append(
            f"{where}.cert: {config.cert} is not valid before {_when(not_before)}; it is still "
            f"served, but clients will refuse it until then"
        )
    elif not_after - now < EXPIRY_WARNING:
        warnings.append(
            f"{where}.cert: {config.cert} expires soon, on {_when(not_after)}: renew it"
        )
    loaded = LoadedCertificate(
        where=where,
        config=config,
        certificate=leaf,
        key=key,
        chain=tuple(chain),
        names=_names(leaf),
        not_before=not_before,
        not_after=not_after,
    )
    return loaded, warnings


def load_certificate_set(
    certs: Sequence[CertificateConfig],
    where: str,
    now: Optional[datetime.datetime] = None,
) -> CertificateSet:
    """
    Read and check every certificate of an https listener.

    Files are read here, at configuration load and reload, never while
    serving a connection.  Each warning of the result is also logged.

    @param certs: the listener's C{certificates}; the first is the default.
    @param where: the field path of the list, for messages, e.g.
        C{"listeners.secure.certificates"}.
    @param now: the time validity is judged at (aware datetime); default: now.
    @return: the L{CertificateSet}.
    @raise ConfigError: the list is empty, a file is missing or unreadable or
        not PEM, or a key does not match its certificate.  The message names
        the field (C{listeners.secure.certificates[1].key}) and the file.
    """
    if not certs:
        raise ConfigError(f"{where}: an https listener needs at least one certificate")
    entries = []
    warnings: List[str] = []
    for index, config in enumerate(certs):
        entry, found = load_certificate(config, f"{where}[{index}]", now)
        if not entry.names and index > 0:
            found.append(
                f"{where}[{index}].cert: {config.cert} has no DNS name, so no client can "
                f"select it by SNI; only the first certificate serves clients without a name"
            )
        entries.append(entry)
        warnings.extend(found)
    certificate_set = CertificateSet(entries, warnings)
    for problem in certificate_set.warnings:
        # (Not "warning=": trial and the legacy log take an event with a
        # "warning" key for a Python warning.)
        log.warn("{problem}", problem=problem)
    return certificate_set



def load_trust_root(ca: str, where: str) -> IOpenSSLTrustRoot:
    """
    The certificates of the PEM file C{ca} (one or several), as a trust root
    for L{optionsForClientTLS}.

    @param where: the field path for messages, e.g. C{"backends.web.tls.ca"}.
    @raise ConfigError: the file is missing, unreadable or holds no PEM
        certificate.
    """
    certificates = _read_certificates(ca, where)
    return trustRootFromCertificates(
        [
            Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in certificates
        ]
    )
