"""Which idle adapter an engine unloads to make room: the one asked for least lately.

Least recently used alone evicts a popular adapter whenever a run of rare ones passes through;
with many adapters of Zipf-like popularity that is most evictions. So each adapter keeps its
request count, decaying with a half-life (`demand`), and the idle adapter with the lowest wins;
ties go to the least recently used (the order the caller lists them in). Used by the gateway's
adapter slots and by the routing simulation alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

DEFAULT_HALF_LIFE_S = 120.0


class DemandTracker:
    """Requests per adapter, decayed: 1 per request, halved every `half_life_s`. Holds only the
    adapters it was told about and not told to forget (the caller's loaded ones)."""

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S) -> None:
        self._rate = math.log(2) / half_life_s
        self._demand: dict[str, tuple[float, float]] = {}  # digest -> (value, as of when)

    def touch(self, digest: str, now: float) -> None:
        self._demand[digest] = (self.demand(digest, now) + 1.0, now)

    def demand(self, digest: str, now: float) -> float:
        value, at = self._demand.get(digest, (0.0, now))
        return value * math.exp(-self._rate * max(now - at, 0.0))

    def forget(self, digest: str) -> None:
        self._demand.pop(digest, None)

    def victim(self, idle: Iterable[str], now: float) -> str | None:
        """The idle adapter to unload: the least demanded, the first listed among equals."""
        best: str | None = None
        best_demand = math.inf
        for digest in idle:
            demand = self.demand(digest, now)
            if demand < best_demand:
                best, best_demand = digest, demand
        return best
