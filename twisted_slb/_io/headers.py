"""
L{FastHeaders}: the header store of the listeners' HTTP server
(L{twisted_slb.web.front}), a L{twisted.web.http_headers.Headers} with the
same API and the same results, made for the proxy's hot path.

Why: a proxied request touches its headers about thirty times (parsing,
routing, the persistence policy, building the request for the backend,
copying the response, framing it), and each call to C{Headers} encodes and
re-checks the name and re-sanitises the value, about a sixth of the
proxy's CPU time.  Here a name is checked and encoded once per process (a
bounded cache), and a value is only sanitised when it holds a CR or LF.

It subclasses C{Headers} (policies and user code may check
C{isinstance}) but overrides every method, so it depends on none of
C{Headers}' internals, which changed across Twisted versions.
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Sequence, Tuple, Union

from twisted.web.http_headers import Headers

__all__ = ["FastHeaders", "cached_name", "canonical_name"]

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")

# Names whose usual spelling is not plain Word-Case (as Twisted writes them).
_SPECIAL = {
    b"content-md5": b"Content-MD5",
    b"dnt": b"DNT",
    b"etag": b"ETag",
    b"p3p": b"P3P",
    b"te": b"TE",
    b"www-authenticate": b"WWW-Authenticate",
    b"x-xss-protection": b"X-XSS-Protection",
}

#: name as given (bytes or str) -> (lowercase key, canonical name)
_NAMES: Dict[Union[bytes, str], Tuple[bytes, bytes]] = {}
# Legitimate traffic uses few distinct names; a client inventing new ones
# must not grow the cache for ever (past this, names are just not cached).
_MAX_NAMES = 10_000


#: The C{(lowercase key, canonical name)} of a name already checked by
#: L{canonical_name}, or L{None}: the hot paths try this before calling it.
cached_name = _NAMES.get


def canonical_name(name: Union[bytes, str]) -> Tuple[bytes, bytes]:
    """
    The lowercase key and the canonical spelling (C{Content-Type}) of a
    header name.

    @raise ValueError: C{name} is not an HTTP token (RFC 9110 5.1), so it
        could smuggle a line break or a colon into a message.
    @raise TypeError: C{name} is neither L{bytes} nor L{str}.
    """
    found = _NAMES.get(name)
    if found is not None:
        return found
    if isinstance(name, str):
        raw = name.encode("iso-8859-1")
    elif isinstance(name, bytes):
        raw = name
    else:
        raise TypeError(f"a header name must be bytes or str, not {type(name).__name__}")
    if not _TOKEN.match(raw):
        raise ValueError(f"invalid header name {raw[:40]!r}")
    lower = raw.lower()
    canonical = _SPECIAL.get(lower) or b"-".join(word.capitalize() for word in lower.split(b"-"))
    found = (lower, canonical)
    if len(_NAMES) < _MAX_NAMES:
        _NAMES[name] = found
    return found


def _value(value: Union[bytes, str]) -> bytes:
    """A header value as bytes, its line breaks folded into spaces (as Twisted does)."""
    if not isinstance(value, bytes):
        if not isinstance(value, str):
            raise TypeError(f"a header value must be bytes or str, not {type(value).__name__}")
        value = value.encode("utf-8")
    if 13 in value or 10 in value:  # CR, LF (an int test is several times faster than b"\r" in value)
        return b" ".join(value.splitlines())
    return value


class FastHeaders(Headers):
    """
    HTTP headers: every L{Headers} method, with the same results
    (C{getAllRawHeaders} gives canonical names, values given as L{str} are
    UTF-8 encoded, line breaks in values are folded), faster.

    @ivar by_name: canonical name (C{b"Content-Length"}) -> list of values.
        The listeners' server reads and sets its framing fields here
        directly; whoever writes to it must keep the names canonical
        tokens and the values free of CR and LF, as the methods do.
    """

    __slots__ = ("by_name",)

    def __init__(self, rawHeaders=None) -> None:
        self.by_name: Dict[bytes, List[bytes]] = {}
        if rawHeaders is not None:
            for name, values in rawHeaders.items():
                self.setRawHeaders(name, values)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.by_name!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return sorted(self.by_name.items()) == sorted(
                (name, list(values)) for name, values in other.getAllRawHeaders()
            )
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    # Mutable, like Headers: unhashable.  mypy types object.__hash__ as a
    # method and has no other spelling of "no __hash__".
    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> FastHeaders:
        new = self.__class__()
        new.by_name = {k: list(v) for k, v in self.by_name.items()}
        return new

    def hasHeader(self, name) -> bool:
        return (_NAMES.get(name) or canonical_name(name))[1] in self.by_name

    def removeHeader(self, name) -> None:
        self.by_name.pop((_NAMES.get(name) or canonical_name(name))[1], None)

    def setRawHeaders(self, name, values: Sequence) -> None:
        if isinstance(values, (bytes, str)) or not isinstance(values, Sequence):
            # Headers raises TypeError for these too: a lone string would
            # become one header per character.
            raise TypeError(f"header values must be a sequence of bytes or str, not {type(values).__name__}")
        self.by_name[(_NAMES.get(name) or canonical_name(name))[1]] = [_value(v) for v in values]

    def addRawHeader(self, name, value) -> None:
        key = (_NAMES.get(name) or canonical_name(name))[1]
        if value.__class__ is not bytes or 13 in value or 10 in value:
            value = _value(value)
        values = self.by_name.get(key)
        if values is None:
            self.by_name[key] = [value]
        else:
            values.append(value)

    def add_fields(self, lines: Sequence[bytes]) -> None:
        """
        Add the header fields of a message head: C{lines} of C{name:
        value}, split on CRLF and already free of CR, LF and other control
        characters (the listeners' parser checks the whole head first).
        Whitespace around a value is dropped.

        One call per message instead of one L{addRawHeader} per field: this
        runs for every request.

        @raise ValueError: a line has no colon, or its name is not a token
            (which includes a space before the colon, and obs-fold).
        """
        by_name = self.by_name
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon:
                raise ValueError(f"no colon in header line {line[:40]!r}")
            key = (_NAMES.get(name) or canonical_name(name))[1]
            values = by_name.get(key)
            if values is None:
                by_name[key] = [value.strip(b" \t")]
            else:
                values.append(value.strip(b" \t"))

    def add_pairs(self, pairs: Sequence[Tuple[bytes, bytes]], skip: Union[frozenset, set] = frozenset()) -> None:
        """
        Add C{(name, value)} pairs, as L{addRawHeader} would, except those
        whose lowercase name is in C{skip}: the proxy copies a backend's
        response headers this way, without its hop-by-hop fields.

        @raise ValueError: a name is not a token.
        """
        by_name = self.by_name
        for name, value in pairs:
            lower, key = _NAMES.get(name) or canonical_name(name)
            if lower in skip:
                continue
            if value.__class__ is not bytes or 13 in value or 10 in value:
                value = _value(value)
            values = by_name.get(key)
            if values is None:
                by_name[key] = [value]
            else:
                values.append(value)

    def getRawHeaders(self, name, default=None):
        values = self.by_name.get((_NAMES.get(name) or canonical_name(name))[1])
        if not values:
            return default
        if isinstance(name, str):
            return [v.decode("utf-8") for v in values]
        return values

    def getAllRawHeaders(self) -> Iterator[Tuple[bytes, Sequence[bytes]]]:
        return iter(self.by_name.items())
