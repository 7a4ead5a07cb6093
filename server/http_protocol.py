"""The HTTP protocol `loragate serve` runs: uvicorn's h11 implementation with a deadline on each
request head and on each write stall. h11 rather than httptools (uvicorn's pick when both are
installed) because only h11 bounds the head's size (`h11_max_incomplete_event_size`); httptools
buffers headers of any size.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


def bounded_h11_protocol(head_timeout_s: float, send_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with two deadlines uvicorn lacks.

    On each request head: uvicorn's keep-alive timer starts only after a response and any byte
    cancels it, so without this a connection that never sends a request, or sends its headers a
    byte at a time, is held forever. Past the deadline the connection is closed, with no answer
    and no log line (a flood of them would flood the log).

    On each write stall: when the client stops reading, the socket's buffers fill, the transport
    pauses writing and the response's next `send` waits for it to resume, forever: a stream
    then holds its engine slot, adapter pin and tenant quota with nobody reading. When writing
    stays paused for `send_timeout_s`, the connection is aborted: uvicorn then reports the
    client as disconnected, and the response's disconnect handling releases what it held."""

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _stall_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            # The deadline runs from the first byte of a request after a response; the idle time
            # before it is uvicorn's keep-alive timeout.
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._arm_head_timer()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in (or the request refused)
                self._cancel_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            self._cancel_stall_timer()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall_timer is None:
                self._stall_timer = self.loop.call_later(send_timeout_s, self._send_stalled)

        def resume_writing(self) -> None:
            self._cancel_stall_timer()
            super().resume_writing()

        def _cancel_stall_timer(self) -> None:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None

        def _send_stalled(self) -> None:
            self._stall_timer = None
            logger.info(
                "client %s read nothing for %g s: connection aborted",
                _peer(self.client),
                send_timeout_s,
            )
            self.transport.abort()  # drops the unsent buffer; calls connection_lost

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return BoundedH11Protocol


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
