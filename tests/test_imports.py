"""
The modules of twisted_slb import one another without a cycle: a static
check of every import that runs (at module level or inside a function; not
those only for type checkers), and each module imported on its own in a
fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from typing import Dict, List, Set

from twisted.trial.unittest import SynchronousTestCase

import twisted_slb

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(twisted_slb.__file__)))


def _modules() -> Dict[str, str]:
    """Module name -> file of every module of the package."""
    found = {}
    for folder, _, files in os.walk(os.path.join(_ROOT, "twisted_slb")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, _ROOT)[:-3].replace(os.sep, ".")
                found[module[: -len(".__init__")] if module.endswith(".__init__") else module] = path
    return found


def _imports(path: str, modules: Dict[str, str], top_level_only: bool = False) -> Set[str]:
    """The twisted_slb modules the file at C{path} imports when it runs."""
    out: Set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                continue  # for type checkers only
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if not (top_level_only and in_function):
                if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                    for alias in child.names:
                        full = f"{child.module}.{alias.name}"
                        out.add(full if full in modules else child.module)
                elif isinstance(child, ast.Import):
                    out.update(alias.name for alias in child.names)
            visit(child, nested)

    with open(path) as f:
        visit(ast.parse(f.read()), False)
    return {m for m in out if m in modules}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


class StaticImportTests(SynchronousTestCase):
    def graph(self, top_level_only: bool = False) -> Dict[str, Set[str]]:
        modules = _modules()
        return {m: _imports(p, modules, top_level_only) - {m} for m, p in modules.items()}

    def test_noCycles(self):
        """No two modules import each other, directly or through others, even inside functions."""
        self.assertEqual(_cycles(self.graph()), [])

    def test_cycleIsFound(self):
        """The check finds a cycle when there is one (a -> b -> c -> a), and ignores a module importing itself."""
        self.assertEqual(_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}), [["a", "b", "c"]])

    def test_configDoesNotImportTheTLSRuntime(self):
        """
        Nothing twisted_slb.config imports, even inside a function (to check
        TLS files), reaches the TLS server or client modules; the package
        twisted_slb.tls imports them only on first use of their names; and
        no TLS module needs config.
        """
        graph = self.graph()
        top_level = self.graph(top_level_only=True)
        seen, todo = set(), ["twisted_slb.config"]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        self.assertIn("twisted_slb.tls._certificates", seen)
        self.assertNotIn("twisted_slb.tls._server", seen)
        self.assertNotIn("twisted_slb.tls._client", seen)
        self.assertEqual(top_level["twisted_slb.tls"], {"twisted_slb.tls._certificates"})
        for module in ["twisted_slb.tls", "twisted_slb.tls._certificates", "twisted_slb.tls._server", "twisted_slb.tls._client"]:
            self.assertNotIn("twisted_slb.config", graph[module], module)


_ALONE = """
import importlib, json, os, sys, types

root, names = sys.argv[1], json.loads(sys.argv[2])
failures = {}
for name in names:
    for loaded in [m for m in sys.modules if m == "twisted_slb" or m.startswith("twisted_slb.")]:
        del sys.modules[loaded]
    # The package without its __init__, which imports most modules in its
    # own order: each module is imported on its own.
    package = types.ModuleType("twisted_slb")
    package.__path__ = [os.path.join(root, "twisted_slb")]
    sys.modules["twisted_slb"] = package
    try:
        importlib.import_module(name)
    except Exception as e:
        failures[name] = f"{type(e).__name__}: {e}"
for loaded in [m for m in sys.modules if m == "twisted_slb" or m.startswith("twisted_slb.")]:
    del sys.modules[loaded]
package = types.ModuleType("twisted_slb")
package.__path__ = [os.path.join(root, "twisted_slb")]
sys.modules["twisted_slb"] = package
config = importlib.import_module("twisted_slb.config")
config.parse_config(
    '[backends.g]\\nservers = [{ name = "a", address = "127.0.0.1:1" }]\\n'
    '[listeners.web]\\nprotocol = "http"\\nbind = "tcp:0"\\nbackends = "g"\\n'
)
tls_loaded = "twisted_slb.tls" in sys.modules
config.parse_config(
    '[backends.g]\\nservers = [{ name = "a", address = "127.0.0.1:1" }]\\n'
    f'[backends.g.tls]\\nca = {json.dumps(sys.argv[3])}\\n'
    '[listeners.web]\\nprotocol = "https"\\nbind = "tcp:0"\\nbackends = "g"\\n'
    f'certificates = [{{ cert = {json.dumps(sys.argv[3])}, key = {json.dumps(sys.argv[4])} }}]\\n'
)
print(json.dumps({
    "failures": failures,
    "tls_loaded": tls_loaded,
    "with_files": sorted(m for m in sys.modules if m.startswith("twisted_slb.tls")),
}))
"""


class FreshInterpreterTests(SynchronousTestCase):
    def test_eachModuleImportsOnItsOwn(self):
        """
        In a fresh interpreter, every module imports on its own (no partly
        initialised module met on the way); loading a configuration without
        TLS files does not import twisted_slb.tls; and loading one with an
        https listener and a backend CA imports only its certificate loading,
        not the TLS server or client modules.
        """
        from tests.certs import CertificateAuthority, Issued

        authority = CertificateAuthority()
        cert, key = Issued(authority.certificate, authority.key).write(self.mktemp(), "ca")
        names = sorted(m for m in _modules() if m != "twisted_slb" and not m.endswith("__main__"))
        out = subprocess.run(
            [sys.executable, "-c", _ALONE, _ROOT, json.dumps(names), cert, key],
            capture_output=True, text=True, check=True, timeout=300,
        ).stdout
        result = json.loads(out.splitlines()[-1])
        self.assertEqual(result["failures"], {})
        self.assertFalse(result["tls_loaded"])
        self.assertEqual(result["with_files"], ["twisted_slb.tls", "twisted_slb.tls._certificates"])
