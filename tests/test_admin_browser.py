"""
The admin page in a real browser: headless Chromium (Debian's C{chromium},
installed by C{run-tests}) renders it; the DOM has the tables and the
screenshot shows the state colours.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

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
        self.assertEqual(out.count(b'<table class="group">'), 1)
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
