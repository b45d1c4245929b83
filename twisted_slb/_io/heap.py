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

Memory freed after a burst of connections (for instance 2,000 clients
that never read, each holding up to 32 KB) goes back to glibc's allocator,
which keeps it: freed chunks in the middle of its heap are not returned to
the system, only a free top of the heap is.  Measured after such a burst
(docs/reliability.md), glibc held 68 to 83 MB free, 10.5 MB in use, the
process's resident size stayed at 135 to 150 MB, and C{malloc_trim(0)}
brought it to 68 MB in 8 to 25 ms.  L{FreedMemoryTrimmer} calls it as a
burst ends: when, at one of its looks (every 10 s), the bytes glibc has in
use fell by 32 MB from their peak, and at the next looks while they keep
falling.  It asks nothing
of a steady process (one C{mallinfo2} call per look, tens of
microseconds) and does nothing where glibc's functions are missing.

A library user's process is left alone: only the twistd plugin and the
workers call these.  On PyPy (no C{gc.freeze}) they do nothing.
"""

from __future__ import annotations

import ctypes
import gc
import time
from typing import Callable, Optional

from twisted.application.internet import TimerService
from twisted.logger import Logger

log = Logger(namespace="twisted_slb._io.heap")


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


#: Seconds between two looks at the C allocator.
TRIM_INTERVAL = 10.0
#: Bytes glibc's allocator must have freed since its peak in use before
#: the free memory is given back to the system.
TRIM_AFTER_FREED = 32 * 1024 * 1024


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]


def glibc_allocator():
    """
    C{(in_use, trim)}: the bytes glibc's C{malloc} has in use, and
    C{malloc_trim(0)}; L{None} where the C library has not both (glibc
    before 2.33, musl, macOS).
    """
    try:
        libc = ctypes.CDLL(None)
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2
    mallinfo2.argtypes = []
    malloc_trim.restype = ctypes.c_int
    malloc_trim.argtypes = [ctypes.c_size_t]
    return (lambda: mallinfo2().uordblks), (lambda: malloc_trim(0))


class FreedMemoryTrimmer:
    """
    Gives the memory freed after a burst back to the system.  Called every
    L{TRIM_INTERVAL} seconds, it trims when the bytes in use fell by
    C{threshold} from their peak, and again at each look while they keep
    falling (by an eighth of C{threshold} since the last trim: a burst
    unwinds over several looks).  Growing by C{threshold} again starts a
    new burst.

    @ivar peak: the most bytes in use seen in this burst.
    @ivar trimmed: the bytes in use at the last trim of this burst, or
        L{None}.
    @ivar trims: how many times it trimmed.
    """

    def __init__(self, in_use: Callable[[], int], trim: Callable[[], object],
                 threshold: int = TRIM_AFTER_FREED) -> None:
        self.in_use = in_use
        self.trim = trim
        self.threshold = threshold
        self.peak = in_use()
        self.trimmed: Optional[int] = None
        self.trims = 0

    def __call__(self) -> None:
        now = self.in_use()
        if self.trimmed is not None and now - self.trimmed >= self.threshold:
            self.peak, self.trimmed = now, None  # a new burst
        if now > self.peak:
            self.peak = now
        elif self.peak - now >= self.threshold and (
                self.trimmed is None or self.trimmed - now >= self.threshold // 8):
            started = time.perf_counter()
            self.trim()
            self.trims += 1
            log.info(
                "{freed} MB freed since the peak of {peak} MB in use: given back to the system ({ms:.0f} ms)",
                freed=(self.peak - now) >> 20, peak=self.peak >> 20, ms=(time.perf_counter() - started) * 1000,
            )
            self.trimmed = now


def trimming_service(clock=None) -> Optional[TimerService]:
    """A service running a L{FreedMemoryTrimmer}, or L{None} without glibc's functions."""
    allocator = glibc_allocator()
    if allocator is None:
        return None
    service = TimerService(TRIM_INTERVAL, FreedMemoryTrimmer(*allocator))
    service.clock = clock
    return service
