"""
Tests for L{twisted_slb._io.headers.FastHeaders}: whatever is done to it,
it answers exactly as Twisted's L{Headers} does.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from twisted_slb._io.headers import FastHeaders, canonical_name

_NAMES = [b"content-type", b"Content-Type", b"CONTENT-TYPE", "content-type", b"set-cookie", "Set-Cookie",
          b"etag", b"ETag", b"www-authenticate", b"x-custom-thing", "X-Custom-Thing", b"te", b"dnt"]
_VALUES = st.one_of(
    st.binary(max_size=12),
    st.text(max_size=8),
    st.sampled_from([b"a\r\nInjected: 1", b"x\ny", "multi\r\nline", b""]),
)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(_NAMES), _VALUES),
        st.tuples(st.just("set"), st.sampled_from(_NAMES), st.lists(_VALUES, max_size=3)),
        st.tuples(st.just("remove"), st.sampled_from(_NAMES), st.none()),
    ),
    max_size=12,
)




def _outcome(f, *args):
    """What C{f(*args)} returns, or the type of exception it raises."""
    try:
        return f(*args)
    except Exception as e:
        return type(e)


class FastHeadersTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_OPS)
    def test_sameAsHeaders(self, ops) -> None:
        """Any sequence of operations leaves both answering the same to every query."""
        ours, theirs = FastHeaders(), Headers()
        for op, name, arg in ops:
            for headers in (ours, theirs):
                if op == "add":
                    headers.addRawHeader(name, arg)
                elif op == "set":
                    headers.setRawHeaders(name, arg)
                else:
                    headers.removeHeader(name)
        for name in _NAMES:
            self.assertEqual(ours.hasHeader(name), theirs.hasHeader(name))
            # A str name gets str values, which may not decode: then both raise.
            self.assertEqual(_outcome(ours.getRawHeaders, name), _outcome(theirs.getRawHeaders, name))
            self.assertEqual(_outcome(ours.getRawHeaders, name, "default"),
                             _outcome(theirs.getRawHeaders, name, "default"))
        self.assertEqual(sorted((n, list(v)) for n, v in ours.getAllRawHeaders()),
                         sorted((n, list(v)) for n, v in theirs.getAllRawHeaders()))
        self.assertEqual(ours, theirs)
        copied = ours.copy()
        self.assertEqual(copied, ours)
        copied.addRawHeader(b"x-only-in-copy", b"1")
        self.assertFalse(ours.hasHeader(b"x-only-in-copy"))
        self.assertNotEqual(copied, ours)

    def test_constructor(self) -> None:
        """Like Headers, the constructor takes a mapping of names to value lists."""
        headers = FastHeaders({b"host": [b"example.com"], "accept": ["*/*"]})
        self.assertEqual(list(headers.getAllRawHeaders()), [(b"Host", [b"example.com"]), (b"Accept", [b"*/*"])])
        self.assertIsInstance(headers, Headers)

    def test_invalidName(self) -> None:
        """A name that is not a token (it could split a header line) is refused."""
        for name in (b"bad name", b"x\r\ny", b"", "caf\xe9", b"a:b"):
            self.assertRaises(ValueError, FastHeaders().addRawHeader, name, b"v")
            self.assertRaises(ValueError, FastHeaders().setRawHeaders, name, [b"v"])
        self.assertRaises(TypeError, FastHeaders().addRawHeader, 1, b"v")

    def test_invalidValues(self) -> None:
        """A lone string is not a list of values; a value must be bytes or str."""
        self.assertRaises(TypeError, FastHeaders().setRawHeaders, b"x", b"value")
        self.assertRaises(TypeError, FastHeaders().addRawHeader, b"x", 3)

    def test_canonicalName(self) -> None:
        """Names come out in Twisted's spelling, special cases included."""
        self.assertEqual(canonical_name(b"x-forwarded-for"), (b"x-forwarded-for", b"X-Forwarded-For"))
        self.assertEqual(canonical_name("WWW-authenticate"), (b"www-authenticate", b"WWW-Authenticate"))
        self.assertEqual(canonical_name(b"ETAG"), (b"etag", b"ETag"))

    def test_addFields(self) -> None:
        """The fields of a message head are added as addRawHeader would, whitespace around values dropped."""
        headers = FastHeaders()
        headers.add_fields([b"Host: example.com", b"accept:*/*", b"X-Many: 1", b"x-many:  2 \t", b"Empty:"])
        expected = Headers()
        for name, value in ((b"Host", b"example.com"), (b"accept", b"*/*"), (b"X-Many", b"1"), (b"x-many", b"2"),
                            (b"Empty", b"")):
            expected.addRawHeader(name, value)
        self.assertEqual(headers, expected)
        self.assertEqual(headers.getRawHeaders(b"x-many"), [b"1", b"2"])

    def test_addFieldsRefusesBadLines(self) -> None:
        """A line without a colon, or whose name is not a token, is refused."""
        for line in (b"no colon", b"bad name: v", b" folded", b": no name", b"Host : space before colon"):
            self.assertRaises(ValueError, FastHeaders().add_fields, [b"Ok: 1", line])

    def test_addPairs(self) -> None:
        """Pairs are added as addRawHeader would (line breaks folded), except the names skipped."""
        headers = FastHeaders()
        headers.add_pairs([(b"Server", b"nginx"), (b"Keep-Alive", b"timeout=5"), (b"x-a", b"1\r\n2"),
                           (b"X-A", b"3"), (b"X-Secret", b"s")], frozenset([b"keep-alive", b"x-secret"]))
        expected = Headers()
        for name, value in ((b"Server", b"nginx"), (b"x-a", b"1\r\n2"), (b"X-A", b"3")):
            expected.addRawHeader(name, value)
        self.assertEqual(headers, expected)
        self.assertEqual(headers.getRawHeaders(b"x-a"), [b"1 2", b"3"])
        self.assertRaises(ValueError, FastHeaders().add_pairs, [(b"bad name", b"v")])
