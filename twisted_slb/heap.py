"""
The garbage collector and a long-running balancer process.

Start-up leaves about 50,000 objects behind (modules, classes, the
configuration) that live as long as the process, and every full collection
of CPython's cyclic garbage collector walks them all: about 40 ms each, a
few times a minute under load.  Measured under HTTP keep-alive load, that
was 6 us of collector time per proxied request, in 40 ms pauses.

C{twistd slb} and its worker processes hand those objects to
C{gc.freeze()} once the listeners are started: the collector then walks
only what came after (1.6 to 2.3 us per request, no pause over a
millisecond).  A reload gives them back first (C{gc.unfreeze()}), so that
the configuration it replaces, which holds reference cycles, can be
collected; they are not frozen again after a reload, because the objects of
connections open at that moment would be frozen with them and never
collected once closed.

The youngest generation is collected every 10,000 net allocations of
container objects instead of 700.  What a proxied request allocates is
freed by reference counting (the request path makes no reference cycle),
but 50 requests in flight hold more than 700 objects at once, so at 700 a
young collection ran every 60 requests, only to walk live objects: 2 us per
request.  At 10,000 none ran in 60,000 requests.

A library user's process is left alone: only the twistd plugin and the
workers call these.  On PyPy (no C{gc.freeze}) they do nothing.
"""

from __future__ import annotations

import gc


#: Net allocations of container objects between two young collections.
YOUNG_THRESHOLD = 10_000


def freeze_startup() -> None:
    """
    Collect what start-up left as garbage, freeze everything left, and make
    young collections rarer.
    """
    if hasattr(gc, "freeze"):
        gc.collect()
        gc.freeze()
        young, middle, old = gc.get_threshold()
        gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)


def thaw() -> None:
    """Give the frozen objects back to the collector (before a reload)."""
    if hasattr(gc, "unfreeze"):
        gc.unfreeze()
