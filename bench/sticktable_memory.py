"""
Memory and speed of a source-IP stick table.

    python bench/sticktable_memory.py [--entries 1000000]

Fills a StickTable with N distinct IPv4 clients pinned over three backends
and prints the process RSS before and after, the bytes per entry, and the
time of a lookup.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from twisted_slb.backends import backend_id  # noqa: E402
from twisted_slb.persistence.sourceip import StickTable  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.entries
    clock = Clock()
    table = StickTable(3600, max_entries=n, clock=clock)
    keys = [backend_id(name) for name in "abc"]
    before = rss_mb()
    start = time.perf_counter()
    for i in range(n):
        table.set(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", keys[i % 3])
    fill = time.perf_counter() - start
    after = rss_mb()
    probes = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(0, n, max(1, n // 100_000))]
    start = time.perf_counter()
    for client in probes:
        table.get(client)
    lookup = (time.perf_counter() - start) / len(probes)
    print(f"entries:           {len(table)}")
    print(f"RSS before:        {before:.1f} MB")
    print(f"RSS after:         {after:.1f} MB  (target: under 250 MB)")
    print(f"bytes per entry:   {(after - before) * 1024 * 1024 / n:.0f}")
    print(f"fill:              {fill / n * 1e6:.2f} us per set")
    print(f"lookup:            {lookup * 1e6:.2f} us per get")


if __name__ == "__main__":
    main()
