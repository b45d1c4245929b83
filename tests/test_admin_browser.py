"""
The admin page in a real browser: headless Chromium (Debian's C{chromium},
installed by C{run-tests}) renders it; the DOM has the tables and the
screenshot shows the state colours.  Driven over Chromium's DevTools pipe,
a page on another origin tries to act and read (and fails), and the admin
page's own button works.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import globalLogPublisher
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_slb.admin import admin_site
from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.stats import StatsRegistry

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def png_pixels(path: str):
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into rows of pixels."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
            channels = {2: 3, 6: 4}[color]
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x:x + 3]) for x in range(0, stride, channels)])
        prev = line
    return width, height, rows


class BrowserTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_pageRendersTablesWithStateColours(self):
        """
        Headless Chromium renders the admin page with its listener and group tables, every backend, and the
        green, amber and red state badges.
        """
        self.assertTrue(os.path.exists(CHROMIUM), "chromium is missing: run-tests installs Debian's chromium")
        group = BackendGroup("web", [
            Backend("alpha", "127.0.0.1", 9001), Backend("beta", "127.0.0.1", 9002, weight=0),
            Backend("gamma", "127.0.0.1", 9003),
        ])
        group.get("gamma").up = False
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            admin_site(StatsRegistry({"web": group}))
        )
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/"
        profile = os.path.abspath(self.mktemp())
        shot = os.path.abspath(self.mktemp() + ".png")
        common = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-quic",
            f"--user-data-dir={profile}", "--window-size=1000,700",
        ]
        out, err, code = yield getProcessOutputAndValue(CHROMIUM, common + ["--dump-dom", url], env=os.environ)
        self.assertEqual(code, 0, err)
        self.assertIn(b'<table id="listeners">', out)
        self.assertEqual(out.count(b'<table class="group"'), 1)
        for name in (b"alpha", b"beta", b"gamma"):
            self.assertIn(name, out)
        out, err, code = yield getProcessOutputAndValue(
            CHROMIUM, common + [f"--screenshot={shot}", url], env=os.environ
        )
        self.assertTrue(os.path.exists(shot), err)
        width, height, rows = png_pixels(shot)
        self.assertEqual((width, height), (1000, 700))
        colours = {p for row in rows for p in row}
        self.assertGreater(len(colours), 10, "the page is blank")

        def near(target):
            return any(all(abs(p[i] - target[i]) < 24 for i in range(3)) for p in colours)

        self.assertTrue(near((0x1A, 0x8F, 0x3A)), "no green 'up' badge")
        self.assertTrue(near((0xD0, 0x8A, 0x00)), "no amber 'drain' badge")
        self.assertTrue(near((0xC6, 0x28, 0x28)), "no red 'down' badge")


COMMON = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-quic",
]


class DevTools(ProcessProtocol):
    """
    Chromium driven over C{--remote-debugging-pipe}: commands are written to
    its fd 3 and answers read from its fd 4, as NUL-terminated JSON.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.next_id = 0
        self.waiting: dict = {}
        self.events: list = []
        self.event_waiters: list = []
        self.ended: defer.Deferred = defer.Deferred()
        self.stderr = b""

    def childDataReceived(self, fd, data):
        if fd == 2:
            self.stderr += data
            return
        if fd != 4:
            return
        self.buffer += data
        while b"\0" in self.buffer:
            message, self.buffer = self.buffer.split(b"\0", 1)
            doc = json.loads(message)
            if "id" in doc:
                d = self.waiting.pop(doc["id"])
                if "error" in doc:
                    d.errback(RuntimeError(doc["error"]))
                else:
                    d.callback(doc.get("result", {}))
            else:
                self.events.append(doc)
                for method, d in list(self.event_waiters):
                    if doc.get("method") == method:
                        self.event_waiters.remove((method, d))
                        d.callback(doc)

    def processEnded(self, reason):
        for d in list(self.waiting.values()):
            d.errback(RuntimeError(f"chromium ended: {self.stderr[-2000:]!r}"))
        self.waiting.clear()
        self.ended.callback(None)

    def send(self, method, session=None, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        d = self.waiting[self.next_id] = defer.Deferred()
        self.transport.writeToChild(3, json.dumps(message).encode() + b"\0")
        return d

    def event(self, method):
        d = defer.Deferred()
        self.event_waiters.append((method, d))
        return d

    @defer.inlineCallbacks
    def open(self, url):
        """Open C{url} in a new tab and wait for its load event; returns the session id."""
        target = yield self.send("Target.createTarget", url="about:blank")
        attached = yield self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        session = attached["sessionId"]
        yield self.send("Page.enable", session)
        loaded = self.event("Page.loadEventFired")
        yield self.send("Page.navigate", session, url=url)
        yield loaded
        return session

    @defer.inlineCallbacks
    def evaluate(self, session, expression):
        result = yield self.send("Runtime.evaluate", session, expression=expression, awaitPromise=True,
                                 returnByValue=True)
        return result["result"].get("value")


def start_chromium(test) -> DevTools:
    devtools = DevTools()
    profile = os.path.abspath(test.mktemp())
    reactor.spawnProcess(
        devtools, CHROMIUM, [CHROMIUM, *COMMON, f"--user-data-dir={profile}", "--remote-debugging-pipe"],
        env=os.environ, childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
    )

    def stop():
        if devtools.ended.called:
            return None
        devtools.send("Browser.close").addErrback(lambda _: None)
        return devtools.ended

    test.addCleanup(stop)
    return devtools


class Attacker(Resource):
    """A page on another local origin that tries to act on, and read, the admin listener."""

    isLeaf = True

    def __init__(self, admin_url: str) -> None:
        Resource.__init__(self)
        self.admin_url = admin_url

    def render_GET(self, request):
        a = self.admin_url
        return f"""<!doctype html><html><body>
<form id=form method=POST action="{a}/backends/web/alpha/down" target=sink></form>
<iframe name=sink></iframe><pre id=out></pre>
<script>
const out = document.getElementById("out");
const note = (what) => {{ out.textContent += what + "\\n"; }};
window.attack = Promise.all([
  fetch("{a}/backends/web/beta/down", {{method: "POST", mode: "no-cors"}})
    .then(r => note("no-cors POST sent (" + r.type + ")"), e => note("no-cors POST failed")),
  fetch("{a}/stats").then(r => r.text()).then(t => note("STATS READ " + t), e => note("stats fetch blocked")),
  fetch("{a}/backends/web/gamma/down", {{method: "POST", headers: {{"X-SLB-Admin": "1"}}}})
    .then(r => note("cors POST answered " + r.status), e => note("cors POST blocked")),
  new Promise(resolve => {{
    document.querySelector("iframe").addEventListener("load", () => {{ note("form posted"); resolve(); }});
    document.getElementById("form").submit();
  }}),
]).then(() => out.textContent);
</script></body></html>""".encode()


class CrossSiteBrowserTests(TestCase):
    timeout = 90

    def setUp(self):
        self.assertTrue(os.path.exists(CHROMIUM), "chromium is missing: run-tests installs Debian's chromium")
        self.group = BackendGroup("web", [
            Backend("alpha", "127.0.0.1", 9001), Backend("beta", "127.0.0.1", 9002), Backend("gamma", "127.0.0.1", 9003),
        ])
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def listen(self, factory):
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def refusals(self):
        return [e for e in self.events if e.get("log_namespace") == "twisted_slb.front" and e.get("code") in (403, 421)]

    @defer.inlineCallbacks
    def test_otherOriginCannotActOrRead(self):
        """A page on another local origin (127.0.0.1, another port: same-site) sends a no-cors POST, a form POST,
        a CORS POST with the admin header and a fetch of /stats: all reach the admin and are refused, nothing
        changes, and the page reads no data."""
        admin_port = yield self.listen(admin_site(StatsRegistry({"web": self.group}),
                                                  bind="tcp:0:interface=127.0.0.1"))
        admin_url = f"http://127.0.0.1:{admin_port}"
        site = Site(Attacker(admin_url))
        attacker_port = yield self.listen(site)
        devtools = start_chromium(self)
        session = yield devtools.open(f"http://127.0.0.1:{attacker_port}/")
        out = yield devtools.evaluate(session, "window.attack")
        self.assertIn("stats fetch blocked", out)
        self.assertIn("cors POST blocked", out)
        self.assertIn("no-cors POST", out)  # sent (opaque answer) or failed: either way nothing to read
        self.assertIn("form posted", out)
        self.assertNotIn("STATS READ", out)
        self.assertEqual([b.state for b in self.group.backends], ["up", "up", "up"])
        refused = " ".join(e["why"] for e in self.refusals())
        self.assertIn("POST /backends/web/alpha/down", refused)  # the form
        self.assertIn("POST /backends/web/beta/down", refused)  # the no-cors fetch
        self.assertIn("GET /stats", refused)

    @defer.inlineCallbacks
    def test_pageButtonWorks(self):
        """The admin page's own 'down' button (its script, under its CSP) takes the backend down, and the page
        shows it after reloading; with a token, the button works once the token is typed."""
        for token in ("", "s3cret"):
            group = BackendGroup("web", [Backend("alpha", "127.0.0.1", 9001)])
            port = yield self.listen(admin_site(StatsRegistry({"web": group}), token=token,
                                                bind="tcp:0:interface=127.0.0.1"))
            devtools = start_chromium(self)
            session = yield devtools.open(f"http://localhost:{port}/")
            if token:
                yield devtools.evaluate(session, "const t = document.getElementById('token'); t.value = 's3cret';"
                                                 "t.dispatchEvent(new Event('input')); true")
            reloaded = devtools.event("Page.loadEventFired")
            clicked = yield devtools.evaluate(
                session, "document.querySelector('button[data-backend=\"alpha\"][data-action=\"down\"]').click(); 1")
            self.assertEqual(clicked, 1)
            yield reloaded
            self.assertEqual(group.get("alpha").state, "down", token)
            state = yield devtools.evaluate(session, "document.querySelector('.state').textContent")
            self.assertEqual(state, "down")
            self.assertEqual(self.refusals(), [])
            yield devtools.send("Browser.close")
            yield devtools.ended
