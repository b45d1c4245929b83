"""
The one place a missing reactor argument becomes the global reactor.

Library code takes its reactor (or clock) as a parameter, defaulting to
L{None}; L{maybe_global_reactor} resolves that default at the last moment,
as Twisted's own C{_maybeGlobalReactor} does, so that importing twisted_slb
never installs a reactor (C{twistd} and L{twisted_slb.reactor.install}
choose it first).
"""

from __future__ import annotations

from typing import Any, Optional


def maybe_global_reactor(reactor: Optional[Any]) -> Any:
    """
    @param reactor: a reactor (or an L{IReactorTime}), or L{None}.
    @return: C{reactor}, or the global reactor when it is L{None}.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor
