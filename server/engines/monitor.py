"""Whether the engine can serve right now and, when not, why; and what happens when a local
engine dies.

`ready` is what /readyz reports and what requests check before touching the engine. The engine is
ready when its /health answers and, read each time it comes up (start-up, every return from
unreachable or unhealthy, a local restart), its model list serves our base model with at least
our context length. Readiness is cleared at once when a request finds the engine unreachable or
the local engine process exits. A dead local engine is restarted, or the gateway is told to exit
non-zero after a grace period of answering 503. `on_down` hears of every time the engine is seen
down, `on_models` of every model list read (when it comes up, then every `models_refresh_s`):
the pool keeps the engine's adapter slots in step with them. While the engine is ready its own
report of its load is read every `load_poll_s` into loragate_engine_reported_requests, and
dropped when it is seen down (a dead engine's queue is no signal).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.engines.adapter_slots import ENGINE_NAME_PREFIX, MERGED_NAME_PREFIX, merged_engine_name
from server.engines.base import Engine, ServedModel, printable
from server.engines.process import EngineProcess, EngineStartError
from server.errors import EngineUnavailableError, LoragateError
from server.metrics import Metrics
from server.settings import EngineSettings, ModelSettings

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = 5.0
MAX_LISTED_MODELS = 5
MAX_MODEL_NAME_CHARS = 64


@dataclass(frozen=True)
class NotReady:
    """Why the gateway does not serve: `code` is the 503's stable code, `message` says why and
    names nothing but base models."""

    code: str
    message: str


STARTING = NotReady("engine_unavailable", "the engine is starting")
UNREACHABLE = NotReady("engine_unavailable", "the engine is not reachable or not healthy")
EXITED = NotReady("engine_unavailable", "the engine process exited")


def is_base_model(model: ServedModel) -> bool:
    # vLLM lists loaded adapters beside the base model; an adapter's name must never be shown.
    return model.parent is None and not model.id.startswith(ENGINE_NAME_PREFIX)


MERGED_MODEL = re.compile(re.escape(MERGED_NAME_PREFIX) + r"([0-9a-f]{64})")


def merged_digest(served: Sequence[ServedModel]) -> str | None:
    """The adapter version a merged engine serves (its one model is `lgm-<digest>`), else None."""
    bases = [m for m in served if is_base_model(m)]
    if len(bases) != 1:
        return None
    found = MERGED_MODEL.fullmatch(bases[0].id)
    return found.group(1) if found else None


def check_served(served: Sequence[ServedModel], model: ModelSettings) -> NotReady | None:
    """None when the engine serves `model.name`, or is a merged engine (one adapter version of
    it, merged), with a context of at least `model.max_model_len` (or reports none), else the
    reason it cannot serve us."""
    bases = [m for m in served if is_base_model(m)]
    digest = merged_digest(served)
    name = model.name if digest is None else merged_engine_name(digest)
    ours = next((m for m in bases if m.id == name), None)
    if ours is None:
        # A merged copy's name carries an adapter's digest: never shown either.
        shown = [m for m in bases if not m.id.startswith(MERGED_NAME_PREFIX)]
        names = [f"`{printable(m.id, MAX_MODEL_NAME_CHARS)}`" for m in shown[:MAX_LISTED_MODELS]]
        if len(shown) > MAX_LISTED_MODELS:
            names.append(f"{len(shown) - MAX_LISTED_MODELS} more")
        serves = ", ".join(names) or "no base model"
        return NotReady(
            "engine_model_mismatch",
            f"the engine does not serve the base model `{model.name}`; it serves {serves}",
        )
    if ours.max_model_len is not None and ours.max_model_len < model.max_model_len:
        what = f"`{model.name}`" if digest is None else f"a merged copy of `{model.name}`"
        return NotReady(
            "engine_context_too_short",
            f"the engine serves {what} with max_model_len {ours.max_model_len}, "
            f"below the configured {model.max_model_len}",
        )
    return None


class EngineMonitor:
    def __init__(
        self,
        engine: Engine,
        settings: EngineSettings,
        model: ModelSettings,
        metrics: Metrics,
        process: EngineProcess | None = None,
        on_fatal: Callable[[int], None] | None = None,
        *,
        name: str = "local",
        on_down: Callable[[], None] | None = None,
        on_models: Callable[[Sequence[ServedModel]], None] | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._model = model
        self._metrics = metrics
        self._process = process
        self._on_fatal = on_fatal
        self.name = name
        self._on_down = on_down
        self._on_models = on_models
        self._up = metrics.engine_up.labels(name)
        # Invariant: `_models_checked` is False whenever the engine was last seen down, so the
        # model list is read again when it comes back; `_epoch` counts those sightings, so a
        # check that began before one does not declare the engine ready.
        self._reason: NotReady | None = STARTING
        self._models_checked = False
        self._epoch = 0
        self.fatal = False
        # The adapter version the engine serves merged (`loragate engine --merged`), from the
        # model list read when it came up; None for an engine of the base model.
        self.merged: str | None = None

    @property
    def ready(self) -> bool:
        return self._reason is None

    @property
    def reason(self) -> NotReady | None:
        return self._reason

    def ensure_ready(self) -> None:
        """Raise the 503 that says why the engine cannot serve, unless it can."""
        reason = self._reason
        if reason is not None:
            raise EngineUnavailableError(reason.message, code=reason.code)

    def _set_reason(self, reason: NotReady | None) -> None:
        if reason != self._reason:  # one log line per change, not one per poll
            if reason is None:
                logger.info("engine %s is ready", self.name)
            else:
                level = logging.WARNING if reason.code == "engine_unavailable" else logging.ERROR
                logger.log(
                    level, "engine %s is NOT ready (%s): %s", self.name, reason.code, reason.message
                )
        self._reason = reason
        self._up.set(1 if reason is None else 0)

    def _seen_down(self, reason: NotReady) -> None:
        self._forget_load()
        self._epoch += 1
        self._models_checked = False
        self._set_reason(reason)
        if self._on_down is not None:
            self._on_down()

    def mark_unreachable(self) -> None:
        """A request found the engine unreachable: stop sending it work until it is healthy."""
        self._seen_down(UNREACHABLE)

    async def check_now(self) -> bool:
        """Poll /health; when the engine has just come up, read its model list too."""
        epoch = self._epoch
        healthy = await self._engine.health()
        if epoch != self._epoch:
            return self.ready  # seen down meanwhile: the next poll decides
        if not healthy:
            self._seen_down(UNREACHABLE)
        elif not self._models_checked:
            reason, definitive, served = await self._check_models()
            if epoch == self._epoch:  # not seen down while the list was read
                self._models_checked = definitive
                if definitive:
                    self.merged = merged_digest(served)
                if definitive and self._on_models is not None:
                    self._on_models(served)
                self._set_reason(reason)
        return self.ready

    async def _check_models(self) -> tuple[NotReady | None, bool, list[ServedModel]]:
        """The reason the engine cannot serve us (None: it can), and whether that is the
        engine's answer (a list that could not be read is asked for again on the next poll)."""
        try:
            served = await self._engine.served_models()
        except LoragateError as e:
            return NotReady("engine_unavailable", f"model list unread: {e.message}"), False, []
        return check_served(served, self._model), True, served

    async def run(self) -> None:
        """Poll until cancelled (the lifespan owns this task)."""
        interval = self._settings.health_interval_s
        since_check = interval
        since_models = 0.0
        since_load = self._settings.load_poll_s
        while True:
            if self._process is not None and (code := self._process.returncode()) is not None:
                await self._on_engine_exit(code)
                if self.fatal:
                    return
                since_check = 0.0
            if since_check >= interval:
                await self.check_now()
                since_check = 0.0
            if since_models >= self._settings.models_refresh_s:
                await self.refresh_models()
                since_models = 0.0
            if since_load >= self._settings.load_poll_s:
                await self.read_load()
                since_load = 0.0
            await asyncio.sleep(0.25)  # process exit is noticed within this
            since_check += 0.25
            since_models += 0.25
            since_load += 0.25

    async def refresh_models(self) -> None:
        """Read a ready engine's model list again: whether it still serves what we need (the
        base model, or for a merged engine which version), and for `on_models` which of our
        adapters it holds now, other gateway replicas' loads and unloads included. A list that
        cannot be read changes nothing: health polls decide readiness."""
        if not self.ready:
            return
        epoch = self._epoch
        try:
            served = await self._engine.served_models()
        except LoragateError:
            return
        if epoch == self._epoch and self.ready:
            # What it serves may have changed under the same address (a merged engine
            # restarted on another adapter version): checked again, as when it came up.
            self.merged = merged_digest(served)
            reason = check_served(served, self._model)
            if reason is not None:
                self._models_checked = False  # the health polls read it again until it fits
            self._set_reason(reason)
            if self._on_models is not None:
                self._on_models(served)

    async def read_load(self) -> None:
        """Export a ready engine's own running and waiting counts; a report that cannot be read
        drops them rather than leave a stale value for the autoscaler."""
        if not self.ready:
            return
        epoch = self._epoch
        load = await self._engine.load()
        if epoch != self._epoch or not self.ready:
            return  # seen down meanwhile: its series were dropped and stay so
        if load is None:
            self._forget_load()
            return
        self._metrics.engine_reported.labels(self.name, "running").set(load.running)
        self._metrics.engine_reported.labels(self.name, "waiting").set(load.waiting)

    def _forget_load(self) -> None:
        self._metrics.engine_reported.remove_by_labels({"engine": self.name})

    async def _on_engine_exit(self, code: int) -> None:
        assert self._process is not None
        self._seen_down(EXITED)
        logger.error("engine %s process exited with code %s", self.name, code)
        await self._process.stop()  # reap whatever of its process group outlived it
        if self._settings.restart:
            self._metrics.engine_restarts.labels(self.name).inc()
            self._process.start()
            try:
                await self._process.wait_healthy(
                    self._engine.health, self._settings.startup_timeout_s
                )
            except EngineStartError as e:
                logger.error("engine restart failed: %s", e)
                await asyncio.sleep(RESTART_BACKOFF_S)
                return  # the next loop iteration sees the exit and tries again
            await self.check_now()
            return
        # Keep answering 503 for a moment so load balancers see /readyz fail, then exit.
        await asyncio.sleep(self._settings.exit_grace_s)
        self.fatal = True
        if self._on_fatal is not None:
            self._on_fatal(1)
