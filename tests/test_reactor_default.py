"""
Tests for L{twisted_slb._reactor.maybe_global_reactor}: one default for a
missing reactor argument, and no module repeating the branch.
"""

from __future__ import annotations

import os
import re

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_slb._reactor import maybe_global_reactor


class MaybeGlobalReactorTests(SynchronousTestCase):
    """L{maybe_global_reactor}: the one default for a missing reactor argument."""

    def test_givenReactorIsKept(self):
        """A reactor (or clock) given is returned as it is."""
        clock = Clock()
        self.assertIs(maybe_global_reactor(clock), clock)

    def test_noneIsTheGlobalReactor(self):
        """None gives the global reactor, imported only then."""
        from twisted.internet import reactor

        self.assertIs(maybe_global_reactor(None), reactor)

    def test_noCopiesOfTheBranch(self):
        """
        No module repeats the default (C{if reactor is None: from
        twisted.internet import reactor}); admin.py, changed on another
        branch at the time, is the one left to convert.
        """
        import twisted_slb

        root = os.path.dirname(twisted_slb.__file__)
        pattern = re.compile(r"if \w+ is None:\n\s+from twisted\.internet import reactor")
        copies = []
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if name.endswith(".py") and name not in ("admin.py", "_reactor.py"):
                    with open(path) as f:
                        if pattern.search(f.read()):
                            copies.append(os.path.relpath(path, root))
        self.assertEqual(copies, [])
