"""The engine pool over in-process fake engines, each member wired as the app wires one (real
adapter slots, monitor and admission queue, one metrics registry): versions held across engines,
the router's choice, an engine leaving rotation when it goes down and rejoining with the
adapters its model list shows, and membership from DNS."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from server.engines.adapter_slots import AdapterLease
from server.engines.pool import EngineMember, EnginePool, resolve_dns_url
from server.errors import EngineUnavailableError
from server.metrics import Metrics
from tests.engine_fake import FakeEngine, fake_member

DNS_URL = "dns+http://engines:8000"
E1, E2 = "http://e1:8000", "http://e2:8000"


class Harness:
    """A pool whose members are fakes, made afresh each time one joins (the newest by URL in
    `fakes`); `idle` records the pool's idle notifications."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        capacity: int = 2,
        load_s: float = 0.0,
        healthy: bool = True,
        model: str | None = None,
        **pool_options: Any,
    ) -> None:
        self.metrics = Metrics()
        self.fakes: dict[str, FakeEngine] = {}
        self.capacity = capacity
        self.load_s = load_s
        self.healthy = healthy
        self.model = model
        self.pool = EnginePool(urls, self._make, self.metrics, **pool_options)
        self.idle: list[str] = []
        self.pool.on_idle(self.idle.append)

    def _make(self, name: str, url: str) -> EngineMember:
        fake = FakeEngine(load_s=self.load_s, healthy=self.healthy)
        if self.model is not None:
            fake.model = self.model
        self.fakes[url] = fake
        return fake_member(name, url, fake, self.metrics, capacity=self.capacity)

    def member(self, name: str) -> EngineMember:
        return next(m for m in self.pool.members if m.name == name)

    def sample(self, metric: str, engine: str) -> float | None:
        return self.metrics.registry.get_sample_value(metric, {"engine": engine})

    def series_of(self, engine: str) -> list[str]:
        """Every exported sample labelled with `engine`."""
        return [
            sample.name
            for family in self.metrics.registry.collect()
            for sample in family.samples
            if sample.labels.get("engine") == engine
        ]


@asynccontextmanager
async def running(urls: Sequence[str], **options: Any) -> AsyncIterator[Harness]:
    harness = Harness(urls, **options)
    await harness.pool.start()
    try:
        yield harness
    finally:
        await harness.pool.aclose()


async def eventually(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Wait (bounded) for `condition`, which the pool's discovery task makes true."""
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


async def use(member: EngineMember, digest: str) -> None:
    """One request's use of `digest` on `member`, over: the adapter stays loaded, idle."""
    (await member.slots.acquire(digest)).release()


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """What the resolver answers, by host name: edit it to move engines in and out of DNS."""
    answers: dict[str, list[str]] = {}

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        family = socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)  # what resolve_dns_url calls
    return answers


# Versions in use, across engines.


async def test_a_version_is_in_use_while_held_or_pinned_on_any_engine() -> None:
    async with running([E1, E2]) as h:
        e1, e2 = h.member("e1:8000"), h.member("e2:8000")
        release_hold = h.pool.hold("A")
        assert h.pool.in_use("A") and not h.pool.in_use("B")
        lease_1, lease_2 = await e1.slots.acquire("A"), await e2.slots.acquire("A")
        release_hold()
        release_hold()  # twice: harmless
        lease_1.release()
        assert h.pool.in_use("A") and h.idle == []  # still pinned on e2
        lease_2.release()
        assert not h.pool.in_use("A") and h.idle == ["A"]


async def test_a_hold_is_not_a_pin_an_idle_held_adapter_can_be_evicted() -> None:
    async with running([E1], capacity=1) as h:
        e1, fake = h.member("e1:8000"), h.fakes[E1]
        release_hold = h.pool.hold("A")
        await use(e1, "A")
        assert h.idle == []  # held: its files stay
        await use(e1, "B")  # the one slot: A is idle, so it goes
        await eventually(lambda: "unload lg-A" in fake.events)
        assert fake.events == ["load lg-A", "unload lg-A", "load lg-B"]
        assert e1.slots.loaded == ["B"]
        assert h.pool.in_use("A")  # evicted, still held
        assert h.idle == ["B"]
        release_hold()
        assert not h.pool.in_use("A") and h.idle == ["B", "A"]


async def test_a_load_under_way_keeps_the_version_in_use() -> None:
    async with running([E1], load_s=0.1) as h:
        loading = asyncio.create_task(h.member("e1:8000").slots.acquire("A"))
        await asyncio.sleep(0.02)
        loading.cancel()  # its request went away; the load goes on
        assert h.pool.in_use("A") and h.idle == []
        await eventually(lambda: h.idle == ["A"])
        assert not h.pool.in_use("A")


# Routing.


async def test_choose_goes_to_the_holder_and_base_requests_to_the_least_loaded() -> None:
    async with running([E1, E2]) as h:
        e1, e2 = h.member("e1:8000"), h.member("e2:8000")
        await use(e2, "A")
        assert h.pool.choose("A") is e2
        assert h.pool.choose("B") is e1  # both have a free slot: equal load, by name
        assert h.pool.choose(None) is e1
        release = await e1.admission.acquire()
        assert h.pool.choose(None) is e2  # e1 is busier now
        assert h.pool.choose("B") is e2
        release()
        assert h.pool.choose("A", exclude=["e2:8000"]) is e1
        with pytest.raises(EngineUnavailableError):
            h.pool.choose("A", exclude=["e1:8000", "e2:8000"])


# An engine that goes down, and comes back.


async def test_an_unreachable_engine_leaves_rotation_and_its_adapters_are_forgotten() -> None:
    async with running([E1, E2]) as h:
        e1, e2, fake = h.member("e1:8000"), h.member("e2:8000"), h.fakes[E1]
        for digest in ("A", "B"):
            await use(e1, digest)
        assert h.pool.choose("A") is e1
        assert h.sample("loragate_adapters_loaded", "e1:8000") == 2
        fake.reachable = False
        e1.monitor.mark_unreachable()  # what a request that found it unreachable does
        assert not e1.monitor.ready and h.pool.ready
        assert h.pool.choose("A") is e2 and h.pool.choose(None) is e2
        assert e1.slots.loaded == [] and e1.slots.held_or_loading() == frozenset()
        assert h.sample("loragate_adapters_loaded", "e1:8000") == 0
        assert h.sample("loragate_engine_up", "e1:8000") == 0
        assert not await e1.monitor.check_now()  # still unreachable: still out
        assert h.pool.choose("B") is e2


async def test_an_engine_back_up_adopts_the_adapters_its_model_list_shows() -> None:
    async with running([E1, E2]) as h:
        e1, fake = h.member("e1:8000"), h.fakes[E1]
        for digest in ("A", "B"):
            await use(e1, digest)
        fake.reachable = False
        e1.monitor.mark_unreachable()
        fake.reachable = True
        del fake.adapters["lg-B"]  # the engine lost B, kept A
        assert await e1.monitor.check_now()
        assert e1.slots.loaded == ["A"]
        assert h.sample("loragate_adapters_loaded", "e1:8000") == 1
        assert h.sample("loragate_engine_up", "e1:8000") == 1
        assert h.pool.choose("A") is e1  # back in rotation, holding A
        loads = fake.events.count("load lg-A")
        await use(e1, "A")
        assert fake.events.count("load lg-A") == loads  # adopted: not loaded again
        await use(e1, "B")
        assert fake.events[-1] == "load lg-B"  # not adopted: loaded again


async def test_a_ready_engine_s_model_list_is_read_again_for_other_replicas_changes() -> None:
    async with running([E1, E2]) as h:
        e1, fake = h.member("e1:8000"), h.fakes[E1]
        await use(e1, "A")
        fake.adapters["lg-C"] = "/elsewhere/C"  # another replica loaded C there
        del fake.adapters["lg-A"]  # and unloaded ours
        await e1.monitor.refresh_models()
        assert e1.slots.loaded == ["C"]
        assert h.pool.choose("C") is e1
        fake.reachable = False  # an unreadable list changes nothing: health polls decide
        await e1.monitor.refresh_models()
        assert e1.slots.loaded == ["C"] and e1.monitor.ready


async def test_an_engine_failing_its_health_check_is_forgotten_too() -> None:
    async with running([E1, E2]) as h:
        e1, fake = h.member("e1:8000"), h.fakes[E1]
        await use(e1, "A")
        fake.healthy = False
        assert not await e1.monitor.check_now()
        assert e1.slots.loaded == [] and h.pool.choose("A") is h.member("e2:8000")
        fake.healthy = True
        assert await e1.monitor.check_now()
        assert e1.slots.loaded == ["A"]  # it still lists A


async def test_ensure_ready_raises_503_with_no_ready_engine() -> None:
    async with running([E1, E2], healthy=False) as h:
        assert not h.pool.ready
        with pytest.raises(EngineUnavailableError) as caught:
            h.pool.ensure_ready()
        assert caught.value.code == "engine_unavailable"
        with pytest.raises(EngineUnavailableError):
            h.pool.choose("A")
        with pytest.raises(EngineUnavailableError):
            h.pool.choose(None)
        h.fakes[E2].healthy = True
        assert await h.member("e2:8000").monitor.check_now()
        h.pool.ensure_ready()
        assert h.pool.choose("A") is h.member("e2:8000")


async def test_ensure_ready_says_why_an_engine_cannot_serve() -> None:
    async with running([E1], model="another-model") as h:
        with pytest.raises(EngineUnavailableError) as caught:
            h.pool.ensure_ready()
        assert caught.value.code == "engine_model_mismatch"


async def test_ensure_ready_with_no_engine_known(dns: dict[str, list[str]]) -> None:
    async with running([DNS_URL]) as h:  # the name resolves to nothing yet
        assert h.pool.members == [] and not h.pool.ready
        with pytest.raises(EngineUnavailableError, match="no engine is known"):
            h.pool.ensure_ready()
        with pytest.raises(EngineUnavailableError):
            h.pool.choose(None)


# Membership from DNS.


def test_resolve_dns_url(dns: dict[str, list[str]]) -> None:
    dns["engines"] = ["10.0.0.2", "10.0.0.1", "10.0.0.2", "fd00::1"]
    assert resolve_dns_url(DNS_URL) == [
        "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://[fd00::1]:8000",
    ]  # fmt: skip
    assert resolve_dns_url("dns+https://engines") == [
        "https://10.0.0.1:443", "https://10.0.0.2:443", "https://[fd00::1]:443",
    ]  # fmt: skip
    assert resolve_dns_url("dns+http://nowhere:8000") == []


async def test_dns_membership_follows_the_name(dns: dict[str, list[str]]) -> None:
    dns["engines"] = ["10.0.0.1", "10.0.0.2"]
    async with running([DNS_URL], dns_refresh_s=0.01) as h:
        assert h.pool.discovers
        assert [m.name for m in h.pool.members] == ["10.0.0.1:8000", "10.0.0.2:8000"]
        gone = h.fakes["http://10.0.0.2:8000"]
        await use(h.member("10.0.0.2:8000"), "A")
        assert h.sample("loragate_adapters_loaded", "10.0.0.2:8000") == 1
        assert "loragate_adapter_loads_total" in h.series_of("10.0.0.2:8000")

        dns["engines"] = ["10.0.0.1"]
        await eventually(lambda: len(h.pool.members) == 1)
        assert [m.name for m in h.pool.members] == ["10.0.0.1:8000"]
        assert gone.closed  # idle: closed at once
        assert h.series_of("10.0.0.2:8000") == []  # forget_engine: no stale series
        assert h.sample("loragate_engine_up", "10.0.0.1:8000") == 1
        assert h.pool.choose("A").name == "10.0.0.1:8000"
        assert not h.pool.in_use("A")

        dns["engines"] = ["10.0.0.1", "10.0.0.2"]  # back, as a new engine
        await eventually(lambda: len(h.pool.members) == 2)
        back = h.member("10.0.0.2:8000")
        assert back.engine is not gone and back.slots.loaded == []
        assert h.sample("loragate_engine_up", "10.0.0.2:8000") == 1


async def test_dns_that_stops_resolving_empties_the_pool(dns: dict[str, list[str]]) -> None:
    dns["engines"] = ["10.0.0.1"]
    async with running([DNS_URL], dns_refresh_s=0.01) as h:
        assert h.pool.ready
        del dns["engines"]
        await eventually(lambda: h.pool.members == [])
        assert not h.pool.ready
        with pytest.raises(EngineUnavailableError):
            h.pool.ensure_ready()


async def test_max_engines_bounds_the_pool(dns: dict[str, list[str]]) -> None:
    dns["engines"] = ["10.0.0.3", "10.0.0.1", "10.0.0.2"]
    async with running([DNS_URL], max_engines=2, dns_refresh_s=0.01) as h:
        assert [m.name for m in h.pool.members] == ["10.0.0.1:8000", "10.0.0.2:8000"]
        dns["engines"] = ["10.0.0.3", "10.0.0.2"]  # one left: the third fits now
        names = ["10.0.0.2:8000", "10.0.0.3:8000"]
        await eventually(lambda: [m.name for m in h.pool.members] == names)
        assert h.series_of("10.0.0.1:8000") == []


async def test_a_member_removed_with_a_request_pinned_is_retired_until_it_ends(
    dns: dict[str, list[str]],
) -> None:
    dns["engines"] = ["10.0.0.1", "10.0.0.2"]
    async with running([DNS_URL], dns_refresh_s=0.01) as h:
        lease: AdapterLease = await h.member("10.0.0.2:8000").slots.acquire("A")
        dns["engines"] = ["10.0.0.1"]
        await eventually(lambda: len(h.pool.members) == 1)
        await asyncio.sleep(0.05)  # a few refreshes more
        assert h.pool.in_use("A")  # its files must stay: the request still runs there
        assert h.idle == []
        assert h.series_of("10.0.0.2:8000") == []
        lease.release()
        assert not h.pool.in_use("A") and h.idle == ["A"]


async def test_a_retired_member_is_not_closed_until_its_request_ends(
    dns: dict[str, list[str]],
) -> None:
    dns["engines"] = ["10.0.0.1", "10.0.0.2"]
    async with running([DNS_URL], dns_refresh_s=0.01) as h:
        leaving = h.fakes["http://10.0.0.2:8000"]
        lease = await h.member("10.0.0.2:8000").slots.acquire("A")
        dns["engines"] = ["10.0.0.1"]
        await eventually(lambda: len(h.pool.members) == 1)
        await asyncio.sleep(0.05)
        assert not leaving.closed  # its request still runs on it
        lease.release()
        await eventually(lambda: leaving.closed)  # closed once it is done


async def test_a_request_waiting_on_a_load_when_its_engine_leaves_is_not_cancelled(
    dns: dict[str, list[str]],
) -> None:
    dns["engines"] = ["10.0.0.1", "10.0.0.2"]
    async with running([DNS_URL], dns_refresh_s=0.01, load_s=0.3) as h:
        waiting = asyncio.create_task(h.member("10.0.0.2:8000").slots.acquire("A"))
        await asyncio.sleep(0.02)
        dns["engines"] = ["10.0.0.1"]
        (outcome,) = await asyncio.gather(waiting, return_exceptions=True)
        # Either the load ends (the engine drains) or the request gets a 503 `_on_engine`
        # retries elsewhere; a request nobody cancelled must not see a cancellation.
        assert isinstance(outcome, AdapterLease | EngineUnavailableError), repr(outcome)
        if isinstance(outcome, AdapterLease):
            outcome.release()
