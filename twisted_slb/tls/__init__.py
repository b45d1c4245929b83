"""
TLS: terminating HTTPS for clients, and speaking TLS to backends (moved to
C{twisted_slb.tls._server}, to be split by concern).
"""

from twisted_slb.tls._server import (  # noqa: F401
    EXPIRY_WARNING,
    MODERN_CIPHERS,
    TLS_VERSIONS,
    CertificateSet,
    ClientTLSCache,
    LoadedCertificate,
    SNIServerOptions,
    StagedClientTLS,
    TLSServerFactory,
    _CountingTLSProtocol,
    client_tls_options,
    describe_address,
    load_certificate,
    load_certificate_set,
    load_trust_root,
    log_handshake_failure,
    log_handshake_timeout,
    server_tls_factory,
    warn_unverified,
)
