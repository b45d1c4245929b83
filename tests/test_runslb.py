"""
C{./run-slb} under the interpreter this suite runs on (CPython, or PyPy with
C{PYTHON=pypy3 ./run-tests}): it makes its own virtualenv for that
interpreter (scripts/install-venv, shared with run-tests), checks an example,
and does not reinstall on the next start when nothing changed.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "http-insert-cookie.toml")
# The interpreter itself, not this suite's virtualenv around it.
PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))


class RunSlbTests(SynchronousTestCase):
    def run_slb(self, venv: str, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHON=PYTHON, SLB_VENV=venv)
        # trial --jobs gives its workers this suite's sys.path as PYTHONPATH.
        for name in ("VIRTUAL_ENV", "PYTHONPATH"):
            env.pop(name, None)
        return subprocess.run(
            [os.path.join(ROOT, "run-slb"), *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )

    def test_checkAnExampleInItsOwnVirtualenv(self) -> None:
        """
        C{run-slb --config EXAMPLE --check} works from nothing: a directory
        left by another interpreter is not reused but made again for this
        one, the package is installed, the example is valid; a second run
        installs nothing.
        """
        venv = os.path.abspath(self.mktemp())
        # What another interpreter's virtualenv looks like to the script.
        os.makedirs(os.path.join(venv, "bin"))
        other = os.path.join(venv, "bin", "python")
        with open(other, "w") as f:
            f.write("#!/bin/sh\necho 'otherpython-1.0 /nowhere/python'\n")
        os.chmod(other, 0o755)

        first = self.run_slb(venv, "--config", EXAMPLE, "--check")
        self.assertEqual(first.returncode, 0, first.stdout + first.stderr)
        self.assertIn(f"OK: {EXAMPLE} is valid", first.stdout)
        self.assertIn("belongs to another interpreter (otherpython-1.0 /nowhere/python)", first.stderr)
        self.assertIn(f"install-venv: installing twisted_slb into {venv}", first.stderr)
        with open(os.path.join(venv, ".slb-stamp")) as f:
            stamp = f.read()
        version = sys.version_info
        self.assertTrue(stamp.startswith(f"{sys.implementation.name}-{version[0]}.{version[1]} {PYTHON} "), stamp)

        second = self.run_slb(venv, "--config", EXAMPLE, "--check")
        self.assertEqual(second.returncode, 0, second.stdout + second.stderr)
        self.assertIn(f"OK: {EXAMPLE} is valid", second.stdout)
        self.assertNotIn("install-venv", second.stderr)
