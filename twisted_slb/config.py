"""
Configuration: TOML in, frozen attrs values out.

Every check and every error message lives here; the rest of twisted_slb never
sees a raw TOML dictionary.  L{load_config} is the one entry point.  Every
problem is a L{ConfigError} whose message names the file, the field path
(C{listeners.tcp.persistence.timeout}), the bad value and what is allowed.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import attr

# --- values ---------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class ServerConfig:
    """One backend server: C{{ name = "a", address = "10.0.0.1:8080", weight = 100 }}."""

    name: str
    host: str
    port: int
    weight: int = 100


@attr.s(frozen=True, auto_attribs=True)
class BackendTLSConfig:
    """C{[backends.X].tls}: TLS from the balancer to the backends."""

    verify: bool = True
    ca: Optional[str] = None  # PEM file of trusted CAs; None: the system's trust store
    server_name: str = ""  # "" means: the host part of each server's address


@attr.s(frozen=True, auto_attribs=True)
class HealthCheckConfig:
    """C{[backends.X].health_check}."""

    type: str = "tcp"  # "tcp" | "http"
    path: str = "/"
    host: str = ""  # Host header for http checks; "" means the server's address
    expect: Tuple[int, int] = (200, 399)  # inclusive status range
    interval: float = 2.0
    timeout: float = 5.0
    healthy_threshold: int = 3
    unhealthy_threshold: int = 3


@attr.s(frozen=True, auto_attribs=True)
class GroupConfig:
    """C{[backends.NAME]}: a backend group."""

    name: str
    servers: Tuple[ServerConfig, ...]
    scheduler: str = "wrr"  # "rr" | "wrr" | "wlc" | "hash"
    connect_timeout: float = 5.0
    retries: int = 2
    tls: Optional[BackendTLSConfig] = None
    health_check: Optional[HealthCheckConfig] = None


@attr.s(frozen=True, auto_attribs=True)
class PersistenceConfig:
    """
    A C{persistence = {...}} table, on a listener or a rule.

    C{type} is C{"source_ip"} (C{timeout} 1..3600), C{"insert_cookie"}
    (C{timeout} 1..86400, plus the cookie attributes) or C{"rewrite_cookie"}
    (C{cookie} required; expiry is the backend's).
    """

    type: str
    timeout: int = 0  # seconds; unused by rewrite_cookie
    cookie: str = ""  # insert_cookie: default "SERVERID"; rewrite_cookie: required
    secure: str = "auto"  # "auto" (on for https) | "always" | "never"
    httponly: bool = True
    samesite: str = "lax"  # "lax" | "strict" | "none" | "" (attribute left out)
    domain: str = ""
    path: str = "/"
    refresh: bool = True  # sliding expiry
    max_entries: int = 1_000_000  # source_ip: stick table size bound (LRU)


@attr.s(frozen=True, auto_attribs=True)
class RuleConfig:
    """C{[[listeners.X.rules]]}: a forwarding rule; first match wins."""

    domain: str = ""  # "" matches any host; exact or "*.example.com"; lowercased
    path: str = "/"  # path prefix
    backends: str = ""  # group name; "" means the listener's group
    persistence: Optional[PersistenceConfig] = None


@attr.s(frozen=True, auto_attribs=True)
class CertificateConfig:
    """One entry of an https listener's C{certificates}."""

    cert: str
    key: str
    chain: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class ListenerConfig:
    """C{[listeners.NAME]}."""

    name: str
    protocol: str  # "tcp" | "http" | "https"
    bind: str  # a Twisted server endpoint description
    backends: Optional[str] = None  # group name; None only for a redirect listener
    persistence: Optional[PersistenceConfig] = None
    max_connections: int = 0  # 0: unlimited
    # tcp
    idle_timeout: float = 900.0
    proxy_protocol: Optional[str] = None  # None | "v1" | "v2"
    # http and https
    request_timeout: float = 60.0
    client_idle_timeout: float = 60.0
    max_header_bytes: int = 65536
    max_headers: int = 100
    max_connections_per_ip: int = 0  # 0: unlimited
    rules: Tuple[RuleConfig, ...] = ()
    https_redirect_port: Optional[int] = None
    # https
    certificates: Tuple[CertificateConfig, ...] = ()
    min_tls: str = "1.2"  # "1.2" | "1.3"
    alpn: Tuple[str, ...] = ("http/1.1",)


@attr.s(frozen=True, auto_attribs=True)
class AdminConfig:
    """C{[admin]}."""

    bind: str
    token: str = ""  # required for POST actions unless bound to loopback


@attr.s(frozen=True, auto_attribs=True)
class Config:
    """A whole configuration file."""

    path: str
    backends: Mapping[str, GroupConfig]
    listeners: Mapping[str, ListenerConfig]
    admin: Optional[AdminConfig] = None
    workers: int = 1
    grace_period: float = 10.0  # seconds open requests may finish on SIGTERM


class ConfigError(Exception):
    """
    A configuration file is invalid.

    C{str(error)} is the complete message for a person: the file, the field
    path, the bad value and what is allowed.
    """


def load_config(path: str) -> Config:
    """
    Read, parse and validate the TOML file at C{path}.

    @raise ConfigError: the file cannot be read, is not TOML, or is invalid.
    """
    raise NotImplementedError("being written")
