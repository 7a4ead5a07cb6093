"""Relay an engine's SSE stream to the client event by event: the engine-side adapter name is
replaced by the tenant's, the usage event the gateway asked for is read (and dropped unless the
client asked for it too), and a failure mid-stream becomes an in-band error event. Closing the
upstream is the caller's job (see serving.OpenStream). A stream the engine ends without its
closing `data: [DONE]` was cut (the engine died between two chunks): that is an error too,
never a clean end the client would take for a complete answer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from server.engines.base import EngineStream
from server.errors import EngineUnavailableError, LoragateError, sse_error_event

EVENT_END = b"\n\n"
DONE = b"data: [DONE]"
MAX_EVENT_BYTES = 4 << 20  # an engine event larger than this is not one we produce


@dataclass(frozen=True)
class RelayOptions:
    engine_model: bytes  # as the engine names the model in each event
    public_model: bytes  # as the client named it
    forward_usage: bool  # the client asked for stream_options.include_usage


def _is_usage_event(event: bytes) -> bool:
    return b'"usage"' in event and b'"choices":[]' in event.replace(b" ", b"")


def _usage_of(event: bytes) -> tuple[int, int] | None:
    try:
        usage = json.loads(event.removeprefix(b"data: "))["usage"]
        return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (ValueError, KeyError, TypeError):
        return None


async def relay_events(
    upstream: EngineStream,
    options: RelayOptions,
    on_first_event: Callable[[], None],
    on_usage: Callable[[int, int], None],
    on_error: Callable[[LoragateError], None],
    on_event: Callable[[bytes], None] | None = None,
) -> AsyncIterator[bytes]:
    """`on_event` sees every event as the client would (usage included), without the blank line."""
    # The engine-side name ("lg-" + a digest) appears nowhere but as the model's value.
    old = b'"' + options.engine_model + b'"'
    new = b'"' + options.public_model + b'"'
    buffer = b""
    first = True
    done = False
    try:
        async for chunk in upstream:
            buffer += chunk
            if len(buffer) > MAX_EVENT_BYTES:
                raise LoragateError("the engine sent an oversized stream event")
            *events, buffer = buffer.split(EVENT_END)
            out = []
            for event in events:
                done = done or event.strip() == DONE
                event = event.replace(old, new)
                if on_event is not None:
                    on_event(event)
                if _is_usage_event(event) and (usage := _usage_of(event)) is not None:
                    on_usage(*usage)
                    if not options.forward_usage:
                        continue
                out.append(event + EVENT_END)
            if out:
                if first:
                    on_first_event()
                    first = False
                yield b"".join(out)
        if buffer.strip():
            done = done or buffer.strip() == DONE
            rest = buffer.replace(old, new)
            if on_event is not None:
                on_event(rest)
            yield rest
        if not done:
            raise EngineUnavailableError("the engine ended the stream before it was complete")
    except LoragateError as e:
        on_error(e)
        yield sse_error_event(e)
