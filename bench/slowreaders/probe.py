"""
twistd with memory probes, for run.sh (Linux, glibc).

  - SIGRTMIN+1: appends to $PROBE_OUT the resident size, glibc's heap
    (mallinfo2), the garbage collector's counts, the reactor's readers,
    writers and timers, the most numerous object types, any exchange or
    HTTP channel still alive, and CPython's arena statistics.
  - SIGRTMIN+2: calls malloc_trim(0), then dumps as above.
  - SIGRTMIN+3: appends one line (resident size, glibc's bytes in use) to
    $PROBE_OUT.inuse.

Usage: python probe.py TWISTD-ARGUMENTS...
"""
import collections
import ctypes
import gc
import os
import signal
import sys
import time

OUT = os.environ.get("PROBE_OUT", "probe.out")
libc = ctypes.CDLL(None)


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


libc.mallinfo2.restype = Mallinfo2


def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def pymalloc_stats() -> str:
    """sys._debugmallocstats() writes to the C stderr: read it through a pipe."""
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    os.close(w)
    sys._debugmallocstats()
    os.dup2(saved, 2)
    os.close(saved)
    os.set_blocking(r, False)
    data = b""
    try:
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    os.close(r)
    return "\n".join(line for line in data.decode().splitlines() if "arenas" in line or "bytes in" in line)


def dump(label: str) -> None:
    from twisted.internet import reactor

    started = time.perf_counter()
    mi = libc.mallinfo2()
    took = (time.perf_counter() - started) * 1e6
    objects = gc.get_objects()
    with open(OUT, "a") as f:
        f.write(f"=== {label} t={time.time():.0f} rss={rss()} kB\n")
        f.write(f"mallinfo2: heap={mi.arena >> 10} kB in-use={mi.uordblks >> 10} kB free={mi.fordblks >> 10} kB "
                f"mmap={mi.hblkhd >> 10} kB ({mi.hblks} blocks) (mallinfo2 took {took:.0f} us)\n")
        f.write(f"gc counts={gc.get_count()} tracked objects={len(objects)}\n")
        f.write(f"reactor readers={len(reactor.getReaders())} writers={len(reactor.getWriters())} "
                f"delayed={len(reactor.getDelayedCalls())}\n")
        types = collections.Counter(type(o).__name__ for o in objects)
        f.write("top types: " + ", ".join(f"{k}={v}" for k, v in types.most_common(25)) + "\n")
        for o in objects:
            name = type(o).__name__
            if name == "_Exchange":
                f.write(f"  exchange gone={o.client_gone} finished={o.finished} upstream={o.upstream!r}\n")
            elif name == "HTTPFrontChannel":
                f.write(f"  channel state={o.state} lost={o.lost} paused={o.paused} "
                        f"unsent={len(getattr(o.transport, '_buffer', b''))}\n")
        f.write(pymalloc_stats() + "\n")


def on_trim(signum, frame) -> None:
    started = time.perf_counter()
    result = libc.malloc_trim(0)
    with open(OUT, "a") as f:
        f.write(f"malloc_trim(0) -> {result} in {(time.perf_counter() - started) * 1000:.1f} ms\n")
    dump("after malloc_trim")


def on_sample(signum, frame) -> None:
    mi = libc.mallinfo2()
    with open(OUT + ".inuse", "a") as f:
        f.write(f"{time.time():.0f} rss={rss()} malloc_in_use={mi.uordblks >> 10} heap={mi.arena >> 10}\n")


signal.signal(signal.SIGRTMIN + 1, lambda signum, frame: dump("dump"))
signal.signal(signal.SIGRTMIN + 2, on_trim)
signal.signal(signal.SIGRTMIN + 3, on_sample)

if os.environ.get("READS") == "big":  # 64 KB reads always (throughput.sh's comparison)
    from twisted_slb.web import proxy
    proxy._STALLED_READ = 65536
elif os.environ.get("READS") == "small":  # 16 KB reads always
    from twisted_slb._io import lean
    lean.LeanConnection.bufferSize = 16384

from twisted.scripts.twistd import run  # noqa: E402

sys.argv = ["twistd"] + sys.argv[1:]
run()
