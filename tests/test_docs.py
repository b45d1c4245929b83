"""
The documentation describes what is really there: every TOML block in
docs/ and README.md is valid TOML, and every complete configuration in them
loads (certificate files aside, which the examples test covers); and every
test method says in its docstring what it proves.
"""

from __future__ import annotations

import ast
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
        """The documentation has TOML blocks for the other checks to read (more than five)."""
        self.assertGreater(len(list(toml_blocks())), 5)

    def test_everyTomlBlockParses(self):
        """Every TOML block in docs/ and the README is valid TOML."""
        for where, block in toml_blocks():
            try:
                tomllib.loads(block)
            except tomllib.TOMLDecodeError as e:
                self.fail(f"{where}: {e}\n{block}")

    def test_completeConfigurationsLoad(self):
        """Every complete configuration in the docs (listeners and backends, no certificates) loads without error."""
        for where, block in toml_blocks():
            if "[listeners." not in block or "[backends." not in block or "certificates" in block:
                continue
            try:
                parse_config(block, where)
            except ConfigError as e:
                self.fail(str(e))


def undocumented_tests(paths):
    """C{path:line Class.method} of each test method in C{paths} without a docstring."""
    found = []
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef):
                continue
            for node in cls.body:
                if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")
                        and ast.get_docstring(node) is None):
                    found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {cls.name}.{node.name}")
    return found


class TestDocstringTests(SynchronousTestCase):
    def test_everyTestMethodSaysWhatItProves(self):
        """Every test method in tests/, examples/ and bench/ has a docstring (Twisted's habit): a new one without fails here."""
        paths = [p for where in ("tests", "examples", "bench") for p in glob.glob(os.path.join(ROOT, where, "test_*.py"))]
        self.assertGreater(len(paths), 40)
        self.assertEqual(undocumented_tests(paths), [])

    def test_undocumentedTestIsFound(self):
        """The check finds a test method without a docstring, with its place, and passes over documented ones."""
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write("class T:\n    def test_a(self):\n        pass\n\n"
                    "    def test_b(self):\n        \"\"\"Says.\"\"\"\n\n    def helper(self):\n        pass\n")
        self.assertEqual([entry.split(" ", 1)[1] for entry in undocumented_tests([path])], ["T.test_a"])
