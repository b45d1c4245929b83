"""
TLS: terminating HTTPS for clients, and speaking TLS to backends.

Certificate loading
===================

L{load_certificate_set} reads an https listener's C{certificates} (PEM
certificate, key and optional chain files), checks them and finds the names
each one serves; L{load_trust_root} reads a backend group's C{ca} file.
Configuration validation needs only these (C{twisted_slb.tls._certificates}),
and importing this package loads only them: the server and client names
below are imported on first use.

Server side
===========

L{SNIServerOptions} turns a certificate set into one L{OpenSSL.SSL.Context}
per certificate, built once, and picks the context for each connection from
the client's SNI name: exact name, then wildcard, then the default (the
first certificate).  L{server_tls_factory} wraps a protocol factory (a
L{twisted.web.server.Site}) in TLS with a handshake timeout and a single log
line for each failed handshake (C{twisted_slb.tls._server}).

Client side
===========

L{client_tls_options} builds the TLS settings of one backend (a
L{BackendClientTLS}: Twisted's connection creator, and what the lean TLS
client needs), verified with service_identity against the group's C{server_name} or the
backend's host; L{ClientTLSCache} builds each of those once per group and
host rather than once per connection (C{twisted_slb.tls._client}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted_slb.tls._certificates import (
    EXPIRY_WARNING,
    CertificateSet,
    LoadedCertificate,
    load_certificate,
    load_certificate_set,
    load_trust_root,
)

if TYPE_CHECKING:
    from twisted_slb.tls._client import (
        BackendClientTLS,
        ClientTLSCache,
        StagedClientTLS,
        client_tls_options,
        warn_unverified,
    )
    from twisted_slb.tls._server import (
        MODERN_CIPHERS,
        TLS_VERSIONS,
        SNIServerOptions,
        TLSServerFactory,
        _CountingTLSProtocol,
        describe_address,
        log_handshake_failure,
        log_handshake_timeout,
        server_tls_factory,
    )

__all__ = [
    "EXPIRY_WARNING",
    "CertificateSet",
    "LoadedCertificate",
    "load_certificate",
    "load_certificate_set",
    "load_trust_root",
    "MODERN_CIPHERS",
    "TLS_VERSIONS",
    "SNIServerOptions",
    "TLSServerFactory",
    "describe_address",
    "log_handshake_failure",
    "log_handshake_timeout",
    "server_tls_factory",
    "BackendClientTLS",
    "ClientTLSCache",
    "StagedClientTLS",
    "client_tls_options",
    "warn_unverified",
]

#: The names of the server and client modules, imported on first use so that
#: loading a configuration (which needs only the certificate loading above)
#: does not import the TLS runtime.
_SERVER = frozenset(
    [
        "MODERN_CIPHERS",
        "TLS_VERSIONS",
        "SNIServerOptions",
        "TLSServerFactory",
        "_CountingTLSProtocol",
        "describe_address",
        "log_handshake_failure",
        "log_handshake_timeout",
        "server_tls_factory",
    ]
)
_CLIENT = frozenset(["BackendClientTLS", "ClientTLSCache", "StagedClientTLS", "client_tls_options", "warn_unverified"])


def __getattr__(name: str) -> Any:
    if name in _SERVER:
        from twisted_slb.tls import _server

        return getattr(_server, name)
    if name in _CLIENT:
        from twisted_slb.tls import _client

        return getattr(_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
