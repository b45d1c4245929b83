"""
The documentation describes what is really there: every TOML block in
docs/ and README.md is valid TOML, and every complete configuration in them
loads (certificate files aside, which the examples test covers).
"""

from __future__ import annotations

import glob
import os
import re
import sys

from twisted.trial.unittest import SynchronousTestCase

from twisted_slb.config import ConfigError, parse_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]


def toml_blocks():
    for page in PAGES:
        with open(page) as f:
            text = f.read()
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", text, re.S)):
            yield f"{os.path.basename(page)} block {i}", block


class DocsTests(SynchronousTestCase):
    def test_thereAreBlocks(self):
        self.assertGreater(len(list(toml_blocks())), 5)

    def test_everyTomlBlockParses(self):
        for where, block in toml_blocks():
            try:
                tomllib.loads(block)
            except tomllib.TOMLDecodeError as e:
                self.fail(f"{where}: {e}\n{block}")

    def test_completeConfigurationsLoad(self):
        for where, block in toml_blocks():
            if "[listeners." not in block or "[backends." not in block or "certificates" in block:
                continue
            try:
                parse_config(block, where)
            except ConfigError as e:
                self.fail(str(e))
