"""
Tests for L{twisted_slb.choices}: each list of names is defined once, and
the configuration and the code that acts on a value use the same one.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_slb import choices, config
from twisted_slb.config import ConfigError, parse_config
from twisted_slb.persistence import interfaces
from twisted_slb.scheduling import SCHEDULERS


class ChoicesTests(SynchronousTestCase):
    def test_configUsesTheLists(self):
        """The configuration checks values against the lists of twisted_slb.choices, not copies."""
        for name in ("PROTOCOLS", "PERSISTENCE_TYPES", "ON_FAILURE", "SCHEDULER_NAMES", "STORE_TYPES"):
            self.assertIs(getattr(config, name), getattr(choices, name), name)
        self.assertIs(interfaces.ON_FAILURE, choices.ON_FAILURE)

    def test_schedulersAreTheNamedOnes(self):
        """Every scheduler name the configuration accepts has a scheduler, and no other exists."""
        self.assertEqual(sorted(SCHEDULERS), sorted(choices.SCHEDULER_NAMES))

    def test_overLimitErrorNamesTheChoices(self):
        """A bad over_limit is refused, the error naming the field, the value and the choices from the list."""
        with self.assertRaises(ConfigError) as e:
            parse_config(
                '[backends.g]\nservers = [{ name = "a", address = "127.0.0.1:1" }]\n'
                '[listeners.l]\nprotocol = "tcp"\nbind = "tcp:0"\nbackends = "g"\nover_limit = "drop"\n'
            )
        message = str(e.exception)
        self.assertIn("over_limit", message)
        self.assertIn("drop", message)
        for choice in choices.OVER_LIMIT:
            self.assertIn(choice, message)
