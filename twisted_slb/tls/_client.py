"""
Client TLS to backends.

L{client_tls_options} builds the TLS settings of one backend (a
L{BackendClientTLS}: Twisted's connection creator, and what the lean TLS
client needs), verified with service_identity against the group's
C{server_name} or the backend's host; L{ClientTLSCache} builds each of those
once per group and host rather than once per connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping, Optional, Tuple

import attr
from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from zope.interface import implementer

from twisted_slb.tls._certificates import load_trust_root

if TYPE_CHECKING:
    # Only for annotations: the interface of trust roots is not re-exported
    # by a public module (twisted.internet.ssl documents it but does not
    # export it).
    from twisted_slb._io.twisted_private import IOpenSSLTrustRoot
    from twisted_slb.config import BackendTLSConfig

log = Logger(namespace="twisted_slb.tls")


def _server_name(group_tls: BackendTLSConfig, host: str) -> str:
    name = group_tls.server_name or host
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """
    Client TLS that accepts any certificate (C{verify = false}), still
    sending the server name by SNI so that a backend hosting several names
    answers with the right one.
    """

    def __init__(self, server_name: str) -> None:
        self._context = CertificateOptions(verify=False).getContext()
        self._sni: Optional[bytes] = None
        if not (isIPAddress(server_name) or isIPv6Address(server_name)):
            self._sni = server_name.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        if self._sni:
            conn.set_tlsext_host_name(self._sni)
        return conn


def warn_unverified(group_name: str) -> None:
    """Log that TLS to the backends of C{group_name} is not verified."""
    log.warn(
        "backends.{group}.tls.verify is false: TLS to these backends is encrypted but "
        "their certificates are not checked, so anyone on the path can impersonate them",
        group=group_name,
    )


def _idna(name: str) -> bytes:
    """C{name} as the IDNA bytes SNI and service_identity take (as Twisted's client TLS encodes it)."""
    try:
        import idna
    except ImportError:  # (Twisted's fallback too)
        return name.encode("idna")
    try:
        return idna.encode(name)
    except idna.IDNAError:
        return name.encode("idna")


@implementer(IOpenSSLClientConnectionCreator)
class BackendClientTLS:
    """
    The TLS settings for connecting to one backend, for both transports.

    As an L{IOpenSSLClientConnectionCreator} it is Twisted's
    (C{optionsForClientTLS}, or L{_UnverifiedClientTLS}): C{connectSSL}
    and the health checks' C{wrapClientTLS} use it.  The lean TLS client
    (L{twisted_slb._io.leantls.connect}) builds its own connection on the
    socket from L{context}, sends L{sni}, and calls L{check} once the
    handshake is done, before anything is written.

    @ivar server_name: the name the certificate must carry (a DNS name or
        an IP address).
    @ivar verify: whether the certificate is checked at all.
    @ivar sni: the IDNA name sent by SNI, or L{None} for an IP address.
    """

    def __init__(self, server_name: str, verify: bool, trust_root: Optional[IOpenSSLTrustRoot]) -> None:
        self.server_name = server_name
        self.verify = verify
        self._is_ip = bool(isIPAddress(server_name) or isIPv6Address(server_name))
        self.sni = None if self._is_ip else _idna(server_name)
        self._trust_root = trust_root
        self._context: Optional[SSL.Context] = None
        self._creator: IOpenSSLClientConnectionCreator
        if verify:
            self._creator = optionsForClientTLS(server_name, trustRoot=trust_root)
        else:
            self._creator = _UnverifiedClientTLS(server_name)

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return self._creator.clientConnectionForTLS(tlsProtocol)

    def context(self) -> SSL.Context:
        """
        The context of the lean client's connections, built once: the same
        L{CertificateOptions} as Twisted's path (TLS 1.2 minimum, its
        ciphers), and with C{verify} the same trust root, so that OpenSSL
        verifies the chain (C{VERIFY_PEER}, fail without a certificate)
        during the handshake.
        """
        if self._context is None:
            if self.verify:
                self._context = CertificateOptions(trustRoot=self._trust_root).getContext()
            else:
                self._context = CertificateOptions(verify=False).getContext()
        return self._context

    def check(self, connection: SSL.Connection) -> None:
        """
        Check that the certificate of C{connection} (handshake done, chain
        verified by OpenSSL) names L{server_name}, with service_identity
        as Twisted's path does; nothing without C{verify}.

        @raise service_identity.VerificationError: it does not.
        """
        if not self.verify:
            return
        from service_identity.pyopenssl import verify_hostname, verify_ip_address

        if self._is_ip:
            verify_ip_address(connection, self.server_name)
        else:
            assert self.sni is not None  # a DNS name has its IDNA form
            verify_hostname(connection, self.sni.decode("ascii"))


def client_tls_options(
    group_tls: BackendTLSConfig,
    host: str,
    trust_root: Optional[IOpenSSLTrustRoot] = None,
    where: str = "backends.tls.ca",
) -> BackendClientTLS:
    """
    The TLS settings for connecting to one backend.

    With C{verify} (the default), the backend's certificate must chain to
    C{trust_root} (else to the C{ca} file, else to the system's trust store)
    and service_identity checks that it names C{server_name}, or when that
    is empty the backend's C{host} (DNS name or IP address).  Without
    C{verify}, any certificate is accepted (see L{warn_unverified}).

    Building the options reads the C{ca} file when no C{trust_root} is
    given: do it at configuration time (L{ClientTLSCache} does), not per
    connection.

    @raise ConfigError: the C{ca} file cannot be read (named by C{where}).
    """
    name = _server_name(group_tls, host)
    if not group_tls.verify:
        return BackendClientTLS(name, False, None)
    if trust_root is None:
        trust_root = platformTrust() if group_tls.ca is None else load_trust_root(group_tls.ca, where)
    return BackendClientTLS(name, True, trust_root)


@attr.s(frozen=True, auto_attribs=True)
class StagedClientTLS:
    """Trust roots loaded by L{ClientTLSCache.stage}, not yet in use."""

    groups: Mapping[str, Tuple[BackendTLSConfig, Optional[IOpenSSLTrustRoot]]]


class ClientTLSCache:
    """
    The client TLS options of every backend, built once per (group, host)
    and reused by every connection (building them loads trust roots and
    creates an OpenSSL context, far too slow to do per connection).

    A group whose C{tls} settings change (a reload) gets fresh options; the
    C{ca} file is re-read then.
    """

    def __init__(self) -> None:
        self._groups: Dict[str, Tuple[BackendTLSConfig, Optional[IOpenSSLTrustRoot]]] = {}
        self._options: Dict[Tuple[str, BackendTLSConfig, str], BackendClientTLS] = {}

    def prepare(self, group_name: str, group_tls: BackendTLSConfig) -> None:
        """
        Load what C{group_name}'s TLS needs (its C{ca} file) and warn when it
        is unverified.  Nothing is done when the settings did not change.

        @raise ConfigError: the C{ca} file cannot be read.
        """
        self.install(self.stage({group_name: group_tls}))

    def stage(self, groups: Mapping[str, BackendTLSConfig]) -> "StagedClientTLS":
        """
        Load the trust roots of every group in C{groups} whose TLS settings
        changed, without changing what connections use: the first half of a
        start or reload, which must fail as a whole before anything changes.
        Give the result to L{install}.

        @param groups: group name -> its C{tls} settings (groups without TLS
            left out).
        @raise ConfigError: a C{ca} file cannot be read or holds no PEM
            certificate (named by its field, C{backends.NAME.tls.ca}).
        """
        staged: Dict[str, Tuple[BackendTLSConfig, Optional[IOpenSSLTrustRoot]]] = {}
        for group_name, group_tls in groups.items():
            known = self._groups.get(group_name)
            if known is not None and known[0] == group_tls:
                continue
            trust_root = None
            if group_tls.verify and group_tls.ca is not None:
                trust_root = load_trust_root(group_tls.ca, f"backends.{group_name}.tls.ca")
            staged[group_name] = (group_tls, trust_root)
        return StagedClientTLS(staged)

    def install(self, staged: "StagedClientTLS") -> None:
        """
        Use the trust roots of L{stage} from now on (it cannot fail), and warn
        about each group that newly has C{verify = false}.
        """
        for group_name, (group_tls, trust_root) in staged.groups.items():
            if not group_tls.verify:
                warn_unverified(group_name)
            self._groups[group_name] = (group_tls, trust_root)
        if staged.groups:
            self._options = {k: v for k, v in self._options.items() if k[0] not in staged.groups}

    def options_for(
        self, group_name: str, group_tls: BackendTLSConfig, host: str
    ) -> BackendClientTLS:
        """
        The TLS options for a connection to C{host} in group C{group_name}.

        @raise ConfigError: the group was not prepared and its C{ca} file
            cannot be read.
        """
        key = (group_name, group_tls, host)
        options = self._options.get(key)
        if options is None:
            self.prepare(group_name, group_tls)
            trust_root = self._groups[group_name][1]
            options = client_tls_options(
                group_tls, host, trust_root=trust_root, where=f"backends.{group_name}.tls.ca"
            )
            self._options[key] = options
        return options
