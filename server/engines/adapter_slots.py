"""Which adapters are loaded on one engine: loaded on first use (once, however many requests ask
together, and on to the end whichever of them goes away), the idle one asked for least lately
unloaded to make room (`eviction.DemandTracker`), never one with requests in flight.
Engine-side names derive from the content digest, never from a tenant's name. An engine that
went down is assumed to hold none (`forget_all`) until its model list says otherwise
(`reconcile`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engines.base import Engine
from server.engines.eviction import DemandTracker
from server.errors import LoragateError, ServerOverloadedError
from server.metrics import Metrics

logger = logging.getLogger(__name__)

ENGINE_NAME_PREFIX = "lg-"


def engine_name(digest: str) -> str:
    return ENGINE_NAME_PREFIX + digest


# What a merged engine (`loragate engine --merged`) serves its one model as: the adapter
# version merged into the base, by digest, so that a replaced adapter never matches it.
MERGED_NAME_PREFIX = "lgm-"


def merged_engine_name(digest: str) -> str:
    return MERGED_NAME_PREFIX + digest


@dataclass
class AdapterLease:
    """A request's hold on a loaded adapter; the adapter cannot be unloaded until released."""

    digest: str
    engine_name: str
    _release: Callable[[str], None] = field(repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self.digest)


class AdapterSlots:
    def __init__(
        self,
        engine: Engine,
        adapter_path: Callable[[str], str | None],
        capacity: int,
        metrics: Metrics,
        wait_for_slot_s: float = 30.0,
        engine_label: str = "local",
    ) -> None:
        self._engine = engine
        # digest -> directory the engine can read, or None: the engine fetches it by name.
        self._adapter_path = adapter_path
        self._capacity = capacity
        self._wait_for_slot_s = wait_for_slot_s
        self._label = engine_label
        self._loaded_gauge = metrics.adapters_loaded.labels(engine_label)
        results = ("ok", "error")
        self._loads = {r: metrics.adapter_loads.labels(engine_label, r) for r in results}
        self._unloads = {r: metrics.adapter_unloads.labels(engine_label, r) for r in results}
        self._load_seconds = metrics.adapter_load_seconds.labels(engine_label)
        # Invariants: a digest in `_loaded` is loaded on the engine (as far as we know), in LRU
        # order (oldest first); `_demand` tracks only digests loaded or loading; a digest with
        # `_in_flight[d] > 0` is never unloaded; loaded plus `_reserved` (loads under way) never
        # exceeds capacity. `_slots` serializes the make-room-and-reserve step so two loads cannot
        # both claim the last slot. `_loading` holds the one load task per digest, owned here and
        # shared by every request waiting.
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._in_flight: Counter[str] = Counter()
        self._demand = DemandTracker()
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._unloading: dict[str, asyncio.Task[None]] = {}
        self._reserved = 0
        self._slots = asyncio.Lock()
        self._became_idle = asyncio.Event()
        self._idle_listeners: list[Callable[[str], None]] = []

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def in_use(self, digest: str) -> bool:
        """Whether a request here uses the version (its files must stay): pinned or loading."""
        return self._in_flight[digest] > 0 or digest in self._loading

    def busy(self) -> bool:
        """Whether any request is pinned here or any load is under way."""
        return bool(self._in_flight) or bool(self._loading)

    def held_or_loading(self) -> frozenset[str]:
        """The digests a request sent here would find loaded, or being loaded."""
        return frozenset(self._loaded) | frozenset(self._loading)

    def active(self) -> frozenset[str]:
        """The digests with requests pinned here: what the engine batches now."""
        return frozenset(self._in_flight)

    def has_free_slot(self) -> bool:
        """Whether one more adapter fits without evicting any."""
        return len(self._loaded) + self._reserved < self._capacity

    def can_load(self) -> bool:
        """Whether one more adapter fits: a free slot, or an idle loaded one to evict."""
        if len(self._loaded) + self._reserved < self._capacity:
            return True
        return any(not self._in_flight[d] for d in self._loaded)

    def forget_all(self) -> None:
        """The engine went down: it holds none of our adapters any more (a restart loses them).
        Pins stay, and end as their requests do."""
        if self._loaded:
            logger.info(
                "engine %s down: forgetting its %d adapters", self._label, len(self._loaded)
            )
        self._loaded.clear()
        self._demand = DemandTracker()
        self._loaded_gauge.set(0)

    def reconcile(self, listed: list[str]) -> None:
        """The engine (back up) lists these digests as loaded: adopt them, up to our capacity,
        and forget those it does not list."""
        for digest in [d for d in self._loaded if d not in listed]:
            del self._loaded[digest]
            self._demand.forget(digest)
        for digest in listed:
            if digest in self._loaded or digest in self._loading:
                continue
            if len(self._loaded) + self._reserved >= self._capacity:
                break
            self._loaded[digest] = None
        self._loaded_gauge.set(len(self._loaded))

    def on_idle(self, listener: Callable[[str], None]) -> None:
        """Call `listener(digest)` on the event loop whenever `in_use(digest)` turns false: its
        last pin released, or its load ended with no pin left. It must not block or raise."""
        self._idle_listeners.append(listener)

    def _notify_idle(self, digest: str) -> None:
        for listener in self._idle_listeners:
            listener(digest)

    async def acquire(self, digest: str) -> AdapterLease:
        """Pin the adapter, loading it if needed; the caller must `release()` the lease."""
        self._in_flight[digest] += 1  # pinned first: from here on nothing evicts it
        self._demand.touch(digest, time.monotonic())
        try:
            await self._ensure_loaded(digest)
        except BaseException:
            self._release(digest)
            raise
        return AdapterLease(digest, engine_name(digest), self._release)

    async def reload(self, digest: str) -> None:
        """The engine lost a pinned adapter (it restarted): load it again, keeping the pin."""
        if digest in self._loaded:
            del self._loaded[digest]
            self._loaded_gauge.set(len(self._loaded))
            logger.warning("adapter %s missing on engine %s; reloading", digest[:12], self._label)
        await self._ensure_loaded(digest)

    async def _ensure_loaded(self, digest: str) -> None:
        while digest not in self._loaded:
            if (load := self._loading.get(digest)) is None:
                load = asyncio.create_task(self._load(digest), name=f"load-{digest[:12]}")
                load.add_done_callback(lambda t: t.cancelled() or t.exception())  # no warning
                self._loading[digest] = load
            # The load is every waiter's, not the one that started it: a waiter cancelled (its
            # client went away) stops waiting and drops its own pin; the load goes on. It is not
            # cancelled when nobody waits any more either: the engine may be loading already,
            # and a load cut short leaves its state unknown. Finished, it stays loaded, idle.
            await asyncio.shield(load)
        self._loaded.move_to_end(digest)

    def _release(self, digest: str) -> None:
        self._in_flight[digest] -= 1
        if self._in_flight[digest] <= 0:
            del self._in_flight[digest]
            self._became_idle.set()
            if not self.in_use(digest):
                self._notify_idle(digest)

    async def _load(self, digest: str) -> None:
        """Runs as its own task, in `_loading` until it ends; its outcome reaches every waiter."""
        reserved = False
        try:
            await self._reserve_slot()
            reserved = True
            if (unloading := self._unloading.get(digest)) is not None:
                await unloading  # its unload must land before our load, or it would undo it
            start = time.perf_counter()
            await self._engine.load_adapter(engine_name(digest), self._adapter_path(digest))
            self._load_seconds.observe(time.perf_counter() - start)
            self._loads["ok"].inc()
            self._loaded[digest] = None
            self._loaded_gauge.set(len(self._loaded))
            logger.info(
                "adapter %s loaded on engine %s (%d/%d)",
                digest[:12], self._label, len(self._loaded), self._capacity,
            )  # fmt: skip
        except BaseException:
            self._loads["error"].inc()
            self._demand.forget(digest)  # it holds only what is loaded or loading
            raise
        finally:
            if reserved:
                self._reserved -= 1
            del self._loading[digest]
            if not self.in_use(digest):
                self._notify_idle(digest)

    async def _reserve_slot(self) -> None:
        deadline = time.monotonic() + self._wait_for_slot_s
        async with self._slots:
            while len(self._loaded) + self._reserved >= self._capacity:
                idle = (d for d in self._loaded if not self._in_flight[d])
                victim = self._demand.victim(idle, time.monotonic())
                if victim is not None:
                    self._evict(victim)
                    continue
                # Every loaded adapter is busy: wait for one to go idle, not forever.
                self._became_idle.clear()
                remaining = deadline - time.monotonic()
                try:
                    await asyncio.wait_for(self._became_idle.wait(), max(remaining, 0))
                except TimeoutError:
                    raise ServerOverloadedError(
                        "every adapter slot on the engine is busy", retry_after_s=2
                    ) from None
            self._reserved += 1

    def _evict(self, digest: str) -> None:
        # Out of `_loaded` before the unload is even sent: a request arriving meanwhile loads
        # it afresh (after this unload lands) instead of using an adapter being removed.
        del self._loaded[digest]
        self._demand.forget(digest)
        self._loaded_gauge.set(len(self._loaded))
        task = asyncio.create_task(self._unload(digest), name=f"unload-{digest[:12]}")
        self._unloading[digest] = task

    async def _unload(self, digest: str) -> None:
        try:
            await self._engine.unload_adapter(engine_name(digest))
            self._unloads["ok"].inc()
            logger.info("adapter %s unloaded from engine %s", digest[:12], self._label)
        except LoragateError as e:
            # The engine may have lost it already (restart); its slot is free either way.
            self._unloads["error"].inc()
            logger.warning("unloading adapter %s failed: %s", digest[:12], e.message)
        finally:
            self._unloading.pop(digest, None)

    async def aclose(self) -> None:
        """Cancel the loads and unloads still running, and wait for them to end."""
        tasks = [*self._loading.values(), *self._unloading.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
