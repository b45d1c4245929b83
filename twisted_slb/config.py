"""
Configuration: TOML in, frozen attrs values out.

Every check and every error message lives here; the rest of twisted_slb never
sees a raw TOML dictionary.  L{load_config} is the one entry point.  Every
problem is a L{ConfigError} whose message names the file, the field path
(C{listeners.tcp.persistence.timeout}), the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attr

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on PyPy 3.9
    import tomli as tomllib

from twisted_slb.errors import ConfigError  # defined apart so that twisted_slb.tls need not import this module
from twisted_slb.choices import (
    HEALTH_CHECK_TYPES,
    ON_FAILURE,
    OVER_LIMIT,
    PERSISTENCE_TYPES,
    PROTOCOLS,
    PROXY_PROTOCOL_VERSIONS,
    SCHEDULER_NAMES,
    STORE_TYPES,
)

# --- values ---------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class ServerConfig:
    """
    One backend server: C{{ name = "a", address = "10.0.0.1:8080", weight = 100 }}.

    C{cookie} is the fixed value cookie persistence uses for it (HAProxy's
    C{server a ... cookie s1}); C{""} means its opaque id.
    """

    name: str
    host: str
    port: int
    weight: int = 100
    cookie: str = ""


@attr.s(frozen=True, auto_attribs=True)
class BackendTLSConfig:
    """C{[backends.X].tls}: TLS from the balancer to the backends."""

    verify: bool = True
    ca: Optional[str] = None  # PEM file of trusted CAs; None: the system's trust store
    server_name: str = ""  # "" means: the host part of each server's address


@attr.s(frozen=True, auto_attribs=True)
class HealthCheckConfig:
    """C{[backends.X].health_check}."""

    type: str = "tcp"  # "tcp" | "http" | "udp"
    path: str = "/"
    host: str = ""  # Host header for http checks; "" means the server's address
    expect: Tuple[int, int] = (200, 399)  # inclusive status range
    interval: float = 2.0
    timeout: float = 5.0
    healthy_threshold: int = 3
    unhealthy_threshold: int = 3
    # udp: the datagram sent, and the bytes a reply must contain ("" : any reply)
    send: bytes = b""
    expect_bytes: bytes = b""


@attr.s(frozen=True, auto_attribs=True)
class PassiveHealthConfig:
    """
    C{[backends.X].health_check.passive}: outlier detection on real traffic,
    as Envoy's.  See docs/health.md for the figures behind the defaults.
    """

    consecutive_failures: int = 3  # failed connects in a row that eject; 0: off
    failure_rate: float = 50.0  # percent of failed requests in the window that ejects; 0: off
    min_requests: int = 20  # requests (successes and failures) in the window before failure_rate applies
    interval: float = 10.0  # seconds: the failure-rate window, and the step of the ejection count's decay
    base_ejection_time: float = 10.0  # seconds out for a first ejection; n-th in a row: n times this
    max_ejection_time: float = 300.0  # the longest ejection
    max_ejection_percent: float = 50.0  # at most this share of a group is ejected (at least one backend, never all)
    slow_start: float = 10.0  # seconds over which a backend back from an ejection ramps up to its weight


@attr.s(frozen=True, auto_attribs=True)
class GroupConfig:
    """C{[backends.NAME]}: a backend group."""

    name: str
    servers: Tuple[ServerConfig, ...]
    scheduler: str = "wrr"  # "rr" | "wrr" | "wlc" | "hash"
    hash_key: str = "source_ip"  # scheduler "hash": "source_ip" | "header:NAME" | "cookie:NAME" | "query:NAME" | "path" | "host"
    hash_balance_factor: int = 0  # scheduler "hash": percent of the average load a backend may take; 0: no bound
    connect_timeout: float = 5.0
    retries: int = 2
    tls: Optional[BackendTLSConfig] = None
    health_check: Optional[HealthCheckConfig] = None  # active checks; None: none
    slow_start: float = 0.0  # seconds a backend that comes back up takes to reach its weight
    passive: PassiveHealthConfig = attr.Factory(PassiveHealthConfig)


@attr.s(frozen=True, auto_attribs=True)
class PersistenceConfig:
    """
    A C{persistence = {...}} table, on a listener or a rule.

    C{type} is C{"source_ip"} (C{timeout} 1..3600), C{"insert_cookie"}
    (C{timeout} 1..86400, plus the cookie attributes and the lifetimes
    C{max_idle} and C{max_life}), C{"rewrite_cookie"} (C{cookie} required;
    expiry is the backend's), C{"header"} (C{header} required; a stick table
    keyed by its value, C{timeout} 1..86400) or C{"learn_cookie"} (C{cookie}
    required; a stick table keyed by the cookie's value, learned from the
    backend, C{timeout} 1..86400).  C{on_failure} is C{"repin"} or
    C{"strict"} for every type.
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
    max_entries: int = 1_000_000  # source_ip, header, learn_cookie: stick table size bound (LRU)
    header: str = ""  # header: the request header whose value is the table key
    on_failure: str = "repin"  # "repin" | "strict": what a pin to a down or refusing backend does
    max_idle: int = 0  # insert_cookie: seconds since the cookie was last written; 0: the timeout
    max_life: int = 0  # insert_cookie: seconds since the cookie was first issued; 0: no limit


@attr.s(frozen=True, auto_attribs=True)
class SplitConfig:
    """One entry of a weighted split: C{{ group = "canary", weight = 10 }}."""

    group: str
    weight: int = 1


@attr.s(frozen=True, auto_attribs=True)
class RuleConfig:
    """C{[[listeners.X.rules]]}: a forwarding rule; first match wins."""

    domain: str = ""  # "" matches any host; exact or "*.example.com"; lowercased
    path: str = "/"  # path prefix
    backends: str = ""  # group name (the first of a split); "" means the listener's group
    persistence: Optional[PersistenceConfig] = None
    split: Tuple[SplitConfig, ...] = ()  # backends = [ { group, weight }, ... ]; () for one group
    request_buffering: Optional[bool] = None  # None: the listener's


@attr.s(frozen=True, auto_attribs=True)
class CertificateConfig:
    """One entry of an https listener's C{certificates}."""

    cert: str
    key: str
    chain: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class ClientIPConfig:
    """
    C{client_ip = { source = "...", trusted = [...] }}: where a listener's
    client address comes from (see L{twisted_slb.clientip}).

    C{source} is C{"peer"} (the connection's other end), C{"x-forwarded-for"}
    or C{"forwarded"} (HTTP and HTTPS listeners: the header, when the peer
    is trusted), or C{"proxy_protocol"} (a PROXY v1/v2 header from a
    trusted peer starts every connection).  C{trusted} holds CIDR blocks,
    canonical (C{"10.0.0.0/8"}); required by every source but C{"peer"}.
    """

    source: str = "peer"
    trusted: Tuple[str, ...] = ()


@attr.s(frozen=True, auto_attribs=True)
class ListenerConfig:
    """C{[listeners.NAME]}."""

    name: str
    protocol: str  # "tcp" | "http" | "https" | "udp"
    bind: str  # a Twisted server endpoint description; for udp "udp:PORT[:interface=ADDR]"
    backends: Optional[str] = None  # group name (the first of a split); None only for a redirect listener
    persistence: Optional[PersistenceConfig] = None
    max_connections: int = 0  # 0: unlimited
    over_limit: str = "wait"  # "wait" | "close": connections over max_connections
    access_log: bool = True  # one line per connection (tcp) or request (http)
    access_log_path: Optional[str] = None  # None: the lines go to twistd's log
    client_ip: ClientIPConfig = attr.Factory(ClientIPConfig)
    # tcp
    idle_timeout: float = 900.0
    proxy_protocol: Optional[str] = None  # None | "v1" | "v2"
    # http and https
    request_timeout: float = 60.0
    response_idle_timeout: float = 60.0  # seconds a backend may go quiet within a response
    client_idle_timeout: float = 60.0
    max_header_bytes: int = 65536
    max_headers: int = 100
    max_body_bytes: int = 0  # 0: unlimited
    request_buffering: bool = False  # read bodies whole before forwarding them (else they stream)
    tunnel_timeout: float = 3600.0  # idle seconds of an upgraded (WebSocket) connection
    backend_header: str = ""  # http(s): a response header naming the backend that answered; "": none
    max_connections_per_ip: int = 0  # 0: unlimited
    rules: Tuple[RuleConfig, ...] = ()
    https_redirect_port: Optional[int] = None
    split: Tuple[SplitConfig, ...] = ()  # backends = [ { group, weight }, ... ]; () for one group
    # https
    certificates: Tuple[CertificateConfig, ...] = ()
    min_tls: str = "1.2"  # "1.2" | "1.3"
    alpn: Tuple[str, ...] = ("h2", "http/1.1")  # "h2" in it: HTTP/2 (twisted_slb.web.h2)
    max_concurrent_streams: int = 100  # HTTP/2 streams open at once per connection
    max_header_list_size: int = 65536  # HTTP/2: the longest header list (and header block), bytes
    hpack_table_size: int = 4096  # HTTP/2: the HPACK dynamic table a client may make us keep, bytes
    # udp (idle_timeout above is shared with tcp; a udp listener's default is 30)
    max_sessions: int = 100_000


@attr.s(frozen=True, auto_attribs=True)
class AdminConfig:
    """C{[admin]}."""

    bind: str
    token: str = ""  # when set, POST actions need "Authorization: Bearer <token>"
    #: host names (besides the bind address and localhost) a request's Host may name
    hosts: Tuple[str, ...] = ()
    max_connections: int = 64  # open admin connections (not counted in the global max_connections)


@attr.s(frozen=True, auto_attribs=True)
class StoreConfig:
    """
    C{[store]}: where the stick tables (source_ip, header, learn_cookie) live.

    C{type} is C{"memory"} (each process its own tables) or C{"redis"}
    (shared by every process and instance that names the same server, with
    the in-process table as a cache in front).
    """

    type: str = "memory"
    url: str = ""  # redis:// or rediss:// (TLS), password and database in the URL
    prefix: str = "slb:"  # keys are PREFIX + table name + ":" + client key
    timeout: float = 0.05  # seconds a new client's first request may wait for a lookup


@attr.s(frozen=True, auto_attribs=True)
class Config:
    """A whole configuration file."""

    path: str
    backends: Mapping[str, GroupConfig]
    listeners: Mapping[str, ListenerConfig]
    admin: Optional[AdminConfig] = None
    workers: int = 1
    grace_period: float = 10.0  # seconds open requests may finish on SIGTERM
    max_connections: int = 0  # over all listeners (not the admin one); 0: unlimited
    store: StoreConfig = attr.Factory(StoreConfig)



# --- loading --------------------------------------------------------------

_MISSING = object()
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# RFC 6265 cookie-name: an RFC 9110 token.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")

#: hash_key values without a name; "header:", "cookie:" and "query:" take one.
HASH_KEYS = ("source_ip", "path", "host")
HASH_KEY_KINDS = ("header", "cookie", "query")

# Keys each listener protocol accepts (beyond the common ones).
_COMMON_LISTENER_KEYS = (
    "protocol", "bind", "backends", "persistence", "max_connections", "over_limit", "access_log", "client_ip",
)
_TCP_KEYS = ("idle_timeout", "proxy_protocol")
_HTTP_KEYS = (
    "request_timeout", "response_idle_timeout", "client_idle_timeout", "max_header_bytes", "max_headers", "max_body_bytes", "tunnel_timeout",
    "max_connections_per_ip", "request_buffering", "rules", "https_redirect_port", "backend_header",
)
_HTTPS_KEYS = ("certificates", "min_tls", "alpn", "max_concurrent_streams", "max_header_list_size", "hpack_table_size")
#: The ALPN protocols a listener can speak.
ALPN_PROTOCOLS = ("h2", "http/1.1")
_UDP_KEYS = ("protocol", "bind", "backends", "persistence", "access_log", "idle_timeout", "max_sessions")
_LISTENER_KEYS = {
    "tcp": _COMMON_LISTENER_KEYS + _TCP_KEYS,
    "http": _COMMON_LISTENER_KEYS + _HTTP_KEYS,
    "https": _COMMON_LISTENER_KEYS + _HTTP_KEYS + _HTTPS_KEYS,
    "udp": _UDP_KEYS,
}
_PERSISTENCE_KEYS = {
    "source_ip": ("type", "timeout", "max_entries", "on_failure"),
    "insert_cookie": ("type", "timeout", "cookie", "secure", "httponly", "samesite", "domain", "path", "refresh",
                      "on_failure", "max_idle", "max_life"),
    "rewrite_cookie": ("type", "cookie", "on_failure"),
    "header": ("type", "header", "timeout", "max_entries", "on_failure"),
    "learn_cookie": ("type", "cookie", "timeout", "max_entries", "on_failure"),
}
#: The longest max_life: a year.
MAX_LIFE = 365 * 86400
#: A server's fixed cookie value: no '.' (it separates the time stamps) and
#: no '~' (it ends the rewrite_cookie prefix).
_SERVER_COOKIE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TIMEOUT_RANGE = {"source_ip": (1, 3600), "insert_cookie": (1, 86400), "header": (1, 86400),
                  "learn_cookie": (1, 86400)}
_DEFAULT_TIMEOUT = {"source_ip": 1000, "insert_cookie": 3600, "header": 3600, "learn_cookie": 3600}


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


class _Table:
    """
    One TOML table being read: knows its file and field path, so that every
    error it raises names them.
    """

    def __init__(self, file: str, path: str, data: Any, allowed: Sequence[str]) -> None:
        self.file = file
        self.path = path
        if not isinstance(data, dict):
            raise self.error_at(path, "must be a table", data, "a table such as { key = value }")
        self.data = data
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"{file}: {self.field(key)}: unknown key{hint}; allowed keys here: {', '.join(allowed)}"
                )

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error_at(self, field: str, problem: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"{self.file}: {field}: {problem}; got {value!r}; allowed: {allowed}")

    def error(self, key: str, problem: str, value: Any, allowed: str) -> ConfigError:
        return self.error_at(self.field(key), problem, value, allowed)

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.data:
            if default is _MISSING:
                raise ConfigError(f"{self.file}: {self.field(key)}: required but missing")
            return default
        return self.data[key]

    def string(self, key: str, default: Any = _MISSING, choices: Optional[Sequence[str]] = None,
               allowed: str = "a string") -> Any:
        value = self.get(key, default)
        if value is default and key not in self.data:
            return value
        if choices is not None:
            if not isinstance(value, str) or value not in choices:
                raise self.error(key, "not one of the choices", value, " | ".join(repr(c) for c in choices))
            return value
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {_type_name(value)}", value, allowed)
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if key in self.data and not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {_type_name(value)}", value, "true | false")
        return value

    def integer(self, key: str, default: Any = _MISSING, low: Optional[int] = None,
                high: Optional[int] = None, unit: str = "") -> Any:
        value = self.get(key, default)
        if key not in self.data:
            return value
        allowed = _range_text(low, high, unit, "an integer")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {_type_name(value)}", value, allowed)
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.error(key, "out of range", value, allowed)
        return value

    def number(self, key: str, default: Any = _MISSING, low: Optional[float] = None,
               high: Optional[float] = None, unit: str = "seconds", above: bool = False) -> Any:
        value = self.get(key, default)
        if key not in self.data:
            return value
        allowed = _range_text(low, high, unit, "a number", above)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, not {_type_name(value)}", value, allowed)
        if value != value or value in (float("inf"), float("-inf")):
            raise self.error(key, "must be a finite number", value, allowed)
        if low is not None and (value <= low if above else value < low):
            raise self.error(key, "out of range", value, allowed)
        if high is not None and value > high:
            raise self.error(key, "out of range", value, allowed)
        return float(value)

    def table(self, key: str, allowed: Sequence[str]) -> Optional["_Table"]:
        if key not in self.data:
            return None
        return _Table(self.file, self.field(key), self.data[key], allowed)

    def array(self, key: str, default: Any = _MISSING, allowed: str = "an array") -> Any:
        value = self.get(key, default)
        if key in self.data and not isinstance(value, list):
            raise self.error(key, f"must be an array, not {_type_name(value)}", value, allowed)
        return value


CLIENT_IP_SOURCES = ("peer", "x-forwarded-for", "forwarded", "proxy_protocol")


def parse_cidr(text: str):
    """
    A trusted entry: a CIDR block (C{"10.0.0.0/8"}, C{"::1/128"}) or a single
    address (C{"127.0.0.1"}, taken as C{/32} or C{/128}).

    @return: an L{ipaddress.IPv4Network} or L{ipaddress.IPv6Network}.
    @raise ValueError: not an address or a block, or a block with host bits
        set (C{"10.0.0.1/8"}: did you mean C{"10.0.0.0/8"}?).
    """
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"host bits set (did you mean {str(loose)!r}?)") from None
        raise ValueError("not an IP address or CIDR block") from None


def _read_client_ip(t: "_Table", protocol: str) -> ClientIPConfig:
    """C{client_ip}: the source of the client address, and the proxies trusted to tell it."""
    c = t.table("client_ip", ("source", "trusted"))
    if c is None:
        return ClientIPConfig()
    sources = ("peer", "proxy_protocol") if protocol == "tcp" else CLIENT_IP_SOURCES
    source = c.get("source", "peer")
    if source not in sources:
        why = (" (tcp listeners read no HTTP headers)" if protocol == "tcp" and source in CLIENT_IP_SOURCES else "")
        raise c.error("source", f"not a client address source for {protocol} listeners{why}", source,
                      " | ".join(repr(s) for s in sources))
    allowed = 'an array of CIDR blocks or addresses, such as ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]'
    entries = c.array("trusted", [], allowed=allowed)
    trusted = []
    for i, entry in enumerate(entries):
        field = f"{c.field('trusted')}[{i}]"
        if not isinstance(entry, str):
            raise c.error_at(field, f"must be a string, not {_type_name(entry)}", entry, allowed)
        try:
            trusted.append(str(parse_cidr(entry.strip())))
        except ValueError as e:
            raise c.error_at(field, f"not a CIDR block: {e}", entry, allowed) from None
    if source == "peer" and c.has("trusted"):
        raise c.error("trusted", 'source = "peer" trusts no proxy', entries,
                      'leave it out, or choose source = "x-forwarded-for", "forwarded" or "proxy_protocol"')
    if source != "peer" and not trusted:
        raise c.error("trusted", f"source = {source!r} needs the addresses of the proxies in front",
                      entries, allowed)
    return ClientIPConfig(source, tuple(trusted))


def _range_text(low, high, unit: str, kind: str, above: bool = False) -> str:
    unit = f" {unit}" if unit else ""
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}{unit}"
    if low is not None:
        return f"{kind} {'above' if above else 'of at least'} {low}{unit}"
    return kind


def _parse_address(t: _Table, key: str, value: Any) -> Tuple[str, int]:
    allowed = '"host:port" or "[ipv6]:port", port 1..65535'
    if not isinstance(value, str):
        raise t.error(key, f"must be a string, not {_type_name(value)}", value, allowed)
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", value) or re.match(r"^([^:\[\]\s]+):(\d+)$", value)
    if not m:
        raise t.error(key, "not a host:port address", value, allowed)
    host, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise t.error(key, "port out of range", value, allowed)
    return host, port


#: A host name (RFC 1123 labels, an optional final dot) or an IPv4 address.
_HOST_NAME = re.compile(r"(?=.{1,253}\.?\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z")


def _admin_hosts(t: _Table) -> Tuple[str, ...]:
    """C{[admin] hosts}: names a request's C{Host} may carry, lower-cased."""
    value = t.get("hosts", [])
    allowed = 'a list of host names or IP addresses without port or scheme, e.g. ["lb1.example.net", "10.0.0.5"]'
    if not isinstance(value, list):
        raise t.error("hosts", "must be a list", value, allowed)
    hosts = []
    for i, host in enumerate(value):
        field = f"{t.field('hosts')}[{i}]"
        if not isinstance(host, str):
            raise t.error_at(field, "must be a string", host, allowed)
        name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if not _HOST_NAME.match(name) or name.replace(".", "").isdigit():
                raise t.error_at(field, "not a host name or an IP address", host, allowed) from None
        hosts.append(name.lower().rstrip("."))
    return tuple(hosts)


def _check_endpoint(t: _Table, key: str, value: Any) -> str:
    """Parse a server endpoint description without listening."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    allowed = 'a Twisted server endpoint description such as "tcp:8080:interface=127.0.0.1"'
    if not isinstance(value, str) or not value.strip():
        raise t.error(key, "must be a non-empty string", value, allowed)
    if value.startswith("systemd:"):
        # Twisted's parser looks the descriptor up as it parses: check only
        # the syntax here, the socket exists only in the process systemd starts.
        problem = _systemd_endpoint_problem(value)
        if problem is not None:
            raise t.error(key, f"not a valid endpoint ({problem})", value,
                          'e.g. "systemd:domain=INET:index=0" or "systemd:domain=INET6:name=web"')
        return value
    try:
        serverFromString(MemoryReactor(), value)
    except Exception as e:  # the parser raises ValueError, KeyError, TypeError...
        raise t.error(key, f"not a valid endpoint ({e.__class__.__name__}: {e})", value, allowed) from None
    return value


def _systemd_endpoint_problem(value: str) -> Optional[str]:
    """What is wrong with a C{systemd:} endpoint description, or L{None}."""
    import socket

    fields: Dict[str, str] = {}
    for part in value[len("systemd:"):].split(":"):
        name, sep, arg = part.partition("=")
        if not sep or name not in ("domain", "index", "name") or not arg:
            return f"{part!r} is not domain=..., index=N or name=..."
        if name in fields:
            return f"{name} given twice"
        fields[name] = arg
    if "domain" not in fields:
        return "domain= (INET, INET6 or UNIX) is missing"
    if not isinstance(getattr(socket, "AF_" + fields["domain"], None), int):
        return f"domain {fields['domain']!r} is not INET, INET6 or UNIX"
    if ("index" in fields) == ("name" in fields):
        return "give exactly one of index=N and name=..."
    if "index" in fields and not fields["index"].isdigit():
        return f"index {fields['index']!r} is not a number"
    return None


def _resolve(base: str, path: str) -> str:
    """Paths in a config file are relative to the file's directory."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _check_file(t: _Table, key: str, value: Any, base: str) -> str:
    if not isinstance(value, str) or not value:
        raise t.error(key, "must be a file path", value, "a path to a readable file")
    path = _resolve(base, value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise t.error(key, "file not found or not readable", value, f"a readable file ({path})")
    return path


#: response headers a backend_header may not replace
_RESERVED_RESPONSE_HEADERS = ("connection", "content-length", "content-type", "keep-alive", "location",
                              "set-cookie", "transfer-encoding", "upgrade")


def _read_backend_header(t: _Table) -> str:
    """C{backend_header}: the name of a response header naming the backend, or ""."""
    allowed = "an HTTP header name such as 'X-Backend', not one the protocol needs; '' (the default): none"
    value = t.string("backend_header", "", allowed=allowed)
    if value and (not _TOKEN.match(value) or value.lower() in _RESERVED_RESPONSE_HEADERS):
        raise t.error("backend_header", "not a header name the balancer may set", value, allowed)
    return value


def _read_access_log(t: _Table, base: str) -> Dict[str, Any]:
    """C{access_log}: true (twistd's log), false, or a file of its own."""
    value = t.get("access_log", True)
    allowed = "true (into twistd's log), false, or the path of a file to append to"
    if isinstance(value, bool):
        return {"access_log": value, "access_log_path": None}
    if not isinstance(value, str) or not value.strip():
        raise t.error("access_log", "must be true, false or a file path", value, allowed)
    path = _resolve(base, value)
    directory = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise t.error("access_log", "is a directory", value, allowed)
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise t.error("access_log", "its directory does not exist or is not writable", value,
                      f"{allowed} (the directory {directory} must exist)")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise t.error("access_log", "file not writable", value, allowed)
    return {"access_log": True, "access_log_path": path}


def _read_server(t: _Table, index: int, data: Any) -> ServerConfig:
    s = _Table(t.file, f"{t.path}.servers[{index}]", data, ("name", "address", "weight", "cookie"))
    name = s.string("name")
    if not _NAME.match(name):
        raise s.error("name", "not a valid backend name", name, "letters, digits, '_', '.', '-'")
    host, port = _parse_address(s, "address", s.get("address"))
    weight = s.integer("weight", 100, 0, 1000)
    cookie = s.string("cookie", "")
    if s.has("cookie") and not _SERVER_COOKIE.match(cookie):
        raise s.error("cookie", "not a cookie-safe value", cookie,
                      "1 to 64 letters, digits, '-' or '_' (such as \"s1\")")
    return ServerConfig(name, host, port, weight, cookie)


def _read_group(file: str, base: str, name: str, data: Any) -> GroupConfig:
    t = _Table(file, f"backends.{name}", data,
               ("scheduler", "hash_key", "hash_balance_factor", "connect_timeout", "retries", "servers", "tls",
                "health_check", "slow_start"))
    if not _NAME.match(name):
        raise t.error_at(t.path, "not a valid group name", name, "letters, digits, '_', '.', '-'")
    servers_data = t.array("servers", allowed="a non-empty array of { name, address, weight } tables")
    if not servers_data:
        raise t.error("servers", "a group needs at least one server", servers_data,
                      'a non-empty array such as [ { name = "a", address = "10.0.0.1:8080" } ]')
    servers = tuple(_read_server(t, i, d) for i, d in enumerate(servers_data))
    seen: Dict[str, int] = {}
    for i, server in enumerate(servers):
        if server.name in seen:
            raise t.error_at(f"{t.path}.servers[{i}].name", "duplicate server name in this group",
                             server.name, f"names unique in the group (servers[{seen[server.name]}] has it)")
        seen[server.name] = i
    cookies: Dict[str, int] = {}
    for i, server in enumerate(servers):
        if not server.cookie:
            continue
        if server.cookie in cookies:
            raise t.error_at(f"{t.path}.servers[{i}].cookie", "duplicate cookie value in this group",
                             server.cookie, f"values unique in the group (servers[{cookies[server.cookie]}] has it)")
        cookies[server.cookie] = i
    tls = None
    tt = t.table("tls", ("verify", "ca", "server_name"))
    if tt is not None:
        ca = tt.get("ca", "")
        ca_path = _check_file(tt, "ca", ca, base) if ca != "" else None
        tls = BackendTLSConfig(tt.boolean("verify", True), ca_path, tt.string("server_name", ""))
    health = None
    passive = PassiveHealthConfig()
    active_keys = ("type", "path", "host", "expect", "interval", "timeout", "healthy_threshold",
                   "unhealthy_threshold", "send")
    ht = t.table("health_check", active_keys + ("passive",))
    if ht is not None:
        pt = ht.table("passive", _PASSIVE_KEYS)
        if pt is not None:
            passive = _read_passive(pt)
        kind = ht.string("type", "tcp", choices=HEALTH_CHECK_TYPES)
        if kind == "none":
            extra = [k for k in active_keys if k != "type" and ht.has(k)]
            if extra:
                raise ht.error(extra[0], 'active check settings with type = "none"', ht.get(extra[0]),
                               'leave it out, or choose type = "tcp", "http" or "udp"')
        elif kind == "udp":
            health = _read_udp_health_check(ht)
        else:
            if ht.has("send"):
                raise ht.error("send", "only udp health checks send a payload", ht.get("send"),
                               'leave it out, or type = "udp"')
            path = ht.string("path", "/")
            if not path.startswith("/"):
                raise ht.error("path", "must start with '/'", path, 'a path such as "/health"')
            expect = ht.array("expect", [200, 399], allowed="[low, high] status codes, 100..599")
            if (len(expect) != 2 or any(isinstance(c, bool) or not isinstance(c, int) for c in expect)
                    or not 100 <= expect[0] <= expect[1] <= 599):
                raise ht.error("expect", "not a status range", expect,
                               "[low, high] with 100 <= low <= high <= 599")
            health = HealthCheckConfig(
                type=kind,
                path=path,
                host=ht.string("host", ""),
                expect=(expect[0], expect[1]),
                interval=ht.number("interval", 2.0, 0, 3600, above=True),
                timeout=ht.number("timeout", 5.0, 0, 3600, above=True),
                healthy_threshold=ht.integer("healthy_threshold", 3, 1, 100),
                unhealthy_threshold=ht.integer("unhealthy_threshold", 3, 1, 100),
            )
    scheduler = t.string("scheduler", "wrr", choices=SCHEDULER_NAMES)
    for key in ("hash_key", "hash_balance_factor"):
        if t.has(key) and scheduler != "hash":
            raise t.error(key, f'a setting of scheduler = "hash" only (this group\'s scheduler is {scheduler!r})',
                          t.get(key), 'leave it out, or set scheduler = "hash"')
    factor = t.integer("hash_balance_factor", 0, 0, 10_000, "percent (0: off)")
    if 0 < factor < 100:
        raise t.error("hash_balance_factor", "below 100: no backend could take its share", factor,
                      "0 (off), or an integer from 100 to 10000 percent of the average load")
    return GroupConfig(
        name=name,
        servers=servers,
        scheduler=scheduler,
        hash_key=_read_hash_key(t),
        hash_balance_factor=factor,
        connect_timeout=t.number("connect_timeout", 5.0, 0, 3600, above=True),
        retries=t.integer("retries", 2, 0, 100),
        tls=tls,
        health_check=health,
        slow_start=t.number("slow_start", 0.0, 0, 3600),
        passive=passive,
    )


_HASH_KEY_ALLOWED = '"source_ip" | "path" | "host" | "header:NAME" | "cookie:NAME" | "query:NAME"'


def _read_hash_key(t: _Table) -> str:
    """C{hash_key}: what the hash scheduler hashes."""
    value = t.string("hash_key", "source_ip", allowed=_HASH_KEY_ALLOWED)
    if value in HASH_KEYS:
        return value
    kind, colon, name = value.partition(":")
    if not colon or kind not in HASH_KEY_KINDS:
        raise t.error("hash_key", "not a hash key", value, _HASH_KEY_ALLOWED)
    if kind == "query":
        ok = bool(name) and not re.search(r"[&=#?\s]", name)
    else:
        ok = bool(_TOKEN.match(name))
    if not ok:
        raise t.error("hash_key", f"not a valid {kind} name after '{kind}:'", value,
                      f'"{kind}:NAME" with NAME a ' + ("query parameter name (no & = # ? or spaces)" if kind == "query"
                                                        else f"{kind} name token such as X-Tenant"))
    return value


_PASSIVE_KEYS = ("consecutive_failures", "failure_rate", "min_requests", "interval", "base_ejection_time",
                 "max_ejection_time", "max_ejection_percent", "slow_start")


def _read_passive(t: _Table) -> PassiveHealthConfig:
    """C{health_check.passive}: outlier detection settings, each checked here."""
    default = PassiveHealthConfig()
    base = t.number("base_ejection_time", default.base_ejection_time, 0, 3600, above=True)
    longest = t.number("max_ejection_time", default.max_ejection_time, 0, 86400, above=True)
    if longest < base:
        raise t.error("max_ejection_time", "shorter than base_ejection_time", longest,
                      f"a number of seconds of at least base_ejection_time ({base})")
    return PassiveHealthConfig(
        consecutive_failures=t.integer("consecutive_failures", default.consecutive_failures, 0, 1000),
        failure_rate=t.number("failure_rate", default.failure_rate, 0, 100, unit="percent (0: off)"),
        min_requests=t.integer("min_requests", default.min_requests, 1, 1_000_000),
        interval=t.number("interval", default.interval, 0, 3600, above=True),
        base_ejection_time=base,
        max_ejection_time=longest,
        max_ejection_percent=t.number("max_ejection_percent", default.max_ejection_percent, 0, 100,
                                      unit="percent"),
        slow_start=t.number("slow_start", default.slow_start, 0, 3600),
    )


def _read_persistence(t: _Table, key: str, protocol: str) -> Optional[PersistenceConfig]:
    if not t.has(key):
        return None
    raw = t.get(key)
    field = t.field(key)
    if not isinstance(raw, dict):
        raise t.error(key, "must be a table", raw, "{ type = " + " | ".join(f'"{k}"' for k in PERSISTENCE_TYPES)
                      + ", ... }")
    types = ("source_ip",) if protocol in ("tcp", "udp") else PERSISTENCE_TYPES
    kind = raw.get("type", _MISSING)
    if kind is _MISSING:
        raise ConfigError(f"{t.file}: {field}.type: required but missing; allowed: {' | '.join(types)}")
    if kind not in types:
        why = (f" ({protocol} listeners persist by source IP only)"
               if protocol in ("tcp", "udp") and kind in PERSISTENCE_TYPES else "")
        raise t.error_at(f"{field}.type", f"not a persistence type for {protocol} listeners{why}", kind,
                         " | ".join(repr(x) for x in types))
    if kind == "rewrite_cookie" and "timeout" in raw:
        raise t.error_at(f"{field}.timeout", "rewrite_cookie has no timeout: the backend's cookie keeps its own expiry",
                         raw["timeout"], "leave it out")
    for key in raw:
        if key not in _PERSISTENCE_KEYS[kind] and any(key in keys for keys in _PERSISTENCE_KEYS.values()):
            owners = " and ".join(k for k, keys in _PERSISTENCE_KEYS.items() if key in keys)
            why = (" (the balancer cannot re-write the backend's own cookie, so it cannot stamp it)"
                   if kind == "rewrite_cookie" and key in ("max_idle", "max_life") else "")
            raise t.error_at(f"{field}.{key}", f"not a setting of {kind} persistence, only of {owners}{why}",
                             raw[key], f"leave it out; keys of {kind}: {', '.join(_PERSISTENCE_KEYS[kind])}")
    p = _Table(t.file, field, raw, _PERSISTENCE_KEYS[kind])
    on_failure = p.string("on_failure", "repin", choices=ON_FAILURE)
    if kind == "rewrite_cookie":
        cookie = p.string("cookie")
        if not _TOKEN.match(cookie):
            raise p.error("cookie", "not a valid cookie name", cookie, "a cookie name token such as JSESSIONID")
        return PersistenceConfig(type=kind, cookie=cookie, on_failure=on_failure)
    low, high = _TIMEOUT_RANGE[kind]
    timeout = p.integer("timeout", _DEFAULT_TIMEOUT[kind], low, high, f"seconds for {kind} persistence")
    if kind in ("source_ip", "header", "learn_cookie"):
        header = cookie = ""
        if kind == "header":
            header = p.string("header")
            if not _TOKEN.match(header):
                raise p.error("header", "not a valid header name", header, "a header name token such as X-Session-Id")
            if header.lower() in ("cookie", "host", "connection", "content-length", "transfer-encoding"):
                raise p.error("header", "not a header to stick on", header,
                              'a request header carrying a session or tenant id, such as "X-Session-Id" '
                              '(for cookies use type = "learn_cookie"; for Host, scheduler hash_key = "host")')
        elif kind == "learn_cookie":
            cookie = p.string("cookie")
            if not _TOKEN.match(cookie):
                raise p.error("cookie", "not a valid cookie name", cookie, "a cookie name token such as JSESSIONID")
        return PersistenceConfig(type=kind, timeout=timeout, header=header, cookie=cookie,
                                 max_entries=p.integer("max_entries", 1_000_000, 1, 100_000_000),
                                 on_failure=on_failure)
    # max_idle beyond timeout would never apply: the browser drops the
    # cookie after Max-Age = timeout.
    max_idle = p.integer("max_idle", timeout, 1, timeout, f"seconds (at most this cookie's timeout, {timeout})")
    max_life = p.integer("max_life", 0, 0, MAX_LIFE, "seconds (0: no limit)")
    cookie = p.string("cookie", "SERVERID")
    if not _TOKEN.match(cookie):
        raise p.error("cookie", "not a valid cookie name", cookie, "a cookie name token such as SERVERID")
    secure = p.get("secure", "auto")
    if secure is True:
        secure = "always"
    elif secure is False:
        secure = "never"
    elif secure not in ("auto", "always", "never"):
        raise p.error("secure", "not one of the choices", secure, '"auto" (on for https) | "always" | "never" | true | false')
    samesite = p.string("samesite", "lax", choices=("lax", "strict", "none", ""))
    if samesite == "none" and secure == "never":
        raise p.error("samesite", "SameSite=None needs a Secure cookie (browsers reject it otherwise)",
                      samesite, 'secure = "auto" or "always" with samesite = "none"')
    path = p.string("path", "/")
    if not path.startswith("/") or ";" in path:
        raise p.error("path", "must start with '/' and contain no ';'", path, 'a path such as "/"')
    domain = p.string("domain", "")
    if ";" in domain or " " in domain:
        raise p.error("domain", "not a cookie domain", domain, 'a domain such as "example.com", or ""')
    _check_cookie_prefix(p, protocol, cookie, secure, domain, path)
    return PersistenceConfig(
        type=kind, timeout=timeout, cookie=cookie, secure=secure,
        httponly=p.boolean("httponly", True), samesite=samesite, domain=domain, path=path,
        refresh=p.boolean("refresh", True), on_failure=on_failure, max_idle=max_idle, max_life=max_life,
    )


def _check_cookie_prefix(p: _Table, protocol: str, cookie: str, secure: str, domain: str, path: str) -> None:
    """
    The rules browsers enforce on cookie name prefixes (RFC 6265bis 4.1.3):
    a C{__Secure-} cookie must be Secure; a C{__Host-} cookie must be
    Secure, have no Domain and have Path=/.  A cookie breaking them is
    dropped by the browser, so persistence would silently never work.
    Browsers match the prefixes case-insensitively.
    """
    name = cookie.lower()
    if name.startswith("__host-"):
        prefix = "__Host-"
    elif name.startswith("__secure-"):
        prefix = "__Secure-"
    else:
        return
    rule = (f"a {prefix} cookie must be Secure" +
            (", have no domain and have path \"/\"" if prefix == "__Host-" else "") +
            " (browsers drop it otherwise)")
    if secure == "never":
        raise p.error("secure", rule, secure, f'"always", or "auto" on an https listener, for {cookie}')
    if secure == "auto" and protocol == "http":
        raise p.error("secure", rule + '; "auto" never sets Secure on an http listener', secure,
                      f'"always" (when TLS is terminated in front of the balancer) for {cookie}')
    if prefix == "__Host-" and domain:
        raise p.error("domain", rule, domain, f'"" (leave domain out) for {cookie}')
    if prefix == "__Host-" and path != "/":
        raise p.error("path", rule, path, f'"/" for {cookie}')


def _check_domain(t: _Table, key: str, value: str) -> str:
    allowed = '"", an exact host such as "app.example.com", or "*.example.com"'
    domain = value.lower()
    if domain == "":
        return domain
    labels = domain[2:].split(".") if domain.startswith("*.") else domain.split(".")
    if not all(_HOST_LABEL.match(label) for label in labels):
        raise t.error(key, "not a host name (no port, scheme or path)", value, allowed)
    return domain


def _read_rule(t: _Table, index: int, data: Any, protocol: str, groups: Mapping[str, GroupConfig],
               default_group: Optional[str]) -> RuleConfig:
    r = _Table(t.file, f"{t.path}.rules[{index}]", data,
               ("domain", "path", "backends", "persistence", "request_buffering"))
    domain = _check_domain(r, "domain", r.string("domain", ""))
    path = r.string("path", "/")
    if not path.startswith("/"):
        raise r.error("path", "must start with '/'", path, 'a path prefix such as "/api"')
    if not r.has("backends") and not default_group:
        raise ConfigError(f"{t.file}: {r.field('backends')}: required (the listener has no backends to default to)")
    backends, split = (default_group or "", ()) if not r.has("backends") else _read_backends(r, groups, protocol)
    persistence = _read_persistence(r, "persistence", protocol)
    _check_split(r, split, groups, persistence)
    request_buffering = r.boolean("request_buffering", None)
    return RuleConfig(domain, path, backends, persistence, split, request_buffering)


_SPLIT_ALLOWED = ('a group name such as "web", or weighted groups such as '
                  '[ { group = "stable", weight = 90 }, { group = "canary", weight = 10 } ]')


def _read_backends(t: _Table, groups: Mapping[str, GroupConfig], protocol: str) -> Tuple[str, Tuple[SplitConfig, ...]]:
    """C{backends}: one group's name, or a weighted split between groups (http and https)."""
    value = t.get("backends")
    if not isinstance(value, list):
        if not isinstance(value, str):
            raise t.error("backends", f"must be a group name or an array of {{ group, weight }}, not "
                          f"{_type_name(value)}", value, _SPLIT_ALLOWED)
        return _check_group(t, "backends", value, groups), ()
    if protocol == "tcp":
        raise t.error("backends", "a tcp listener balances over one group", value,
                      'one group name such as "web" (weighted splits are for http and https)')
    if not value:
        raise t.error("backends", "an empty split", value, _SPLIT_ALLOWED)
    split: List[SplitConfig] = []
    for i, data in enumerate(value):
        e = _Table(t.file, f"{t.field('backends')}[{i}]", data, ("group", "weight"))
        group = _check_group(e, "group", e.get("group"), groups)
        if any(s.group == group for s in split):
            raise e.error("group", "named twice in this split", group, "each group once")
        split.append(SplitConfig(group, e.integer("weight", 1, 0, 1000, "(0: no new clients)")))
    if not any(s.weight for s in split):
        raise t.error("backends", "every weight is 0: no group would take new clients", value,
                      "at least one group with a weight from 1 to 1000")
    return split[0].group, tuple(split)


def _check_split(t: _Table, split: Sequence[SplitConfig], groups: Mapping[str, GroupConfig],
                 persistence: Optional[PersistenceConfig]) -> None:
    """
    A pin names a backend and, through it, its group: backend names (and
    their fixed cookie values, for cookie persistence) must be unique across
    the groups of a split.
    """
    names: Dict[str, str] = {}
    cookies: Dict[str, str] = {}
    for i, entry in enumerate(split):
        for server in groups[entry.group].servers:
            other = names.setdefault(server.name, entry.group)
            if other != entry.group:
                raise t.error_at(f"{t.field('backends')}[{i}].group",
                                 f"backend {server.name!r} is in groups {other!r} and {entry.group!r}", entry.group,
                                 "groups whose backend names are unique across the split (a pin names a backend, "
                                 "and through it its group)")
            if server.cookie and persistence is not None and persistence.type in ("insert_cookie", "rewrite_cookie"):
                other = cookies.setdefault(server.cookie, entry.group)
                if other != entry.group:
                    raise t.error_at(f"{t.field('backends')}[{i}].group",
                                     f"cookie value {server.cookie!r} is used in groups {other!r} and "
                                     f"{entry.group!r}", entry.group,
                                     "groups whose servers' cookie values are unique across the split")


def _check_group(t: _Table, key: str, name: Any, groups: Mapping[str, GroupConfig]) -> str:
    if not isinstance(name, str) or name not in groups:
        known = ", ".join(repr(g) for g in groups) or "none are defined"
        raise t.error(key, "no such backend group", name, f"one of the [backends.NAME] groups ({known})")
    return name


def _read_listener(file: str, base: str, name: str, data: Any,
                   groups: Mapping[str, GroupConfig]) -> ListenerConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: listeners.{name}: must be a table; got {data!r}")
    protocol = data.get("protocol", _MISSING)
    if protocol is _MISSING:
        raise ConfigError(f"{file}: listeners.{name}.protocol: required but missing; allowed: tcp | http | https")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{file}: listeners.{name}.protocol: not one of the choices; got {protocol!r}; "
                          "allowed: 'tcp' | 'http' | 'https' | 'udp'")
    allowed = _LISTENER_KEYS[protocol]
    for key in data:
        if key not in allowed and any(key in keys for keys in _LISTENER_KEYS.values()):
            raise ConfigError(f"{file}: listeners.{name}.{key}: not a setting of {protocol} listeners; "
                              f"allowed keys here: {', '.join(allowed)}")
    t = _Table(file, f"listeners.{name}", data, allowed)
    if not _NAME.match(name):
        raise t.error_at(t.path, "not a valid listener name", name, "letters, digits, '_', '.', '-'")
    if protocol == "udp":
        return _read_udp_listener(t, base, groups)
    bind = _check_endpoint(t, "bind", t.get("bind"))
    redirect = None
    if protocol != "tcp" and t.has("https_redirect_port"):
        redirect = t.integer("https_redirect_port", None, 1, 65535)
        for key in ("backends", "persistence", "rules"):
            if t.has(key):
                raise t.error(key, "a redirect listener sends every request to https and has no backends",
                              t.get(key), "leave it out, or remove https_redirect_port")
    backends = None
    split: Tuple[SplitConfig, ...] = ()
    if redirect is None:
        if t.has("backends") or protocol == "tcp" or not t.has("rules"):
            backends, split = _read_backends(t, groups, protocol)
    persistence = _read_persistence(t, "persistence", protocol)
    _check_split(t, split, groups, persistence)
    if protocol == "tcp":
        assert backends is not None  # a tcp listener always reads its backends (above)
        if groups[backends].scheduler == "hash" and groups[backends].hash_key != "source_ip":
            raise t.error("backends", f"group {backends!r} hashes on {groups[backends].hash_key!r}, which a tcp "
                          "listener cannot read", backends,
                          'a group whose hash_key is "source_ip" (the default): a tcp connection has no header, '
                          "cookie, query, path or host")
    kwargs: Dict[str, Any] = dict(
        name=name, protocol=protocol, bind=bind, backends=backends, persistence=persistence,
        max_connections=t.integer("max_connections", 0, 0, 10_000_000),
        over_limit=t.string("over_limit", "wait", choices=OVER_LIMIT),
        client_ip=_read_client_ip(t, protocol),
        **_read_access_log(t, base),
    )
    if protocol == "tcp":
        kwargs.update(
            idle_timeout=t.number("idle_timeout", 900.0, 0, 86400 * 7, above=True),
            proxy_protocol=t.string("proxy_protocol", None, choices=PROXY_PROTOCOL_VERSIONS),
        )
    else:
        rules_data = t.array("rules", [], allowed="an array of [[listeners.NAME.rules]] tables")
        kwargs.update(
            request_timeout=t.number("request_timeout", 60.0, 0, 86400, above=True),
            response_idle_timeout=t.number("response_idle_timeout", 60.0, 0, 86400, above=True),
            client_idle_timeout=t.number("client_idle_timeout", 60.0, 0, 86400, above=True),
            max_header_bytes=t.integer("max_header_bytes", 65536, 1024, 1048576, "bytes"),
            max_headers=t.integer("max_headers", 100, 1, 1000),
            max_body_bytes=t.integer("max_body_bytes", 0, 0, 2 ** 50, "bytes"),
            request_buffering=t.boolean("request_buffering", False),
            tunnel_timeout=t.number("tunnel_timeout", 3600.0, 0, 86400 * 7),
            max_connections_per_ip=t.integer("max_connections_per_ip", 0, 0, 1_000_000),
            rules=tuple(_read_rule(t, i, d, protocol, groups, backends) for i, d in enumerate(rules_data)),
            https_redirect_port=redirect,
            split=split,
            backend_header=_read_backend_header(t),
        )
    if protocol == "https":
        certs_data = t.array("certificates", allowed="a non-empty array of { cert, key, chain } tables")
        if not certs_data:
            raise t.error("certificates", "an https listener needs at least one certificate", certs_data,
                          'a non-empty array such as [ { cert = "a.pem", key = "a.key" } ]')
        certs = []
        for i, d in enumerate(certs_data):
            c = _Table(file, f"{t.path}.certificates[{i}]", d, ("cert", "key", "chain"))
            chain = c.get("chain", None)
            certs.append(CertificateConfig(
                _check_file(c, "cert", c.get("cert"), base),
                _check_file(c, "key", c.get("key"), base),
                _check_file(c, "chain", chain, base) if chain is not None else None,
            ))
        alpn_allowed = 'a non-empty array of "h2" and "http/1.1", best first, such as ["h2", "http/1.1"]'
        alpn = t.array("alpn", ["h2", "http/1.1"], allowed=alpn_allowed)
        if not alpn or not all(isinstance(a, str) and a and len(a) < 256 for a in alpn):
            raise t.error("alpn", "not a list of protocol names", alpn, alpn_allowed)
        for name in alpn:
            if name not in ALPN_PROTOCOLS:
                raise t.error("alpn", f"{name!r} is not a protocol this listener speaks", alpn, alpn_allowed)
        if len(set(alpn)) != len(alpn):
            raise t.error("alpn", "a protocol is named twice", alpn, alpn_allowed)
        kwargs.update(
            certificates=tuple(certs),
            min_tls=t.string("min_tls", "1.2", choices=("1.2", "1.3")),
            alpn=tuple(alpn),
            max_concurrent_streams=t.integer("max_concurrent_streams", 100, 1, 10_000),
            max_header_list_size=t.integer("max_header_list_size", 65536, 1024, 1048576, "bytes"),
            hpack_table_size=t.integer("hpack_table_size", 4096, 0, 65536, "bytes"),
        )
    return ListenerConfig(**kwargs)


def parse_config(document: Any, path: str = "<string>") -> Config:
    """
    Validate a configuration given as TOML text or as an already parsed
    dictionary.

    @param path: the file name used in error messages; relative file paths in
        the document are resolved against its directory.
    @raise ConfigError: the document is invalid.
    """
    if isinstance(document, (bytes, str)):
        text = document.decode("utf-8") if isinstance(document, bytes) else document
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path)) if not path.startswith("<") else os.getcwd()
    top = _Table(path, "", document,
                 ("backends", "listeners", "admin", "workers", "grace_period", "max_connections", "store"))
    groups_data = top.get("backends", {})
    if not isinstance(groups_data, dict):
        raise top.error("backends", "must be a table of groups", groups_data, "[backends.NAME] tables")
    groups = {name: _read_group(path, base, name, data) for name, data in groups_data.items()}
    listeners_data = top.data.get("listeners", _MISSING)
    if listeners_data is _MISSING or listeners_data == {}:
        raise ConfigError(f"{path}: listeners: no listener is configured; allowed: one or more "
                          "[listeners.NAME] tables with protocol, bind and backends")
    if not isinstance(listeners_data, dict):
        raise top.error("listeners", "must be a table of listeners", listeners_data, "[listeners.NAME] tables")
    listeners: Dict[str, ListenerConfig] = {}
    binds: Dict[str, str] = {}
    for name, data in listeners_data.items():
        listener = _read_listener(path, base, name, data, groups)
        if listener.bind in binds and not re.match(r"^(tcp6?|unix|udp):0(:|$)", listener.bind):
            raise ConfigError(f"{path}: listeners.{name}.bind: the same address as listeners.{binds[listener.bind]}; "
                              f"got {listener.bind!r}; allowed: an address no other listener binds")
        binds[listener.bind] = name
        listeners[name] = listener
    admin = None
    at = top.table("admin", ("bind", "token", "hosts", "max_connections"))
    if at is not None:
        admin = AdminConfig(
            _check_endpoint(at, "bind", at.get("bind")), at.string("token", ""), _admin_hosts(at),
            at.integer("max_connections", 64, 1, 10_000),
        )
    config = Config(
        path=path, backends=groups, listeners=listeners, admin=admin,
        workers=top.integer("workers", 1, 1, 64),
        grace_period=top.number("grace_period", 10.0, 0, 3600),
        max_connections=top.integer("max_connections", 0, 0, 100_000_000),
        store=_read_store(top),
    )
    _check_tls_files(config)
    _check_udp(config)
    return config


_STORE_KEYS = {"memory": ("type",), "redis": ("type", "url", "prefix", "timeout")}
_REDIS_SCHEMES = ("redis", "rediss")


def _read_store(top: _Table) -> StoreConfig:
    """C{[store]}: C{type = "memory"} (the default) or C{"redis"} with its C{url}."""
    data = top.get("store", {})
    if not isinstance(data, dict):
        raise top.error("store", f"must be a table, not {_type_name(data)}", data, "a [store] table")
    kind = data.get("type", "memory")
    if kind not in STORE_TYPES:
        raise top.error_at("store.type", "not one of the choices", kind, " | ".join(repr(c) for c in STORE_TYPES))
    t = _Table(top.file, "store", data, _STORE_KEYS[kind])
    if kind == "memory":
        return StoreConfig()
    url = t.string("url", allowed="a redis://[user:password@]host[:port][/db] or rediss:// URL")
    _check_redis_url(t, url)
    prefix = t.string("prefix", "slb:")
    if len(prefix) > 64 or any(c.isspace() for c in prefix):
        raise t.error("prefix", "too long or has white space", prefix, "at most 64 characters, no white space")
    timeout = t.number("timeout", 0.05, 0, 5, above=True)
    return StoreConfig(type=kind, url=url, prefix=prefix, timeout=timeout)


def _check_redis_url(t: _Table, url: str) -> None:
    from urllib.parse import urlsplit

    allowed = "redis://[user:password@]host[:port][/db] or rediss://... (TLS), db 0..15"
    # An error message names the URL, never its password.
    shown = re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise t.error("url", "not a valid URL", shown, allowed) from None
    if parts.scheme not in _REDIS_SCHEMES:
        raise t.error("url", "the scheme must be redis or rediss", shown, allowed)
    if not parts.hostname:
        raise t.error("url", "no host", shown, allowed)
    if port == 0:
        raise t.error("url", "port 0", shown, allowed)
    db = parts.path.strip("/")
    if db and (not db.isdigit() or int(db) > 15):
        raise t.error("url", f"database {db!r} is not 0..15", shown, allowed)
    if parts.query or parts.fragment:
        raise t.error("url", "a query or fragment", shown, allowed)


def redis_address(url: str) -> Dict[str, Any]:
    """
    The parts of a checked C{[store] url}: C{host}, C{port}, C{db},
    C{username}, C{password} (L{None} when absent) and C{tls}.
    """
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    db = parts.path.strip("/")
    return {
        "host": parts.hostname,
        "port": parts.port or 6379,
        "db": int(db) if db else 0,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password is not None else None,
        "tls": parts.scheme == "rediss",
    }


def _check_tls_files(config: Config) -> None:
    """
    Load every TLS file now (each https listener's certificates and keys,
    each backend group's C{tls.ca}), so that a bad file fails the load, and
    so C{--check}, the start and a reload, rather than the first connection.

    The certificate loading of L{twisted_slb.tls} (C{cryptography}) is
    imported only for a configuration that names such files, and never the
    TLS server or client runtime.
    """
    https = any(listener.protocol == "https" for listener in config.listeners.values())
    cas = any(group.tls is not None and group.tls.ca is not None for group in config.backends.values())
    if not (https or cas):
        return
    from twisted_slb.tls._certificates import load_certificate_set, load_trust_root

    try:
        for listener in config.listeners.values():
            if listener.protocol == "https":
                load_certificate_set(listener.certificates, f"listeners.{listener.name}.certificates")
        for group in config.backends.values():
            if group.tls is not None and group.tls.ca is not None:
                load_trust_root(group.tls.ca, f"backends.{group.name}.tls.ca")
    except ConfigError as e:
        raise ConfigError(f"{config.path}: {e}") from None


#: The largest configuration file read (a configuration is a few KB; this
#: refuses a mistaken path such as a log or a device before it fills memory).
MAX_CONFIG_BYTES = 10 * 1024 * 1024


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _read_config_file(path: str) -> bytes:
    """
    The bytes of the configuration file at C{path}, refusing what is not a
    regular file (C{/dev/zero}, a pipe, a directory) and files over
    L{MAX_CONFIG_BYTES}.
    """
    allowed = f"a regular TOML file of at most {MAX_CONFIG_BYTES // (1024 * 1024)} MB"
    try:
        # Checked before opening: opening a named pipe would block.
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: not a regular file ({_file_kind(mode)}); allowed: {allowed}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):  # replaced since the check
                raise ConfigError(f"{path}: not a regular file ({_file_kind(info.st_mode)}); allowed: {allowed}")
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        size = max(info.st_size, len(data))
        raise ConfigError(f"{path}: the configuration file is too large ({size} bytes); allowed: {allowed}")
    return data


def load_config(path: str) -> Config:
    """
    Read, parse and validate the TOML file at C{path}.

    @raise ConfigError: the file cannot be read, is not a regular file, is
        larger than L{MAX_CONFIG_BYTES}, is not TOML, or is invalid.
    """
    data = _read_config_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    return parse_config(text, path)


def _describe_persistence(p: Optional[PersistenceConfig], protocol: str) -> str:
    if p is None:
        unit = {"tcp": "connection", "udp": "session"}.get(protocol, "request")
        return f"none (each {unit} is balanced on its own)"
    return _describe_pin(p, protocol) + "; " + _describe_on_failure(p, protocol)


def _describe_on_failure(p: PersistenceConfig, protocol: str) -> str:
    if p.on_failure == "strict":
        refusal = "its connection is closed" if protocol == "tcp" else "it gets 503 with Retry-After"
        return f"on_failure strict: a client whose backend is down or refuses is not moved, {refusal}"
    return "on_failure repin: a client whose backend is down or refuses is moved to another"


def _describe_pin(p: PersistenceConfig, protocol: str) -> str:
    if p.type == "source_ip":
        return (f"source_ip: a client IP stays on its backend for {p.timeout} s after its last "
                f"{ {'tcp': 'connection', 'udp': 'datagram'}.get(protocol, 'request')} "
                f"(table of at most {p.max_entries} clients)")
    if p.type == "header":
        return (f"header {p.header}: a request carrying it stays on the backend its value is pinned to for "
                f"{p.timeout} s after its last request (table of at most {p.max_entries} values); without it, "
                "balanced as usual and nothing stored")
    if p.type == "learn_cookie":
        return (f"learn_cookie {p.cookie}: the value the backend sets is learned (never modified) and pinned to "
                f"it for {p.timeout} s after its last request (table of at most {p.max_entries} values)")
    if p.type == "rewrite_cookie":
        return (f"rewrite_cookie {p.cookie}: the backend's cookie is prefixed with the backend's cookie value "
                "or id; expiry is the backend's")
    attrs = [f"expires after {p.timeout} s", "sliding" if p.refresh else "fixed"]
    if p.max_idle:
        attrs.append(f"max_idle {p.max_idle} s")
    attrs.append(f"max_life {p.max_life} s" if p.max_life else "max_life none")
    if p.httponly:
        attrs.append("HttpOnly")
    if p.samesite:
        attrs.append(f"SameSite={p.samesite.capitalize()}")
    attrs.append({"auto": "Secure on https", "always": "always Secure", "never": "never Secure"}[p.secure])
    if p.domain:
        attrs.append(f"Domain={p.domain}")
    attrs.append(f"Path={p.path}")
    return f"insert_cookie {p.cookie}: " + ", ".join(attrs)


def _describe_split(split: Sequence[SplitConfig]) -> str:
    total = sum(e.weight for e in split)
    parts = [f"{e.group} weight {e.weight} ({100 * e.weight / total:.0f}% of new clients)" for e in split]
    return ", ".join(parts) + "; a pinned client keeps its backend and so its group"


def _describe_group(g: GroupConfig, protocol: str) -> List[str]:
    servers = ", ".join(f"{s.name}={s.host}:{s.port} (weight {s.weight}"
                        + (f", cookie {s.cookie})" if s.cookie else ")") for s in g.servers)
    lines = [f"  backends: {g.name} [{g.scheduler}] {servers}"]
    if g.scheduler == "hash":
        bound = (f"no backend above {g.hash_balance_factor}% of the average load" if g.hash_balance_factor
                 else "no load bound")
        lines.append(f"  hash_key {g.hash_key} (requests without it: weighted round robin), {bound}")
    if protocol != "udp":  # a udp session connects nothing and retries on refusal
        lines.append(f"  connect_timeout {g.connect_timeout} s, retries {g.retries}")
    return lines


def _describe_client_ip(c: ClientIPConfig) -> str:
    if c.source == "peer":
        return "the connection's peer"
    trusted = ", ".join(c.trusted)
    if c.source == "proxy_protocol":
        return f"a PROXY protocol header (v1 or v2) from {trusted}; other connections are closed"
    return f"the rightmost untrusted address of {c.source} when the peer is one of {trusted}"


def describe(config: Config) -> str:
    """
    The effective settings of every listener, for C{twistd slb --check}.
    """
    lines: List[str] = [f"config: {config.path}", f"workers: {config.workers}"]
    if config.max_connections:
        lines.append(f"max_connections {config.max_connections} over all listeners")
    if config.store.type == "redis":
        from urllib.parse import urlsplit

        shown = urlsplit(config.store.url)
        where = f"{shown.scheme}://{shown.hostname}:{shown.port or 6379}{shown.path}"  # never the password
        lines.append(f"store: redis {where}, prefix {config.store.prefix!r}, lookup timeout {config.store.timeout} s")
    for l in config.listeners.values():
        lines.append("")
        lines.append(f"listener {l.name}: {l.protocol} on {l.bind}")
        if l.https_redirect_port is not None:
            lines.append(f"  redirects every request to https (port {l.https_redirect_port})")
            continue
        described = [e.group for e in l.split] or ([l.backends] if l.backends is not None else [])
        if l.split:
            lines.append(f"  split: {_describe_split(l.split)}")
        for name in described:
            lines.extend(_describe_group(config.backends[name], l.protocol))
        lines.append(f"  persistence: {_describe_persistence(l.persistence, l.protocol)}")
        if l.protocol != "udp":
            lines.append(f"  client address: {_describe_client_ip(l.client_ip)}")
        if l.protocol == "udp":
            lines.extend(_describe_udp(l))
        elif l.protocol == "tcp":
            lines.append(f"  idle_timeout {l.idle_timeout} s" +
                         (f", PROXY protocol {l.proxy_protocol}" if l.proxy_protocol else ""))
        else:
            lines.append(f"  request_timeout {l.request_timeout} s, response_idle_timeout {l.response_idle_timeout} s, "
                         f"client_idle_timeout {l.client_idle_timeout} s, "
                         f"max_header_bytes {l.max_header_bytes}, max_headers {l.max_headers}" +
                         (f", max_body_bytes {l.max_body_bytes}" if l.max_body_bytes else "") +
                         (", request_buffering" if l.request_buffering else ""))
            for i, r in enumerate(l.rules):
                where = f"host {r.domain or '*'} path {r.path}"
                target = f"split {_describe_split(r.split)}" if r.split else r.backends
                lines.append(f"  rule {i}: {where} -> {target}; persistence: "
                             f"{_describe_persistence(r.persistence, l.protocol)}" +
                             ("" if r.request_buffering is None else f"; request_buffering {str(r.request_buffering).lower()}"))
                for name in [e.group for e in r.split] or [r.backends]:
                    if name not in described:
                        described.append(name)
                        lines.extend("  " + line for line in _describe_group(config.backends[name], l.protocol))
        if l.protocol == "https":
            lines.append(f"  TLS >= {l.min_tls}, ALPN {', '.join(l.alpn)}" +
                         (f"; HTTP/2: max_concurrent_streams {l.max_concurrent_streams}, max_header_list_size "
                          f"{l.max_header_list_size}, hpack_table_size {l.hpack_table_size}" if "h2" in l.alpn
                          else ""))
            for c in l.certificates:
                lines.append(f"  certificate {c.cert}")
        if l.max_connections:
            lines.append(f"  max_connections {l.max_connections}, over_limit {l.over_limit}")
        if l.access_log_path:
            lines.append(f"  access log to {l.access_log_path} (buffered, flushed every second)")
        if not l.access_log:
            lines.append("  access log off")
        if l.backend_header:
            lines.append(f"  each response names its backend in {l.backend_header}")
    if config.admin is not None:
        lines.append("")
        lines.append(f"admin: {config.admin.bind}")
    return "\n".join(lines)


# --- udp listeners ------------------------------------------------------------

_UDP_BIND_ALLOWED = '"udp:PORT" or "udp:PORT:interface=ADDR", PORT 0..65535, ADDR an IPv4 or IPv6 address'


def parse_udp_bind(value: str) -> Tuple[int, str]:
    """
    Read a udp listener's C{bind}: C{"udp:PORT[:interface=ADDR]"} (Twisted has
    no endpoint strings for UDP).  An IPv6 interface may be written plainly
    (C{interface=::1}) or with Twisted's escaped colons (C{interface=\\:\\:1}).

    @return: C{(port, interface)}; interface C{""} means every IPv4 address.
    @raise ValueError: the text is not of that form (the message says why).
    """
    import ipaddress

    if not isinstance(value, str) or not value.startswith("udp:"):
        raise ValueError("must start with 'udp:'")
    rest = value[4:]
    port_text, sep, option = rest.partition(":")
    if not port_text.isdigit():
        raise ValueError(f"{port_text!r} is not a port number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} out of range")
    interface = ""
    if sep:
        name, eq, address = option.partition("=")
        if name != "interface" or not eq:
            raise ValueError(f"unknown option {option!r} (the only option is interface=ADDR)")
        address = address.replace("\\:", ":")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"interface {address!r} is not an IP address") from None
        interface = address
    return port, interface


def _decode_payload(t: _Table, key: str) -> bytes:
    r"""
    A udp health check payload: a TOML string in which C{\xHH}, C{\n},
    C{\r}, C{\t}, C{\0} and C{\\} stand for bytes (write it as a literal
    string, C{'\x00\x01'}, so that TOML leaves the backslashes alone);
    other characters are UTF-8.
    """
    allowed = r"a string; \xHH, \n, \r, \t, \0 and \\ stand for bytes (use a 'literal string')"
    text = t.string(key, "", allowed=allowed)
    out = bytearray()
    i = 0
    simple = {"n": b"\n", "r": b"\r", "t": b"\t", "0": b"\0", "\\": b"\\"}
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        nxt = text[i + 1:i + 2]
        if nxt in simple and nxt:
            out += simple[nxt]
            i += 2
        elif nxt == "x" and re.match(r"^[0-9A-Fa-f]{2}$", text[i + 2:i + 4]):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            raise t.error(key, f"bad escape {text[i:i + 4]!r} at character {i}", text, allowed)
    if len(out) > 65507:
        raise t.error(key, "longer than a UDP datagram can be", f"{len(out)} bytes", "at most 65507 bytes")
    return bytes(out)


def _read_udp_health_check(ht: _Table) -> HealthCheckConfig:
    """C{health_check = { type = "udp", send = "...", expect = "..." }}."""
    for key in ("path", "host"):
        if ht.has(key):
            raise ht.error(key, "not a setting of udp health checks", ht.get(key),
                           "type, send, expect, interval, timeout, healthy_threshold, unhealthy_threshold")
    send = _decode_payload(ht, "send")
    if not send:
        raise ht.error("send", "a udp health check needs a datagram to send", ht.get("send", ""),
                       "a non-empty string, e.g. 'ping' or '\\x12\\x34...'")
    return HealthCheckConfig(
        type="udp",
        send=send,
        expect_bytes=_decode_payload(ht, "expect"),
        interval=ht.number("interval", 2.0, 0, 3600, above=True),
        timeout=ht.number("timeout", 5.0, 0, 3600, above=True),
        healthy_threshold=ht.integer("healthy_threshold", 3, 1, 100),
        unhealthy_threshold=ht.integer("unhealthy_threshold", 3, 1, 100),
    )


def _read_udp_listener(t: _Table, base: str, groups: Mapping[str, GroupConfig]) -> ListenerConfig:
    """C{[listeners.NAME]} with C{protocol = "udp"}."""
    bind = t.get("bind")
    try:
        parse_udp_bind(bind)
    except ValueError as e:
        raise t.error("bind", f"not a udp address ({e})", bind, _UDP_BIND_ALLOWED) from None
    persistence = _read_persistence(t, "persistence", "udp")
    return ListenerConfig(
        name=t.path.split(".", 1)[1], protocol="udp", bind=bind,
        backends=_check_group(t, "backends", t.get("backends"), groups),
        persistence=persistence,
        idle_timeout=t.number("idle_timeout", 30.0, 0, 3600, above=True),
        max_sessions=t.integer("max_sessions", 100_000, 1, 10_000_000),
        **_read_access_log(t, base),
    )


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_udp(config: Config) -> None:
    """
    What udp listeners and udp health checks need of the rest of the file:
    backends given by IP address (datagrams are sent to an address; the
    balancer resolves no names per session), and one process.
    """
    udp = [l for l in config.listeners.values() if l.protocol == "udp"]
    if udp and config.workers > 1:
        raise ConfigError(f"{config.path}: workers: udp listeners ({', '.join(l.name for l in udp)}) run in one "
                          f"process; got {config.workers}; allowed: 1 with a udp listener")
    for group in config.backends.values():
        users = [l.name for l in udp if l.backends == group.name]
        checked = group.health_check is not None and group.health_check.type == "udp"
        if not users and not checked:
            continue
        why = f"used by udp listener {users[0]}" if users else "checked over udp"
        for i, server in enumerate(group.servers):
            if not _is_ip(server.host):
                raise ConfigError(
                    f"{config.path}: backends.{group.name}.servers[{i}].address: a group {why} needs "
                    f"IP addresses; got {server.host}:{server.port}; allowed: \"IPv4:port\" or \"[IPv6]:port\""
                )


def _describe_udp(l: ListenerConfig) -> List[str]:
    port, interface = parse_udp_bind(l.bind)
    return [
        f"  udp on {interface or '0.0.0.0'} port {port}: a session is a client address (ip, port), relayed "
        "through one socket connected to its backend",
        f"  idle_timeout {l.idle_timeout} s (silence both ways ends a session), max_sessions {l.max_sessions} "
        "(the oldest idle session is evicted beyond it)",
        "  a backend's ICMP port unreachable counts as a failure and moves the session; "
        "a drained backend gets no new session; no PROXY protocol",
    ]
