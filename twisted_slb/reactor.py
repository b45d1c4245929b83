"""
The reactor C{twistd slb} runs, for an application that embeds twisted_slb:
Twisted's epoll reactor without the per-event logging context (see
docs/operations.md and docs/performance.md).  Call L{install} before
anything imports C{twisted.internet.reactor}::

    from twisted_slb.reactor import install
    install()          # RuntimeError where epoll is missing
    from twisted.internet import reactor

The implementation is private (C{twisted_slb._io.reactor}); this module is
its public face.
"""

from twisted_slb._io.reactor import SLBEPollReactor, install, install_default

__all__ = ["SLBEPollReactor", "install", "install_default"]
