"""The gateway's engines: one member per engine, each with its own client, health monitor,
adapter slots and admission queue, and the router's choice between them.

Members come from the configured URLs; a `dns+http://name:port` URL stands for every address
the name resolves to (a Kubernetes headless Service), re-resolved every `dns_refresh_s`. An
engine that goes down leaves rotation at once and its adapters are forgotten; when it comes
back, its model list says which of our adapters it still holds. Which adapter version a request
resolved is held here, across engines, so its files stay until the request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from server.engines.adapter_slots import AdapterSlots
from server.engines.admission import EngineAdmission
from server.engines.base import Engine, ServedModel
from server.engines.monitor import EngineMonitor
from server.engines.routing import EngineView, choose
from server.errors import EngineUnavailableError
from server.metrics import Metrics

logger = logging.getLogger(__name__)

DNS_SCHEMES = {"dns+http": "http", "dns+https": "https"}


@dataclass
class EngineMember:
    """One engine and everything the gateway keeps about it."""

    name: str  # the `engine` label of its metrics: bounded by the pool's size
    url: str
    engine: Engine
    monitor: EngineMonitor
    slots: AdapterSlots
    admission: EngineAdmission
    max_active: int = 1 << 30  # adapters the engine batches at once (vLLM's --max-loras)
    monitor_task: asyncio.Task[None] | None = field(default=None, repr=False)

    def view(self) -> EngineView:
        return EngineView(
            name=self.name,
            ready=self.monitor.ready,
            running=self.admission.running,
            queued=self.admission.queued,
            max_running=self.admission.max_running,
            loaded=self.slots.held_or_loading(),
            can_load=self.slots.can_load(),
            free_slot=self.slots.has_free_slot(),
            active=self.slots.active(),
            max_active=self.max_active,
            merged=self.monitor.merged,
        )


MemberFactory = Callable[[str, str], EngineMember]  # (name, url) -> member, monitor not started


def member_name(url: str) -> str:
    """`host:port` of an engine URL: short, and one per engine."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def resolve_dns_url(url: str) -> list[str]:
    """The engine URLs a `dns+http://name:port` URL stands for now, sorted (blocking: run it
    on a thread). An unresolvable name is an empty list: its engines are all gone."""
    parts = urlsplit(url)
    scheme = DNS_SCHEMES[parts.scheme]
    host, port = parts.hostname or "", parts.port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    addresses = sorted({str(info[4][0]) for info in infos})
    return [f"{scheme}://[{a}]:{port}" if ":" in a else f"{scheme}://{a}:{port}" for a in addresses]


class EnginePool:
    def __init__(
        self,
        urls: Sequence[str],
        make_member: MemberFactory,
        metrics: Metrics,
        *,
        max_engines: int = 64,
        dns_refresh_s: float = 5.0,
    ) -> None:
        self._urls = list(urls)
        self._make_member = make_member
        self._metrics = metrics
        self._max_engines = max_engines
        self._dns_refresh_s = dns_refresh_s
        self._members: dict[str, EngineMember] = {}  # by URL, in the order they joined
        # Left the pool (DNS no longer lists them) with requests still on them: their slots
        # still count in `in_use` until those end.
        self._retired: list[EngineMember] = []
        self._held: Counter[str] = Counter()
        self._idle_listeners: list[Callable[[str], None]] = []
        self._discovery: asyncio.Task[None] | None = None

    @property
    def members(self) -> list[EngineMember]:
        return list(self._members.values())

    @property
    def ready(self) -> bool:
        return self.ready_except(())

    def ready_except(self, names: Iterable[str]) -> bool:
        """Whether an engine not named in `names` can serve now."""
        excluded = set(names)
        return any(m.monitor.ready and m.name not in excluded for m in self._members.values())

    @property
    def discovers(self) -> bool:
        return any(urlsplit(u).scheme in DNS_SCHEMES for u in self._urls)

    def serves_merged(self, digest: str) -> bool:
        """Whether a ready engine serves the version `digest` merged."""
        return any(m.monitor.ready and m.monitor.merged == digest for m in self._members.values())

    def ensure_ready(self) -> None:
        """Raise the 503 that says why no engine can serve, unless one can."""
        members = list(self._members.values())
        if not members:
            raise EngineUnavailableError("no engine is known yet")
        if not self.ready:
            members[0].monitor.ensure_ready()  # one engine's reason says why

    def choose(
        self, digest: str | None, exclude: Iterable[str] = (), *, merged_only: bool = False
    ) -> EngineMember:
        """The member for a request for `digest` (None: the base model); 503 when none fits."""
        views = [m.view() for m in self._members.values()]
        view = choose(views, digest, set(exclude), merged_only=merged_only)
        if view is None:
            self.ensure_ready()
            raise EngineUnavailableError("no other engine is ready")
        return next(m for m in self._members.values() if m.name == view.name)

    # Versions in use, across engines: what the adapter admin must not collect.

    def hold(self, digest: str) -> Callable[[], None]:
        """Keep the version in use (its files uncollected) from when a request resolves it
        until the returned release is called, however long it waits before it reaches an
        engine. Not a pin: it keeps no adapter loaded."""
        self._held[digest] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._held[digest] -= 1
            if self._held[digest] <= 0:
                del self._held[digest]
                self._maybe_idle(digest)

        return release

    def in_use(self, digest: str) -> bool:
        """Whether a request here uses the version: held, or pinned or loading on an engine."""
        if self._held[digest] > 0:
            return True
        return any(m.slots.in_use(digest) for m in (*self._members.values(), *self._retired))

    def on_idle(self, listener: Callable[[str], None]) -> None:
        """Call `listener(digest)` on the event loop whenever `in_use(digest)` turns false. It
        must not block or raise."""
        self._idle_listeners.append(listener)

    def _maybe_idle(self, digest: str) -> None:
        if not self.in_use(digest):
            for listener in self._idle_listeners:
                listener(digest)

    # Membership.

    async def start(self) -> None:
        """Make the members and start their monitors; with DNS URLs, keep re-resolving."""
        await self._refresh()
        if self.discovers:
            self._discovery = asyncio.create_task(self._discover(), name="engine-discovery")

    async def _discover(self) -> None:
        while True:
            await asyncio.sleep(self._dns_refresh_s)
            try:
                await self._refresh()
            except Exception:  # one failed refresh must not end discovery
                logger.exception("engine discovery failed; trying again")

    async def _refresh(self) -> None:
        wanted: list[str] = []
        for url in self._urls:
            if urlsplit(url).scheme in DNS_SCHEMES:
                wanted.extend(await asyncio.to_thread(resolve_dns_url, url))
            else:
                wanted.append(url)
        wanted = list(dict.fromkeys(wanted))
        if len(wanted) > self._max_engines:
            logger.warning(
                "%d engines found, serving with the first %d (engine.max_engines)",
                len(wanted), self._max_engines,
            )  # fmt: skip
            wanted = wanted[: self._max_engines]
        for url in [u for u in self._members if u not in wanted]:
            await self._remove(url)
        for url in wanted:
            if url not in self._members:
                await self._add(url)
        for member in [m for m in self._retired if not m.slots.busy()]:
            self._retired.remove(member)
            await self._close_member(member)

    async def _add(self, url: str) -> None:
        member = self._make_member(member_name(url), url)
        member.slots.on_idle(self._maybe_idle)
        await member.monitor.check_now()
        member.monitor_task = asyncio.create_task(member.monitor.run(), name=f"monitor-{url}")
        self._members[url] = member
        logger.info("engine %s joined the pool (%s)", member.name, url)

    async def _remove(self, url: str) -> None:
        """Out of rotation at once; a member with requests on it (a draining pod) keeps its
        client and slots until they end, and is closed by a later refresh."""
        member = self._members.pop(url)
        logger.info("engine %s left the pool", member.name)
        await self._stop_monitor(member)
        if member.slots.busy():
            self._retired.append(member)
        else:
            await self._close_member(member)
        self._metrics.forget_engine(member.name)

    @staticmethod
    async def _stop_monitor(member: EngineMember) -> None:
        if member.monitor_task is not None:
            member.monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await member.monitor_task

    @staticmethod
    async def _close_member(member: EngineMember) -> None:
        await member.slots.aclose()
        await member.engine.aclose()

    async def aclose(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery
        for member in [*self._members.values(), *self._retired]:
            await self._stop_monitor(member)
            await self._close_member(member)
        self._members.clear()
        self._retired.clear()


def adapters_listed(served: Sequence[ServedModel], prefix: str) -> list[str]:
    """The digests of our adapters an engine's model list shows loaded."""
    return [m.id[len(prefix) :] for m in served if m.id.startswith(prefix)]
