"""Lookup counters of a network directory backend, read by the metrics collector.

Plain attributes, no locks: each is written by the thread doing the lookup (both daemons
serialise lookups) and read at scrape time, when a count off by one in flight is harmless.
The histogram buckets are the metrics module's, so a lookup and a decision compare.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds; a cache miss on a LAN takes 0.1-1 ms, a timeout ends at directory.postgresql_timeout.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)


@dataclass
class LookupStats:
    """What one process's lookups on one backend did (kept across reloads by the runtime)."""

    backend: str = "postgresql"
    in_use: bool = False  # set by the backend's store: the metrics show only a backend in use
    cache_hits: int = 0
    known: int = 0
    unknown: int = 0
    errors: int = 0
    backend_up: bool = False
    # Server round trips (misses and errors): cumulative counts per bucket, and the sum.
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    seconds_sum: float = 0.0

    def _observe(self, seconds: float) -> None:
        self.bucket_counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.seconds_sum += seconds

    def record(self, seconds: float, *, known: bool) -> None:
        if known:
            self.known += 1
        else:
            self.unknown += 1
        self._observe(seconds)

    def record_error(self, seconds: float) -> None:
        self.errors += 1
        self._observe(seconds)
